"""Outlier-aware weight-only quantization: AdaDim group layouts and QuantEase rounding.

Weights are quantized group-wise, asymmetric, ``b`` bits (levels ``0 … 2^b − 1``)::

    Ŵ[k, n] = (q[k, n] − z_g) · s_g,   q = clip(round(W / s_g) + z_g, 0, 2^b − 1)

with ``g`` the group of ``(k, n)``. Two group layouts for a linear ``y = x @ W``
(``W [K, N]``):

- ``per_oc`` — groups of ``G`` consecutive *input* rows within each output column
  (MatMulNBits' layout; written as ``com.microsoft::MatMulNBits``, a real int4 kernel);
- ``per_ic`` — groups of ``G`` consecutive *output* columns within each input row. A row
  that meets a large activation channel gets its own scales, so its rounding error is set
  by its own range (written with standard ops: packed uint4 unpacked with BitShift/Sub,
  dequantized, MatMul; onnxruntime constant-folds the dequantization at session start, so
  the file is 4-bit but the GEMM runs in fp32).

**AdaDim** — Heo et al. 2024, "Rethinking Channel Dimensions to Isolate Outliers for
Low-bit Weight Quantization of Large Language Models": choose the layout per layer by the
layer's output error on calibration activations. With ``Σ = E[x xᵀ]`` (from the
calibration covariance plus the outer product of the mean) and ``Δ = Ŵ − W``, the mean
squared output error is exactly::

    E ||x Δ||² = tr(Δᵀ Σ Δ)

so both candidates are scored without another pass over the data. Without a covariance
only ``diag Σ = E[x_k²]`` is known and the score uses it (channels treated uncorrelated).

**QuantEase** — Behdin et al. 2023, "QuantEase: Optimization-based Quantization for
Language Models": minimise ``tr(Δᵀ Σ Δ)`` over the grid by cyclic coordinate descent on
the rows of ``Ŵ`` (all output columns at once; scales fixed). For row ``k`` with the other
rows fixed, the objective is a 1-D quadratic in ``Ŵ[k]`` whose unconstrained minimiser is::

    Ŵ[k] ← W[k] + (Σ[k, :] (W − Ŵ) − Σ[k, k] (W[k] − Ŵ[k])) / Σ[k, k]

and the best grid point is its rounding (a 1-D convex quadratic), so every update keeps
``Ŵ`` on the grid and never increases the error. Starting from round-to-nearest, a few
sweeps give GPTQ-class errors. Outlier-aware variant: the ``outlier_fraction`` of weights
with the largest impact ``|W[k, n]| · sqrt(Σ[k, k])`` is kept in float as a sparse side
path ``H``: they are excluded from the group ranges (tighter grids for the rest), fixed
during the descent, and ``H = (W − Ŵ)`` on them, so ``Ŵ + H`` is exact there. ``H`` is
written as ``Gather(x, rows) @ H[rows]`` over the rows that hold an outlier.

Group scales: min/max of each group (zero included), optionally shrunk by the factor of
``clip_ratios`` that minimises the group's ``diag Σ``-weighted squared error.

Two refinements of the same objective (options, off by default):

- ``scale_refits``: with the levels fixed, ``Ŵ[:, n]`` is linear in the scales of column
  ``n``, so the scales that minimise ``tr(Δᵀ Σ Δ)`` solve a small least-squares system
  per column (:func:`refit_scales`); QuantEase sweeps again from the current levels on
  the new grid. Each step can only lower the error. per_oc grids only.
- ``bias_correction``: the mean output error ``μᵀΔ`` (``μ = E[x]``) is subtracted in the
  linear's bias (folded into its constant bias Add, or an inserted Add), so only
  ``E||(x − μ) Δ||² = tr(Δᵀ C Δ)`` remains, ``C`` the covariance; the rounding then
  minimises that instead of ``tr(Δᵀ Σ Δ)`` (``Σ = C + μμᵀ``), freeing it from the large,
  nearly constant channels of post-norm activations.

**Sequential calibration** (option ``sequential``; GPTQ's order, GPTAQ's target — Li et al.
2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration"). Without
it every linear is rounded against its *fp32* input, so the errors of the layers below are
ignored and accumulate through depth. With it the linears are processed in stages in graph
order (the linears that read one tensor form a stage); before a stage the partially
quantized model is run on the calibration feeds, giving the rows ``X_q`` the stage will
really see, paired row by row with the rows ``X_f`` of the fp32 model. The ``fp32_output``
target asks the rounding to reproduce the fp32 layer output from the quantized input::

    min_Q ||X_q Q − X_f W||² / n + λ ||Q − W||²,   λ = damp · mean diag Σ_qq

With ``Σ_qq = X_qᵀX_q / n`` and ``Σ_qf = X_qᵀX_f / n`` this is, up to a constant,
``tr((Q − W')ᵀ (Σ_qq + λI) (Q − W'))`` with::

    W' = (Σ_qq + λI)⁻¹ (Σ_qf + λI) W

so it is exactly the QuantEase problem above with target ``W'`` and metric ``Σ_qq + λI``
(``W' = W`` when nothing upstream is quantized). The damping term pulls the target towards
``W``. The ``weight`` target is plain GPTQ-style sequential rounding (target ``W``, metric
``Σ_qq``). With ``bias_correction`` the moments are centred (``C_qq``, ``C_qf``) and the
bias gets ``μ_f W − μ_q (Ŵ + H)``, the mean of the remaining output error (``−μ_q Δ`` for
the ``weight`` target). ``X_q`` and ``X_f`` keep at most ``sequential_rows`` evenly spread
token rows (padding dropped), the same rows from both models.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.collect import MEMORY_BUDGET_BYTES, activation_budget
from outlierquant.emit.fake_quant import fake_quantize_activation
from outlierquant.emit.weights import correct_bias, emit_grouped_weight
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import is_excluded, linear_label, splittable
from outlierquant.graph.records import Linear
from outlierquant.graph.values import MS_DOMAIN
from outlierquant.numerics.grids import GroupGrid, dequantize_levels, group_grid, rtn_levels
from outlierquant.numerics.rounding import (
    DEFAULT_CLIP_RATIOS,
    InputMoments,
    heldout_residual,
    holdout_split,
    outlier_impact,
    outlier_threshold,
    output_error,
    quantease_round,
    refit_scales,
)
from outlierquant.numerics.slabs import slabs
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)

__all__ = [
    "AdaDimOptions",
    "AdaDimQuantizePass",
    "QuantEaseOptions",
    "QuantEaseRoundPass",
]


@dataclasses.dataclass(frozen=True)
class WeightOnlyOptions:
    """Shared options: ``bits`` (3 or 4; 3-bit levels are stored in 4-bit containers),
    ``group_size`` (a power of two >= 16), ``dimension`` (``adaptive`` = AdaDim's choice,
    ``per_oc``, ``per_ic``), ``clip_ratios`` (range shrink factors searched per group; ``[1.0]``
    = plain min/max), ``exclude`` (substrings of node names left in float), ``damp``
    (relative diagonal added to Σ), ``scale_refits`` (rounds of: refit the per_oc group
    scales to the levels by least squares on ``tr(Δᵀ Σ Δ)``, then QuantEase sweeps again
    from the current levels; needs QuantEase rounding, leaves per_ic candidates as they are),
    ``bias_correction`` (subtract the calibrated mean output error ``μᵀΔ`` in the linear's
    bias, and round against the covariance ``E[(x − μ)(x − μ)ᵀ]``, the error that remains),
    ``sequential`` / ``sequential_target`` / ``sequential_rows`` (round stage by stage against
    the inputs of the partially quantized model; see the module doc; needs the calibration
    feeds instead of statistics)."""

    bits: int = 4
    group_size: int = 32
    dimension: Literal["adaptive", "per_oc", "per_ic"] = "adaptive"
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS
    exclude: tuple[str, ...] = ()
    damp: float = 0.01
    scale_refits: int = 0
    bias_correction: bool = False
    #: None: float activations (weight-only). 8: each quantized linear's input is
    #: fake-quantized to int8 symmetric per token (SIMULATED; for W4A8 accuracy studies)
    activation_bits: Literal[4, 8] | None = None
    #: round each stage of linears against the inputs of the partially quantized model
    #: (captured from the calibration feeds) instead of the fp32 statistics
    sequential: bool = False
    #: ``fp32_output``: reproduce the fp32 layer output (GPTAQ target W'); ``weight``: plain
    #: sequential rounding of W against the quantized inputs (GPTQ)
    sequential_target: Literal["fp32_output", "weight"] = "fp32_output"
    #: token rows captured per stage input (evenly spread over the calibration data)
    sequential_rows: int = 4096
    #: sequential only: damping values tried per stage, each fitted on the rows outside a
    #: held-out split of the calibration rows and scored by the stage's output error on the
    #: held-out rows; the best is refitted on all rows (empty: ``damp`` as given). With
    #: ``dimension: adaptive`` the AdaDim layout is chosen on the held-out rows as well.
    damp_candidates: tuple[float, ...] = ()
    #: share of the captured rows held out for that choice (contiguous blocks: whole samples)
    holdout_fraction: float = 0.25
    #: coordinate-descent sweeps (and no scale refit) for each candidate of the search
    search_iterations: int = 3
    #: the largest damping whose held-out error is within this relative margin of the best
    #: is taken: held-out rows come from the calibration source, so among near-equal fits the
    #: more regularised one is safer on text of another source
    damp_tolerance: float = 0.0
    version: int = 1

    def __post_init__(self) -> None:
        if self.bits not in (3, 4):
            raise ValueError(f"bits={self.bits}: allowed 3, 4")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size={self.group_size}: a power of two >= 16")
        if not self.clip_ratios or any(not 0.0 < r <= 1.0 for r in self.clip_ratios):
            raise ValueError("clip_ratios: a non-empty list of numbers in (0, 1]")
        if self.damp < 0:
            raise ValueError(f"damp={self.damp}: must be >= 0")
        if self.scale_refits < 0:
            raise ValueError(f"scale_refits={self.scale_refits}: must be >= 0")
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential={self.sequential!r}: must be true or false")
        if isinstance(self.sequential_rows, bool) or not isinstance(self.sequential_rows, int) \
                or self.sequential_rows < 16:
            raise ValueError(f"sequential_rows={self.sequential_rows!r}: an integer >= 16")
        if self.sequential and self.activation_bits is not None:
            raise ValueError("sequential=true: not supported with activation_bits (weight-only rounding)")
        if any(not d >= 0 for d in self.damp_candidates):
            raise ValueError(f"damp_candidates={list(self.damp_candidates)}: numbers >= 0")
        if self.damp_candidates and not self.sequential:
            raise ValueError("damp_candidates: needs sequential=true (the choice is scored on held-out captured rows)")
        if not 0.0 < self.holdout_fraction <= 0.5:
            raise ValueError(f"holdout_fraction={self.holdout_fraction}: allowed (0, 0.5]")
        if self.search_iterations < 1:
            raise ValueError(f"search_iterations={self.search_iterations}: must be >= 1")
        if not 0.0 <= self.damp_tolerance < 1.0:
            raise ValueError(f"damp_tolerance={self.damp_tolerance}: allowed [0, 1)")


@dataclasses.dataclass(frozen=True)
class AdaDimOptions(WeightOnlyOptions):
    """Options of :class:`AdaDimQuantizePass`: ``rounding`` is ``rtn`` or ``quantease``
    (then ``iterations`` sweeps)."""

    rounding: Literal["rtn", "quantease"] = "rtn"
    iterations: int = 10

    def __post_init__(self) -> None:
        check_fields(self)
        super().__post_init__()
        if self.scale_refits and self.rounding != "quantease":
            raise ValueError(f"scale_refits={self.scale_refits}: needs rounding 'quantease'")
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class QuantEaseOptions(WeightOnlyOptions):
    """Options of :class:`QuantEaseRoundPass`: ``iterations`` coordinate-descent sweeps,
    ``outlier_fraction`` of weights kept in float (0 = none), ``dimension`` defaults to
    ``per_oc`` (MatMulNBits)."""

    dimension: Literal["adaptive", "per_oc", "per_ic"] = "per_oc"
    iterations: int = 10
    outlier_fraction: float = 0.0
    #: the most input rows (a share of the layer's) the float side path may hold: it is
    #: written as dense rows ``Gather(x, rows) @ H[rows]``, so outliers scattered over every
    #: row (an LM head's) made it a float copy of the whole weight. Over the cap, the rows
    #: with the largest summed outlier impact keep their outliers; the others' weights are
    #: rounded with the rest. 1.0: no cap.
    outlier_rows: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self)
        super().__post_init__()
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations}: must be >= 1")
        if not 0.0 <= self.outlier_fraction < 0.1:
            raise ValueError(f"outlier_fraction={self.outlier_fraction}: allowed [0, 0.1)")
        if not 0.0 < self.outlier_rows <= 1.0:
            raise ValueError(f"outlier_rows={self.outlier_rows}: allowed (0, 1]")


# -- math ------------------------------------------------------------------------------------


# -- emission --------------------------------------------------------------------------------


# -- the passes ------------------------------------------------------------------------------


def _column_slabs(k: int, n: int, group_size: int) -> list[slice]:
    """Output-column slabs of a ``[k, n]`` weight for :meth:`_WeightOnlyPass._solve`: whole
    groups of ``group_size`` columns (per_ic groups stay in one slab), about
    :data:`~outlierquant.numerics.slabs.SLAB_ELEMENTS` weights each (the rounding keeps
    about ten float64 arrays of a slab's size). A transformer's own linears mostly fit in
    one slab; an LM head is cut."""
    return list(slabs(n, k, align=group_size))


@dataclasses.dataclass
class _Candidate:
    """One layout's result, filled a column slab at a time."""

    q: np.ndarray  # uint8 [K, N] levels
    scales: list = dataclasses.field(default_factory=list)  # compact grid, per slab
    zeros: list = dataclasses.field(default_factory=list)
    corrections: list = dataclasses.field(default_factory=list)  # bias correction, per slab
    side: np.ndarray | None = None  # float32 [len(side rows), N]: the outlier weights' float path
    error: float = 0.0  # tr(ΔᵀΣΔ)
    heldout: float = 0.0  # summed squared output error on held-out rows


class _ReferenceRows:
    """The fp32 model's input rows of each stage, captured in chunks that fit ``budget`` bytes.

    The fp32 model is a copy taken before the pass changes anything; a chunk of stages is
    captured in one run over the feeds, and each stage's rows are handed out once.
    """

    def __init__(self, model: ir.Model, feeds, order: list[str], max_rows: int, channels: dict[str, int],
                 budget: int = MEMORY_BUDGET_BYTES) -> None:
        # a structural copy sharing the weight tensors: the pass replaces initializers and
        # never writes into one, so the copy keeps seeing the fp32 weights
        self.model = model.clone()
        self.feeds = feeds
        self.order = order
        self.max_rows = max_rows
        self.channels = channels
        self.budget = budget
        self.cache: dict[str, np.ndarray] = {}

    def take(self, name: str) -> np.ndarray:
        from outlierquant.calibration.collect import capture_activations

        if name not in self.cache:
            start = self.order.index(name)
            chunk, size = [], 0
            for other in self.order[start:]:
                size += 4 * self.max_rows * self.channels[other]
                if chunk and size > self.budget:
                    break
                chunk.append(other)
            self.cache.update(capture_activations(self.model, self.feeds, chunk, max_rows=self.max_rows))
        return self.cache.pop(name)


class _WeightOnlyPass(OutlierPass):
    #: Σ = E[xxᵀ] is needed per linear input (the pipeline must pass ``covariance_for``);
    #: with ``sequential`` the pass captures its inputs from the calibration feeds instead

    def __init__(self, options=None, **kwargs: Any) -> None:
        super().__init__()
        self.options = options or self.options_type(**kwargs)

    needs_stats = True  # one-shot: the covariance of each linear's input
    needs_feeds = True  # sequential: the calibration samples, run through the partly quantized model

    def reads(self) -> frozenset[str]:
        return frozenset({"feeds"} if self.options.sequential else {"stats"})

    def covariance_targets(self, model: ir.Model) -> list[str]:
        """Linear inputs whose covariance Σ this pass reads (for ``collect_statistics(covariance_for=)``)."""
        return [] if self.options.sequential else analyze_graph(model).input_names()

    def calibration_targets(self, model: ir.Model) -> list:
        return [] if self.options.sequential else super().calibration_targets(model)

    def _round(self, weight, sigma, grid, fixed, iterations) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _outliers(self, weight: np.ndarray, moments: InputMoments, columns: list[slice]) -> np.ndarray | None:
        """Mask of the weights kept in float (``None``: none); ``weight``: the linear's own."""
        return None

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        options = self.options
        stats = None if options.sequential else self.require_stats()
        if options.sequential and not self.feeds:
            raise RuntimeError(f"pass {self.name}: sequential=true needs the calibration feeds")
        layers: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        fake_inputs: dict[str, ir.Value] = {}
        todo: list[Linear] = []
        for linear in analyze_graph(model).linears:
            reason = splittable(linear)
            if reason is None and is_excluded(linear, options.exclude):
                reason = "excluded by option"
            if reason is None and stats is not None and linear.input.name not in stats:
                reason = "no calibration statistics for its input"
            if reason is None and stats is not None and stats[linear.input.name].channels != linear.in_features:
                reason = "statistics do not match the weight rows"
            if reason:
                self._skip(skipped, linear, reason)
            else:
                todo.append(linear)
        sequential_record = None
        if options.sequential:
            sequential_record = self._run_sequential(model, todo, layers, skipped)
        else:
            moments: dict[str, InputMoments] = {}
            for linear in todo:
                name = linear.input.name
                if name not in moments:
                    moments[name] = InputMoments.from_stats(stats[name], options.damp, centered=options.bias_correction)
                if options.activation_bits is not None:
                    self._fake_quantize_input(model, linear, fake_inputs)
                layers.append(self._quantize_linear(model, linear, moments[name]))
        diagonal_only = sum(not l.pop("full_covariance") for l in layers)
        if any(l["dimension"] == "per_oc" for l in layers):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        if diagonal_only:
            logger.warning("%s: %d layers had no input covariance; using diag E[x²] (pipeline did not collect "
                           "covariance)", self.name, diagonal_only)
        counts = {d: sum(l["dimension"] == d for l in layers) for d in ("per_oc", "per_ic")}
        logger.info("%s: %d linears quantized to %d bits (%s), %d skipped", self.name, len(layers), options.bits,
                    counts, len(skipped))
        record = {
            "options": dataclasses.asdict(options),
            "layers": layers,
            "skipped": skipped,
            "dimension_counts": counts,
            "diagonal_covariance_layers": diagonal_only,
            "storage_bits": 4,
            "activation_bits": options.activation_bits,
            "fake_quantized_activations": len(fake_inputs),
            "simulated": options.activation_bits is not None,
        }
        if sequential_record is not None:
            record["sequential"] = sequential_record
        return bool(layers), record

    def _skip(self, skipped: list, linear: Linear, reason: str) -> None:
        skipped.append({"linear": linear.name, "reason": reason})
        logger.info("%s: skip %s: %s", self.name, linear.name, reason)

    def _run_sequential(self, model: ir.Model, todo: list[Linear], layers: list, skipped: list) -> dict[str, Any]:
        """Stages in graph order; each rounded against the inputs of the partially quantized model."""
        from outlierquant.calibration.collect import capture_activations

        options = self.options
        position = {id(node): i for i, node in enumerate(model.graph)}
        stages: dict[str, list[Linear]] = {}
        for linear in sorted(todo, key=lambda l: position[id(l.node)]):
            stages.setdefault(linear.input.name, []).append(linear)
        reference = None
        if options.sequential_target == "fp32_output":
            reference = _ReferenceRows(model, self.feeds, list(stages), options.sequential_rows,
                                       {name: group[0].in_features for name, group in stages.items()},
                                       budget=activation_budget(model))
        quantized_any = False
        rows = 0
        chosen: list[float] = []
        for name, group in stages.items():
            x_f = reference.take(name) if reference is not None else None
            current = {linear.node.inputs[0].name for linear in group}
            if len(current) != 1:  # cannot happen: the group read one value and is rewritten together
                raise RuntimeError(f"{self.name}: stage {name!r} reads {sorted(current)}")
            if quantized_any or x_f is None:
                x_q = capture_activations(model, self.feeds, sorted(current), max_rows=options.sequential_rows)
                x_q = x_q[next(iter(current))]
            else:  # nothing quantized yet: the input is the fp32 one
                x_q = x_f
            if x_q.shape[1] != group[0].in_features:
                for linear in group:
                    self._skip(skipped, linear, "captured input does not match the weight rows")
                continue
            rows = max(rows, x_q.shape[0])
            # x_f is x_q (nothing quantized upstream yet): W' = W, so the plain moments are exact
            paired = x_f if x_f is not x_q else None
            damp, dims, search = options.damp, None, None
            if options.damp_candidates and x_q.shape[0] >= 16:
                damp, dims, search = self._choose_on_holdout(group, x_q, paired)
                chosen.append(damp)
            moments = InputMoments.from_rows(x_q, paired, damp, centered=options.bias_correction)
            for linear in group:
                entry = self._quantize_linear(model, linear, moments, dims=dims.get(linear.name) if dims else None)
                if search is not None:
                    entry["holdout"] = {"damp": damp, "errors": search}
                layers.append(entry)
                model.opset_imports.setdefault(MS_DOMAIN, 1)  # the next capture runs MatMulNBits
                quantized_any = True
            del x_q, x_f
        record = {"stages": len(stages), "rows": rows, "target": options.sequential_target}
        if options.damp_candidates:
            record["damp_chosen"] = {str(d): chosen.count(d) for d in sorted(set(chosen))}
        return record

    def _choose_on_holdout(self, group: list[Linear], x_q: np.ndarray, x_f: np.ndarray | None):
        """The damping (and, for ``adaptive``, each linear's layout) whose rounding, fitted on
        the rows outside the held-out split, gives the stage the least output error on the
        held-out rows. Small or other-source calibration sets make the in-sample error an
        optimistic judge: with fewer token rows than input channels Σ is rank-deficient and
        a light damping fits the noise of those rows."""
        options = self.options
        fit, held = holdout_split(x_q.shape[0], options.holdout_fraction)
        xq_fit, xq_held = x_q[fit], x_q[held]
        xf_fit = None if x_f is None else x_f[fit]
        xf_held = None if x_f is None else x_f[held]
        dims = ("per_oc", "per_ic") if options.dimension == "adaptive" else (options.dimension,)
        errors: dict[str, float] = {}
        best_dims: dict[float, dict[str, str]] = {}
        for damp in options.damp_candidates:
            moments = InputMoments.from_rows(xq_fit, xf_fit, damp, centered=options.bias_correction)
            total, layouts = 0.0, {}
            for linear in group:
                solved = self._solve(linear, moments, dims, iterations=options.search_iterations, refits=0,
                                     heldout=(xq_held, xf_held))
                scored = solved["heldout"]
                layouts[linear.name] = min(scored, key=scored.get)
                total += scored[layouts[linear.name]]
            errors[str(damp)] = total
            best_dims[damp] = layouts
        best = min(errors.values())
        damp = max(d for d in options.damp_candidates if errors[str(d)] <= best * (1.0 + options.damp_tolerance))
        return damp, (best_dims[damp] if len(dims) > 1 else None), errors

    def _solve(self, linear: Linear, moments: InputMoments, dims: tuple[str, ...], *, iterations: int | None = None,
               refits: int | None = None, heldout: tuple[np.ndarray, np.ndarray | None] | None = None) -> dict[str, Any]:
        """Round one linear against ``moments`` over the layouts ``dims``; the least-error one.

        The objective ``tr(ΔᵀΣΔ)`` is a sum over output columns and every step (target,
        grid, coordinate descent, scale refit, bias correction, held-out error) works on
        each column (per_ic: each group of ``group_size`` columns) on its own, so the
        columns go a slab at a time (:func:`_column_slabs`): float64 working copies of a
        vocabulary-sized LM head would be gigabytes. What is kept whole is compact: uint8
        levels per layout and the float side path of the outlier weights.
        ``heldout``: rows ``(x_q, x_f)`` the rounding did not see; each layout's output
        error on them is returned as ``heldout`` (with its bias correction applied).
        """
        options = self.options
        iterations = options.iterations if iterations is None else iterations
        refits = options.scale_refits if refits is None else refits
        sigma = moments.sigma
        original = linear.weight_array()
        k, n = original.shape
        columns = _column_slabs(k, n, options.group_size)
        fixed = self._outliers(original, moments, columns)
        if fixed is not None and not fixed.any():
            fixed = None
        # the side path is kept for the rows that hold an outlier only (a dense [K, N] was an
        # LM head's worth of float32 however few rows it had)
        side_rows = np.flatnonzero(fixed.any(axis=1)) if fixed is not None else None
        found = {dim: _Candidate(np.zeros((k, n), np.uint8)) for dim in dims}
        signal = 0.0
        for cols in columns:
            source = np.asarray(original[:, cols], dtype=np.float64)
            weight = moments.target(source)
            keep = None if fixed is None else fixed[:, cols]
            signal += float(np.einsum("kn,kn->", weight, sigma @ weight))
            for dim in dims:
                grid = group_grid(weight, dim, options.group_size, options.bits, row_weight=np.diag(sigma),
                                  clip_ratios=options.clip_ratios, keep_out=keep)
                q = self._round(weight, sigma, grid, keep, iterations)
                if dim == "per_oc":
                    for _ in range(refits):
                        grid = refit_scales(weight, sigma, q, grid, keep)
                        q = quantease_round(weight, sigma, grid, iterations=iterations, fixed=keep, levels=q)
                effective = dequantize_levels(q, grid)
                delta = effective - weight
                if keep is not None:
                    delta = np.where(keep, 0.0, delta)
                candidate = found[dim]
                candidate.error += output_error(delta, sigma)
                del delta
                candidate.q[:, cols] = q
                candidate.scales.append(grid.scale)
                candidate.zeros.append(grid.zero)
                if keep is not None:
                    side = np.where(keep, weight - effective, 0.0)
                    effective = effective + side
                    if candidate.side is None:
                        candidate.side = np.zeros((side_rows.size, n), np.float32)
                    candidate.side[:, cols] = side[side_rows]
                bias = moments.correction(source, effective) if options.bias_correction else None
                if bias is not None:
                    candidate.corrections.append(bias)
                if heldout is not None:
                    candidate.heldout += heldout_residual(heldout[0], heldout[1], source, effective, bias)
        chosen = min(found, key=lambda d: found[d].error)
        best = found[chosen]
        grid = GroupGrid(chosen, options.group_size, options.bits, np.concatenate(best.scales, axis=1),
                         np.concatenate(best.zeros, axis=1))
        signal = signal or 1.0
        rows = max(heldout[0].shape[0], 1) if heldout is not None else 1
        return {"dimension": chosen, "error": best.error, "signal": signal, "q": best.q, "grid": grid,
                "side": None if best.side is None else (side_rows, best.side), "fixed": fixed,
                "correction": np.concatenate(best.corrections) if best.corrections else None,
                "errors": {d: c.error / signal for d, c in found.items()},
                "heldout": {d: c.heldout / rows for d, c in found.items()}}

    def _quantize_linear(self, model: ir.Model, linear: Linear, moments: InputMoments,
                         dims: str | None = None) -> dict[str, Any]:
        """Round one linear against ``moments`` and replace it in the graph; its report entry.
        ``dims``: the layout chosen beforehand (on held-out rows), else the option's."""
        options = self.options
        if dims is None:
            dims = ("per_oc", "per_ic") if options.dimension == "adaptive" else (options.dimension,)
        else:
            dims = (dims,)
        solved = self._solve(linear, moments, dims)
        q, grid, side, fixed = solved["q"], solved["grid"], solved["side"], solved["fixed"]
        correction = solved["correction"]  # mean output error left: μ_f W − μ_q (Ŵ + H)
        entry_extra = {}
        if correction is not None:
            entry_extra["bias_correction"] = correct_bias(model.graph, linear, correction)
        emit_grouped_weight(model.graph, linear, q, grid, side, linear_label(linear, self.name),
              None if correction is None or entry_extra["bias_correction"] == "folded" else correction)
        entry = {
            "linear": linear.name,
            "dimension": solved["dimension"],
            "relative_output_error": solved["error"] / solved["signal"],
            "errors": solved["errors"],
            "full_covariance": moments.full,
        }
        entry.update(entry_extra)
        if side is not None:
            entry["float_weights"] = int(fixed.sum())
            entry["float_rows"] = int(np.any(fixed, axis=1).sum())
        return entry

    def _fake_quantize_input(self, model: ir.Model, linear: Linear, shared: dict[str, ir.Value]) -> None:
        """Per-token symmetric fake quantization of the linear's input (simulated), shared per tensor."""
        source = linear.node.inputs[0]
        if source.name not in shared:
            shared[source.name] = fake_quantize_activation(model, source, linear.node,
                                                           int(self.options.activation_bits), "per_token")
        linear.node.replace_input_with(0, shared[source.name])


class AdaDimQuantizePass(_WeightOnlyPass):
    """AdaDim: per layer, per-output- or per-input-channel groups, whichever errs less."""

    name = "adadim"
    options_type = AdaDimOptions

    def _round(self, weight, sigma, grid, fixed, iterations):
        if self.options.rounding == "quantease":
            return quantease_round(weight, sigma, grid, iterations=iterations, fixed=fixed)
        return rtn_levels(weight, grid, fixed)


class QuantEaseRoundPass(_WeightOnlyPass):
    """QuantEase: coordinate-descent rounding against Σ = E[xxᵀ], optional float outliers."""

    name = "quantease"
    options_type = QuantEaseOptions

    def _round(self, weight, sigma, grid, fixed, iterations):
        return quantease_round(weight, sigma, grid, iterations=iterations, fixed=fixed)

    def _outliers(self, weight, moments, columns):
        if self.options.outlier_fraction <= 0:
            return None
        diag = np.diag(moments.sigma)
        targets = (moments.target(np.asarray(weight[:, cols], np.float64)) for cols in columns)
        # select_outlier_weights over slabs: the largest impacts over all slabs are among each
        # slab's largest, so a threshold from those, then the mask slab by slab, marks the
        # same weights as one pass over the matrix
        count = int(np.ceil(self.options.outlier_fraction * weight.size))
        threshold = outlier_threshold((outlier_impact(t, diag) for t in targets), count)
        mask = np.zeros(weight.shape, bool)
        row_impact = np.zeros(weight.shape[0])
        for cols in columns:
            impact = outlier_impact(moments.target(np.asarray(weight[:, cols], np.float64)), diag)
            mask[:, cols] = impact >= threshold
            row_impact += np.where(mask[:, cols], impact, 0.0).sum(axis=1)
        cap = max(1, int(np.floor(self.options.outlier_rows * weight.shape[0])))
        rows = np.flatnonzero(row_impact > 0)
        if rows.size > cap:
            dropped = rows[np.argsort(-row_impact[rows], kind="stable")[cap:]]
            mask[dropped] = False
        return mask
