"""SmoothQuant: migrate activation outliers into the weights by a per-channel scale.

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models". For a group of linears ``y_i = x @ W_i`` that read the same
tensor ``x`` (``[..., K]``), and ``s > 0`` of length ``K``::

    y_i = (x · diag(s)⁻¹) @ (diag(s) · W_i)

with ``s_j = max|X_j|^α / max_i max_n |W_i[j, n]|^(1−α)`` (calibrated ``max|X_j|``, the
weight maximum over every linear of the group). Large activation channels shrink,
their weight rows grow; α moves the quantization difficulty between the two.

Where ``diag(s)⁻¹`` goes (the *foldable producer* found by
:func:`outlierquant.passes.analysis.analyze_graph`):

- a norm: ``γ ← γ / s``, ``β ← β / s`` (LayerNorm, RMSNorm, fused or decomposed);
- a producing linear ``x = z @ W₀ + b₀`` — directly, through head reshapes (attention
  ``V → O``, where grouped-query attention maps several O input channels onto one V
  channel, so ``s`` is chosen per V channel and shared by the O rows that carry it), or
  through the gate product of a gated MLP (``up → down``): ``W₀[:, c] ← W₀[:, c] / s_c``,
  ``b₀[c] ← b₀[c] / s_c``;
- nothing (the FFN down projection after GELU, a post-norm BERT's norm that also feeds
  the residual): an explicit ``Mul(x, 1/s)`` is inserted when ``insert_mul`` allows it
  (it costs one elementwise pass over ``x`` at run time; the record counts them),
  otherwise the group is left unchanged and the reason recorded.

α search (``alpha: search``): for each group, α on a grid minimises an estimate of the
quantized group's output error computed from the calibration statistics alone
(:func:`estimated_output_error`): with ``x`` quantized per tensor after smoothing (step
``Δ``, so channel ``j`` has step ``Δ·s_j`` in original units) and ``W' = diag(s)·W``
rounded per output channel (exact rounding error ``E' = Q(W') − W'``),

    err(α) = Σ_i Σ_n Σ_j [ (Δ s_j)²/12 · W_i[j,n]²  +  E[x_j²] · (E'_i[j,n] / s_j)² ]

— uniform rounding noise on the activations, the actual weight rounding error weighted
by the channel's mean square. Channels are treated as uncorrelated; the estimate needs
no extra pass over the data and ranks α the same way the measured error does on the
models we tried (see ``benchmarks/bench_recipes.py``).

SmoothQuant+ (weight-only, ``activation_bits: 0``): the activations stay float, so the
only error is the weights'. With ``full_covariance`` the pass asks the pipeline for the
input covariance of every group and scores α by the exact mean squared output error of
the group on the calibration activations::

    err(α) = Σ_i tr(E'_iᵀ Σ_s E'_i),   Σ_s = diag(s)⁻¹ Σ diag(s)⁻¹ = E[(x/s)(x/s)ᵀ]

(``E'_i`` the rounding error of the smoothed weight ``diag(s)·W_i``, ``Σ = E[x xᵀ]``),
and ``clip_ratios`` lets the scored rounding shrink each block's range as the
``weight_only`` pass will (its ``E[(x/s)²]``-weighted clip search). Defaults keep the
diagonal, unclipped estimate above.

Shared helpers used by the shift and rescale passes live here too: the error model,
:func:`fold_into_producer` / :func:`scale_consumers`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.stats import ActivationStats, ChannelStats
from outlierquant.passes.analysis import Linear, LinearGroup, analyze_graph
from outlierquant.passes.base import (
    OutlierPass,
    add_initializer,
    constant_array,
    first_in_graph,
    set_input_constant,
    write_linear_weight,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SmoothQuantOptions",
    "SmoothQuantPass",
    "estimated_output_error",
    "estimated_static_sqnr_db",
    "fold_into_producer",
    "group_weight_rows",
    "scale_consumers",
    "smoothing_scales",
]

DEFAULT_ALPHA_GRID = tuple(round(a, 2) for a in np.arange(0.0, 1.0001, 0.05))
_MIN_SCALE = 1e-5


@dataclasses.dataclass(frozen=True)
class SmoothQuantOptions:
    """Options of :class:`SmoothQuantPass`.

    ``alpha``: migration strength in [0, 1], or ``"search"`` (per group, see the module
    docstring). ``insert_mul``: allow an explicit ``Mul`` where no producer can absorb
    ``1/s``. ``relations``: which producer relations to smooth (``norm``, ``linear``,
    ``v_to_o``, ``up_to_down``, ``none``). ``weight_bits`` / ``weight_block``: the weight
    format the α search assumes (8-bit per channel for W8A8; 4 bits in blocks of 32 for
    weight-only). ``activation_bits``: 0 means activations stay float (weight-only).
    ``full_covariance`` (weight-only only): score α with the full smoothed second moment
    (module docstring; the pipeline then collects the group input covariances).
    ``clip_ratios``: block range shrink factors the scored weight rounding searches
    (weight-only with ``weight_block`` > 0 only; ``[1.0]``: plain min/max).
    """

    alpha: float | str = 0.5
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    insert_mul: bool = False
    relations: tuple[str, ...] = ("norm", "linear", "v_to_o", "up_to_down", "none")
    weight_bits: int = 8
    weight_block: int = 0
    activation_bits: int = 8
    full_covariance: bool = False
    clip_ratios: tuple[float, ...] = (1.0,)
    version: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "search":
                raise ValueError(f"alpha={self.alpha!r}: allowed a number in [0, 1] or 'search'")
        elif not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha={self.alpha}: allowed a number in [0, 1] or 'search'")
        if not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError("alpha_grid: a non-empty list of numbers in [0, 1]")
        allowed = {"norm", "linear", "v_to_o", "up_to_down", "none"}
        unknown = set(self.relations) - allowed
        if unknown:
            raise ValueError(f"relations {sorted(unknown)}: allowed {', '.join(sorted(allowed))}")
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits={self.weight_bits}: allowed 4, 8")
        if self.activation_bits not in (0, 8):
            raise ValueError(f"activation_bits={self.activation_bits}: allowed 0 (float), 8")
        if self.weight_block < 0:
            raise ValueError(f"weight_block={self.weight_block}: must be >= 0 (0: per output channel)")
        if self.full_covariance and self.activation_bits != 0:
            raise ValueError("full_covariance: only for weight-only smoothing (activation_bits: 0)")
        if not self.clip_ratios or any(not 0.0 < r <= 1.0 for r in self.clip_ratios):
            raise ValueError("clip_ratios: a non-empty list of numbers in (0, 1]")
        if tuple(self.clip_ratios) != (1.0,) and (self.activation_bits != 0 or self.weight_block <= 0):
            raise ValueError("clip_ratios: only for weight-only smoothing with weight_block > 0")


# -- scale math ----------------------------------------------------------------------------


def group_weight_rows(group: LinearGroup) -> list[np.ndarray]:
    """Each linear's weight as ``[K, N]`` (float64 copies)."""
    return [np.asarray(linear.weight_array(), dtype=np.float64) for linear in group.linears]


