"""SmoothQuant: migrate activation outliers into the weights by a per-channel scale.

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models". For a group of linears ``y_i = x @ W_i`` that read the same
tensor ``x`` (``[..., K]``), and ``s > 0`` of length ``K``::

    y_i = (x · diag(s)⁻¹) @ (diag(s) · W_i)

with ``s_j = max|X_j|^α / max_i max_n |W_i[j, n]|^(1−α)`` (calibrated ``max|X_j|``, the
weight maximum over every linear of the group). Large activation channels shrink,
their weight rows grow; α moves the quantization difficulty between the two.

Where ``diag(s)⁻¹`` goes (the *foldable producer* found by
:func:`outlierquant.graph.analysis.analyze_graph`):

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

The error model lives in :mod:`outlierquant.numerics.estimates` and the folding edits
(:func:`~outlierquant.graph.edit.fold_into_producer`, :func:`~outlierquant.graph.edit.scale_consumers`)
in :mod:`outlierquant.graph.edit`, shared with the shift and rescale passes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.stats import StatisticsCarry
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import (
    group_weight_rows,
    producer_channels,
    transform_group_channels,
)
from outlierquant.graph.records import LinearGroup
from outlierquant.numerics.estimates import (
    DEFAULT_ALPHA_GRID,
    estimated_output_error,
    max_median_ratio,
    row_absmax,
    search_alpha,
    smoothing_scales,
)
from outlierquant.options import check_fields
from outlierquant.passes.base import GroupRewritePass

logger = logging.getLogger(__name__)

__all__ = [
    "SmoothQuantOptions",
    "SmoothQuantPass",
]


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
    weight_bits: Literal[4, 8] = 8
    weight_block: int = 0
    activation_bits: int = 8
    full_covariance: bool = False
    clip_ratios: tuple[float, ...] = (1.0,)
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
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


# -- folding ---------------------------------------------------------------------------------


# -- the pass ----------------------------------------------------------------------------------


class SmoothQuantPass(GroupRewritePass):
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

    def allow_insert(self) -> bool:
        return self.options.insert_mul

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        self._carry = StatisticsCarry()
        return super().run(model)

    def carried_statistics(self) -> StatisticsCarry | None:
        """A folded group's input is ``x / s`` (derived exactly); the values inside its producer
        change; an inserted ``Mul`` leaves ``x`` as it was and the linears read a new tensor."""
        return getattr(self, "_carry", None)

    def rewrite_group(self, graph: ir.Graph, group: LinearGroup, st, entry: dict[str, Any]) -> int | None:
        options = self.options
        weights = group_weight_rows(group)
        absmax, cmap = producer_channels(group, np.asarray(st.absmax, dtype=np.float64))

        def scales(alpha: float) -> np.ndarray:
            w_rows = [row_absmax(w) for w in weights]
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
                return None
        else:
            alpha = float(options.alpha)
            s = scales(alpha)
        entry["alpha"] = alpha
        entry["max_median_before"] = max_median_ratio(st.absmax)
        entry["max_median_after"] = max_median_ratio(st.absmax / s)
        weights.clear()  # float64 copies (an LM head's: 256 MiB): not needed while rewriting
        s_prod = s if cmap is None else producer_channels(group, s, reduce=lambda a, b: a)[0]
        if group.producer.foldable:
            self._carry.changed |= _values_inside_producer(group)
            self._carry.scaled[group.input.name] = np.asarray(s, dtype=np.float64)
        inserted = transform_group_channels(graph, group, s, s_producer=s_prod)
        entry["folded_into"] = group.producer.describe() if group.producer.foldable else "inserted Mul"
        return inserted


def _values_inside_producer(group: LinearGroup) -> set[str]:
    """The values a scale folded into the group's producer changes, besides the group's input:
    the producer's own outputs, the path to the group, and whatever the produced value flows
    into on its way (attention's V → probs·V → O, a KV-cache output)."""
    producer = group.producer
    nodes = list(producer.path)
    if producer.norm is not None:
        nodes += list(producer.norm.nodes)
    if producer.linear is not None:
        nodes += [node for node in (producer.linear.node, producer.linear.bias_node) if node is not None]
    changed = {out.name for node in nodes for out in node.outputs if out is not None and out.name}
    seen: set[str] = set()
    frontier = [producer.value]
    while frontier:
        value = frontier.pop()
        if value is None or value is group.input or value.name in seen:
            continue
        seen.add(value.name)
        for user, _ in value.uses():
            frontier.extend(user.outputs)
    changed |= seen
    changed.discard(group.input.name)
    return changed
