"""Number formats (numpy only): small floating-point element formats, OCP microscaling (MX)
blocks and classic block floating point — bit-exact references for what the emitted graphs
compute.

**Small floats.** A format with ``e`` exponent bits, ``m`` mantissa bits and bias ``b``
holds ``±2^E · (1 + f/2^m)`` for normal exponents ``E ≥ emin = 1 − b`` and the
subnormals ``±2^emin · f/2^m`` (``f < 2^m``), up to the largest finite value ``max``:

====================  ====  ====  ====  ==========  ======  =========  =================
format                 e     m     b    max finite  Inf     NaN        emax = ⌊log2 max⌋
====================  ====  ====  ====  ==========  ======  =========  =================
FP8 E4M3 (``fn``)      4     3     7    448         no      S.1111.111  8
FP8 E5M2               5     2    15    57344       yes     yes         15
FP6 E2M3               2     3     1    7.5         no      no          2
FP6 E3M2               3     2     3    28          no      no          4
FP4 E2M1               2     1     1    6           no      no          2
FP4 E3M0               3     0     3    16          no      no          4
FP4 E1M2               1     2     0    3.5         no      no          1
====================  ====  ====  ====  ==========  ======  =========  =================

E4M3 gives up infinities to keep one more binade (its all-ones exponent holds normal
numbers except the one NaN mantissa), so ``max = 1.75 · 2^8``; E5M2 is IEEE-like, ``max =
1.75 · 2^15``. FP4 E2M1 holds exactly the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. The other
two 4-bit splits, which LLM-FP4 (Liu et al. 2023) searches beside E2M1, use every code for
a finite number with the usual bias ``2^(e−1) − 1``: E3M0 holds 0 and the powers of two
0.25 … 16 (with no mantissa bit a tie between ``2^E`` and ``2^(E+1)`` rounds up), E1M2 the
uniform grid 0, 0.5, …, 3.5 (an INT4-like format).

Rounding (:func:`round_to_format`) is to nearest, ties to even, on the format's grid
with an unbounded exponent: the quantum of ``|v|`` is ``2^(max(⌊log2|v|⌋, emin) − m)``,
so subnormals fall out of the same rule. Then out-of-range results are handled:
``saturate=True`` clamps every ``|r| > max`` — infinities included — to ``±max`` (the
``saturate`` rule of ONNX ``QuantizeLinear`` / ``Cast`` for E4M3FN and E5M2, which the
emitted graphs run); ``saturate=False`` gives ``±Inf`` where the format has infinities
(E5M2) and NaN otherwise (E4M3FN) — what ``ml_dtypes`` casting does. FP6 and FP4 have
neither, so they always saturate. NaN stays NaN (also in formats that cannot encode it:
the reference keeps it visible rather than inventing a number).

:func:`quantize_float` divides by a scale first, in float32 as onnxruntime's
``QuantizeLinear`` does (``v = fl32(x / s)``), rounds, and returns ``round(v) · s`` in
float32 (``DequantizeLinear``); with ``s = max|x| / max`` the largest value lands on the
format's maximum.

**MX blocks** (OCP Microscaling Formats specification v1.0). ``k = 32`` consecutive values
``V_i`` along one axis share a scale ``X = 2^s`` stored as E8M0 (an 8-bit biased exponent,
``s ∈ [−127, 127]``, the all-ones code meaning NaN). With ``emax_elem`` the exponent of the
element format's largest normal (table above; 0 for INT8)::

    s   = clamp(⌊log2 max_i |V_i|⌋ − emax_elem, −127, 127)
    P_i = quantize_to_element(V_i / X)          (ties to even, saturating at the element max)
    V̂_i = X · P_i

so the block maximum lands in the element format's top binade ``[2^emax, 2^(emax+1))`` and
saturates at ``max`` when above it (E2M1: a block maximum in (6, 8)·X becomes 6·X). A block
of zeros takes the smallest scale. A block holding a NaN or an infinity gets the NaN scale:
every element of it decodes to NaN. MXFP8 = E4M3 (or E5M2) elements, MXFP6 = E2M3 (or
E3M2), MXFP4 = E2M1, MXINT8 = 8-bit two's-complement elements with 6 fractional bits
(``P = q / 64``, ``emax_elem = 0``); we use the symmetric range ``q ∈ [−127, 127]`` and
leave the code −128 unused.

**Block floating point** (BFP): blocks of 16 or 32 values along one axis share the exponent
``E = ⌊log2 max_i |V_i|⌋`` of their largest magnitude (an 8-bit exponent: float32's normal
range ``[−126, 127]``), and each value keeps an ``M``-bit sign-magnitude mantissa
``q_i ∈ [−(2^(M−1) − 1), 2^(M−1) − 1]``::

    V̂_i = q_i · 2^(E − (M − 2)),    q_i = clamp(round_half_even(V_i / 2^(E − (M − 2))))

(one integer bit, ``M − 2`` fraction bits; the block maximum is in ``[2^(M−2), 2^(M−1))``
steps and saturates when it rounds up to ``2^(M−1)``). With ``M = 8`` and blocks of 32 this
is MXINT8 without the E8M0 clamp.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A small floating-point format: sign, ``exponent_bits``, ``mantissa_bits``, ``bias``."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    has_inf: bool
    has_nan: bool
    max_finite: float
    #: the ONNX TensorProto data type name when ONNX has one (onnxruntime may still lack kernels)
    onnx_type: str | None = None

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number, ``1 − bias``."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal number, ``⌊log2 max_finite⌋``."""
        return int(math.floor(math.log2(self.max_finite)))

    @property
    def min_subnormal(self) -> float:
        return math.ldexp(1.0, self.emin - self.mantissa_bits)

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    def grid(self) -> np.ndarray:
        """Every non-negative finite value of the format, ascending (for tests and tables)."""
        m = self.mantissa_bits
        values = {f * self.min_subnormal for f in range(2 ** m)}  # zero and the subnormals
        for e in range(self.emin, self.emax + 1):
            values.update(math.ldexp(1.0 + f / 2 ** m, e) for f in range(2 ** m))
        return np.array(sorted(v for v in values if v <= self.max_finite))


