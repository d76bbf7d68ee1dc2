"""Weight rounding beyond round-to-nearest (numpy only): QuantEase coordinate descent on the
output error ``tr(ΔᵀΣΔ)`` (Behdin et al. 2023) against each linear's input second moment
(or the GPTAQ target with fp32-output moments), scale refits, and the choice of outlier
weights kept in float.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from outlierquant.numerics.grids import GroupGrid, weight_scales
from outlierquant.numerics.slabs import slabs

if TYPE_CHECKING:  # statistics are read, never built, here
    from outlierquant.calibration.stats import ChannelStats


def second_moment(stats: ChannelStats, damp: float = 0.0, *, centered: bool = False) -> tuple[np.ndarray, bool]:
    """``(Σ = E[x xᵀ], full)``; the diagonal ``E[x_k²]`` only when no covariance was collected.

    ``centered``: the covariance ``E[(x − μ)(x − μ)ᵀ]`` instead (the error left once the
    mean output error ``μᵀΔ`` is corrected in the bias).
    """
    mean = np.asarray(stats.mean, np.float64)
    if stats.covariance is not None:
        sigma = stats.covariance + (0.0 if centered else np.outer(mean, mean))
        full = True
    else:
        sigma = np.diag(np.maximum(stats.mean_sq - (mean**2 if centered else 0.0), 0.0))
        full = False
    diag = np.diag(sigma).copy()
    sigma = sigma + np.eye(sigma.shape[0]) * (damp * max(float(diag.mean()), 1e-12))
    return sigma, full


@dataclasses.dataclass
class InputMoments:
    """What the rounding of every linear reading one input needs.

    ``sigma``: the (damped) metric of the objective ``tr((Q − T)ᵀ Σ (Q − T))``; ``cross``:
    ``Σ_qf + λI`` of the module doc when the target is the fp32 output (``None``: the
    target is the weight itself); ``mean``: the mean of the input the layer sees (``μ_q``);
    ``reference_mean``: the input mean its fp32 output is made of (``μ_f``; ``μ_q`` for the
    ``weight`` target); ``full``: whether Σ is a full matrix (else its diagonal only).
    """

    sigma: np.ndarray
    mean: np.ndarray
    reference_mean: np.ndarray
    cross: np.ndarray | None = None
    full: bool = True

    @classmethod
    def from_stats(cls, stats: ChannelStats, damp: float, *, centered: bool) -> "InputMoments":
        sigma, full = second_moment(stats, damp, centered=centered)
        mean = np.asarray(stats.mean, np.float64)
        return cls(sigma, mean, mean, None, full)

    @classmethod
    def from_rows(cls, x_q: np.ndarray, x_f: np.ndarray | None, damp: float, *, centered: bool) -> "InputMoments":
        """Moments of paired rows ``x_q`` (quantized model) and ``x_f`` (fp32 model).

        ``x_f=None``: the ``weight`` target (plain sequential rounding against ``x_q``).
        """
        xq = np.asarray(x_q, np.float64)
        if x_f is not None and np.shape(x_f) != xq.shape:
            raise ValueError(f"paired rows differ in shape: {xq.shape} vs {np.shape(x_f)}")
        n = xq.shape[0]
        mean_q = xq.mean(axis=0)
        if centered:
            xq = xq - mean_q
        sigma = xq.T @ xq / n
        ridge = damp * max(float(np.diag(sigma).mean()), 1e-12)
        eye = np.eye(sigma.shape[0]) * ridge
        if x_f is None:
            return cls(sigma + eye, mean_q, mean_q, None, True)
        xf = np.asarray(x_f, np.float64)
        mean_f = xf.mean(axis=0)
        if centered:
            xf = xf - mean_f
        return cls(sigma + eye, mean_q, mean_f, xq.T @ xf / n + eye, True)

    def target(self, weight: np.ndarray) -> np.ndarray:
        """The weight the rounding aims at: ``W`` or ``W' = Σ⁻¹ (Σ_qf + λI) W``."""
        weight = np.asarray(weight, np.float64)
        if self.cross is None:
            return weight
        try:
            return np.linalg.solve(self.sigma, self.cross @ weight)
        except np.linalg.LinAlgError:  # singular (damp 0, rank-deficient rows): least squares
            return np.linalg.lstsq(self.sigma, self.cross @ weight, rcond=None)[0]

    def correction(self, weight: np.ndarray, effective: np.ndarray) -> np.ndarray:
        """The bias that removes the mean output error ``μ_f W − μ_q Ŵ``."""
        return self.reference_mean @ np.asarray(weight, np.float64) - self.mean @ effective


