"""Mixed-precision outlier split and layer splitting: LLM.int8() and SplitQuant.

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

- ``ai.outlierquant::MixedInt8MatMul`` (the custom kernel) when ``kernels`` is ``always``,
  or ``auto`` and :func:`outlierquant.custom_ops.available`;
- otherwise the standard-op form of that op (``standard_form: integer``): per-token
  quantization with Abs/ReduceMax/Div/Round/Clip, ``MatMulInteger`` (u8 with zero point
  128 × s8), rescale, plus ``Gather`` → float ``MatMul``. Real int8 arithmetic, runs on any
  onnxruntime with nothing registered;
- or (``standard_form: qdq``) the float split with per-token Q/DQ declared through the
  quantizer's :func:`~outlierquant.passes.quantize.insert_qdq` (simulated: float GEMM);
- ``quantize: false`` writes only the float split ``Mul(x, m) @ W_I + Gather(x, O) @ W_O``,
  which is exactly equivalent to the original layer (tested to 1e-4).

With ``activations: static`` and ``dynamic_matmuls`` the attention MatMuls get static QDQ
too; ``probs_residual`` then adds a second int8 MatMul on the rounding residual of the
softmax probabilities in probs·V, where their uint8 grid would drop a measured share of
the attention mass (:func:`outlierquant.passes.quantize.add_probs_residual`).

**SplitQuant** — Song & Lin 2025, "SplitQuant: Layer Splitting for Low-Bit Neural
Network Quantization". The weight values of a layer are clustered into three groups
(lower / middle / upper, 1-D k-means on the values, or fixed quantile thresholds) and the
layer becomes three layers reading the same input::

    y = x @ W = x @ (W ⊙ M_low) + x @ (W ⊙ M_mid) + x @ (W ⊙ M_up)

with ``M_*`` disjoint 0/1 masks covering ``W``. Each part is quantized with its own
per-output-channel scale, so the many small middle values get a fine grid that the few
extreme ones no longer dictate. The float split is exact up to float summation order;
the bias stays on the sum.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.stats import ActivationStats
from outlierquant.errors import CalibrationError
from outlierquant.passes.analysis import Linear, analyze_graph
from outlierquant.passes.base import OutlierPass, constant_array

logger = logging.getLogger(__name__)

__all__ = [
    "LlmInt8Options",
    "LlmInt8SplitPass",
    "SplitQuantOptions",
    "SplitQuantPass",
    "select_outlier_channels",
    "replace_value",
    "split_weight_clusters",
    "without_channels",
]


# -- shared graph plumbing -------------------------------------------------------------------


def splittable(linear: Linear) -> str | None:
    """Why ``linear`` cannot be rewritten as ``x @ W[K, N]`` (+ bias), or None when it can."""
    node = linear.node
    if linear.op_type not in ("MatMul", "Gemm"):
        return f"{linear.op_type} is not a MatMul/Gemm"
    weight = constant_array(linear.weight)
    if weight is None or weight.dtype != np.float32:
        return "weight is not a float32 constant"
    if weight.ndim != 2:
        return f"weight has rank {weight.ndim} (expected 2)"
    if linear.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0):
            return "Gemm with transA"
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return "Gemm with alpha/beta != 1"
    return None


def _gemm_bias(linear: Linear) -> np.ndarray | None:
    if linear.op_type == "Gemm" and len(linear.node.inputs) > 2 and linear.node.inputs[2] is not None:
        return constant_array(linear.node.inputs[2])
    return None


def replace_linear(graph: ir.Graph, linear: Linear, build, label: str) -> list[ir.Node]:
    """Replace ``linear.node`` by the nodes ``build(tape, x) -> y`` writes.

    Nodes and initializers get unique names prefixed ``label``; a Gemm's bias is added
    after ``y``. Returns the inserted nodes (graph order).
    """
    tape = ir.tape.Tape()
    x = linear.node.inputs[0]
    y = build(tape, x)
    bias = _gemm_bias(linear)
    if bias is not None:
        y = tape.op("Add", [y, tape.initializer(ir.tensor(bias.astype(np.float32)), name=f"{label}_bias")])
    for value in tape.initializers:
        value.name = _unique_initializer_name(graph, value.name)
        graph.register_initializer(value)
    for index, node in enumerate(tape.nodes):
        node.name = f"{label}/{node.op_type}_{index}"
        for j, output in enumerate(node.outputs):
            if not output.name:
                output.name = f"{label}/{node.op_type}_{index}_out{j}"
    old = linear.node.outputs[0]
    y.type = old.type
    y.shape = old.shape
    graph.insert_before(linear.node, tape.nodes)
    replace_value(graph, old, y)
    constants = [v for v in linear.node.inputs[1:] if v is not None]
    graph.remove(linear.node, safe=True)
    for value in constants:
        if value.name in graph.initializers and not value.uses() and not value.is_graph_output():
            del graph.initializers[value.name]
    return list(tape.nodes)


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every reader of ``old`` reads ``new``; a graph output keeps its name."""
    was_output = old.is_graph_output()
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:  # keep the model's output name
        old.name = f"{name}_replaced"
        new.name = name