FP8_E4M3 = FloatFormat("fp8_e4m3", 4, 3, 7, has_inf=False, has_nan=True, max_finite=448.0,
                       onnx_type="FLOAT8E4M3FN")
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, 15, has_inf=True, has_nan=True, max_finite=57344.0,
                       onnx_type="FLOAT8E5M2")
FP6_E2M3 = FloatFormat("fp6_e2m3", 2, 3, 1, has_inf=False, has_nan=False, max_finite=7.5)
FP6_E3M2 = FloatFormat("fp6_e3m2", 3, 2, 3, has_inf=False, has_nan=False, max_finite=28.0)
FP4_E2M1 = FloatFormat("fp4_e2m1", 2, 1, 1, has_inf=False, has_nan=False, max_finite=6.0,
                       onnx_type="FLOAT4E2M1")

FP4_E3M0 = FloatFormat("fp4_e3m0", 3, 0, 3, has_inf=False, has_nan=False, max_finite=16.0)
FP4_E1M2 = FloatFormat("fp4_e1m2", 1, 2, 0, has_inf=False, has_nan=False, max_finite=3.5)

FLOAT_FORMATS: dict[str, FloatFormat] = {f.name: f for f in (FP8_E4M3, FP8_E5M2, FP6_E2M3, FP6_E3M2, FP4_E2M1,
                                                             FP4_E3M0, FP4_E1M2)}
#: the 4-bit exponent/mantissa splits LLM-FP4 searches, by their short names
FP4_SPLITS: dict[str, FloatFormat] = {"e2m1": FP4_E2M1, "e3m0": FP4_E3M0, "e1m2": FP4_E1M2}

#: the MXINT8 element: two's complement with 6 fractional bits, symmetric range ±127/64
MX_INT8 = "int8"
MXINT8_FRACTION_BITS = 6

#: OCP MX concrete formats -> element format (the first variant of MXFP8 / MXFP6 is the default)
MX_FORMATS: dict[str, FloatFormat | str] = {
    "mxfp8": FP8_E4M3, "mxfp8_e4m3": FP8_E4M3, "mxfp8_e5m2": FP8_E5M2,
    "mxfp6": FP6_E2M3, "mxfp6_e2m3": FP6_E2M3, "mxfp6_e3m2": FP6_E3M2,
    "mxfp4": FP4_E2M1, "mxint8": MX_INT8,
}
MX_BLOCK = 32
#: range of the E8M0 shared exponent (the code 0xFF is NaN)
E8M0_MIN, E8M0_MAX = -127, 127
#: range of the BFP shared exponent (float32's normal exponents)
BFP_EXP_MIN, BFP_EXP_MAX = -126, 127


