"""Quantization grids (numpy only): symmetric per-channel int8 weight scales, asymmetric
per-tensor activation parameters, group grids along output or input channels with clip
search, blockwise int4 levels and their packing, and fake quantization of weights. The
rounding conventions are onnxruntime's (round half to even, int8 grid [−127, 127]).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from outlierquant.numerics.slabs import slabs


def weight_scales(weight: np.ndarray, axis: int, bits: int = 8) -> np.ndarray:
    """Symmetric per-channel scales along ``axis`` (the output channels)."""
    qmax = 2 ** (bits - 1) - 1
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    # max(max, −min) is max(|w|) without a weight-sized temporary (an LM head's is 128+ MiB)
    absmax = np.maximum(weight.max(axis=reduce_axes), -weight.min(axis=reduce_axes)).astype(np.float32)
    scale = absmax / np.float32(qmax)
    return np.where(scale > np.finfo(np.float32).tiny, scale, np.float32(1.0)).astype(np.float32)


def quantize_weight(weight: np.ndarray, axis: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and their scales (round half to even, as QuantizeLinear)."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight_scales(weight, axis, bits)
    shape = [1] * weight.ndim
    shape[axis] = -1
    scale_b = scale.reshape(shape)
    q = np.empty(weight.shape, np.int8)
    if weight.ndim == 0:
        q[...] = np.clip(np.rint(weight / scale_b), -qmax, qmax)
        return q, scale
    # a slab of the leading axis at a time: elementwise, so the same values as one pass
    for part in slabs(weight.shape[0], weight.size // max(1, weight.shape[0])):
        q[part] = np.clip(np.rint(weight[part] / (scale_b if axis != 0 else scale_b[part])), -qmax, qmax)
    return q, scale


def activation_scale_zero_point(rmin: float, rmax: float, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric uint8 (or symmetric int8) per-tensor parameters for a calibrated range."""
    rmin = min(float(rmin), 0.0)
    rmax = max(float(rmax), 0.0)
    if dtype == "uint8":
        scale = np.float32((rmax - rmin) / 255.0)
        if not scale > np.finfo(np.float32).tiny:
            return np.array(1.0, np.float32), np.array(0, np.uint8)
        zero_point = np.uint8(np.clip(np.rint(-rmin / scale), 0, 255))
        return np.array(scale, np.float32), np.array(zero_point, np.uint8)
    absmax = max(abs(rmin), abs(rmax))
    scale = np.float32(absmax / 127.0)
    if not scale > np.finfo(np.float32).tiny:
        scale = np.float32(1.0)
    return np.array(scale, np.float32), np.array(0, np.int8)


