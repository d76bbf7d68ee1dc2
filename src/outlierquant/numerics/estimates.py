"""Error estimates from calibration statistics (numpy only): SmoothQuant's migration scales,
weight rounding errors per channel and per block, the output error of static W8A8 after a
scale (and the α search on it), an SQNR estimate, the attention mass a uint8 grid drops,
and the outlier profile (kurtosis, max/median) a record reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from outlierquant.numerics.slabs import slabs

from outlierquant.numerics.grids import as_f64, group_grid

if TYPE_CHECKING:  # statistics are read, never built, here
    from outlierquant.calibration.stats import ChannelStats

DEFAULT_ALPHA_GRID = tuple(round(a, 2) for a in np.arange(0.0, 1.0001, 0.05))


_MIN_SCALE = 1e-5


def row_absmax(weight: np.ndarray) -> np.ndarray:
    """``max_n |W[k, n]|`` per row, as ``max(max, −min)``: the same values as
    ``np.abs(weight).max(axis=1)`` without a weight-sized temporary (an LM head's is 256 MiB
    in float64)."""
    return np.maximum(weight.max(axis=1), -weight.min(axis=1)).astype(np.float64)


def smoothing_scales(act_absmax: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)``, guarded against empty channels."""
    w_absmax = np.max([row_absmax(w) for w in weights], axis=0)
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
            # the blocks are groups of rows within one output column, and the score is a sum
            # over columns: a slab of columns at a time (an LM head is never whole in float64)
            for cols in slabs(w.shape[1], w.shape[0]):
                error = smoothed_weight_error(as_f64(w[:, cols]), s, weight_bits, weight_block, mean_sq / s**2,
                                              clip_ratios)
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
        error_rows, weight_rows = _row_sums_of_squares(w, s, weight_bits, weight_block, bool(activation_bits))
        total += float(mean_sq @ error_rows)
        if activation_bits:
            total += float(act_noise @ weight_rows)
    return total


def _row_sums_of_squares(w: np.ndarray, s: np.ndarray, bits: int, block: int,
                         weights_too: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Per input row k: ``Σ_n E[k, n]²`` of the rounding error ``E`` of ``diag(s)·W``
    (mapped back by ``1/s``), and ``Σ_n W[k, n]²``; a slab of rows at a time.

    Why slabs: one α of a search on an LM head (65536 x 512) held about five float64
    copies of the weight at once (1.2 GB). Rows are independent once the per-column
    scales are known (per-channel: the column abs-max, taken over the slabs first; blocked:
    slabs of whole blocks), so each row's sums are the whole-matrix computation's.
    """
    k, n = w.shape
    qmax = 2 ** (bits - 1) - 1
    error_rows = np.empty(k)
    weight_rows = np.empty(k) if weights_too else None
    scale = None
    if block <= 0:
        absmax = np.zeros(n)
        for part in slabs(k, n):
            absmax = np.maximum(absmax, np.abs(w[part] * s[part, None]).max(axis=0))
        scale = absmax[None, :] / qmax
        scale = np.where(scale > 0, scale, 1.0)
    for part in slabs(k, n, align=max(block, 1)):
        ws = w[part] * s[part, None]
        if block <= 0:
            error = np.clip(np.rint(ws / scale), -qmax, qmax) * scale - ws
        else:
            error = blockwise_rounding_error(ws, bits, block)
        error_rows[part] = ((error / s[part, None]) ** 2).sum(axis=1)
        if weight_rows is not None:
            weight_rows[part] = (as_f64(w[part]) ** 2).sum(axis=1)
    return error_rows, weight_rows


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


def lost_mass(probs: np.ndarray, step: float, query_mask: np.ndarray | None = None) -> tuple[float, float]:
    """(mass at or below ``step / 2``, total mass) of a probability tensor: QuantizeLinear at
    that step rounds the first to zero (half to even), so their ratio is the share it drops.

    ``query_mask`` (``[B, T]``, 0 at padding) drops the rows of padded queries from a
    ``[B, H, T, T]`` tensor: their softmax rows are not attention anyone reads.
    """
    probs = np.asarray(probs)
    if query_mask is not None and probs.ndim == 4 and query_mask.shape == (probs.shape[0], probs.shape[2]):
        probs = probs.transpose(0, 2, 1, 3)[np.asarray(query_mask).astype(bool)]
    return float(probs[probs <= step / 2].sum(dtype=np.float64)), float(probs.sum(dtype=np.float64))


def outlier_profile(absmax: np.ndarray | None = None, mean_sq: np.ndarray | None = None) -> dict[str, float]:
    """Channel-outlier measures of one tensor from its per-channel statistics.

    ``max_median``: max / median of the per-channel abs-max (what per-tensor activation
    quantization suffers from); ``kurtosis``: Pearson kurtosis of the per-channel abs-max
    values (3 for Gaussian-like channel magnitudes, large when a few channels dominate);
    ``rms_max_median``: the same ratio for the per-channel root-mean-square.
    """

    profile: dict[str, float] = {}
    if absmax is not None:
        values = np.abs(np.asarray(absmax, dtype=np.float64))
        median = float(np.median(values))
        profile["max_median"] = round(float(values.max() / median) if median > 0 else float("inf"), 3)
        profile["kurtosis"] = round(float(kurtosis(values)), 3)
    if mean_sq is not None:
        rms = np.sqrt(np.maximum(np.asarray(mean_sq, dtype=np.float64), 0.0))
        median = float(np.median(rms))
        profile["rms_max_median"] = round(float(rms.max() / median) if median > 0 else float("inf"), 3)
    return profile


def _rotated_rms(stats, rotation: np.ndarray, left_scale: np.ndarray | None = None) -> np.ndarray | None:
    """Per-channel mean square of ``x · diag(left_scale) · rotation`` from a covariance."""
    if stats is None or stats.covariance is None:
        return None
    second = stats.covariance + np.outer(stats.mean, stats.mean)
    if left_scale is not None:
        second = second * np.outer(left_scale, left_scale)
    return np.einsum("ij,ik,kj->j", rotation, second, rotation)


def _profile_entry(stats, rotation: np.ndarray | None = None, left_scale: np.ndarray | None = None) -> dict:
    if stats is None:
        return {}
    entry = {"before": outlier_profile(stats.absmax, stats.mean_sq)}
    if rotation is not None:
        rms = _rotated_rms(stats, rotation, left_scale)
        if rms is not None:
            entry["after_predicted"] = outlier_profile(None, rms)
    return entry


def kurtosis(x, axis: int | None = None, *, excess: bool = False) -> np.ndarray | float:
    """Pearson kurtosis ``m4 / m2²`` along ``axis`` (all elements when None); NaN if constant."""
    x = np.asarray(x, dtype=np.float64)
    centered = x - x.mean(axis=axis, keepdims=True)
    m2 = np.mean(centered**2, axis=axis)
    m4 = np.mean(centered**4, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(m2 > 0, m4 / np.where(m2 > 0, m2 * m2, 1.0), np.nan)
    if excess:
        value = value - 3.0
    return float(value) if np.ndim(value) == 0 else value
