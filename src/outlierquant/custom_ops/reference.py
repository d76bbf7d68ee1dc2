"""Numpy reference definitions of the ``ai.outlierquant`` operators.

These functions *are* the specification: the C++ kernels and the standard-op forms in
:mod:`outlierquant.custom_ops.standard_forms` are tested against them.

HadamardTransform (QuaRot: Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference
in Rotated LLMs")
    Inputs: ``X`` float32 ``[..., d]``; optional ``block`` float32 ``[m, m]``, orthogonal.
    Output: ``Y`` float32 ``[..., d]``.

    ``d = m * n`` with ``n = 2^k`` (``m = 1`` when ``block`` is absent). The rotation is

        Y = X @ R,    R = M ⊗ (H_n / sqrt(n))

    with ``H_n`` the Sylvester Hadamard matrix (``H_1 = [1]``,
    ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, symmetric) and ``⊗`` the Kronecker product
    (``numpy.kron``). Index ``i = a * n + b`` of the last axis is element ``b`` of block
    ``a``: each row is split into ``m`` contiguous blocks of length ``n``; each block is
    Walsh-Hadamard transformed, and output block ``a'`` is ``sum_a M[a, a'] * block_a``.
    ``R`` is orthogonal, so ``X @ R @ R.T == X``; a rotation folded into a weight ``W``
    (``X @ W``) becomes ``R.T @ W``. Any other ``d`` is rejected.

DynamicQuantizePerToken
    Input: ``X`` float32 ``[..., K]``. Outputs (each optional): ``Q`` int8 ``[..., K]``,
    ``scale`` float32 ``[..., 1]``, ``Q_u8`` uint8 ``[..., K]`` = ``Q + 128`` (the
    activation layout of onnxruntime's u8 x s8 ``MatMulIntegerToFloat``).

    Per row (token), symmetric: ``scale = max|x| / 127`` in float32, replaced by ``1`` when
    it is ``0`` (an all-zero row quantizes to zeros, never NaN);
    ``Q = clip(round_half_to_even(x / scale), -127, 127)``. The grid is symmetric
    (-128 is never produced) so that ``Q + 128`` fits uint8 for the u8 x s8 GEMM and
    negation is exact. ``X ≈ Q * scale``. Inputs must be finite.

MixedInt8MatMul (LLM.int8(): Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix
Multiplication for Transformers at Scale")
    Inputs:
      0. ``X`` float32 ``[..., K]``
      1. ``W_q`` int8 ``[K, N]``: weight quantized per output channel, symmetric
      2. ``w_scale`` float32 ``[N]``: ``W ≈ W_q * w_scale``
      3. ``outlier_channels`` int64 ``[n_out]`` (optional, may be empty): static outlier
         input channels, unique, in ``[0, K)``
      4. ``W_outlier`` float32 ``[n_out, N]`` (optional; required when ``n_out > 0``):
         the float weight rows of those channels
    Attribute: ``threshold`` float (default ``0`` = off). When ``> 0``, every other channel
    ``k`` with ``|X[..., k]| >= threshold`` in any row of this call is an outlier too, and
    is multiplied in float against its dequantized row ``W_q[k] * w_scale``.
    Output: ``Y`` float32 ``[..., N]``.

    With ``S`` the static and ``D`` the runtime outlier channels and ``X_r`` equal to
    ``X`` with the columns in ``S ∪ D`` zeroed::

        Q, s = DynamicQuantizePerToken(X_r)
        Y = ((Q @ W_q) * w_scale) * s + X[:, S] @ W_outlier + X[:, D] @ (W_q[D] * w_scale)

    ``Q @ W_q`` is exact integer arithmetic. Rows of ``W_q`` at static outlier channels are
    never used (``prepare_mixed_int8_weights`` stores zeros there).

    On x86 CPUs without VNNI, onnxruntime's u8 x s8 GEMM sums pairs of products in int16
    and can saturate; ``prepare_mixed_int8_weights(..., reduce_range=True)`` keeps weights
    in [-63, 63] to stay exact there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from outlierquant.errors import InputError

logger = logging.getLogger(__name__)

INT8_MAX = 127


# --- Hadamard -------------------------------------------------------------------------


# --- per-token quantization -----------------------------------------------------------


def dynamic_quantize_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DynamicQuantizePerToken reference: ``(Q int8 [..., K], scale float32 [..., 1])``."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 1:
        raise InputError("DynamicQuantizePerToken input must have rank >= 1")
    if x.shape[-1] == 0:
        return np.zeros(x.shape, np.int8), np.ones(x.shape[:-1] + (1,), np.float32)
    scale = np.max(np.abs(x), axis=-1, keepdims=True) / np.float32(INT8_MAX)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    quantized = np.clip(np.rint(x / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return quantized, scale


# --- LLM.int8() mixed decomposition ---------------------------------------------------


def quantize_weight_per_channel(
    weight: np.ndarray, *, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 weights: ``W [K, N] ≈ W_q * w_scale[N]``."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise InputError(f"weight must be 2-D [K, N], got shape {weight.shape}")
    q_max = 63 if reduce_range else INT8_MAX
    scale = (np.max(np.abs(weight), axis=0) / np.float32(q_max)) if weight.shape[0] else np.zeros(weight.shape[1])
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    quantized = np.clip(np.rint(weight / scale), -q_max, q_max).astype(np.int8)
    return quantized, scale


def outlier_channel_array(outlier_channels: Sequence[int] | np.ndarray | None, k: int) -> np.ndarray:
    """``outlier_channels`` as a unique int64 array in ``[0, k)``; raises InputError otherwise."""
    channels = np.asarray([] if outlier_channels is None else outlier_channels, dtype=np.int64).reshape(-1)
    if channels.size and (channels.min() < 0 or channels.max() >= k):
        raise InputError(f"outlier_channels must lie in [0, {k}), got {channels.tolist()}")
    if np.unique(channels).size != channels.size:
        raise InputError(f"outlier_channels must be unique, got {channels.tolist()}")
    return channels


def prepare_mixed_int8_weights(
    weight: np.ndarray,
    outlier_channels: Sequence[int] | np.ndarray | None,
    *,
    reduce_range: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split a float weight ``[K, N]`` into MixedInt8MatMul inputs 1-4.

    Returns ``(W_q, w_scale, outlier_channels, W_outlier)``: the outlier rows are kept in
    float and zeroed before per-channel quantization, so they do not widen ``w_scale``.
    """
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise InputError(f"weight must be 2-D [K, N], got shape {weight.shape}")
    channels = outlier_channel_array(outlier_channels, weight.shape[0])
    inlier_weight = weight.copy()
    inlier_weight[channels] = 0
    weight_q, weight_scale = quantize_weight_per_channel(inlier_weight, reduce_range=reduce_range)
    return weight_q, weight_scale, channels, weight[channels].copy()


