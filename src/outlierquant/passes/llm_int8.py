"""LLM.int8(): outlier input channels in float, the rest int8, summed.

**LLM.int8()** — Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale". For a linear ``y = x @ W`` (``x [..., K]``, ``W [K, N]``) and a set
``O`` of outlier input channels, with ``I`` the other channels::

    y = x[..., I] @ W[I, :]  +  x[..., O] @ W[O, :]
      = (x ⊙ m) @ W_I        +  Gather(x, O) @ W_O

where ``m`` is the 0/1 mask of ``I`` and ``W_I`` is ``W`` with the rows of ``O`` zeroed
(so the int8 GEMM keeps its full width ``K`` and no scatter is needed). The first term is
computed *vector-wise* in int8: per-token activation scales ``s_t = max_k |(x⊙m)_tk|/127``
and per-output-channel weight scales ``w_n = max_k |W_I,kn|/127``; the second stays in
float (``|O|`` is a few channels, so it costs a thin ``[T, |O|] @ [|O|, N]`` GEMM). Because
``O`` is removed before the per-token scale is taken, one huge channel no longer
stretches every token's quantization grid — the whole point of the decomposition.

``O`` comes from the calibration statistics (the static, portable form):

- ``criterion: threshold`` — channels with calibrated ``max |x_j| >= threshold`` (paper:
  6.0); ``max_share`` caps the share of a layer's channels kept in float (largest first);
- ``criterion: top_k`` — the ``top_k`` channels with the widest calibrated range
  ``max x_j − min x_j``;
- ``criterion: relative`` — channels with ``max |x_j| >= ratio · median_k max |x_k|``: the
  absolute 6.0 was set for the activation scale of 6.7B+ models; small models put their
  norm outputs at other scales (SmolLM2: many late down-projection inputs exceed 6 in
  most channels, while q/k/v inputs carry outliers of 2-5 that cost per-token
  resolution), so a multiple of the layer's typical channel is the scale-free form.

The paper's extra condition (the outlier must hit ≥ 25 % of the layers / 6 % of the
sequence dimensions) needs per-channel exceedance counts, which ``ActivationStats`` does
not record; ``runtime_threshold > 0`` adds bitsandbytes' dynamic form on top: channels with
``|x| >= runtime_threshold`` in the current batch also go through float.

Forms written (``kernels`` / ``standard_form``):

- with the kernel library (``kernels`` ``custom``, or ``auto`` and
  :func:`outlierquant.custom_ops.available`): our ``ai.outlierquant::DynamicQuantizePerToken``
  feeding onnxruntime's ``MatMulIntegerToFloat`` plus the float ``Gather`` → ``MatMul``
  (``kernel_form: gemm``: onnxruntime prepacks the constant int8 weight), or the single
  ``ai.outlierquant::MixedInt8MatMul`` node (``kernel_form: node``, the default, and
  always with a ``runtime_threshold``);
- otherwise the standard-op form of that op (``standard_form: integer``): per-token
  quantization with Abs/ReduceMax/Div/Round/Clip, ``MatMulInteger`` (u8 with zero point
  128 × s8), rescale, plus ``Gather`` → float ``MatMul``. Real int8 arithmetic, runs on any
  onnxruntime with nothing registered;
- or (``standard_form: qdq``) the float split with per-token Q/DQ declared through the
  quantizer's :func:`~outlierquant.emit.qdq.insert_qdq` (simulated: float GEMM);
- ``quantize: false`` writes only the float split ``Mul(x, m) @ W_I + Gather(x, O) @ W_O``,
  which is exactly equivalent to the original layer (tested to 1e-4).

With ``activations: static`` and ``dynamic_matmuls`` the attention MatMuls get static QDQ
too; ``probs_residual`` then adds a second int8 MatMul on the rounding residual of the
softmax probabilities in probs·V, where their uint8 grid would drop a measured share of
the attention mass (:func:`outlierquant.emit.qdq.add_probs_residual`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.stats import ActivationStats
from outlierquant.emit.kernels import use_kernel
from outlierquant.emit.mixed_int8 import float_split_builder, mixed_int8_builder, without_channels
from outlierquant.emit.qdq import QuantConfig, add_probs_residual, attention_matmul_declarations, insert_qdq
from outlierquant.errors import CalibrationError
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.attention import probs_input_index, probs_step, quantized_source
from outlierquant.graph.edit import is_excluded, linear_label, replace_linear, splittable
from outlierquant.graph.values import MS_DOMAIN
from outlierquant.numerics.estimates import lost_mass
from outlierquant.numerics.outliers import select_outlier_channels
from outlierquant.numerics.rounding import quantease_int8_weight, second_moment
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LlmInt8Options:
    """Options of :class:`LlmInt8SplitPass` (see the module docstring).

    ``criterion``: ``threshold`` (calibrated ``max|x_j| >= threshold``) or ``top_k``
    (``top_k`` widest channels per layer). ``max_share``: at most this share of a layer's
    input channels in float (largest first; 0 = no cap). ``quantize``: false writes the
    equivalent float split only. ``kernels``: ``auto`` (the custom kernel when it loads),
    ``custom`` (the kernel or an error), ``standard`` (standard ops). ``standard_form``: without the kernel, ``integer``
    (MatMulInteger, real int8) or ``qdq`` (per-token Q/DQ, simulated). ``runtime_threshold``:
    > 0 adds the dynamic outlier detection at run time. ``exclude``: substrings of node
    names left untouched (e.g. ``lm_head``). ``reduce_range``: int8 weights in [-63, 63]
    for CPUs whose u8×s8 GEMM can saturate (no VNNI).
    """

    criterion: Literal["threshold", "top_k", "relative"] = "threshold"
    threshold: float = 6.0
    top_k: int = 0
    #: ``criterion: relative``: channels whose calibrated max |x_j| reaches this multiple
    #: of the layer's median channel max (scale-free, unlike the absolute 6.0)
    ratio: float = 4.0
    max_share: float = 0.0
    quantize: bool = True
    kernels: Literal["auto", "standard", "custom"] = "auto"
    standard_form: Literal["integer", "qdq"] = "integer"
    runtime_threshold: float = 0.0
    #: with the kernel library: ``node`` writes the single MixedInt8MatMul; ``gemm`` our
    #: per-token quantizer (once per input tensor) feeding onnxruntime's
    #: MatMulIntegerToFloat, which prepacks the constant weight (MiniLM, one thread, speed-up
    #: over fp32 at batch 1 / 16: 2.45x / 1.97x against 2.02x / 2.05x for ``node``: at 16
    #: sentences its separate rescale and side-path passes cost about what the packing
    #: saves). A ``runtime_threshold`` needs ``node``.
    kernel_form: Literal["gemm", "node"] = "node"
    exclude: tuple[str, ...] = ()
    reduce_range: bool = False
    #: the int8 part's activations: ``per_token`` (vector-wise, the paper) or ``static``
    #: (one calibrated per-tensor scale over the inlier channels; written as QDQ that
    #: onnxruntime runs as real int8 — the static W8A8 form with float outlier channels)
    activations: Literal["per_token", "static"] = "per_token"
    #: ``activations: static`` only: also quantize the activation x activation MatMuls
    #: (attention QK^T and probs x V) with static per-tensor QDQ, so every MatMul runs int8
    dynamic_matmuls: bool = False
    #: ``dynamic_matmuls`` only: add a second int8 MatMul on the rounding residual of the
    #: attention probabilities in probs·V (``P̂·V̂ + R̂·V̂``, see ``quantize.add_probs_residual``):
    #: ``none``; ``all`` probs·V MatMuls; ``gated``: those whose calibrated probabilities
    #: lose at least ``probs_lost_mass`` of their mass below half a uint8 step (measured on
    #: the calibration data, so the pass then needs it, not only statistics; the layers'
    #: [batch, heads, T, T] probabilities are fetched as many at a time as fit in 512 MB)
    probs_residual: Literal["none", "gated", "all"] = "none"
    probs_lost_mass: float = 0.005
    #: int8 weight rounding of the inlier part: ``rtn`` or ``quantease`` (coordinate descent
    #: on tr(ΔᵀΣΔ) against the calibration covariance, float-channel rows held at zero)
    weight_rounding: Literal["rtn", "quantease"] = "rtn"
    quantease_damp: float = 1.0
    #: leave linears whose output is a graph output (the lm_head) in float, as the
    #: transformers / bitsandbytes LLM.int8() integration does by default
    skip_output_layers: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.ratio > 1.0:
            raise ValueError(f"ratio={self.ratio}: must be > 1")
        if not self.threshold > 0:
            raise ValueError(f"threshold={self.threshold}: must be > 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")
        if self.criterion == "top_k" and self.top_k == 0:
            raise ValueError("top_k: criterion 'top_k' needs top_k >= 1")
        if not 0.0 <= self.max_share < 1.0:
            raise ValueError(f"max_share={self.max_share}: allowed [0, 1) (0: no cap)")
        if self.standard_form not in ("integer", "qdq"):
            raise ValueError(f"standard_form={self.standard_form!r}: allowed 'integer', 'qdq'")
        if self.runtime_threshold < 0:
            raise ValueError(f"runtime_threshold={self.runtime_threshold}: must be >= 0 (0: off)")
        if self.activations == "static" and (self.kernels == "custom" or self.runtime_threshold > 0):
            raise ValueError("activations='static' is written as QDQ: needs kernels auto/standard and no runtime_threshold")
        if not float(self.quantease_damp) >= 0.0:
            raise ValueError(f"quantease_damp={self.quantease_damp!r}: must be >= 0")
        if self.dynamic_matmuls and self.activations != "static":
            raise ValueError("dynamic_matmuls: needs activations 'static' (the per-token forms leave QK^T in float)")
        if self.probs_residual != "none" and not self.dynamic_matmuls:
            raise ValueError("probs_residual: needs dynamic_matmuls (the probabilities are quantized only then)")
        if not 0.0 <= float(self.probs_lost_mass) < 1.0:
            raise ValueError(f"probs_lost_mass={self.probs_lost_mass!r}: allowed [0, 1)")
        if self.kernel_form not in ("gemm", "node"):
            raise ValueError(f"kernel_form={self.kernel_form!r}: allowed 'gemm', 'node'")
        if self.runtime_threshold > 0 and self.standard_form == "qdq":
            raise ValueError("runtime_threshold: needs standard_form 'integer' or the kernel")


class LlmInt8SplitPass(OutlierPass):
    """LLM.int8(): outlier input channels in float, the rest vector-wise int8, summed."""

    name = "llm-int8"
    needs_stats = True
    #: with ``quantize: false`` the pass is the equivalent float split (tested)
    claims_equivalence = False
    options_type = LlmInt8Options

    needs_feeds = True  # probs_residual: gated measures the probabilities on the calibration data

    def reads(self) -> frozenset[str]:
        return frozenset({"stats", "feeds"} if self.options.probs_residual == "gated" else {"stats"})

    def covariance_targets(self, model: ir.Model) -> list[str]:
        """Every linear input, when QuantEase rounds the int8 weights (it needs Σ)."""
        if self.options.weight_rounding != "quantease":
            return []
        return analyze_graph(model).input_names()

    def form(self) -> str:
        """``float``, ``kernel``, ``integer`` or ``qdq``: what :meth:`run` writes."""
        options = self.options
        if not options.quantize:
            return "float"
        if options.activations == "static":
            return "qdq"
        return "kernel" if use_kernel(options.kernels) else options.standard_form

    def _written_form(self, form: str) -> str:
        """The kernel form as written: ``gemm`` where asked for and no runtime threshold needs the node."""
        if form == "kernel" and self.options.kernel_form == "gemm" and not self.options.runtime_threshold:
            return "gemm"
        return form

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        stats = self.require_stats()
        options = self.options
        form = self.form()
        graph = model.graph
        opset = model.opset_imports.get("", 13)
        layers: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        declarations = []
        masked_stats: dict[str, Any] = {}
        rounded: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        # linears reading one tensor with the same float channels (q/k/v) share the masked
        # input, its QDQ and the gathered outlier columns
        shared_inputs: dict[tuple[str, bytes], tuple[ir.Value, ir.Value | None]] = {}
        shared_quantized: dict[tuple[str, bytes], tuple] = {}  # the gemm form's, likewise
        total_in = total_float = 0
        attention = _activation_matmuls(model, stats, masked_stats) if options.dynamic_matmuls else []
        declarations.extend(attention)
        for linear in analyze_graph(model).linears:
            reason = splittable(linear)
            if reason is None and is_excluded(linear, options.exclude):
                reason = "excluded by option"
            if reason is None and options.skip_output_layers and linear.output.is_graph_output():
                reason = "output layer (skip_output_layers)"
            if reason is None and linear.input.name not in stats:
                reason = "no calibration statistics for its input"
            if reason:
                skipped.append({"linear": linear.name, "reason": reason})
                logger.info("llm_int8: skip %s: %s", linear.name, reason)
                continue
            st = stats[linear.input.name]
            weight = np.asarray(linear.weight_array(), dtype=np.float32)
            k = weight.shape[0]
            if st.channels != k:
                skipped.append({"linear": linear.name, "reason": f"statistics have {st.channels} channels, weight {k}"})
                continue
            channels = select_outlier_channels(st.absmax, st.maximum - st.minimum, criterion=options.criterion,
                                                   threshold=options.threshold, top_k=options.top_k,
                                                   ratio=options.ratio, max_share=options.max_share)
            label = linear_label(linear, "llm_int8")
            prepared = None
            if options.weight_rounding == "quantease" and form != "float":

                inliers = weight.copy()
                inliers[channels] = 0.0
                prepared = quantease_int8_weight(inliers, second_moment(st, options.quantease_damp)[0],
                                                 fixed_rows=channels)
            if form == "float" or form == "qdq":
                build, decl = float_split_builder(weight, channels, label, shared_inputs,
                                                   mask=form != "qdq" or options.activations != "static",
                                                   source=linear.weight_array)
                new_nodes = replace_linear(graph, linear, build, label)
                if form == "qdq":
                    declared = decl(new_nodes, options.activations)
                    declarations.extend(declared)
                    if prepared is not None:
                        rounded[(declared[1].consumer, 1)] = prepared
                    if options.activations == "static":
                        masked_stats[declared[0].tensor] = without_channels(st, channels)
            else:
                build = mixed_int8_builder(weight, channels, label, self._written_form(form), opset,
                                           reduce_range=options.reduce_range,
                                           runtime_threshold=options.runtime_threshold, prepared=prepared,
                                           shared=shared_quantized)
                replace_linear(graph, linear, build, label)
            total_in += k
            total_float += int(channels.size)
            layers.append({
                "linear": linear.name,
                "in_features": k,
                "float_channels": int(channels.size),
                "channels": channels.tolist()[:32],
                "max_input": float(st.tensor_absmax),
            })
        if declarations:

            insert_qdq(model, declarations, ActivationStats(masked_stats),
                       QuantConfig(activations=options.activations, dynamic_matmuls=False), rounded)
        probs = self._probs_residual(model, {decl.consumer for decl in attention}) if attention else None
        if form == "kernel" and layers:
            from outlierquant.custom_ops import DOMAIN

            model.opset_imports.setdefault(DOMAIN, 1)
            if self._written_form(form) == "gemm":
                model.opset_imports.setdefault(MS_DOMAIN, 1)
        share = total_float / total_in if total_in else 0.0
        logger.info("llm_int8: %d layers (%s form), %.3f%% of input channels in float", len(layers), form, 100 * share)
        return bool(layers), {
            "options": dataclasses.asdict(options),
            "form": form,
            "kernel_form": ("gemm" if self._written_form(form) == "gemm" else "node") if form == "kernel" else None,
            "layers": layers,
            "skipped": skipped,
            "float_channel_share": share,
            "float_channels": total_float,
            "input_channels": total_in,
            "simulated": form == "qdq" and options.activations == "per_token",
            **({"probs_residual": probs} if probs is not None else {}),
            **({"summary": [f"residual int8 attention probabilities in {probs['residual_matmuls']} of "
                            f"{len(probs['matmuls'])} probs x V MatMuls"]} if probs else {}),
        }

    def _probs_residual(self, model: ir.Model, consumers: set[str]) -> dict[str, Any] | None:
        """Add the residual int8 MatMul to the quantized probs·V MatMuls the option selects."""

        options = self.options
        if options.probs_residual == "none":
            return None
        # (node, probs input index or None, why not) for every probs·V, in graph order
        sites: list[tuple[ir.Node, int | None, str]] = []
        for node in model.graph:
            if node.name not in consumers or node.op_type != "MatMul":
                continue
            index = probs_input_index(node)
            if index is None:
                continue
            if probs_step(node, index) is None:
                sites.append((node, None, "the probabilities' QDQ is not one uint8 scale with zero point 0"))
            elif node.outputs[0].is_graph_output():
                sites.append((node, None, "its output is a graph output"))
            else:
                sites.append((node, index, ""))
        candidates = [(node, index) for node, index, _ in sites if index is not None]
        shares: dict[str, float] = {}
        if options.probs_residual == "gated" and candidates:
            from outlierquant.calibration.collect import activation_budget, require_finite, stream_tensors

            if not self.feeds:
                raise CalibrationError("llm_int8: probs_residual 'gated' measures the attention probabilities "
                                       "on calibration data, and none was given")
            steps = {quantized_source(node.inputs[index]).name: probs_step(node, index) for node, index in candidates}
            sums = {name: [0.0, 0.0] for name in steps}

            def visit(name: str, array: np.ndarray, piece: dict, sample: int) -> None:
                require_finite(array, name, f"calibration sample {sample}")
                # padding unpad could not remove: leave its query rows out
                below, total = lost_mass(array, steps[name], piece.get("attention_mask"))
                sums[name][0] += below
                sums[name][1] += total

            # every layer's probabilities are [batch, heads, T, T]: fetch as many layers per
            # pass over the data as fit in the model's calibration budget (T² grows fast: 30
            # layers of 9 heads are 18 MB per sample at T = 128, 4.5 GB at T = 2048), and run
            # same-shape samples together within it (the sums do not depend on how samples are
            # grouped). The budget follows the model's size (activation_budget): a fixed 512
            # MiB was default's peak on the 65k-vocabulary bench model (2.45x its file)
            budget = activation_budget(model)
            stream_tensors(model, self.feeds, list(steps), visit, fetch_bytes=budget, batch_bytes=budget)
            shares = {name: below / total if total > 0 else 0.0 for name, (below, total) in sums.items()}
        entries, added = [], 0
        for node, index, reason in sites:
            entry: dict[str, Any] = {"matmul": node.name, "residual": False}
            if index is None:
                entry["reason"] = reason
                entries.append(entry)
                continue
            share = shares.get(quantized_source(node.inputs[index]).name)
            entry["residual"] = options.probs_residual == "all" or (share is not None
                                                                    and share >= options.probs_lost_mass)
            if share is not None:
                entry["lost_mass"] = round(share, 6)
            if entry["residual"]:
                add_probs_residual(model.graph, node, index)
                added += 1
            entries.append(entry)
        logger.info("llm_int8: residual int8 probabilities in %d of %d probs x V MatMuls", added, len(entries))
        return {"mode": options.probs_residual, "lost_mass_gate": options.probs_lost_mass,
                "residual_matmuls": added, "matmuls": entries}


def _activation_matmuls(model: ir.Model, stats, collected: dict) -> list:
    """Static declarations for attention QKᵀ / probs·V inputs that have calibration statistics
    (their statistics copied into ``collected``)."""

    candidates = attention_matmul_declarations(model, "static")
    missing = {d.consumer for d in candidates if d.tensor not in stats}
    declared = [d for d in candidates if d.consumer not in missing]
    for decl in declared:
        collected[decl.tensor] = stats[decl.tensor]
    return declared