@dataclasses.dataclass
class GroupGrid:
    """Per-group scale / zero point, compact (``[K/G, N]`` per_oc, ``[K, N/G]`` per_ic)."""

    dimension: str
    group_size: int
    bits: int
    scale: np.ndarray
    zero: np.ndarray

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def expand(self, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point broadcast to ``[K, N]``."""
        if self.dimension == "per_oc":
            s = np.repeat(self.scale, self.group_size, axis=0)[:k]
            z = np.repeat(self.zero, self.group_size, axis=0)[:k]
        else:
            s = np.repeat(self.scale, self.group_size, axis=1)[:, :n]
            z = np.repeat(self.zero, self.group_size, axis=1)[:, :n]
        return s, z

    def levels(self, w: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(w / s) + z, 0, self.maxq)


def _grouped(a: np.ndarray, dimension: str, g: int) -> np.ndarray:
    """``[K, N]`` → groups on axis 1: ``[K/G, G, N]`` (per_oc) or ``[K, N/G, G]`` (per_ic), zero-padded."""
    k, n = a.shape
    if dimension == "per_oc":
        kp = -(-k // g) * g
        padded = np.zeros((kp, n), a.dtype)
        padded[:k] = a
        return padded.reshape(kp // g, g, n)
    np_ = -(-n // g) * g
    padded = np.zeros((k, np_), a.dtype)
    padded[:, :n] = a
    return padded.reshape(k, np_ // g, g)


def group_grid(weight: np.ndarray, dimension: str, group_size: int, bits: int, *,
               row_weight: np.ndarray | None = None, clip_ratios=(1.0,), keep_out: np.ndarray | None = None) -> GroupGrid:
    """Asymmetric min/max grid per group (zero included), with the clip search of the module doc.

    ``row_weight``: ``E[x_k²]`` per input row (weights the clip search); ``keep_out``: mask of
    weights left out of the ranges (kept in float).
    """
    k, n = weight.shape
    w = np.asarray(weight, dtype=np.float64)
    if keep_out is not None:
        w = np.where(keep_out, 0.0, w)
    rw = np.ones(k) if row_weight is None else np.maximum(np.asarray(row_weight, np.float64), 1e-12)
    reduce_axis = 1 if dimension == "per_oc" else 2
    blocks = _grouped(w, dimension, group_size)
    weights = _grouped(np.broadcast_to(rw[:, None], (k, n)).copy(), dimension, group_size)
    lo = np.minimum(blocks.min(axis=reduce_axis, keepdims=True), 0.0)
    hi = np.maximum(blocks.max(axis=reduce_axis, keepdims=True), 0.0)
    maxq = 2**bits - 1
    best_err = best_scale = best_zero = None
    for ratio in clip_ratios:
        scale = (hi - lo) * ratio / maxq
        scale = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.rint(-lo * ratio / scale), 0, maxq)
        q = np.clip(np.rint(blocks / scale) + zero, 0, maxq)
        err = (((q - zero) * scale - blocks) ** 2 * weights).sum(axis=reduce_axis, keepdims=True)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, zero, best_zero)
    return GroupGrid(dimension, group_size, bits, best_scale.squeeze(reduce_axis).astype(np.float32),
                     best_zero.squeeze(reduce_axis).astype(np.uint8))


def rtn_levels(weight: np.ndarray, grid: GroupGrid, fixed: np.ndarray | None = None) -> np.ndarray:
    k, n = weight.shape
    s, z = grid.expand(k, n)
    q = grid.levels(np.asarray(weight, np.float64), s, z)
    return q if fixed is None else np.where(fixed, z, q)


def dequantize_levels(q: np.ndarray, grid: GroupGrid) -> np.ndarray:
    s, z = grid.expand(*q.shape)
    return (q - z.astype(np.float64)) * s


@dataclasses.dataclass
class BlockwiseWeight:
    """Levels ``q [K, N]`` (uint8, ``0 … 2^b − 1``) on a per-block ``grid`` (blocks along K)."""

    levels: np.ndarray
    grid: GroupGrid
    symmetric: bool

    @property
    def bits(self) -> int:
        return self.grid.bits

    @property
    def block_size(self) -> int:
        return self.grid.group_size

    def dequantize(self, columns: slice = slice(None)) -> np.ndarray:
        """``(q − z) · s`` in float64 with the float32 scales that are stored (of ``columns``)."""
        q = self.levels[:, columns]
        grid = dataclasses.replace(self.grid, scale=self.grid.scale[:, columns], zero=self.grid.zero[:, columns])
        s, z = grid.expand(*q.shape)
        return (q.astype(np.float64) - z.astype(np.float64)) * s.astype(np.float64)

    def weighted_error(self, weight: np.ndarray, row_weight: np.ndarray | None = None) -> tuple[float, float]:
        """``Σ rw_k (ŵ − w)²`` and ``Σ rw_k w²`` over the ``[K, N]`` ``weight`` this quantizes,
        a column chunk at a time (no full-size float64 temporaries)."""
        k, n = self.levels.shape
        rw = np.ones((k, 1)) if row_weight is None else np.asarray(row_weight, np.float64)[:, None]
        error = reference = 0.0
        for columns in slabs(n, k):
            w = np.asarray(weight[:, columns], dtype=np.float64)
            error += float(np.sum((self.dequantize(columns) - w) ** 2 * rw))
            reference += float(np.sum(w**2 * rw))
        return error, reference


def _blocks(a: np.ndarray, block: int) -> np.ndarray:
    """``[K, N]`` → ``[K/G, G, N]`` (zero-padded rows)."""
    k, n = a.shape
    padded = -(-k // block) * block
    out = np.zeros((padded, n), a.dtype)
    out[:k] = a
    return out.reshape(padded // block, block, n)


def _symmetric_grid(weight: np.ndarray, bits: int, block: int, row_weight: np.ndarray,
                    clip_ratios: tuple[float, ...]) -> GroupGrid:
    """onnxruntime's symmetric grid: the signed extreme of a block maps to level 0 (``−2^(b−1)``)."""
    half = 2 ** (bits - 1)
    blocks = _blocks(weight, block)
    k, n = weight.shape
    weights = _blocks(np.broadcast_to(row_weight[:, None], (k, n)).copy(), block)
    hi = blocks.max(axis=1, keepdims=True)
    lo = blocks.min(axis=1, keepdims=True)
    extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo)
    best_err = best_scale = None
    for ratio in clip_ratios:
        scale = (extreme * ratio / -half).astype(np.float32).astype(np.float64)
        safe = np.where(scale != 0, scale, 1.0)
        q = np.clip(np.rint(blocks / safe), -half, half - 1)
        err = ((q * safe - blocks) ** 2 * weights).sum(axis=1, keepdims=True)
        if best_err is None:
            best_err, best_scale = err, safe
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, safe, best_scale)
    scale = best_scale.squeeze(1).astype(np.float32)
    return GroupGrid("per_oc", block, bits, scale, np.full(scale.shape, half, np.uint8))


