"""How int8 weight codes are stored for onnxruntime's integer kernels: signed (``int8``,
zero point 0) or unsigned (``uint8``, zero point 128, the same values shifted).

Why both: onnxruntime runs an integer MatMul of uint8 activations and int8 weights (what
a QDQ MatMul, ``MatMulIntegerToFloat`` or ``MatMulInteger`` become) with MLAS's u8s8
kernels. On x86 CPUs with VNNI (``vpdpbusd``) they are exact and the fastest form; on x86
CPUs without it (AVX2 only: Intel before Cascade Lake, AMD before Zen 4) they multiply with
``vpmaddubsw``, which saturates each pair sum at int16 (255·127·2 > 32767). Measured on an
AVX2-only AMD EPYC: a toy model's int8 output error 11-12% with onnxruntime's fusions on,
1.1% with them off; the same model with unsigned weights, 1.1% fused. onnxruntime's u8u8
kernels widen to int16 before multiplying and never saturate. So the codes are unsigned
where the CPU lacks VNNI, signed elsewhere: ``auto`` decides from the CPU quantizing the
model (the usual case is that it also runs it); ``OUTLIERQUANT_INT8_WEIGHTS`` (or the
CLI's ``--int8-weights``) names the target explicitly. Both forms describe exactly the
same dequantized weights.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from typing import Iterator, Literal

import numpy as np

#: ``auto``, ``signed`` or ``unsigned`` (see the module doc)
ENV = "OUTLIERQUANT_INT8_WEIGHTS"
ENCODINGS = ("auto", "signed", "unsigned")

Encoding = Literal["signed", "unsigned"]

#: /proc/cpuinfo flags of x86 int8 dot-product instructions that do not saturate
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def host_saturates_u8s8() -> bool:
    """Whether this CPU runs u8s8 integer MatMuls with saturating int16 pair sums: an
    x86-64 CPU whose flags (Linux) show no VNNI. Elsewhere (ARM, or flags unreadable) False."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and not any(flag in flags for flag in _VNNI_FLAGS)


def weight_encoding() -> Encoding:
    """The encoding int8 weights get now: ``OUTLIERQUANT_INT8_WEIGHTS``, else ``auto``."""
    chosen = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if chosen not in ENCODINGS:
        raise ValueError(f"{ENV}={chosen!r}: allowed {', '.join(ENCODINGS)}")
    if chosen == "auto":
        return "unsigned" if host_saturates_u8s8() else "signed"
    return chosen  # type: ignore[return-value]


def describe_encoding() -> dict[str, str]:
    """The encoding and why, for the report."""
    chosen = os.environ.get(ENV, "auto").strip().lower() or "auto"
    encoding = weight_encoding()
    if chosen != "auto":
        reason = f"asked for ({ENV}={chosen})"
    elif encoding == "unsigned":
        reason = "this x86 CPU has no VNNI: onnxruntime's u8s8 kernels would saturate, u8u8 do not"
    else:
        reason = "this CPU runs u8s8 integer MatMuls exactly (VNNI, or not x86)"
    return {"encoding": encoding, "reason": reason}


@contextlib.contextmanager
def encoding_set(encoding: str | None) -> Iterator[None]:
    """Within the block, int8 weights get ``encoding`` (``None``: as configured already)."""
    if encoding is None:
        yield
        return
    if encoding not in ENCODINGS:
        raise ValueError(f"int8 weights {encoding!r}: allowed {', '.join(ENCODINGS)}")
    before = os.environ.get(ENV)
    os.environ[ENV] = encoding
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def weight_codes(levels: np.ndarray, zero_shape: tuple[int, ...] = (),
                 encoding: Encoding | None = None, *, reuse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stored codes and zero point of symmetric int8 weight ``levels`` (``[-127, 127]``).

    Signed: the levels and an int8 zero point 0. Unsigned: ``levels + 128`` as uint8 and a
    uint8 zero point 128 — ``(code − zero) = level`` exactly. ``zero_shape``: the zero
    point's shape (the scale's). ``reuse``: the caller gives ``levels`` up, and unsigned
    codes are written into its buffer (``level + 128`` is the int8 byte with its top bit
    flipped) instead of a second weight-sized array — an LM head's is 160+ MiB.
    """
    levels = np.asarray(levels)
    if levels.dtype != np.int8:
        raise ValueError(f"int8 weight levels expected, got {levels.dtype}")
    if (encoding or weight_encoding()) == "signed":
        return levels, np.zeros(zero_shape, np.int8)
    if reuse and levels.flags.writeable and levels.flags.c_contiguous:
        codes = levels.view(np.uint8)
        np.bitwise_xor(codes, np.uint8(0x80), out=codes)
        return codes, np.full(zero_shape, 128, np.uint8)
    codes = np.empty(levels.shape, np.uint8)
    np.add(levels, 128, out=codes, casting="unsafe", dtype=np.int16)
    return codes, np.full(zero_shape, 128, np.uint8)