def _unique_initializer_name(graph: ir.Graph, hint: str) -> str:
    if hint not in graph.initializers:
        return hint
    i = 1
    while f"{hint}_{i}" in graph.initializers:
        i += 1
    return f"{hint}_{i}"


def _label(linear: Linear, suffix: str) -> str:
    base = (linear.node.name or linear.output.name or "linear").strip("/").replace("/", "_")
    return f"{base}_{suffix}"


def _excluded(linear: Linear, exclude: tuple[str, ...]) -> bool:
    name = linear.node.name or ""
    return any(pattern and pattern in name for pattern in exclude)


# -- LLM.int8() --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlmInt8Options:
    """Options of :class:`LlmInt8SplitPass` (see the module docstring).

    ``criterion``: ``threshold`` (calibrated ``max|x_j| >= threshold``) or ``top_k``
    (``top_k`` widest channels per layer). ``max_share``: at most this share of a layer's
    input channels in float (largest first; 0 = no cap). ``quantize``: false writes the
    equivalent float split only. ``kernels``: ``auto`` (the custom kernel when it loads),
    ``always``, ``never``. ``standard_form``: without the kernel, ``integer``
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
    kernels: Literal["auto", "always", "never"] = "auto"
    standard_form: Literal["integer", "qdq"] = "integer"
    runtime_threshold: float = 0.0
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
        if self.criterion not in ("threshold", "top_k", "relative"):
            raise ValueError(f"criterion={self.criterion!r}: allowed 'threshold', 'top_k', 'relative'")
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
        if self.kernels not in ("auto", "always", "never"):
            raise ValueError(f"kernels={self.kernels!r}: allowed 'auto', 'always', 'never'")
        if self.standard_form not in ("integer", "qdq"):
            raise ValueError(f"standard_form={self.standard_form!r}: allowed 'integer', 'qdq'")
        if self.runtime_threshold < 0:
            raise ValueError(f"runtime_threshold={self.runtime_threshold}: must be >= 0 (0: off)")
        if self.activations not in ("per_token", "static"):
            raise ValueError(f"activations={self.activations!r}: allowed 'per_token', 'static'")
        if self.activations == "static" and (self.kernels == "always" or self.runtime_threshold > 0):
            raise ValueError("activations='static' is written as QDQ: needs kernels auto/never and no runtime_threshold")
        if self.weight_rounding not in ("rtn", "quantease"):
            raise ValueError(f"weight_rounding={self.weight_rounding!r}: allowed 'rtn', 'quantease'")
        if not float(self.quantease_damp) >= 0.0:
            raise ValueError(f"quantease_damp={self.quantease_damp!r}: must be >= 0")
        if self.dynamic_matmuls and self.activations != "static":
            raise ValueError("dynamic_matmuls: needs activations 'static' (the per-token forms leave QK^T in float)")
        if self.probs_residual not in ("none", "gated", "all"):
            raise ValueError(f"probs_residual={self.probs_residual!r}: allowed 'none', 'gated', 'all'")
        if self.probs_residual != "none" and not self.dynamic_matmuls:
            raise ValueError("probs_residual: needs dynamic_matmuls (the probabilities are quantized only then)")
        if not 0.0 <= float(self.probs_lost_mass) < 1.0:
            raise ValueError(f"probs_lost_mass={self.probs_lost_mass!r}: allowed [0, 1)")
        if self.runtime_threshold > 0 and self.standard_form == "qdq":
            raise ValueError("runtime_threshold: needs standard_form 'integer' or the kernel")


def select_outlier_channels(absmax: np.ndarray, value_range: np.ndarray, options: LlmInt8Options) -> np.ndarray:
    """Sorted int64 indices of the outlier input channels of one layer."""
    absmax = np.asarray(absmax, dtype=np.float64)
    k = absmax.shape[0]
    if options.criterion == "top_k":
        order = np.argsort(-np.asarray(value_range, dtype=np.float64), kind="stable")
        chosen = order[: min(options.top_k, k)]
    else:
        limit = options.threshold if options.criterion == "threshold" else options.ratio * float(np.median(absmax))
        chosen = np.flatnonzero(absmax >= limit)
        chosen = chosen[np.argsort(-absmax[chosen], kind="stable")]
    if options.max_share > 0:
        chosen = chosen[: int(np.floor(options.max_share * k))]
    return np.sort(chosen).astype(np.int64)


class LlmInt8SplitPass(OutlierPass):
    """LLM.int8(): outlier input channels in float, the rest vector-wise int8, summed."""

    name = "llm_int8"
    needs_stats = True
    #: with ``quantize: false`` the pass is the equivalent float split (tested)
    claims_equivalence = False
    options_type = LlmInt8Options

    @property
    def needs_feeds(self) -> bool:  # type: ignore[override]
        """The ``gated`` residual measures the probabilities on the calibration data."""
        return self.options.probs_residual == "gated"

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
        if options.kernels == "always":
            return "kernel"
        if options.kernels == "auto":
            from outlierquant import custom_ops

            if custom_ops.available():
                return "kernel"
            custom_ops.warn_once_unavailable()
        return options.standard_form

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
        total_in = total_float = 0
        attention = _activation_matmuls(model, stats, masked_stats) if options.dynamic_matmuls else []
        declarations.extend(attention)
        for linear in analyze_graph(model).linears:
            reason = splittable(linear)
            if reason is None and _excluded(linear, options.exclude):
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
            channels = select_outlier_channels(st.absmax, st.maximum - st.minimum, options)
            label = _label(linear, "llm_int8")
            prepared = None
            if options.weight_rounding == "quantease" and form != "float":
                from outlierquant.passes.quantize import quantease_int8_weight
                from outlierquant.passes.weight_rounding import second_moment

                inliers = weight.copy()
                inliers[channels] = 0.0
                prepared = quantease_int8_weight(inliers, second_moment(st, options.quantease_damp)[0],
                                                 fixed_rows=channels)
            if form == "float" or form == "qdq":
                build, decl = _float_split_builder(weight, channels, label, shared_inputs,
                                                   mask=form != "qdq" or options.activations != "static")
                new_nodes = replace_linear(graph, linear, build, label)
                if form == "qdq":
                    declared = decl(new_nodes, options.activations)
                    declarations.extend(declared)
                    if prepared is not None:
                        rounded[(declared[1].consumer, 1)] = prepared
                    if options.activations == "static":
                        masked_stats[declared[0].tensor] = without_channels(st, channels)
            else:
                build = mixed_int8_builder(weight, channels, label, form, options, opset, prepared=prepared)
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
            from outlierquant.passes.quantize import QuantConfig, insert_qdq

            insert_qdq(model, declarations, ActivationStats(masked_stats),
                       QuantConfig(activations=options.activations, dynamic_matmuls=False), rounded)
        probs = self._probs_residual(model, {decl.consumer for decl in attention}) if attention else None
        if form == "kernel" and layers:
            from outlierquant.custom_ops import DOMAIN

            model.opset_imports.setdefault(DOMAIN, 1)
        share = total_float / total_in if total_in else 0.0
        logger.info("llm_int8: %d layers (%s form), %.3f%% of input channels in float", len(layers), form, 100 * share)
        return bool(layers), {
            "options": dataclasses.asdict(options),
            "form": form,
            "layers": layers,
            "skipped": skipped,
            "float_channel_share": share,
            "float_channels": total_float,
            "input_channels": total_in,
            "simulated": form == "qdq" and options.activations == "per_token",
            **({"probs_residual": probs} if probs is not None else {}),
        }

    def _probs_residual(self, model: ir.Model, consumers: set[str]) -> dict[str, Any] | None:
        """Add the residual int8 MatMul to the quantized probs·V MatMuls the option selects."""
        from outlierquant.passes.quantize import (add_probs_residual, lost_mass, probs_input_index, probs_step,
                                                  quantized_source)

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
            from outlierquant.calibration.collect import require_finite, stream_tensors

            if not self.feeds:
                raise CalibrationError("llm_int8: probs_residual 'gated' measures the attention probabilities "
                                       "on calibration data, and none was given")
            steps = {quantized_source(node.inputs[index]).name: probs_step(node, index) for node, index in candidates}
            sums = {name: [0.0, 0.0] for name in steps}

            def visit(name: str, array: np.ndarray, piece: dict, sample: int) -> None:
                require_finite(array, name, f"calibration sample {sample}")
                # padding _unpad could not remove: leave its query rows out
                below, total = lost_mass(array, steps[name], piece.get("attention_mask"))
                sums[name][0] += below
                sums[name][1] += total

            # every layer's probabilities are [batch, heads, T, T]: fetch as many layers per
            # pass over the data as fit in _PROBS_FETCH_BYTES (T² grows fast: 30 layers of 9
            # heads are 18 MB per sample at T = 128, 4.5 GB at T = 2048)
            names = list(steps)
            largest: list[int] = [1]
            stream_tensors(model, [max(self.feeds, key=_feed_elements)], names[:1],
                           lambda name, array, piece, sample: largest.append(array.nbytes))
            chunk = max(1, _PROBS_FETCH_BYTES // max(largest))
            for start in range(0, len(names), chunk):
                stream_tensors(model, self.feeds, names[start:start + chunk], visit)
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


#: memory for the attention probabilities the ``gated`` residual fetches per sample
_PROBS_FETCH_BYTES = 512 << 20


def _feed_elements(feed: dict) -> int:
    return sum(int(np.asarray(value).size) for value in feed.values())


def _activation_matmuls(model: ir.Model, stats, collected: dict) -> list:
    """Static declarations for attention QKᵀ / probs·V inputs that have calibration statistics
    (their statistics copied into ``collected``)."""
    from outlierquant.passes.quantize import attention_matmul_declarations

    candidates = attention_matmul_declarations(model, "static")
    missing = {d.consumer for d in candidates if d.tensor not in stats}
    declared = [d for d in candidates if d.consumer not in missing]
    for decl in declared:
        collected[decl.tensor] = stats[decl.tensor]
    return declared


def without_channels(stats, channels: np.ndarray):
    """The statistics of ``x ⊙ m``: the outlier channels read as constant zero."""
    zeroed = {}
    for field in ("absmax", "minimum", "maximum", "mean", "mean_sq"):
        array = np.array(getattr(stats, field), dtype=np.float64, copy=True)
        array[channels] = 0.0
        zeroed[field] = array
    return dataclasses.replace(stats, covariance=None, **zeroed)


def _float_split_builder(weight: np.ndarray, channels: np.ndarray, label: str,
                         shared: dict | None = None, *, mask: bool = True):
    """``Mul(x, m) @ W_I (+ Gather(x, O) @ W_O)`` and the per-token declarations for it.

    ``mask=False`` (static activations) drops the ``Mul``: ``W_I``'s outlier rows are
    zero, so ``x @ W_I`` is the same product, and a per-tensor QuantizeLinear calibrated on
    the inlier range clips the outlier channels to values those zero rows ignore.

    ``shared`` (keyed by input name and channel set) reuses the masked input and the
    gathered columns an earlier linear on the same input wrote; callers rewrite linears
    in graph order, so the shared values are defined before every later reader.
    """
    inlier_weight = weight.copy()
    inlier_weight[channels] = 0.0
    holder: dict[str, ir.Value] = {}

    def build(tape: ir.tape.Tape, x: ir.Value) -> ir.Value:
        key = (x.name, channels.tobytes())
        if shared is not None and key in shared:
            inliers, gathered = shared[key]
        else:
            inliers, gathered = x, None
            if channels.size:
                if mask:
                    keep = np.ones(weight.shape[0], np.float32)
                    keep[channels] = 0.0
                    inliers = tape.op("Mul", [x, tape.initializer(ir.tensor(keep), name=f"{label}_keep")])
                gathered = tape.op("Gather", [x, tape.initializer(ir.tensor(channels), name=f"{label}_outlier_channels")],
                                   {"axis": -1})
            if shared is not None:
                shared[key] = (inliers, gathered)
        holder["activation"] = inliers
        holder["weight"] = tape.initializer(ir.tensor(inlier_weight), name=f"{label}_inlier_weight")
        y = tape.op("MatMul", [inliers, holder["weight"]])
        holder["matmul_out"] = y
        if channels.size:
            outlier = tape.op("MatMul", [gathered, tape.initializer(ir.tensor(np.ascontiguousarray(weight[channels])),
                                                                        name=f"{label}_outlier_weight")])
            y = tape.op("Add", [y, outlier])
        return y

    def declarations(nodes: list[ir.Node], mode: str = "per_token"):
        from outlierquant.passes.quantize import TensorQuant

        matmul = holder["matmul_out"].producer()
        return [
            TensorQuant(holder["activation"].name, "activation", mode, matmul.name, 0),
            TensorQuant(holder["weight"].name, "weight", "per_channel", matmul.name, 1, 1),
        ]

    return build, declarations


def mixed_int8_builder(weight: np.ndarray, channels: np.ndarray, label: str, form: str, options: LlmInt8Options,
                        opset: int, prepared: tuple[np.ndarray, np.ndarray] | None = None):
    """``prepared``: int8 ``[K, N]`` weights (float-channel rows zero) and scales chosen elsewhere."""
    from outlierquant.custom_ops.reference import prepare_mixed_int8_weights
    from outlierquant.custom_ops.standard_forms import (
        mixed_int8_matmul_kernel_form,
        mixed_int8_matmul_standard_form,
    )

    weight_q, weight_scale, channels, outlier_weight = prepare_mixed_int8_weights(
        weight, channels, reduce_range=options.reduce_range
    )
    if prepared is not None:  # the float channels' rows are zero in it too
        weight_q, weight_scale = prepared

    def build(tape: ir.tape.Tape, x: ir.Value) -> ir.Value:
        if form == "kernel":
            return mixed_int8_matmul_kernel_form(tape, x, weight_q, weight_scale, channels, outlier_weight,
                                                 threshold=options.runtime_threshold, name=label)
        return mixed_int8_matmul_standard_form(tape, x, weight_q, weight_scale, channels, outlier_weight,
                                               threshold=options.runtime_threshold, opset=max(opset, 13),
                                               name=label)

    return build


# -- SplitQuant --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitQuantOptions:
    """Options of :class:`SplitQuantPass`.

    ``method``: ``kmeans`` (1-D k-means with three clusters on the layer's weight values)
    or ``quantile`` (fixed thresholds at the ``quantiles`` of the values).
    ``iterations``: Lloyd iterations of the k-means. ``exclude``: substrings of node names
    left untouched. ``min_in_features``: smaller layers are not split.
    """

    method: Literal["kmeans", "quantile"] = "kmeans"
    quantiles: tuple[float, float] = (0.05, 0.95)
    iterations: int = 30
    exclude: tuple[str, ...] = ()
    min_in_features: int = 1
    version: int = 1

    def __post_init__(self) -> None:
        if self.method not in ("kmeans", "quantile"):
            raise ValueError(f"method={self.method!r}: allowed 'kmeans', 'quantile'")
        if len(self.quantiles) != 2 or not 0.0 < self.quantiles[0] < self.quantiles[1] < 1.0:
            raise ValueError(f"quantiles={self.quantiles}: two increasing numbers in (0, 1)")
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations}: must be >= 1")


def _kmeans_1d_boundaries(values: np.ndarray, iterations: int) -> tuple[float, float]:
    """Two boundaries splitting ``values`` into three 1-D k-means clusters (Lloyd)."""
    values = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    centroids = np.quantile(values, [1 / 6, 1 / 2, 5 / 6])
    lower = upper = 0.0
    for _ in range(iterations):
        lower, upper = (centroids[0] + centroids[1]) / 2, (centroids[1] + centroids[2]) / 2
        cuts = [0, int(np.searchsorted(values, lower, "left")), int(np.searchsorted(values, upper, "left")),
                values.size]
        updated = centroids.copy()
        for c in range(3):
            count = cuts[c + 1] - cuts[c]
            if count:
                updated[c] = (prefix[cuts[c + 1]] - prefix[cuts[c]]) / count
        if np.allclose(updated, centroids, rtol=0, atol=1e-12):
            break
        centroids = updated
    return float(lower), float(upper)


def split_weight_clusters(weight: np.ndarray, options: SplitQuantOptions) -> tuple[list[np.ndarray], tuple[float, float]]:
    """``W`` as three arrays (lower, middle, upper cluster; zeros elsewhere) that sum to ``W``."""
    if options.method == "kmeans":
        lower, upper = _kmeans_1d_boundaries(weight, options.iterations)
    else:
        lower, upper = (float(q) for q in np.quantile(weight, options.quantiles))
    low = weight < lower
    up = weight >= upper
    mid = ~(low | up)
    parts = [np.where(mask, weight, np.float32(0)).astype(weight.dtype) for mask in (low, mid, up)]
    return parts, (lower, upper)


class SplitQuantPass(OutlierPass):
    """SplitQuant: each linear becomes three equivalent linears over weight-value clusters."""

    name = "splitquant"
    needs_stats = False
    claims_equivalence = True
    options_type = SplitQuantOptions

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        options = self.options
        graph = model.graph
        layers: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        for linear in analyze_graph(model).linears:
            reason = splittable(linear)
            if reason is None and _excluded(linear, options.exclude):
                reason = "excluded by option"
            if reason is None and linear.in_features < options.min_in_features:
                reason = f"in_features {linear.in_features} < min_in_features"
            if reason:
                skipped.append({"linear": linear.name, "reason": reason})
                logger.info("splitquant: skip %s: %s", linear.name, reason)
                continue
            weight = np.asarray(linear.weight_array(), dtype=np.float32)
            parts, (lower, upper) = split_weight_clusters(weight, options)
            label = _label(linear, "splitquant")

            def build(tape: ir.tape.Tape, x: ir.Value, parts=parts, label=label) -> ir.Value:
                outputs = [
                    tape.op("MatMul", [x, tape.initializer(ir.tensor(np.ascontiguousarray(part)),
                                                           name=f"{label}_{cluster}_weight")])
                    for cluster, part in zip(("lower", "middle", "upper"), parts)
                ]
                return tape.op("Add", [tape.op("Add", [outputs[0], outputs[1]]), outputs[2]])

            replace_linear(graph, linear, build, label)
            absmax = float(np.abs(weight).max()) or 1.0
            layers.append({
                "linear": linear.name,
                "boundaries": [lower, upper],
                "cluster_sizes": [int(np.count_nonzero(p)) for p in parts],
                "middle_range_ratio": float(np.abs(parts[1]).max() / absmax),
            })
        logger.info("splitquant: %d linears split into 3, %d skipped", len(layers), len(skipped))
        return bool(layers), {"options": dataclasses.asdict(options), "layers": layers, "skipped": skipped}
