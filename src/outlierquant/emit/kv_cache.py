"""KV-cache quantization forms in standard ONNX ops (default domain, opset >= 18).

A cache tensor is ``[B, kv heads, T, D]`` (float32). The forms here are what
``passes/kv_cache.py`` writes; their arithmetic is :mod:`outlierquant.numerics.kv_quant`:

- :func:`per_token_grid` / :func:`channel_grid_levels`: codes ``q`` (integers in float),
  with the per-token step and minimum rounded to float16 (what a packed cache stores);
- :func:`dequantize`: ``q · step + min`` — written once, used by both the simulated form
  (right after quantizing) and the packed form (after unpacking), so the two agree bit
  for bit;
- :func:`pack` / :func:`unpack`: ``8 / bits`` codes per uint8 with Mul/ReduceSum/Cast and
  Div/Floor (exact in float32 for codes < 256);
- :func:`rotate_heads`: ``x @ R_h`` per kv head (``R`` constant ``[H, D, D]``), and the
  same rotation on queries laid out ``[B, H·r, S, D]`` (grouped-query attention: query
  head ``j`` reads kv head ``j // r``);
- :func:`positions_below`: a ``[1, 1, S_new, 1]`` mask of the new tokens whose cache
  position (past length + index) is below ``sinks``;
- :func:`recent_window`: the split a float window of recent tokens needs (KIVI's
  residual): the settled, already quantized part of the past and the window after it.

Every node carries :data:`~outlierquant.graph.tags.KEEP_FLOAT_KEY` so no quantizer takes
the rotation MatMul for a linear layer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from outlierquant.graph.tags import KEEP_FLOAT_KEY
from outlierquant.graph.values import NodeWriter, add_initializer

INT64_MAX = np.iinfo(np.int64).max


class CacheWriter(NodeWriter):
    """A :class:`NodeWriter` that also makes the constants its forms need."""

    def __init__(self, model: ir.Model, prefix: str) -> None:
        super().__init__(prefix, {KEEP_FLOAT_KEY: "kv-cache"})
        self.graph = model.graph

    def const(self, tag: str, array) -> ir.Value:
        return add_initializer(self.graph, f"{self.prefix}_{tag}", np.asarray(array))

    def ints(self, tag: str, values) -> ir.Value:
        return self.const(tag, np.asarray(values, dtype=np.int64))

    def floats(self, tag: str, values) -> ir.Value:
        return self.const(tag, np.asarray(values, dtype=np.float32))


def per_token_grid(w: CacheWriter, x: ir.Value, bits: int, group: int, head_dim: int, *, min_step: float):
    """``(q, step, low)``: ``q`` ``[B, H, S, D/G, G]``, ``step`` / ``low`` ``[B, H, S, D/G, 1]``
    (float16-rounded, as float32)."""
    op = w.op
    xg = op("Reshape", x, w.ints("groups", [0, 0, 0, head_dim // group, group]))
    axes = w.ints("axes", [-1])
    hi = op("ReduceMax", xg, axes, keepdims=1)
    lo = op("ReduceMin", xg, axes, keepdims=1)
    step = op("Max", op("Div", op("Sub", hi, lo), w.floats("qmax", 2**bits - 1)), w.floats("min_step", min_step))
    step = _through_float16(w, step)
    low = _through_float16(w, lo)
    q = op("Clip", op("Round", op("Div", op("Sub", xg, low), step)), w.floats("zero", 0.0),
           w.floats("qmax_clip", 2**bits - 1))
    return q, step, low


def channel_grid_levels(w: CacheWriter, x: ir.Value, bits: int, step: np.ndarray, low: np.ndarray):
    """``(q, step, low)`` of a static per-channel grid: constants ``[H, 1, D]``."""
    op = w.op
    step_v, low_v = w.floats("channel_step", step), w.floats("channel_min", low)
    q = op("Clip", op("Round", op("Div", op("Sub", x, low_v), step_v)), w.floats("zero", 0.0),
           w.floats("qmax_clip", 2**bits - 1))
    return q, step_v, low_v


def dequantize(w: CacheWriter, q: ir.Value, step: ir.Value, low: ir.Value, head_dim: int | None) -> ir.Value:
    """``q · step + low``, back to ``[B, H, T, D]`` when ``head_dim`` (grouped layout) is given."""
    out = w.op("Add", w.op("Mul", q, step), low)
    if head_dim is not None:
        out = w.op("Reshape", out, w.ints("heads", [0, 0, 0, head_dim]))
    return out


def pack(w: CacheWriter, q: ir.Value, bits: int, head_dim: int | None = None) -> ir.Value:
    """uint8 ``[B, H, S, D·bits/8]``: code ``k`` of each byte in bits ``k·bits …``. Give
    ``head_dim`` when ``S`` can be 0 (onnxruntime cannot infer a ``-1`` dim of an empty tensor)."""
    n = 8 // bits
    op = w.op
    grouped = op("Reshape", q, w.ints("bytes", [0, 0, 0, head_dim // n if head_dim else -1, n]))
    weights = w.floats("code_weights", [2.0 ** (bits * k) for k in range(n)])
    summed = op("ReduceSum", op("Mul", grouped, weights), w.ints("sum_axes", [-1]), keepdims=0)
    return op("Cast", summed, to=ir.DataType.UINT8)


def unpack(w: CacheWriter, codes: ir.Value, bits: int, group: int | None, head_dim: int) -> ir.Value:
    """Float codes from packed bytes: ``[B, H, T, D/G, G]`` (``group``) or ``[B, H, T, D]``."""
    n = 8 // bits
    op = w.op
    c = op("Unsqueeze", op("Cast", codes, to=ir.DataType.FLOAT), w.ints("last", [-1]))
    shifted = op("Floor", op("Div", c, w.floats("code_weights", [2.0 ** (bits * k) for k in range(n)])))
    top = w.floats("levels", 2.0**bits)
    q = op("Sub", shifted, op("Mul", op("Floor", op("Div", shifted, top)), top))
    target = [0, 0, 0, head_dim // group, group] if group else [0, 0, 0, head_dim]
    return op("Reshape", q, w.ints("unpacked", target))


def store_scale(w: CacheWriter, value: ir.Value, groups: int | None = None) -> ir.Value:
    """A ``[B, H, S, D/G, 1]`` step or minimum as the float16 ``[B, H, S, D/G]`` the cache holds
    (``groups`` = ``D/G`` when ``S`` can be 0)."""
    return w.op("Cast", w.op("Reshape", value, w.ints("scale_shape", [0, 0, 0, groups or -1])),
                to=ir.DataType.FLOAT16)


def load_scale(w: CacheWriter, value: ir.Value) -> ir.Value:
    return w.op("Unsqueeze", w.op("Cast", value, to=ir.DataType.FLOAT), w.ints("scale_axis", [-1]))


def _through_float16(w: CacheWriter, value: ir.Value) -> ir.Value:
    return w.op("Cast", w.op("Cast", value, to=ir.DataType.FLOAT16), to=ir.DataType.FLOAT)


def positions_below(w: CacheWriter, past: ir.Value, new: ir.Value, sinks: int) -> ir.Value:
    """Bool ``[1, 1, S_new, 1]``: cache position ``past length + i`` of new token ``i`` < ``sinks``."""
    op = w.op
    two = w.ints("seq_axis", [2])
    past_len = op("Squeeze", op("Gather", op("Shape", past), two, axis=0))
    new_len = op("Squeeze", op("Gather", op("Shape", new), two, axis=0))
    positions = op("Range", past_len, op("Add", past_len, new_len), w.const("one", np.array(1, dtype=np.int64)))
    column = op("Reshape", positions, w.ints("column", [1, 1, -1, 1]))
    return op("Less", column, w.const("sinks", np.array(sinks, dtype=np.int64)))


def recent_window(w: CacheWriter, past: ir.Value, new: ir.Value, recent: int):
    """``(settled, window, positions, limit)`` for a cache whose last ``recent`` positions stay
    float: ``start = max(P - recent, 0)`` (``P`` the past length); ``settled = past[:, :, :start]``
    was quantized when it left the window; ``window = Concat(past[:, :, start:], new)`` holds
    the candidates; ``positions`` ``[1, 1, W, 1]`` are their cache positions and ``limit`` the
    scalar ``T - recent``: a window position below it leaves the window in this call.

    Only the window is read per call (``recent`` + new tokens), not the whole cache."""
    op = w.op
    two = w.ints("seq_axis", [2])
    past_len = op("Gather", op("Shape", past), two, axis=0)  # [1]
    new_len = op("Gather", op("Shape", new), two, axis=0)
    size = w.ints("recent", [recent])
    start = op("Max", op("Sub", past_len, size), w.ints("zero_start", [0]))
    settled = op("Slice", past, w.ints("settled_start", [0]), start, two)
    window = op("Concat", op("Slice", past, start, w.ints("window_stop", [INT64_MAX]), two), new, axis=2)
    total = op("Add", past_len, new_len)
    scalar = w.ints("scalar", [])
    positions = op("Range", op("Reshape", start, scalar), op("Reshape", total, scalar),
                   w.const("one", np.array(1, dtype=np.int64)))
    column = op("Reshape", positions, w.ints("column", [1, 1, -1, 1]))
    limit = op("Reshape", op("Sub", total, size), scalar)
    return settled, window, column, limit


def keep_sinks(w: CacheWriter, past_sink: ir.Value, new: ir.Value, sinks: int) -> ir.Value:
    """The first ``sinks`` cache positions in float: ``Concat(past sink, new)[:, :, :sinks]``."""
    joined = w.op("Concat", past_sink, new, axis=2)
    return w.op("Slice", joined, w.ints("sink_start", [0]), w.ints("sink_stop", [sinks]), w.ints("sink_axis", [2]))


def replace_first(w: CacheWriter, full: ir.Value, sink: ir.Value) -> ir.Value:
    """``full`` with its first ``len(sink)`` positions replaced by ``sink`` (axis 2)."""
    op = w.op
    count = op("Slice", op("Shape", sink), w.ints("len_start", [2]), w.ints("len_stop", [3]))
    rest = op("Slice", full, count, w.ints("rest_stop", [INT64_MAX]), w.ints("rest_axis", [2]))
    return op("Concat", sink, rest, axis=2)


def float_shape(w: CacheWriter, codes: ir.Value, head_dim: int, recent: ir.Value | None = None) -> ir.Value:
    """``Shape`` of the float cache a packed ``codes`` tensor (and the float ``recent`` window
    after it, if any) stands for: ``[B, H, T, D]``."""
    if recent is None:
        leading = w.op("Slice", w.op("Shape", codes), w.ints("lead_start", [0]), w.ints("lead_stop", [3]))
        return w.op("Concat", leading, w.ints("head_dim", [head_dim]), axis=0)
    shape, recent_shape = w.op("Shape", codes), w.op("Shape", recent)
    two, three = w.ints("len_start", [2]), w.ints("len_stop", [3])
    length = w.op("Add", w.op("Slice", shape, two, three), w.op("Slice", recent_shape, two, three))
    leading = w.op("Slice", shape, w.ints("lead_start", [0]), two)
    return w.op("Concat", leading, length, w.ints("head_dim", [head_dim]), axis=0)


def leave_window(w: CacheWriter, window: ir.Value, recent: int) -> tuple[ir.Value, ir.Value]:
    """``(leaving, kept)``: ``window`` split on axis 2 so that ``kept`` holds its last ``recent``
    positions (all of them when it is shorter)."""
    op = w.op
    two = w.ints("seq_axis", [2])
    length = op("Gather", op("Shape", window), two, axis=0)
    cut = op("Max", op("Sub", length, w.ints("recent", [recent])), w.ints("zero_start", [0]))
    leaving = op("Slice", window, w.ints("window_start", [0]), cut, two)
    return leaving, op("Slice", window, cut, w.ints("window_stop", [INT64_MAX]), two)


def rotate_heads(w: CacheWriter, x: ir.Value, rotation: np.ndarray, *, query: bool) -> ir.Value:
    """``x @ R_h`` with ``R`` ``[H, D, D]``; a query ``[B, H·r, S, D]`` is viewed as
    ``[B, H, r·S, D]`` (query head ``j`` → kv head ``j // r``) and reshaped back."""
    heads, d = rotation.shape[0], rotation.shape[-1]
    r = w.floats("rotation", rotation.astype(np.float32))
    if not query:
        return w.op("MatMul", x, r)
    grouped = w.op("Reshape", x, w.ints("kv_groups", [0, heads, -1, d]))
    return w.op("Reshape", w.op("MatMul", grouped, r), w.op("Shape", x))
