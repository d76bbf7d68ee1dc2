"""KV-cache quantization arithmetic (RotateKV, KIVI-style baselines): numpy references.

A cache tensor is ``[batch, kv heads, tokens, head size]``. Two grids:

- **per token** (RotateKV's keys after rotation, and values): each token's ``head size``
  channels split into groups of ``G``; per group an asymmetric grid
  ``x ≈ q · s + m``, ``m = min``, ``s = (max − min) / (2^b − 1)``, ``q`` in ``[0, 2^b − 1]``.
  ``s`` and ``m`` are stored as float16 (what the packed cache holds), so the reference
  rounds them to float16 before use — the graph forms do the same and agree bit for bit.
- **per channel, static** (the KIVI-style key baseline): one calibrated ``(min, max)`` per
  kv head and channel; the same asymmetric grid with constant ``s`` and ``m``.

And the **outlier-aware rotation** of RotateKV: a channel permutation ``P`` that sorts the
channels by calibrated magnitude and deals them over the Hadamard blocks in zig-zag
order (each block gets a balanced share of the outlier channels), followed by a
block-diagonal normalized Hadamard ``H``; ``R = P H`` is orthogonal, so rotating queries
and keys by the same ``R`` leaves every score ``q·k`` unchanged.
"""

from __future__ import annotations

import numpy as np

from outlierquant.numerics.hadamard import hadamard_rotation, is_power_of_two

#: smallest step of a per-token grid (a constant group gets this step, its codes are 0)
MIN_STEP = 1e-5


def codes_per_byte(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits!r}: a packed cache holds 2-, 4- or 8-bit codes")
    return 8 // bits


def per_token_quantize(x: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes ``q`` (float, integers), float16-rounded step ``s`` and minimum ``m`` per group
    of ``group`` channels of the last axis: ``s``, ``m`` have shape ``[..., D / group]``."""
    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    if group < 1 or d % group:
        raise ValueError(f"group size {group} does not divide the head size {d}")
    qmax = np.float32(2**bits - 1)
    xg = x.reshape(*x.shape[:-1], d // group, group)
    lo = xg.min(axis=-1, keepdims=True)
    hi = xg.max(axis=-1, keepdims=True)
    step = np.maximum((hi - lo) / qmax, np.float32(MIN_STEP)).astype(np.float16).astype(np.float32)
    low = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.round((xg - low) / step), 0, qmax)
    return q.reshape(x.shape), step[..., 0], low[..., 0]


def per_token_dequantize(q: np.ndarray, step: np.ndarray, low: np.ndarray) -> np.ndarray:
    d = q.shape[-1]
    groups = step.shape[-1]
    qg = np.asarray(q, dtype=np.float32).reshape(*q.shape[:-1], groups, d // groups)
    return (qg * step[..., None] + low[..., None]).reshape(q.shape).astype(np.float32)


def per_token_fake_quantize(x: np.ndarray, bits: int, group: int) -> np.ndarray:
    return per_token_dequantize(*per_token_quantize(x, bits, group))


def channel_grid(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Static asymmetric grid ``(step, min)`` from calibrated per-channel ranges (float32)."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    step = np.maximum((hi - lo) / (2**bits - 1), MIN_STEP)
    return step.astype(np.float32), lo.astype(np.float32)


def channel_fake_quantize(x: np.ndarray, step: np.ndarray, low: np.ndarray, bits: int) -> np.ndarray:
    q = np.clip(np.round((np.asarray(x, np.float32) - low) / step), 0, 2**bits - 1)
    return (q * step + low).astype(np.float32)


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """``n = 8 / bits`` consecutive codes of the last axis in one byte, the first in the low bits."""
    n = codes_per_byte(bits)
    q = np.asarray(q).astype(np.int64)
    qg = q.reshape(*q.shape[:-1], q.shape[-1] // n, n)
    weights = (2 ** (bits * np.arange(n))).astype(np.int64)
    return (qg * weights).sum(axis=-1).astype(np.uint8)


def unpack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    n = codes_per_byte(bits)
    c = np.asarray(codes).astype(np.int64)[..., None]
    q = (c >> (bits * np.arange(n))) & (2**bits - 1)
    return q.reshape(*codes.shape[:-1], codes.shape[-1] * n)


def balanced_order(magnitude: np.ndarray, blocks: int) -> np.ndarray:
    """A channel order that deals the channels, largest calibrated magnitude first, over
    ``blocks`` equal blocks in zig-zag order (0, 1, …, n−1, n−1, …, 0, …): every block of the
    rotation gets a balanced share of the outlier channels. ``order[j]`` is the channel put
    at position ``j``."""
    magnitude = np.asarray(magnitude, dtype=np.float64)
    d = magnitude.shape[0]
    if blocks < 1 or d % blocks:
        raise ValueError(f"{blocks} rotation blocks do not divide the head size {d}")
    size = d // blocks
    ranked = np.argsort(-magnitude, kind="stable")
    slots: list[list[int]] = [[] for _ in range(blocks)]
    for rank, channel in enumerate(ranked):
        sweep, offset = divmod(rank, blocks)
        slots[offset if sweep % 2 == 0 else blocks - 1 - offset].append(int(channel))
    assert all(len(slot) == size for slot in slots)
    return np.array([channel for slot in slots for channel in slot], dtype=np.int64)


def outlier_aware_rotation(head_dim: int, block: int, magnitude: np.ndarray | None) -> np.ndarray:
    """``R = P · (I ⊗ H_block)`` (float64, orthogonal): ``x @ R`` reorders the channels of ``x``
    by :func:`balanced_order` (when ``magnitude`` is given) and rotates each block of
    ``block`` channels with a normalized Walsh-Hadamard matrix."""
    if block < 1 or head_dim % block or not is_power_of_two(block):
        raise ValueError(f"rotation block {block} must be a power of two dividing the head size {head_dim}")
    rotation = np.kron(np.eye(head_dim // block), hadamard_rotation(block))
    if magnitude is None:
        return rotation
    order = balanced_order(magnitude, head_dim // block)
    permutation = np.zeros((head_dim, head_dim))
    permutation[order, np.arange(head_dim)] = 1.0  # (x @ P)[:, j] = x[:, order[j]]
    return permutation @ rotation


def cache_bytes_per_token(head_dim: int, bits: int, group: int, *, scale_bytes: int = 2,
                          per_token_scales: bool = True) -> float:
    """Bytes one token costs per kv head in a packed cache (codes, plus float16 step and
    minimum per group when the grid is per token), beside ``4 · head_dim`` in fp32."""
    codes = head_dim * bits / 8
    return codes + (2 * scale_bytes * head_dim // group if per_token_scales else 0)