def float_format(name: str | FloatFormat) -> FloatFormat:
    if isinstance(name, FloatFormat):
        return name
    try:
        return FLOAT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown float format {name!r} (allowed: {', '.join(FLOAT_FORMATS)})") from None


# -- element rounding ----------------------------------------------------------------------


def round_to_format(v, fmt: str | FloatFormat, *, saturate: bool = True) -> np.ndarray:
    """``v`` rounded to the nearest value of ``fmt`` (ties to even), as float64.

    Overflow: see the module docstring (``saturate``; formats without Inf and NaN always
    saturate). NaN stays NaN; the sign of zero is kept.
    """
    fmt = float_format(fmt)
    v = np.asarray(v, dtype=np.float64)
    a = np.abs(v)
    with np.errstate(invalid="ignore", over="ignore"):
        _, k = np.frexp(a)  # a = f · 2^k, f in [0.5, 1): ⌊log2 a⌋ = k − 1 (k = 0 for 0, Inf, NaN)
        exponent = np.maximum(k - 1, fmt.emin)
        quantum = np.ldexp(1.0, exponent - fmt.mantissa_bits)
        r = np.rint(a / quantum) * quantum
        over = r > fmt.max_finite  # Inf included; NaN compares false
    if saturate or not (fmt.has_inf or fmt.has_nan):
        r = np.where(over, fmt.max_finite, r)
    else:
        r = np.where(over, np.inf if fmt.has_inf else np.nan, r)
    return np.copysign(r, v)


def absmax_scale(absmax, fmt: str | FloatFormat) -> np.ndarray:
    """The float32 scale ``max|x| / max_finite`` mapping a range onto the format (1 for 0)."""
    fmt = float_format(fmt)
    absmax = np.asarray(absmax, dtype=np.float32)
    scale = absmax / np.float32(fmt.max_finite)
    return np.where(scale > np.finfo(np.float32).tiny, scale, np.float32(1.0)).astype(np.float32)


def quantize_float(x, fmt: str | FloatFormat, scale=1.0, *, saturate: bool = True) -> np.ndarray:
    """Quantize-dequantize ``x`` to ``fmt`` with ``scale`` (broadcast against ``x``), float32.

    ``fl32(round(fl32(x / scale)) · scale)``: the arithmetic of ``QuantizeLinear`` followed
    by ``DequantizeLinear`` with a float8 zero point of 0.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        v = x / scale
        return (round_to_format(v, fmt, saturate=saturate).astype(np.float32) * scale).astype(np.float32)


# -- blocks --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """Values sharing one power-of-two scale per block of ``block`` along ``axis``.

    ``elements`` has the input's shape and holds the element values ``P_i`` (float64);
    ``exponents`` has the input's shape with ``axis`` cut to ``ceil(n / block)`` blocks and
    holds the shared exponents ``s`` (NaN for a block with a NaN or an infinity), so that
    ``V̂ = P · 2^s``.
    """

    elements: np.ndarray
    exponents: np.ndarray
    block: int
    axis: int

    def scales(self) -> np.ndarray:
        """``2^s`` per block, float32 (NaN for NaN blocks)."""
        with np.errstate(invalid="ignore"):
            return np.where(np.isnan(self.exponents), np.nan,
                            np.ldexp(1.0, np.nan_to_num(self.exponents).astype(np.int64))).astype(np.float32)

    def expanded_scales(self) -> np.ndarray:
        """The block scales repeated to the elements' shape (float32)."""
        n = self.elements.shape[self.axis]
        return np.repeat(self.scales(), self.block, axis=self.axis).take(np.arange(n), axis=self.axis)

    def dequantized(self) -> np.ndarray:
        """``P · 2^s`` in float32 (what ``DequantizeLinear`` with block scales computes)."""
        with np.errstate(invalid="ignore", over="ignore"):
            return (self.elements.astype(np.float32) * self.expanded_scales()).astype(np.float32)


