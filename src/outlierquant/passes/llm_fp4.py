"""LLM-FP4: 4-bit floating-point weights and activations with searched exponent biases and
the pre-shifted activation bias (Liu et al. 2023, "LLM-FP4: 4-Bit Floating-Point Quantized
Transformers").

A 4-bit float with exponent bias ``b`` covers ``[−max_b, max_b]``; changing ``b`` by a
real number is the same as dividing by a scale before rounding, so "searching the exponent
bias" is searching the value mapped onto the format's largest number. For every linear
``y = x @ W`` (``W``: ``[K, N]``) picked by :func:`~outlierquant.graph.analysis.analyze_graph`:

1. **Pre-shifted exponent bias** (the paper's reparameterization). The calibrated
   per-channel range ``a_j = max|x_j|`` gives each input channel its own bias; it is split
   into one tensor-wise real bias (the largest channel's) plus a per-channel integer
   ``k_j = ⌊log2(max_i a_i / a_j)⌋`` (:func:`~outlierquant.numerics.formats.preshift_exponents`).
   The integer part is pre-shifted into the weights::

       y = (x · diag(2^k)) @ (diag(2^−k) · W)

   with ``diag(2^k)`` folded into the producer (norm γ/β, the producing linear's columns —
   also through V → O and the gate product, as SmoothQuant folds) by
   :func:`~outlierquant.graph.edit.transform_group_channels`, so at run time only the one
   tensor-wise activation bias remains. Where nothing can absorb it (a post-norm LayerNorm
   that also feeds the residual, a down projection after GELU) an explicit ``Mul`` by the
   powers of two is inserted (``insert_mul``; counted in the record) — in a real FP4 kernel
   that is an add on the exponent field. Multiplying by a power of two is exact in float32,
   so this step leaves the fp32 function unchanged bit for bit (tested).
2. **Weights**: per output channel a searched maximum (``weight_ratios`` × the channel's
   ``max|W'|``) minimising the channel's output error ``Σ_k E[x'_k²]·(Q(W'_kn) − W'_kn)²``
   (uncorrelated inputs; :func:`~outlierquant.numerics.formats.search_channel_scales`), and
   per layer the best exponent/mantissa split of ``weight_formats`` (E2M1, E3M0, E1M2).
3. **Activations**: one static scale per tensor (the tensor-wise bias), searched on captured
   calibration rows (shifted by ``2^k`` in numpy, which is exactly what the rewritten graph
   computes) minimising the consumers' weighted rounding error
   (:func:`~outlierquant.numerics.formats.search_tensor_scale`), and the best split of
   ``activation_formats``.

The paper searches by minimising each layer's output reconstruction error over the
calibration set; we score with the diagonal (uncorrelated-channel) form of that error,
which needs no ``K × K`` products. Everything is **simulated**: onnxruntime has no FP4
kernels, so weights are stored already rounded (float32) and activations are rounded by
float ops (:func:`~outlierquant.emit.formats.insert_float_round`); the MatMuls run in
float32. Attention's activation × activation MatMuls and output layers stay in float.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.collect import capture_activations
from outlierquant.emit.formats import insert_float_round
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import (check_group, group_label, is_excluded, linear_label, producer_channels,
                                     splittable, transform_group_channels, write_linear_weight)
from outlierquant.graph.records import Linear
from outlierquant.graph.values import first_in_graph
from outlierquant.numerics.formats import (ACTIVATION_CLIP_RATIOS, FP4_SPLITS, WEIGHT_CLIP_RATIOS, preshift_exponents,
                                           quantize_float, search_channel_scales, search_tensor_scale)
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)

RELATIONS = ("norm", "linear", "v_to_o", "up_to_down", "none")


@dataclasses.dataclass(frozen=True)
class LlmFp4Options:
    """Options of :class:`LlmFp4Pass`.

    ``weight_formats`` / ``activation_formats``: the 4-bit exponent/mantissa splits searched
    per weight / per activation tensor (``e2m1``, ``e3m0``, ``e1m2``; one entry: no format
    search). ``weight_ratios`` / ``activation_ratios``: the clip ratios of the maximum-value
    search (1.0 = plain absmax). ``preshift``: fold the per-channel integer exponent bias of
    the activations into the weights (False: one tensor-wise bias only, the paper's
    ablation). ``max_shift``: the largest per-channel shift (binades). ``insert_mul``: where
    no producer can absorb the shift, insert a ``Mul`` by powers of two (else that tensor is
    not shifted). ``quantize``: False stops after the pre-shift (an exact float rewrite, for
    the equivalence test). ``max_rows``: calibration rows sampled per activation for its
    search. ``skip_output_layers``: leave linears whose output is a graph output (an lm_head)
    in float. ``exclude``: node-name patterns left in float.
    """

    weight_formats: tuple[str, ...] = ("e2m1",)
    activation_formats: tuple[str, ...] = ("e2m1",)
    weight_ratios: tuple[float, ...] = WEIGHT_CLIP_RATIOS
    activation_ratios: tuple[float, ...] = ACTIVATION_CLIP_RATIOS
    preshift: bool = True
    max_shift: int = 8
    insert_mul: bool = True
    quantize: bool = True
    max_rows: int = 512
    skip_output_layers: bool = True
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self)
        for field in ("weight_formats", "activation_formats"):
            value = getattr(self, field)
            unknown = [name for name in value if name not in FP4_SPLITS]
            if not value or unknown:
                raise ValueError(f"{field}={list(value)!r}: a non-empty list of {', '.join(FP4_SPLITS)}")
        for field in ("weight_ratios", "activation_ratios"):
            value = getattr(self, field)
            if not value or any(not 0.0 < float(r) <= 1.0 for r in value):
                raise ValueError(f"{field}: a non-empty list of numbers in (0, 1]")
        if not 0 <= self.max_shift <= 30:
            raise ValueError(f"max_shift={self.max_shift}: an integer in 0..30")
        if self.max_rows < 1:
            raise ValueError(f"max_rows={self.max_rows}: must be >= 1")
        if not self.quantize and not self.preshift:
            raise ValueError("quantize and preshift are both off: nothing to do")


class LlmFp4Pass(OutlierPass):
    """FP4 W4A4 with searched exponent biases and the pre-shifted activation bias."""

    name = "llm-fp4"
    options_type = LlmFp4Options
    needs_stats = True  # per-channel ranges (pre-shift) and second moments (weight search)
    needs_feeds = True  # calibration rows for the activation bias search

    def reads(self) -> frozenset[str]:
        return frozenset({"stats", "feeds"}) if self.options.quantize else frozenset({"stats"})

    def _select(self, model: ir.Model) -> tuple[list[Linear], list[dict[str, str]]]:
        layers: list[Linear] = []
        skipped: list[dict[str, str]] = []
        for linear in analyze_graph(model).linears:
            reason = splittable(linear) or ""
            if not reason and self.options.skip_output_layers and linear.output.is_graph_output():
                reason = "output layer (skip_output_layers)"
            elif not reason and is_excluded(linear, self.options.exclude):
                reason = "excluded"
            if reason:
                skipped.append({"linear": linear.name, "skipped": reason})
            else:
                layers.append(linear)
        return layers, skipped

    def calibration_targets(self, model: ir.Model) -> list:
        return sorted({linear.input.name for linear in self._select(model)[0]})

    # -- step 1: the pre-shift -----------------------------------------------------------

    def preshift(self, model: ir.Model, chosen: set[int]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], int]:
        """Fold ``2^k`` per channel into each group's producer and ``2^−k`` into its linears.

        Returns (input name before the rewrite → the per-channel factor ``2^k`` now applied
        to it, the group entries, ops inserted)."""
        stats = self.require_stats()
        factors: dict[str, np.ndarray] = {}
        entries: list[dict[str, Any]] = []
        inserted = 0
        for group in analyze_graph(model).groups:
            entry: dict[str, Any] = {"linears": [linear.name for linear in group.linears],
                                     "relation": group.producer.relation}
            entries.append(entry)
            if not all(id(linear.node) in chosen for linear in group.linears):
                entry["skipped"] = "a linear of the group is not quantized"
                continue
            reason = check_group(group, stats, allow_insert=self.options.insert_mul, relations=RELATIONS)
            if reason:
                entry["skipped"] = reason
                continue
            name = group.input.name
            absmax = np.asarray(stats[name].absmax, dtype=np.float64)
            per_producer, cmap = producer_channels(group, absmax)  # GQA: the V channel's largest reader
            k_producer = preshift_exponents(np.nan_to_num(per_producer), self.options.max_shift)
            k = k_producer[cmap] if cmap is not None else k_producer
            if not k.any():
                entry["skipped"] = "every channel is within one binade of the largest"
                continue
            s = np.ldexp(1.0, -k)  # x ← x / s = x · 2^k, W ← diag(s) · W
            s_producer = np.ldexp(1.0, -k_producer) if cmap is not None else None
            ops = transform_group_channels(model.graph, group, s, s_producer=s_producer)
            inserted += ops
            factors[name] = np.ldexp(1.0, k)
            entry.update({"folded": ops == 0, "inserted_ops": ops, "shifted_channels": int((k > 0).sum()),
                          "max_shift": int(k.max()), "mean_shift": float(k.mean())})
            logger.info("llm-fp4: pre-shift [%s]: %d channels, up to 2^%d (%s)", group_label(group),
                        int((k > 0).sum()), int(k.max()), "folded" if ops == 0 else "Mul inserted")
        return factors, entries, inserted

    # -- run -----------------------------------------------------------------------------

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        options = self.options
        stats = self.require_stats()
        layers, skipped = self._select(model)
        chosen = {id(linear.node) for linear in layers}
        original_input = {id(linear.node): linear.input.name for linear in layers}
        rows: dict[str, np.ndarray] = {}
        if options.quantize and layers:
            # captured before the rewrite: the shifted rows are these times 2^k, exactly
            rows = capture_activations(model, self.feeds, sorted(set(original_input.values())),
                                       max_rows=options.max_rows)
        factors, group_entries, inserted = self.preshift(model, chosen) if options.preshift else ({}, [], 0)
        record: dict[str, Any] = {"options": dataclasses.asdict(options), "simulated": options.quantize,
                                  "preshift_groups": group_entries,
                                  "preshifted_groups": sum(1 for e in group_entries if "skipped" not in e),
                                  "inserted_ops": inserted, "skipped": skipped}
        if not options.quantize:
            return bool(factors), record

        # the linears as they stand after the rewrite (new weight values, maybe new inputs)
        current = [linear for linear in analyze_graph(model).linears if id(linear.node) in chosen]
        by_tensor: dict[str, list[Linear]] = {}
        for linear in current:
            by_tensor.setdefault(original_input[id(linear.node)], []).append(linear)
        weight_entries: list[dict[str, Any]] = []
        activation_entries: list[dict[str, Any]] = []
        rounded = 0
        for name, linears in by_tensor.items():
            st = stats[name] if name in stats else None
            factor = factors.get(name, np.ones(linears[0].in_features))
            weights = [np.asarray(linear.weight_array(), dtype=np.float32) for linear in linears]
            # activation: one tensor-wise scale on the shifted rows
            if st is None or name not in rows:
                activation_entries.append({"tensor": name, "skipped": f"no calibration statistics for {name!r}"})
            else:
                shifted = (rows[name] * factor[None, :]).astype(np.float32)
                importance = sum((w.astype(np.float64) ** 2).sum(axis=1) for w in weights)
                absmax = float((np.asarray(st.absmax) * factor).max())
                best = None
                for split in options.activation_formats:
                    scale, ratio, error = search_tensor_scale(shifted, FP4_SPLITS[split], importance,
                                                              options.activation_ratios, absmax=absmax)
                    if best is None or error < best[3]:
                        best = (split, scale, ratio, error)
                split, scale, ratio, error = best
                label = linear_label(linears[0], f"fp4_{split}")
                x = linears[0].node.inputs[0]
                anchor = first_in_graph(model.graph, [linear.node for linear in linears])
                y = insert_float_round(model, x, anchor, FP4_SPLITS[split], scale, f"{label}_act")
                for linear in linears:
                    linear.node.replace_input_with(0, y)
                rounded += 1
                activation_entries.append({"tensor": name, "format": f"fp4_{split}", "scale": scale,
                                           "clip_ratio": ratio})
            # weights: per-channel maximum search, one split per layer
            second = (np.asarray(st.mean_sq, dtype=np.float64) * factor ** 2) if st is not None else None
            for linear, weight in zip(linears, weights):
                best = None
                for split in options.weight_formats:
                    scales, errors = search_channel_scales(weight, FP4_SPLITS[split], second, options.weight_ratios)
                    if best is None or errors.sum() < best[2].sum():
                        best = (split, scales, errors)
                split, scales, _ = best
                dequantized = quantize_float(weight, FP4_SPLITS[split], scales[None, :])
                write_linear_weight(model.graph, linear, dequantized, f"{linear_label(linear, 'fp4')}_weight")
                norm = float(np.linalg.norm(weight)) or 1.0
                weight_entries.append({"linear": linear.name, "format": f"fp4_{split}",
                                       "relative_error": float(np.linalg.norm(dequantized - weight) / norm)})
        splits = lambda entries: {s: sum(1 for e in entries if e.get("format") == f"fp4_{s}") for s in FP4_SPLITS}
        record.update({
            "formats": {"weights": {"form": "stored dequantized (float32)", "per_channel_scale": "searched",
                                    "splits": splits(weight_entries), "simulated": True},
                        "activations": {"form": "float ops, one static searched scale per tensor",
                                        "splits": splits(activation_entries), "simulated": True}},
            "matmul": "float32 (onnxruntime has no FP4 kernels: no speed-up)",
            "attention_matmuls": "float",
            "linear_layers": len(weight_entries),
            "activation_tensors": rounded,
            "weight_relative_error_mean": float(np.mean([e["relative_error"] for e in weight_entries]))
            if weight_entries else None,
            "weights": weight_entries,
            "activations": activation_entries,
        })
        logger.info("llm-fp4: %d linears, %d activation tensors, %d groups pre-shifted", len(weight_entries), rounded,
                    record["preshifted_groups"])
        return bool(weight_entries), record