def mixed_int8_matmul(
    x: np.ndarray,
    weight_q: np.ndarray,
    weight_scale: np.ndarray,
    outlier_channels: Sequence[int] | np.ndarray | None = None,
    outlier_weight: np.ndarray | None = None,
    *,
    threshold: float = 0.0,
) -> np.ndarray:
    """MixedInt8MatMul reference (see the module docstring)."""
    x = np.asarray(x, dtype=np.float32)
    weight_q = np.asarray(weight_q, dtype=np.int8)
    weight_scale = np.asarray(weight_scale, dtype=np.float32)
    k, n = weight_q.shape
    if x.shape[-1] != k:
        raise InputError(f"X last dimension {x.shape[-1]} does not match W_q rows {k}")
    rows = x.reshape(-1, k)
    static = outlier_channel_array(outlier_channels, k)
    if static.size and (outlier_weight is None or np.shape(outlier_weight) != (static.size, n)):
        raise InputError(f"W_outlier must be [{static.size}, {n}] when outlier_channels is not empty")
    is_outlier = np.zeros(k, dtype=bool)
    is_outlier[static] = True
    dynamic = np.zeros(0, dtype=np.int64)
    if threshold > 0 and rows.shape[0]:
        hit = np.max(np.abs(rows), axis=0) >= np.float32(threshold)
        dynamic = np.flatnonzero(hit & ~is_outlier)
        is_outlier[dynamic] = True

    quantized, row_scale = dynamic_quantize_per_token(np.where(is_outlier, np.float32(0), rows))
    accumulator = quantized.astype(np.int64) @ weight_q.astype(np.int64)
    out = (accumulator.astype(np.float32) * weight_scale) * row_scale
    float_part = np.zeros_like(out, dtype=np.float64)
    if static.size:
        float_part += rows[:, static].astype(np.float64) @ np.asarray(outlier_weight, np.float64)
    if dynamic.size:
        dequantized = weight_q[dynamic].astype(np.float32) * weight_scale
        float_part += rows[:, dynamic].astype(np.float64) @ dequantized.astype(np.float64)
    out = (out.astype(np.float64) + float_part).astype(np.float32)
    return out.reshape(x.shape[:-1] + (n,))