def _as_blocks(x: np.ndarray, block: int, axis: int) -> tuple[np.ndarray, int, int]:
    """``x`` with ``axis`` moved last, zero-padded to whole blocks, as ``[..., blocks, block]``."""
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r}: a positive integer")
    axis = axis % x.ndim
    moved = np.moveaxis(x, axis, -1)
    n = moved.shape[-1]
    padded_n = -(-n // block) * block
    if padded_n != n:
        moved = np.concatenate([moved, np.zeros(moved.shape[:-1] + (padded_n - n,), moved.dtype)], axis=-1)
    return moved.reshape(moved.shape[:-1] + (padded_n // block, block)), axis, n


def _from_blocks(blocks: np.ndarray, axis: int, n: int) -> np.ndarray:
    flat = blocks.reshape(blocks.shape[:-2] + (-1,))[..., :n]
    return np.moveaxis(flat, -1, axis)


def _floor_log2(a: np.ndarray) -> np.ndarray:
    """``⌊log2 a⌋`` for positive finite ``a`` (exact, from the binary exponent)."""
    _, k = np.frexp(a)
    return (k - 1).astype(np.float64)


def _shared_exponents(blocks: np.ndarray, low: int, high: int, offset: int) -> np.ndarray:
    """``clamp(⌊log2 max|block|⌋ − offset, low, high)`` per block; ``low`` for zero blocks, NaN
    for blocks holding a NaN or an infinity."""
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(blocks), axis=-1)
        bad = ~np.isfinite(amax) | np.isnan(blocks).any(axis=-1)
        positive = np.where(bad | (amax == 0), 1.0, amax)
    exponents = np.clip(_floor_log2(positive) - offset, low, high)
    exponents = np.where(amax == 0, float(low), exponents)
    return np.where(bad, np.nan, exponents)


def mx_element(element: str | FloatFormat) -> FloatFormat | str:
    """The element format of an MX format name (``mxfp4``), a float format, or ``"int8"``."""
    if isinstance(element, FloatFormat) or element == MX_INT8:
        return element
    if element in MX_FORMATS:
        return MX_FORMATS[element]
    if element in FLOAT_FORMATS:
        return FLOAT_FORMATS[element]
    raise ValueError(f"unknown MX element format {element!r} (allowed: {', '.join([*MX_FORMATS, *FLOAT_FORMATS])}, "
                     f"{MX_INT8!r})")


def mx_emax(element: str | FloatFormat) -> int:
    """``emax_elem``: the exponent of the element format's largest normal (0 for INT8)."""
    element = mx_element(element)
    return 0 if element == MX_INT8 else element.emax


def round_mx_element(v, element: str | FloatFormat) -> np.ndarray:
    """``v`` (already divided by the block scale) rounded to the MX element format."""
    element = mx_element(element)
    if element == MX_INT8:
        step = 2.0 ** MXINT8_FRACTION_BITS
        with np.errstate(invalid="ignore"):
            return np.clip(np.rint(np.asarray(v, np.float64) * step), -127, 127) / step
    return round_to_format(v, element, saturate=True)


def mx_blocks(x, element: str | FloatFormat, block: int = MX_BLOCK, axis: int = -1) -> BlockQuantized:
    """OCP MX quantization of ``x`` in blocks of ``block`` along ``axis`` (the parts)."""
    element = mx_element(element)
    x = np.asarray(x, dtype=np.float32)
    blocks, axis, n = _as_blocks(x.astype(np.float64), block, axis)
    exponents = _shared_exponents(blocks, E8M0_MIN, E8M0_MAX, mx_emax(element))
    with np.errstate(invalid="ignore"):
        v = blocks / np.ldexp(1.0, np.nan_to_num(exponents).astype(np.int64))[..., None]
        elements = round_mx_element(v, element)
        elements = np.where(np.isnan(exponents)[..., None], np.nan, elements)
    return BlockQuantized(_from_blocks(elements, axis, n), np.moveaxis(exponents, -1, axis), block, axis)


def mx_quantize(x, element: str | FloatFormat, block: int = MX_BLOCK, axis: int = -1) -> np.ndarray:
    """OCP MX quantize-dequantize of ``x`` (float32): ``element`` is ``mxfp8`` / ``mxfp6`` /
    ``mxfp4`` / ``mxint8`` (or a float format, or ``"int8"``), blocks of 32 along ``axis``."""
    return mx_blocks(x, element, block, axis).dequantized()


def bfp_blocks(x, mantissa_bits: int = 8, block: int = 16, axis: int = -1) -> BlockQuantized:
    """Block floating point: shared exponent per block, ``mantissa_bits``-bit sign-magnitude
    mantissas (the parts; ``elements`` are ``q · 2^−(M−2)`` in [−2, 2))."""
    if not isinstance(mantissa_bits, int) or not 2 <= mantissa_bits <= 24:
        raise ValueError(f"mantissa_bits={mantissa_bits!r}: an integer in 2..24")
    x = np.asarray(x, dtype=np.float32)
    blocks, axis, n = _as_blocks(x.astype(np.float64), block, axis)
    exponents = _shared_exponents(blocks, BFP_EXP_MIN, BFP_EXP_MAX, 0)
    qmax = 2 ** (mantissa_bits - 1) - 1
    fraction = mantissa_bits - 2
    with np.errstate(invalid="ignore"):
        step = np.ldexp(1.0, np.nan_to_num(exponents).astype(np.int64) - fraction)[..., None]
        q = np.clip(np.rint(blocks / step), -qmax, qmax)
        elements = np.where(np.isnan(exponents)[..., None], np.nan, q / 2.0 ** fraction)
    return BlockQuantized(_from_blocks(elements, axis, n), np.moveaxis(exponents, -1, axis), block, axis)


def bfp_quantize(x, mantissa_bits: int = 8, block: int = 16, axis: int = -1) -> np.ndarray:
    """Block-floating-point quantize-dequantize of ``x`` (float32)."""
    return bfp_blocks(x, mantissa_bits, block, axis).dequantized()


def integer_levels(quantized: BlockQuantized, fraction_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer elements ``q = P · 2^f`` and the float32 block scales ``2^(s − f)`` — the same
    values as a blocked ``DequantizeLinear`` of int8 levels (MXINT8: f = 6; BFP: f = M − 2)."""
    q = np.rint(np.nan_to_num(quantized.elements) * 2.0 ** fraction_bits)
    with np.errstate(invalid="ignore"):
        scales = np.ldexp(1.0, np.nan_to_num(quantized.exponents).astype(np.int64) - fraction_bits)
    return q, scales.astype(np.float32)


def float_weight(weight: np.ndarray, fmt: str | FloatFormat, *, per_channel: bool = True,
                 axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Scalar-format weight: ``(elements, scale)`` with ``scale = max|W| / max_finite`` per
    channel along ``axis`` (or per tensor) and ``elements = round(fl32(W / scale))``, so that
    ``elements · scale`` is :func:`quantize_float` of the weight."""
    weight = np.asarray(weight, dtype=np.float32)
    if per_channel:
        axis = axis % weight.ndim
        reduce = tuple(i for i in range(weight.ndim) if i != axis)
        scale = absmax_scale(np.abs(weight).max(axis=reduce), fmt)
        shape = [1] * weight.ndim
        shape[axis] = -1
        broadcast = scale.reshape(shape)
    else:
        scale = absmax_scale(np.abs(weight).max(), fmt)
        broadcast = scale
    with np.errstate(over="ignore", invalid="ignore"):
        elements = round_to_format(weight / broadcast, fmt)
    return elements, scale


# -- scale searches (LLM-FP4) and block reordering (Trukhanov & Soloveychik 2024) ------------

#: clip ratios a scale search tries: the range mapped onto the format's maximum is
#: ``ratio · max|x|`` (1.0 = plain absmax)
WEIGHT_CLIP_RATIOS = tuple(float(r) for r in np.round(np.linspace(0.5, 1.0, 11), 3))
ACTIVATION_CLIP_RATIOS = tuple(float(r) for r in np.round(np.linspace(0.3, 1.0, 15), 3))


def _ratios(ratios) -> np.ndarray:
    ratios = np.asarray(ratios, dtype=np.float64).reshape(-1)
    if ratios.size == 0 or np.any(~(ratios > 0)):
        raise ValueError(f"clip ratios {ratios.tolist()!r}: a non-empty list of positive numbers")
    return ratios


def search_channel_scales(weight, fmt: str | FloatFormat, importance=None,
                          ratios=WEIGHT_CLIP_RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel scale search for a ``[K, N]`` weight (LLM-FP4's per-channel
    real-valued exponent bias: a maximum value per channel is the same thing as a scale).

    For each column ``n`` and ratio ``r`` the scale is ``r · max_k |W_kn| / max_finite``;
    the chosen one minimises ``Σ_k importance_k · (Q(W_kn) − W_kn)²`` — the output error
    of that channel when the input channels are uncorrelated with second moments
    ``importance`` (``E[x_k²]``; ones when None). Returns ``(scales [N] float32,
    errors [N] float64)``.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight of shape {w.shape}: expected [K, N]")
    imp = np.ones(w.shape[0]) if importance is None else np.asarray(importance, dtype=np.float64).reshape(-1)
    if imp.shape[0] != w.shape[0]:
        raise ValueError(f"importance has {imp.shape[0]} entries, the weight {w.shape[0]} rows")
    amax = np.abs(w).max(axis=0).astype(np.float64)
    best_error = np.full(w.shape[1], np.inf)
    best_scale = absmax_scale(amax, fmt)
    w64 = w.astype(np.float64)
    for ratio in _ratios(ratios):
        scale = absmax_scale(amax * ratio, fmt)
        error = (((quantize_float(w, fmt, scale[None, :]) - w64) ** 2) * imp[:, None]).sum(axis=0)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale, best_scale)
    return best_scale.astype(np.float32), best_error


def search_tensor_scale(rows, fmt: str | FloatFormat, importance=None, ratios=ACTIVATION_CLIP_RATIOS,
                        absmax: float | None = None) -> tuple[float, float, float]:
    """One scale for an activation (LLM-FP4's tensor-wise exponent bias), searched on
    sampled rows ``[R, K]``: ``s = r · absmax / max_finite`` minimising
    ``Σ_k importance_k Σ_r (Q(x_rk) − x_rk)²`` (``importance``: the squared norm of the
    weight rows channel ``k`` meets, so the sum is the consumers' output error with
    uncorrelated channels). ``absmax``: the calibrated range (default: the rows' own).
    Returns ``(scale, ratio, error)``.
    """
    x = np.asarray(rows, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"rows of shape {x.shape}: expected a non-empty [R, K]")
    imp = np.ones(x.shape[1]) if importance is None else np.asarray(importance, dtype=np.float64).reshape(-1)
    if imp.shape[0] != x.shape[1]:
        raise ValueError(f"importance has {imp.shape[0]} entries, the rows {x.shape[1]} channels")
    top = float(np.abs(x).max()) if absmax is None else float(absmax)
    x64 = x.astype(np.float64)
    best = (float(absmax_scale(top, fmt)), 1.0, np.inf)
    for ratio in _ratios(ratios):
        scale = float(absmax_scale(top * ratio, fmt))
        error = float(((((quantize_float(x, fmt, scale) - x64) ** 2).sum(axis=0)) * imp).sum())
        if error < best[2]:
            best = (scale, float(ratio), error)
    return best


def preshift_exponents(absmax, max_shift: int = 8) -> np.ndarray:
    """LLM-FP4's pre-shifted exponent bias, the per-channel integer part: ``k_j = ⌊log2(M /
    a_j)⌋`` clipped to ``[0, max_shift]``, with ``a_j`` a channel's calibrated ``max|x_j|``
    and ``M`` the largest. Channel ``j`` scaled by ``2^k_j`` stays ``≤ M`` (the tensor-wise
    range is the largest channel's), and every channel's maximum then lies in ``(M/2, M]``
    unless the shift is capped. Zero channels get 0. Returns int64."""
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift={max_shift!r}: a non-negative integer")
    a = np.asarray(absmax, dtype=np.float64).reshape(-1)
    if np.any(~np.isfinite(a)) or np.any(a < 0):
        raise ValueError("absmax: finite non-negative values")
    top = a.max() if a.size else 0.0
    k = np.zeros(a.shape, dtype=np.int64)
    live = a > 0
    if top > 0:
        k[live] = np.floor(np.log2(top / a[live])).astype(np.int64)
        k = np.clip(k, 0, max_shift)
        k = np.where(live & (np.ldexp(a, k) > top), k - 1, k)  # log2 rounding at exact powers of two
    return k


def block_order(magnitude) -> np.ndarray:
    """The channel order that puts channels of similar calibrated magnitude in the same
    blocks: descending magnitude, ties in their original order. ``order[c]`` is the old
    channel that new channel ``c`` carries."""
    m = np.asarray(magnitude, dtype=np.float64).reshape(-1)
    if np.any(np.isnan(m)):
        raise ValueError("magnitude holds NaN")
    return np.argsort(-m, kind="stable")


def block_exponent_gap(magnitude, block: int) -> float:
    """Mean over channels of ``log2(max of its block / its own magnitude)``: how many
    binades below its block's shared scale a channel sits (the mantissa bits it loses).
    Channels of magnitude 0 are left out; blocks are consecutive along the channel axis."""
    m = np.asarray(magnitude, dtype=np.float64).reshape(-1)
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r}: a positive integer")
    padded = -(-m.size // block) * block
    blocks = np.concatenate([m, np.zeros(padded - m.size)]).reshape(-1, block)
    top = np.repeat(blocks.max(axis=1), block)[:m.size]
    live = m > 0
    return float(np.mean(np.log2(top[live] / m[live]))) if live.any() else 0.0