def quantize_blockwise(weight: np.ndarray, bits: int = 4, block: int = 32, *, symmetric: bool = False,
                       clip_ratios: tuple[float, ...] = (1.0,), row_weight: np.ndarray | None = None,
                       axis: int = 0) -> BlockwiseWeight:
    """Quantize ``weight`` in blocks of ``block`` along ``axis`` (0: K of a ``[K, N]`` weight).

    ``row_weight`` (``E[x_k²]``) weights the clip search; ``axis=1`` quantizes the
    transpose (blocks along the last axis) and returns levels in that transposed layout.
    Every output column is quantized on its own, so the work runs over chunks of columns
    (bounded memory) with the same result as one pass over the whole matrix.
    """
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"weight has rank {w.ndim}: expected 2")
    if axis == 1:
        w = w.T
    elif axis != 0:
        raise ValueError(f"axis={axis}: allowed 0, 1")
    k, n = w.shape
    rw = np.ones(k) if row_weight is None else np.maximum(np.asarray(row_weight, np.float64), 1e-12)
    scales, zeros, levels = [], [], []
    # the clip search holds several temporaries of a chunk's size: a vocabulary-sized LM
    # head at once would need over a GiB
    for columns in slabs(n, k):
        chunk = np.asarray(w[:, columns], dtype=np.float64)
        if symmetric:
            grid = _symmetric_grid(chunk, bits, block, rw, tuple(clip_ratios))
        else:
            grid = group_grid(chunk, "per_oc", block, bits, row_weight=rw, clip_ratios=tuple(clip_ratios))
        s, z = grid.expand(*chunk.shape)
        levels.append(grid.levels(chunk, s.astype(np.float64), z.astype(np.float64)).astype(np.uint8))
        scales.append(grid.scale)
        zeros.append(grid.zero)
    one = len(levels) == 1
    grid = GroupGrid("per_oc", block, bits, scales[0] if one else np.concatenate(scales, axis=1),
                     zeros[0] if one else np.concatenate(zeros, axis=1))
    return BlockwiseWeight(levels[0] if one else np.concatenate(levels, axis=1), grid, symmetric)


def pack_levels(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack along the last axis, ``8 // bits`` per byte, first element in the lowest bits.

    3-bit levels use the 4-bit layout (MatMulNBits and int4 tensors have no 3-bit one).
    """
    container = 4 if bits == 3 else bits
    if container == 8:
        return np.ascontiguousarray(levels, dtype=np.uint8)
    per_byte = 8 // container
    levels = np.asarray(levels, dtype=np.uint8)  # no copy of uint8 levels (an LM head's are 32 MiB)
    pad = -levels.shape[-1] % per_byte
    if pad:
        levels = np.concatenate([levels, np.zeros(levels.shape[:-1] + (pad,), np.uint8)], axis=-1)
    grouped = levels.reshape(levels.shape[:-1] + (-1, per_byte))
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per_byte):
        packed |= (grouped[..., i] & (2**container - 1)) << (i * container)
    return packed


def unpack_levels(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_levels` (``count`` elements along the last axis)."""
    container = 4 if bits == 3 else bits
    if container == 8:
        return packed[..., :count].copy()
    per_byte = 8 // container
    parts = [(packed >> (i * container)) & (2**container - 1) for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :count].astype(np.uint8)


def fake_quantize_weight(weight: np.ndarray, bits: int, group_size: int = 0, *,
                         clip_ratios: tuple[float, ...] = (1.0,), dtype=np.float64) -> np.ndarray:
    """Symmetric round-to-nearest of a ``[K, N]`` weight, per output channel or per group of
    ``group_size`` input rows; returns the dequantized weight as ``dtype``.

    Each scale is ``r · max|W_group| / qmax`` with ``r`` the entry of ``clip_ratios`` that
    minimises that group's squared rounding error (``(1.0,)``: plain abs-max RTN). Every
    group lies in one output column, so the work goes a slab of columns at a time (an LM
    head is never whole in float64) with the one-pass values.
    """
    k, n = np.shape(weight)
    out = np.empty((k, n), dtype)
    for cols in slabs(n, k):
        out[:, cols] = _fake_quantize_columns(np.asarray(weight[:, cols], dtype=np.float64), bits, group_size,
                                              clip_ratios)
    return out


def _fake_quantize_columns(w: np.ndarray, bits: int, group_size: int, clip_ratios) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    k, n = w.shape
    g = group_size if group_size and group_size < k else k
    pad = (-k) % g
    padded = np.concatenate([w, np.zeros((pad, n))]) if pad else w
    blocks = padded.reshape(-1, g, n)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    best = None
    best_error = None
    for ratio in clip_ratios:
        scale = np.where(absmax > 0, absmax * ratio / qmax, 1.0)
        candidate = np.clip(np.rint(blocks / scale), -qmax - 1, qmax) * scale
        error = ((candidate - blocks) ** 2).sum(axis=1, keepdims=True)
        if best is None:
            best, best_error = candidate, error
        else:
            better = error < best_error
            best = np.where(better, candidate, best)
            best_error = np.minimum(error, best_error)
    return best.reshape(-1, n)[:k]


def as_f64(array) -> np.ndarray:
    """``array`` as float64: the rewrites compute in double and cast back on writing."""
    return np.asarray(array, dtype=np.float64)