def smoothing_scales(act_absmax: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)``, guarded against empty channels."""
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    a = np.maximum(np.asarray(act_absmax, dtype=np.float64), _MIN_SCALE)
    w = np.maximum(w_absmax, _MIN_SCALE)
    s = a**alpha / w ** (1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    # keep the overall magnitude of x unchanged (a global factor is free; this keeps
    # folded γ / weights in a sane float range)
    return s / np.exp(np.mean(np.log(s)))


def weight_rounding_error(weight: np.ndarray, bits: int, block: int = 0) -> np.ndarray:
    """``Q(W) − W`` for symmetric per-output-channel (``block == 0``) or blocked along K."""
    qmax = 2 ** (bits - 1) - 1
    if block <= 0:
        scale = np.abs(weight).max(axis=0, keepdims=True) / qmax
        scale = np.where(scale > 0, scale, 1.0)
        return np.clip(np.rint(weight / scale), -qmax, qmax) * scale - weight
    return blockwise_rounding_error(weight, bits, block)


def blockwise_rounding_error(weight: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Asymmetric ``bits``-bit rounding in blocks of ``block`` input rows (MatMulNBits' scheme)."""
    k, n = weight.shape
    padded = -(-k // block) * block
    w = np.zeros((padded, n)) if padded != k else weight.copy()
    if padded != k:
        w[:k] = weight
    blocks = w.reshape(padded // block, block, n)
    lo = np.minimum(blocks.min(axis=1, keepdims=True), 0.0)
    hi = np.maximum(blocks.max(axis=1, keepdims=True), 0.0)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    scale = np.where(scale > 0, scale, 1.0)
    zero = np.clip(np.rint(-lo / scale), 0, levels)
    q = np.clip(np.rint(blocks / scale) + zero, 0, levels)
    return ((q - zero) * scale - blocks).reshape(padded, n)[:k]


def activation_steps(stats: ChannelStats, s: np.ndarray, *, per_channel_zero_point: bool = False,
                     levels: int = 255) -> np.ndarray:
    """Quantization step of each channel of ``x`` (original units) after ``x ← x / s``.

    Per-tensor asymmetric (zero included): one step ``Δ`` for ``x / s``, ``Δ·s_j`` for
    channel ``j``. With a zero point per channel only the widest ``(max − min)/s``
    matters.
    """
    lo, hi = stats.minimum / s, stats.maximum / s
    if per_channel_zero_point:
        step = float(np.max(hi - lo)) / levels
    else:
        step = (max(float(hi.max()), 0.0) - min(float(lo.min()), 0.0)) / levels
    return step * s


def smoothed_weight_error(weight: np.ndarray, s: np.ndarray, bits: int, block: int,
                          smoothed_mean_sq: np.ndarray, clip_ratios: Sequence[float]) -> np.ndarray:
    """``Q(diag(s)·W) − diag(s)·W`` for weight-only blocks, with the ``weight_only`` clip search.

    The clip search weights rows by ``E[(x/s)²]`` (``smoothed_mean_sq``), as the
    ``weight_only`` pass does on the smoothed model's statistics.
    """
    from outlierquant.passes.weight_rounding import group_grid

    smoothed = weight * s[:, None]
    grid = group_grid(smoothed, "per_oc", block, bits, row_weight=smoothed_mean_sq, clip_ratios=tuple(clip_ratios))
    scale, zero = grid.expand(*smoothed.shape)
    scale = scale.astype(np.float64)
    q = grid.levels(smoothed, scale, zero.astype(np.float64))
    return (q - zero) * scale - smoothed


def estimated_output_error(stats: ChannelStats, weights: Sequence[np.ndarray], s: np.ndarray, *,
                           activation_bits: int = 8, weight_bits: int = 8, weight_block: int = 0,
                           per_channel_zero_point: bool = False, sigma: np.ndarray | None = None,
                           clip_ratios: Sequence[float] = (1.0,)) -> float:
    """Estimated squared output error of the group with smoothing ``s`` (module docstring).

    ``sigma`` (weight-only): the full ``E[x xᵀ]``; the weight error is then scored exactly
    as ``tr(E'ᵀ Σ_s E')``. ``clip_ratios`` (weight-only, blocked): the clip search of the
    scored rounding.
    """
    mean_sq = np.maximum(stats.mean_sq, 0.0)
    if sigma is not None and activation_bits:
        raise ValueError("sigma: only for weight-only scoring (activation_bits=0)")
    if tuple(clip_ratios) != (1.0,) or sigma is not None:
        if weight_block <= 0:
            raise ValueError("sigma / clip_ratios: only for blocked weight-only scoring (weight_block > 0)")
        total = 0.0
        smoothed_sigma = sigma / np.outer(s, s) if sigma is not None else None
        for w in weights:
            error = smoothed_weight_error(w, s, weight_bits, weight_block, mean_sq / s**2, clip_ratios)
            if smoothed_sigma is not None:
                total += float(np.einsum("kn,kn->", error, smoothed_sigma @ error))
            else:
                total += float((mean_sq / s**2) @ (error**2).sum(axis=1))
        return total
    total = 0.0
    if activation_bits:
        steps = activation_steps(stats, s, per_channel_zero_point=per_channel_zero_point,
                                 levels=2**activation_bits - 1)
        act_noise = steps**2 / 12.0
    for w in weights:
        error = weight_rounding_error(w * s[:, None], weight_bits, weight_block) / s[:, None]
        total += float(mean_sq @ (error**2).sum(axis=1))
        if activation_bits:
            total += float(act_noise @ (w**2).sum(axis=1))
    return total


def search_alpha(stats: ChannelStats, weights: Sequence[np.ndarray], grid: Sequence[float], *,
                 scale_fn=None, **error_options: Any) -> tuple[float, np.ndarray, dict[float, float]]:
    """The α of ``grid`` with the smallest :func:`estimated_output_error`."""
    scale_fn = scale_fn or (lambda alpha: smoothing_scales(stats.absmax, weights, alpha))
    errors: dict[float, float] = {}
    best = (None, None, np.inf)
    for alpha in grid:
        s = scale_fn(alpha)
        err = estimated_output_error(stats, weights, s, **error_options)
        errors[float(alpha)] = err
        if err < best[2]:
            best = (float(alpha), s, err)
    return best[0], best[1], errors


def estimated_static_sqnr_db(stats: ChannelStats, weights: Sequence[np.ndarray],
                             grid: Sequence[float] = DEFAULT_ALPHA_GRID) -> float:
    """Estimated SQNR (dB) of a group's output under static per-tensor int8 activations
    with the best per-channel activation scales of ``grid`` (OutlierTune's α search).

    The signal ``E‖xW‖²`` is estimated as ``Σ_j E[x_j²]·‖W_j‖²`` (channels treated as
    uncorrelated, as :func:`estimated_output_error` treats the noise). A low value marks
    an input whose range is set by rare, token-varying spikes that no per-channel scale
    can absorb (an LLM's down projection), where a rotation pays for itself.
    """
    mean_sq = np.maximum(np.asarray(stats.mean_sq, dtype=np.float64), 0.0)
    signal = sum(float(mean_sq @ (np.asarray(w, dtype=np.float64) ** 2).sum(axis=1)) for w in weights)
    if signal <= 0.0:
        return float("-inf")  # a constant-zero input: callers skip it
    _, _, errors = search_alpha(stats, weights, grid)
    noise = min(errors.values())
    return float("inf") if noise <= 0.0 else float(10.0 * np.log10(signal / noise))


def max_median_ratio(values: np.ndarray) -> float:
    values = np.abs(np.asarray(values, dtype=np.float64))
    median = float(np.median(values))
    return float(values.max() / median) if median > 0 else float("inf")


# -- folding ---------------------------------------------------------------------------------


def _scale_vector(node: ir.Node, index: int, factor: np.ndarray, graph: ir.Graph, hint: str,
                  shift: np.ndarray | None = None) -> None:
    """``v ← (v − shift) · factor`` for a constant vector input broadcast along the last axis."""
    value = node.inputs[index]
    array = np.asarray(constant_array(value), dtype=np.float64)
    shape = array.shape
    flat = array.reshape(-1) if array.size == factor.size else np.broadcast_to(array.reshape(-1), factor.shape)
    if shift is not None:
        flat = flat - shift
    new = (flat * factor).reshape(shape if array.size == factor.size else factor.shape)
    set_input_constant(graph, node, index, new, hint)


def _norm_affine_nodes(norm) -> tuple[tuple[ir.Node, int] | None, tuple[ir.Node, int] | None]:
    """(node, input index) of γ and β within the norm."""
    gamma = beta = None
    for node in norm.nodes:
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if norm.gamma is not None and value is norm.gamma and gamma is None:
                gamma = (node, index)
            if norm.beta is not None and value is norm.beta and beta is None:
                beta = (node, index)
    return gamma, beta


def fold_into_producer(graph: ir.Graph, group: LinearGroup, s_producer: np.ndarray,
                       shift_producer: np.ndarray | None = None) -> None:
    """Apply ``x ← (x − shift) / s`` inside the group's foldable producer.

    ``s_producer`` / ``shift_producer`` are indexed by the *producer's* output channels
    (equal to the group's input channels unless a channel map — GQA — intervenes).
    """
    producer = group.producer
    inverse = 1.0 / s_producer
    if producer.kind == "norm":
        norm = producer.norm
        gamma, beta = _norm_affine_nodes(norm)
        if gamma is None:
            raise ValueError(f"norm {norm.name} has no γ to fold into")
        _scale_vector(gamma[0], gamma[1], inverse, graph, f"{norm.name}_gamma_folded")
        if beta is not None:
            _scale_vector(beta[0], beta[1], inverse, graph, f"{norm.name}_beta_folded", shift_producer)
        elif shift_producer is not None and np.any(shift_producer):
            raise ValueError(f"norm {norm.name} has no β to absorb a shift")
        return
    if producer.kind == "linear":
        linear = producer.linear
        weight = np.asarray(linear.weight_array(), dtype=np.float64) * inverse[None, :]
        write_linear_weight(graph, linear, weight, f"{linear.name}_weight_folded")
        if linear.bias is not None:
            index = _bias_index(linear)
            _scale_vector(linear.bias_node or linear.node, index, inverse, graph, f"{linear.name}_bias_folded",
                          shift_producer)
        elif shift_producer is not None and np.any(shift_producer):
            raise ValueError(f"linear {linear.name} has no bias to absorb a shift")
        return
    raise ValueError(f"group producer {producer.kind!r} cannot absorb a scale")


def _bias_index(linear: Linear) -> int:
    if linear.bias_node is not None:
        return next(i for i, v in enumerate(linear.bias_node.inputs) if v is linear.bias)
    return 2  # Gemm C / Conv B


def scale_consumers(graph: ir.Graph, group: LinearGroup, s: np.ndarray, shift: np.ndarray | None = None) -> None:
    """``W ← diag(s)·W`` (and ``b ← b + shift @ W`` for a shift) for every linear of the group."""
    for linear in group.linears:
        weight = np.asarray(linear.weight_array(), dtype=np.float64)
        if shift is not None and np.any(shift):
            if linear.bias is None:
                raise ValueError(f"linear {linear.name} has no bias to absorb a shift")
            correction = shift @ weight
            _scale_vector(linear.bias_node or linear.node, _bias_index(linear), np.ones_like(correction), graph,
                          f"{linear.name}_bias_shifted", -correction)
        write_linear_weight(graph, linear, weight * s[:, None], f"{linear.name}_weight_smoothed")


def insert_channel_ops(graph: ir.Graph, group: LinearGroup, s: np.ndarray, shift: np.ndarray | None = None) -> int:
    """Insert ``Mul(x, 1/s)`` (after ``Sub(x, shift)`` when shifting) before the group; returns ops inserted."""
    x = group.input
    first = first_in_graph(graph, [linear.node for linear in group.linears])
    base = x.name or "smooth_input"
    nodes: list[ir.Node] = []
    current = x
    if shift is not None and np.any(shift):
        z = add_initializer(graph, f"{base}_shift", shift.astype(np.float32))
        sub = ir.node("Sub", inputs=[current, z], name=f"{base}_Shift")
        sub.outputs[0].name = f"{base}_shifted"
        nodes.append(sub)
        current = sub.outputs[0]
    inv = add_initializer(graph, f"{base}_inv_scale", (1.0 / s).astype(np.float32))
    mul = ir.node("Mul", inputs=[current, inv], name=f"{base}_Smooth")
    mul.outputs[0].name = f"{base}_smoothed"
    nodes.append(mul)
    for node_ in nodes:
        node_.outputs[0].type = x.type
        node_.outputs[0].shape = x.shape
    graph.insert_before(first, nodes)
    for linear in group.linears:
        linear.node.replace_input_with(0, mul.outputs[0])
    return len(nodes)


def producer_channels(group: LinearGroup, values: np.ndarray, reduce=np.maximum) -> tuple[np.ndarray, np.ndarray | None]:
    """Aggregate a per-input-channel array onto the producer's channels (GQA: several → one).

    Returns (per-producer-channel array, channel_map or None for identity).
    """
    cmap = group.producer.channel_map
    if cmap is None or (len(cmap) == len(values) and np.array_equal(cmap, np.arange(len(values)))):
        return values, None
    cmap = np.asarray(cmap)
    out = np.full(int(cmap.max()) + 1, np.nan)
    for j, c in enumerate(cmap):
        out[c] = values[j] if np.isnan(out[c]) else reduce(out[c], values[j])
    return out, cmap


def check_group(group: LinearGroup, stats: ActivationStats, *, allow_insert: bool,
                relations: Sequence[str]) -> str:
    """Why the group cannot be rewritten ("" when it can)."""
    name = group.input.name
    producer = group.producer
    if producer.relation not in relations:
        return f"relation {producer.relation!r} not selected by the recipe"
    if any(linear.weight_layout == "conv" for linear in group.linears):
        return "Conv consumers are not handled"
    if name not in stats:
        return f"no calibration statistics for {name}"
    if stats[name].channels != group.in_features:
        return f"statistics of {name} have {stats[name].channels} channels, the linears read {group.in_features}"
    for linear in group.linears:
        if len(linear.weight.uses()) != 1:
            return f"weight of {linear.name} is shared with another node"
    if not producer.foldable and not allow_insert:
        return f"no foldable producer ({producer.reason or producer.relation}) and insert_mul is off"
    return ""


def group_label(group: LinearGroup) -> str:
    return ", ".join(linear.name for linear in group.linears)


# -- the pass ----------------------------------------------------------------------------------


class SmoothQuantPass(OutlierPass):
    """SmoothQuant α migration, folded into norms / producing linears (module docstring)."""

    name = "smoothquant"
    needs_stats = True
    claims_equivalence = True
    options_type = SmoothQuantOptions

    def covariance_targets(self, model: ir.Model) -> list[str]:
        """Group inputs whose covariance the weight-only α search reads (none otherwise)."""
        if not self.options.full_covariance:
            return []
        return analyze_graph(model).input_names(groups=True)

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        stats = self.require_stats()
        options = self.options
        graph = model.graph
        analysis = analyze_graph(model)
        groups_record: list[dict[str, Any]] = []
        inserted = 0
        modified = False
        for group in analysis.groups:
            entry: dict[str, Any] = {"linears": [l.name for l in group.linears], "relation": group.producer.relation}
            reason = check_group(group, stats, allow_insert=options.insert_mul, relations=options.relations)
            if reason:
                entry["skipped"] = reason
                logger.info("smoothquant: skip [%s]: %s", group_label(group), reason)
                groups_record.append(entry)
                continue
            st = stats[group.input.name]
            weights = group_weight_rows(group)
            absmax, cmap = producer_channels(group, np.asarray(st.absmax, dtype=np.float64))

            def scales(alpha: float) -> np.ndarray:
                w_rows = [np.abs(w).max(axis=1) for w in weights]
                w_absmax = np.max(w_rows, axis=0)
                w_prod, _ = producer_channels(group, w_absmax)
                s_prod = smoothing_scales(absmax, [w_prod[:, None]], alpha)
                return s_prod[cmap] if cmap is not None else s_prod

            error_options = dict(activation_bits=options.activation_bits, weight_bits=options.weight_bits,
                                 weight_block=options.weight_block)
            if tuple(options.clip_ratios) != (1.0,):
                error_options["clip_ratios"] = tuple(options.clip_ratios)
            if options.full_covariance:
                if st.covariance is None:
                    entry["covariance"] = "not collected: diagonal E[x²] used"
                else:
                    error_options["sigma"] = st.covariance + np.outer(st.mean, st.mean)
            if options.alpha == "search":
                alpha, s, errors = search_alpha(st, weights, options.alpha_grid, scale_fn=scales, **error_options)
                unsmoothed = estimated_output_error(st, weights, np.ones(group.in_features), **error_options)
                entry["estimated_error_ratio"] = float(errors[alpha] / unsmoothed) if unsmoothed > 0 else None
                if unsmoothed <= errors[alpha]:
                    entry["alpha"] = None
                    entry["skipped"] = "α search: no α on the grid beats leaving the group unsmoothed"
                    groups_record.append(entry)
                    continue
            else:
                alpha = float(options.alpha)
                s = scales(alpha)
            entry["alpha"] = alpha
            entry["max_median_before"] = max_median_ratio(st.absmax)
            entry["max_median_after"] = max_median_ratio(st.absmax / s)
            if group.producer.foldable:
                s_prod = s if cmap is None else producer_channels(group, s, reduce=lambda a, b: a)[0]
                fold_into_producer(graph, group, s_prod)
                entry["folded_into"] = group.producer.describe()
            else:
                inserted += insert_channel_ops(graph, group, s)
                entry["folded_into"] = "inserted Mul"
            scale_consumers(graph, group, s)
            modified = True
            groups_record.append(entry)
        smoothed = [g for g in groups_record if "skipped" not in g]
        logger.info("smoothquant: %d of %d groups smoothed, %d Mul inserted", len(smoothed), len(groups_record), inserted)
        return modified, {
            "options": dataclasses.asdict(self.options),
            "groups": groups_record,
            "smoothed_groups": len(smoothed),
            "inserted_ops": inserted,
        }