def gptaq_objective(x_q: np.ndarray, x_f: np.ndarray, weight: np.ndarray, q: np.ndarray, damp: float = 0.0) -> float:
    """The direct objective ``||X_q Q − X_f W||² / n + λ ||Q − W||²`` (λ as in :class:`InputMoments`)."""
    xq, xf = np.asarray(x_q, np.float64), np.asarray(x_f, np.float64)
    residual = xq @ q - xf @ weight
    ridge = damp * max(float((xq**2).mean(axis=0).mean()), 1e-12)
    return float((residual**2).sum() / xq.shape[0] + ridge * ((q - weight) ** 2).sum())


def holdout_split(n: int, fraction: float = 0.25, blocks: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, held)`` row indices: ``n`` rows cut into ``blocks`` contiguous blocks, every
    ``round(1 / fraction)``-th block held out.

    Captured rows keep the order of the calibration samples, so contiguous blocks hold out
    whole samples (mostly): token rows of one sentence are strongly correlated, and holding
    out every fourth *row* would score a fit on the sentences it was fitted to.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction {fraction!r}: must be in (0, 1)")
    block = np.minimum(np.arange(n) * blocks // max(n, 1), blocks - 1)
    period = max(2, int(round(1.0 / fraction)))
    held = block % period == period - 1
    return np.flatnonzero(~held), np.flatnonzero(held)


def heldout_output_error(x_q: np.ndarray, x_f: np.ndarray | None, weight: np.ndarray, effective: np.ndarray,
                         bias: np.ndarray | None = None) -> float:
    """``||X_q Ŵ + b − X_f W||² / n`` on rows the rounding did not see (``x_f=None``: the
    target is ``X_q W``). ``b`` is the bias correction fitted with the rounding."""
    return heldout_residual(x_q, x_f, weight, effective, bias) / max(np.shape(x_q)[0], 1)


def heldout_residual(x_q: np.ndarray, x_f: np.ndarray | None, weight: np.ndarray, effective: np.ndarray,
                     bias: np.ndarray | None = None) -> float:
    """``||X_q Ŵ + b − X_f W||²`` summed (not averaged): a sum over output columns, so the
    columns of a weight may be scored a slab at a time and the parts added."""
    xq = np.asarray(x_q, np.float64)
    reference = (xq if x_f is None else np.asarray(x_f, np.float64)) @ np.asarray(weight, np.float64)
    residual = xq @ effective - reference
    if bias is not None:
        residual += bias
    return float((residual**2).sum())


def output_error(delta: np.ndarray, sigma: np.ndarray) -> float:
    """``tr(Δᵀ Σ Δ)``: the mean squared output error of ``x @ (W + Δ)`` vs ``x @ W``."""
    return float(np.einsum("kn,kn->", delta, sigma @ delta))


def quantease_round(weight: np.ndarray, sigma: np.ndarray, grid: GroupGrid, *, iterations: int = 10,
                    fixed: np.ndarray | None = None, levels: np.ndarray | None = None) -> np.ndarray:
    """Grid levels ``q [K, N]`` minimising ``tr(Δᵀ Σ Δ)`` by cyclic coordinate descent over rows.

    ``fixed``: mask of weights excluded from the objective (kept in float elsewhere); their
    levels stay at the zero point. ``levels``: the starting point (default round-to-nearest).

    Rows are visited in blocks of 32: ``Σ Δ`` is kept exact for the rows outside the
    current block (one GEMM per block) and completed on demand for a row of the block with
    the steps already taken in it, so each row update is exact coordinate descent.
    """
    with _one_blas_thread():  # thousands of small GEMVs: threads only add synchronisation
        return _coordinate_descent(weight, sigma, grid, iterations, fixed, levels)


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only speed depends on it
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _coordinate_descent(weight, sigma, grid, iterations, fixed, levels) -> np.ndarray:
    k, n = weight.shape
    w = np.asarray(weight, dtype=np.float64)
    s, z = grid.expand(k, n)
    s = s.astype(np.float64)
    z = z.astype(np.float64)
    inv_s = 1.0 / s
    maxq = float(grid.maxq)
    free = None if fixed is None or not fixed.any() else ~fixed
    if levels is not None:
        q = np.asarray(levels, np.float64).copy()
    else:
        q = grid.levels(w, s, z)
    if free is not None:
        q = np.where(free, q, z)
    delta = w - (q - z) * s  # W − Ŵ on the free entries
    if free is not None:
        delta = np.where(free, delta, 0.0)
    sigma = np.asarray(sigma, np.float64)
    sigma_delta = sigma @ delta
    diag = np.diag(sigma)
    block = 32
    for _ in range(iterations):
        changed = 0
        for start in range(0, k, block):
            stop = min(start + block, k)
            steps = np.zeros((stop - start, n))
            local = sigma[start:stop, start:stop]
            touched = False
            for row in range(start, stop):
                d = diag[row]
                if d <= 0:
                    continue
                current = sigma_delta[row] + local[row - start] @ steps if touched else sigma_delta[row]
                target = w[row] + (current - d * delta[row]) / d
                q_row = np.clip(np.rint(target * inv_s[row]) + z[row], 0.0, maxq)
                new_delta = w[row] - (q_row - z[row]) * s[row]
                if free is not None:
                    q_row = np.where(free[row], q_row, z[row])
                    new_delta = np.where(free[row], new_delta, 0.0)
                step = new_delta - delta[row]
                if step.any():
                    changed += 1
                    touched = True
                    steps[row - start] = step
                    delta[row] = new_delta
                    q[row] = q_row
            if touched:
                sigma_delta += sigma[:, start:stop] @ steps
        if not changed:
            break
    return q


def refit_scales(weight: np.ndarray, sigma: np.ndarray, q: np.ndarray, grid: GroupGrid,
                 fixed: np.ndarray | None = None) -> GroupGrid:
    """per_oc grid whose scales minimise ``tr(Δᵀ Σ Δ)`` for the given levels and zero points.

    With ``a = q − z`` fixed, output column ``n`` is ``Ŵ[:, n] = A_n s_n`` with
    ``A_n[k, g] = a[k, n]·[k ∈ g]``, so its error is the quadratic
    ``(A_n s_n − W_n)ᵀ Σ (A_n s_n − W_n)``, minimised by ``s_n = (A_nᵀ Σ A_n)⁻¹ A_nᵀ Σ W_n``
    (all groups of a column at once: the groups are coupled through Σ). A scale that
    comes out non-positive or from a singular system keeps its old value.
    """
    if grid.dimension != "per_oc":
        raise ValueError(f"refit_scales: dimension={grid.dimension!r}: only per_oc grids are refitted")
    k, n = q.shape
    h = -(-k // grid.group_size)
    # each column's system is its own; the block products below hold H x K x (columns)
    # elements, so the columns go a slab at a time (GEMM gives every column the same bits
    # whatever the slab width)
    scales = [_refit_columns(weight[:, cols], sigma, q[:, cols], grid, cols,
                             None if fixed is None else fixed[:, cols])
              for cols in slabs(n, h * k)]
    return GroupGrid(grid.dimension, grid.group_size, grid.bits, np.concatenate(scales, axis=1), grid.zero.copy())


def _refit_columns(weight, sigma, q, grid: GroupGrid, cols: slice, fixed) -> np.ndarray:
    """The refitted ``[H, n]`` scales of the columns ``cols`` (``weight``/``q``/``fixed``: those columns)."""
    k, n = q.shape
    g = grid.group_size
    h = -(-k // g)
    kp = h * g
    z = np.repeat(grid.zero[:, cols], g, axis=0)[:k]
    a = np.zeros((kp, n))
    a[:k] = q - z.astype(np.float64)
    w = np.asarray(weight, np.float64)
    if fixed is not None:
        a[:k] = np.where(fixed, 0.0, a[:k])
        w = np.where(fixed, 0.0, w)
    sig = np.zeros((kp, kp))
    sig[:k, :k] = sigma
    a3 = a.reshape(h, g, n)
    # P[k, j, n] = Σ_{l ∈ group j} Σ[k, l] a[l, n]
    partial = np.matmul(sig.reshape(kp, h, g).transpose(1, 0, 2), a3)  # [j, k, n] (BLAS)
    gram = np.einsum("iun,jiun->nij", a3, partial.reshape(h, h, g, n), optimize=True)
    del partial
    rhs_full = np.zeros((kp, n))
    rhs_full[:k] = sigma @ w
    rhs = np.einsum("iun,iun->ni", a3, rhs_full.reshape(h, g, n))
    old = grid.scale[:, cols].astype(np.float64).T  # [n, H]
    ridge = 1e-9 * np.maximum(np.trace(gram, axis1=1, axis2=2) / h, 1e-30)
    gram = gram + ridge[:, None, None] * np.eye(h)[None]
    try:
        new = np.linalg.solve(gram, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return grid.scale[:, cols].copy()
    empty = np.abs(a3).sum(axis=1).T == 0  # [n, H]: groups with no nonzero level
    keep = ~np.isfinite(new) | (new <= 0) | empty
    return np.where(keep, old, new).T.astype(np.float32)


def outlier_impact(weight: np.ndarray, sigma_diag: np.ndarray) -> np.ndarray:
    """``|W[k, n]| · sqrt(Σ[k, k])``: a weight's share of the output error scale."""
    return np.abs(weight) * np.sqrt(np.maximum(sigma_diag, 0.0))[:, None]


def select_outlier_weights(weight: np.ndarray, sigma_diag: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the ``fraction`` of weights with the largest ``|W[k, n]| · sqrt(Σ[k, k])``."""
    if fraction <= 0:
        return np.zeros(weight.shape, bool)
    impact = outlier_impact(weight, sigma_diag)
    count = int(np.ceil(fraction * weight.size))
    threshold = np.partition(impact.reshape(-1), weight.size - count)[weight.size - count]
    return impact >= threshold


def outlier_threshold(impacts, count: int) -> float:
    """The ``count``-th largest value over the arrays ``impacts`` (slabs of one matrix): the
    threshold of :func:`select_outlier_weights` for the whole matrix, without holding it.
    A pool of the ``count`` largest values so far is kept and merged with each slab's."""
    pool = np.zeros(0)
    for impact in impacts:
        flat = np.concatenate([pool, np.asarray(impact, np.float64).reshape(-1)])
        keep = min(count, flat.size)
        pool = np.partition(flat, flat.size - keep)[flat.size - keep:]
    return pool[np.argpartition(pool, pool.size - count)[pool.size - count]]


def quantease_int8_weight(weight_kn: np.ndarray, sigma: np.ndarray, iterations: int = 4, *,
                          fixed_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int8 ``[K, N]`` weights and per-output-channel scales on the symmetric grid of
    :func:`quantize_weight` (scale ``max|w|/127``), the levels chosen by QuantEase
    coordinate descent on ``tr(ΔᵀΣΔ)`` instead of rounding each weight to nearest.
    ``fixed_rows``: input rows held at zero (LLM.int8()'s float channels).

    Every output column has its own scale and its own descent, so the columns go a slab at
    a time (an LM head's float64 working copies were 256 MiB each) with the one-pass levels.
    """
    k, n = np.shape(weight_kn)
    q = np.empty((k, n), np.int8)
    scale = np.empty(n, np.float32)
    for cols in slabs(n, k):
        q[:, cols], scale[cols] = _quantease_int8_columns(np.asarray(weight_kn[:, cols], dtype=np.float32), sigma,
                                                          iterations, fixed_rows)
    return q, scale


def _quantease_int8_columns(weight_kn, sigma, iterations, fixed_rows):
    k = weight_kn.shape[0]
    scale = weight_scales(weight_kn, 1)
    # one group of K rows per output column; uint8 levels 1..255 around zero point 128
    grid = GroupGrid("per_oc", k, 8, scale[None, :].astype(np.float32), np.full((1, scale.size), 128, np.uint8))
    fixed = None
    if fixed_rows is not None and len(fixed_rows):
        fixed = np.zeros(weight_kn.shape, dtype=bool)
        fixed[np.asarray(fixed_rows, dtype=np.int64)] = True
    levels = quantease_round(weight_kn, sigma, grid, iterations=iterations, fixed=fixed)
    return np.clip(levels - 128, -127, 127).astype(np.int8), scale


DEFAULT_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
