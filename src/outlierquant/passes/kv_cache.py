"""Low-bit KV cache (RotateKV; KIVI-style baselines) for decoders exported with past.

Su et al. 2025, "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via
Outlier-Aware Adaptive Rotations". Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache" (per-channel keys, per-token values).

Where: a with-past decoder writes, per layer, ``present.i.key = Concat(past.i.key, K_new)``
(axis 2 of ``[B, kv heads, T, D]``) and attention reads that Concat. The pass rewrites
the *new* keys and values before they enter the Concat, so what is stored — and re-read
by every later step — is what a low-bit cache would hold:

- **values**: per-token asymmetric ``value_bits`` in groups of ``group_size`` channels;
- **keys**: ``key_mode: per-token`` (RotateKV: after the rotation below) or
  ``per-channel`` (KIVI-style: one calibrated ``(min, max)`` per kv head and channel);
- **rotation** (``rotate``): ``K ← K R_h`` with ``R_h = P_h (I ⊗ H_b)``, ``P_h`` the
  outlier-aware channel order of kv head ``h`` (``reorder``: channels sorted by calibrated
  absolute maximum and dealt over the ``rotation_block``-sized Hadamard blocks in zig-zag
  order, so every block gets a balanced share of outlier channels) and ``H_b`` a
  normalized Walsh-Hadamard matrix. The queries get the same ``R_h`` at the score MatMul
  (query head ``j`` uses kv head ``j // r`` under grouped-query attention), so
  ``(Q R)(K R)ᵀ = Q Kᵀ``: with quantization off the rewrite is exact (tested).
- **attention sinks** (``sink_tokens``): the first ``S`` cache positions stay in float.

Pre- versus post-RoPE. RotateKV rotates keys *before* RoPE across groups of heads and
stores pre-RoPE keys. In the exported graph RoPE is applied before the cache Concat, so
the cache holds post-RoPE keys; storing pre-RoPE keys would move RoPE after the cache
read (re-applied to every cached position each step), a change of the graph's structure
beyond a local rewrite, and a rotation across heads cannot be matched on the query side
(each head's score is its own dot product) without undoing it after every cache read.
This pass therefore rotates post-RoPE, per kv head — exact on the query side.

Sinks are chosen by position (the first ``S``), not detected from massive activations as
the paper does; position = past length + index, so a left-padded batch would protect pads.

Two forms (``form``):

- ``simulated``: quantize-dequantize (standard ops) before the Concat; the cache tensors
  stay float32. Prefill and decode behave the same: every grid is per token (or static
  per channel), so a token's stored value does not depend on how many tokens came with it.
- ``packed``: ``past_key_values.i.{key,value}`` become ``.codes`` (uint8, ``8 / bits``
  codes per byte), ``.step`` / ``.min`` (float16 per token and group; absent for static
  per-channel keys) and ``.sink`` (float32, the first ``S`` positions); ``present.*`` the
  same. The graph unpacks and dequantizes the whole cache at every step; the arithmetic is
  the simulated form's, so both give identical logits. A generation loop that feeds them
  back is :mod:`outlierquant.export.packed_cache`.

**Recent window** (``recent_tokens``, KIVI's residual): the last ``R`` cache positions stay
float and a token is quantized when it leaves the window. The state is the cache itself:
the simulated form re-reads the last ``R`` past positions each call and quantizes the ones
now older than ``T − R``; the packed form carries ``.recent`` (float32, the window) beside
the codes and appends the codes of the tokens that leave it. With a window, attention
reads the past as stored and the call's own tokens in float (KIVI: a prefill attends in
full precision), so only decode steps see quantized tokens — compare ``ppl decode``.

KIVI groups key channels over blocks of tokens; here the per-channel baseline uses static
calibrated ranges instead (the same for prefill and decode).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.collect import stream_tensors
from outlierquant.emit import kv_cache as form
from outlierquant.errors import UnsupportedModelError
from outlierquant.graph.attention import find_score_matmuls
from outlierquant.numerics.kv_quant import MIN_STEP, channel_grid, outlier_aware_rotation
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)

_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
#: ops between the present key Concat and the score MatMul's key Transpose (repeat_kv, casts)
_KEY_PATH_OPS = {"Reshape", "Expand", "Unsqueeze", "Identity", "Cast"}
#: calibration tokens kept per layer for the static per-channel ranges
_MAX_ROWS = 8192


@dataclasses.dataclass(frozen=True)
class KVCacheQuantOptions:
    """Options of :class:`KVCacheQuantizePass`.

    ``key_bits`` / ``value_bits``: 2, 4 or 8 (0: that tensor stays float). ``group_size``:
    channels per per-token group (0: the whole head). ``key_mode``: ``per-token`` or
    ``per-channel`` (static calibrated ranges). ``rotate`` / ``reorder``: RotateKV's key
    rotation and its outlier-aware channel order (reads the calibration samples);
    ``rotation_block``: Hadamard block size (0: the head size). ``sink_tokens``: first cache
    positions kept in float. ``recent_tokens``: the last cache positions kept in float (KIVI's
    residual window; a token is quantized when it leaves the window). ``form``: ``simulated``
    or ``packed``.
    """

    key_bits: int = 4
    value_bits: int = 4
    group_size: int = 0
    key_mode: Literal["per-token", "per-channel"] = "per-token"
    rotate: bool = True
    reorder: bool = True
    rotation_block: int = 0
    sink_tokens: int = 4
    recent_tokens: int = 0
    form: Literal["simulated", "packed"] = "simulated"

    def __post_init__(self) -> None:
        check_fields(self)
        for field in ("key_bits", "value_bits"):
            if getattr(self, field) not in (0, 2, 4, 8):
                raise ValueError(f"{field}={getattr(self, field)!r}: allowed 2, 4, 8 or 0 (float)")
        for field in ("group_size", "rotation_block", "sink_tokens", "recent_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{field}={value!r}: a non-negative integer")
        if self.form == "packed" and (self.key_bits == 0 or self.value_bits == 0):
            raise ValueError("form='packed' needs key_bits and value_bits (a float tensor has nothing to pack)")


@dataclasses.dataclass
class _Layer:
    index: int
    key: ir.Node  # the present key Concat
    value: ir.Node
    heads: int
    head_dim: int
    scores: list = dataclasses.field(default_factory=list)  # score MatMuls reading this key


class KVCacheQuantizePass(OutlierPass):
    """Quantize the KV cache of a with-past decoder (simulated or packed), RotateKV or KIVI-style."""

    name = "kv-quantize"
    options_type = KVCacheQuantOptions
    needs_feeds = True

    def reads(self) -> frozenset[str]:
        o = self.options
        calibrated = (o.rotate and o.reorder) or (o.key_bits and o.key_mode == "per-channel")
        return frozenset({"feeds"}) if calibrated else frozenset()

    # ---------------------------------------------------------------------- discovery

    def _layers(self, model: ir.Model) -> list[_Layer]:
        graph = model.graph
        found: dict[int, dict[str, ir.Node]] = {}
        for value in graph.outputs:
            match = _PRESENT.match(value.name or "")
            node = value.producer()
            if not match:
                continue
            past = node.inputs[0] if node is not None and node.op_type == "Concat" else None
            axis = node.attributes.get_int("axis", 0) if node is not None and node.op_type == "Concat" else None
            if past is None or len(node.inputs) != 2 or axis not in (2, -2) or not past.is_graph_input() \
                    or past.name != f"past_key_values.{match[1]}.{match[2]}":
                raise UnsupportedModelError(f"kv-quantize: {value.name} is not Concat(past_key_values.{match[1]}."
                                            f"{match[2]}, new) over the token axis; the pass needs the with-past "
                                            "layout of optimum's decoder export")
            found.setdefault(int(match[1]), {})[match[2]] = node
        if not found:
            return []
        layers = []
        for index in sorted(found):
            pair = found[index]
            if set(pair) != {"key", "value"}:
                raise UnsupportedModelError(f"kv-quantize: layer {index} has only present {sorted(pair)}")
            shape = pair["key"].inputs[0].shape
            if shape is None or len(shape) != 4 or not all(isinstance(shape[i], int) for i in (1, 3)):
                raise UnsupportedModelError(f"kv-quantize: past_key_values.{index}.key needs static kv heads and "
                                            f"head size, got shape {shape}")
            layers.append(_Layer(index, pair["key"], pair["value"], int(shape[1]), int(shape[3])))
        by_concat = {layer.key.outputs[0]: layer for layer in layers}
        for score in find_score_matmuls(model):
            if score.key_transpose is None:
                continue
            value = score.key_transpose.inputs[0]
            while value is not None and value not in by_concat:
                producer = value.producer()
                value = producer.inputs[0] if producer is not None and producer.op_type in _KEY_PATH_OPS else None
            if value is not None:
                by_concat[value].scores.append(score)
        return layers

    # -------------------------------------------------------------------- calibration

    def _calibrate(self, model: ir.Model, layers: list[_Layer]) -> dict[int, np.ndarray]:
        """Per layer, the new keys of the calibration samples ``[H, n, D]`` (positions at or
        after ``sink_tokens``: the sinks stay float and must not widen a range)."""
        names = {layer.key.inputs[1].name: layer.index for layer in layers}
        rows: dict[int, list[np.ndarray]] = {layer.index: [] for layer in layers}
        sinks = self.options.sink_tokens

        def visit(name: str, array: np.ndarray, piece: dict, index: int) -> None:
            keys = np.asarray(array, dtype=np.float32)  # [B, H, S, D]
            past = piece.get(f"past_key_values.{names[name]}.key")
            start = 0 if past is None else int(np.asarray(past).shape[2])
            positions = start + np.arange(keys.shape[2])
            keep = keys[:, :, positions >= sinks]
            rows[names[name]].append(np.moveaxis(keep, 1, 0).reshape(keys.shape[1], -1, keys.shape[3]))

        stream_tensors(model, self.feeds, list(names), visit)
        out = {}
        for index, parts in rows.items():
            stacked = np.concatenate(parts, axis=1) if parts else np.zeros((0, 0, 0), np.float32)
            if stacked.shape[1] > _MAX_ROWS:
                stacked = stacked[:, np.linspace(0, stacked.shape[1] - 1, _MAX_ROWS).astype(int)]
            out[index] = stacked
        return out

    # ------------------------------------------------------------------------ rewrite

    def _rotation(self, layer: _Layer, samples: np.ndarray | None) -> np.ndarray:
        block = self.options.rotation_block or layer.head_dim
        if block > layer.head_dim or layer.head_dim % block:
            raise UnsupportedModelError(f"kv-quantize: rotation_block {block} does not divide head size "
                                        f"{layer.head_dim}")
        mats = []
        for h in range(layer.heads):
            magnitude = None
            if self.options.reorder and samples is not None and samples.shape[1]:
                magnitude = np.abs(samples[h]).max(axis=0)
            mats.append(outlier_aware_rotation(layer.head_dim, block, magnitude))
        return np.stack(mats)

    def _group(self, head_dim: int) -> int:
        group = min(self.options.group_size or head_dim, head_dim)
        if head_dim % group:
            raise UnsupportedModelError(f"kv-quantize: group_size {group} does not divide head size {head_dim}")
        return group

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        o = self.options
        layers = self._layers(model)
        if not layers:
            reason = "no present.*.key/value outputs: the model has no KV cache (export it with past)"
            logger.info("kv-quantize: skipped: %s", reason)
            return False, {"options": dataclasses.asdict(o), "skipped": reason, "summary": [f"kv-quantize: {reason}"]}
        samples = self._calibrate(model, layers) if "feeds" in self.reads() else {}
        entries = []
        rotations = 0
        for layer in layers:
            entry: dict[str, Any] = {"layer": layer.index, "kv_heads": layer.heads, "head_dim": layer.head_dim}
            key_new = layer.key.inputs[1]
            rotation = None
            if o.rotate:
                if not layer.scores:
                    entry["rotation_skipped"] = "no score MatMul reads this key through repeat_kv ops"
                else:
                    rotation = self._rotation(layer, samples.get(layer.index))
            prefix = f"/kv_cache/layers.{layer.index}"
            if rotation is not None:
                w = form.CacheWriter(model, f"{prefix}/key_rotation")
                key_new = form.rotate_heads(w, key_new, rotation, query=False)
                self._insert(model, w, layer.key)
                for score in layer.scores:
                    wq = form.CacheWriter(model, f"{prefix}/query_rotation")
                    rotated = form.rotate_heads(wq, score.query, rotation, query=True)
                    self._insert(model, wq, score.node)
                    score.node.replace_input_with(0, rotated)
                    rotations += 1
                entry["rotation"] = {"block": o.rotation_block or layer.head_dim, "reordered": bool(o.reorder and
                                     layer.index in samples), "queries": len(layer.scores)}
            for kind, concat, new, bits in (("key", layer.key, key_new, o.key_bits),
                                            ("value", layer.value, layer.value.inputs[1], o.value_bits)):
                if not bits:
                    if new is not concat.inputs[1]:
                        concat.replace_input_with(1, new)
                    entry[kind] = "float"
                    continue
                static = kind == "key" and o.key_mode == "per-channel"
                grid = None
                if static:
                    keys = samples[layer.index]
                    if rotation is not None:
                        keys = np.einsum("hnd,hde->hne", keys, rotation.astype(np.float32))
                    if not keys.shape[1]:
                        raise UnsupportedModelError(f"kv-quantize: no calibration keys after the {o.sink_tokens} "
                                                    f"sink positions for layer {layer.index}")
                    grid = channel_grid(keys.min(axis=1)[:, None, :], keys.max(axis=1)[:, None, :], bits)
                if o.form == "simulated":
                    self._simulate(model, f"{prefix}/{kind}", concat, new, bits, grid, layer.head_dim)
                else:
                    self._pack(model, f"{prefix}/{kind}", concat, new, bits, grid, layer.head_dim)
                entry[kind] = {"bits": bits, "grid": "per-channel static" if static else "per-token",
                               "group": None if static else self._group(layer.head_dim)}
            entries.append(entry)
        record = {"options": dataclasses.asdict(o), "layers": entries, "query_rotations": rotations,
                  "simulated": o.form == "simulated",
                  "summary": [f"kv-quantize: {len(layers)} layers, K {o.key_bits or 'float'}-bit "
                              f"({o.key_mode}{', rotated' if o.rotate else ''}), V {o.value_bits or 'float'}-bit, "
                              f"{o.sink_tokens} sink tokens"
                              f"{f' and the last {o.recent_tokens}' if o.recent_tokens else ''} in float, "
                              f"{o.form} cache"]}
        return True, record

    def _reshape_readers(self, model: ir.Model, w: form.CacheWriter, past: ir.Value, codes: ir.Value,
                         head_dim: int, recent: ir.Value | None = None) -> None:
        """The export reads the past length as ``Shape(past key)``: that Shape now reads the
        packed codes (same batch and heads; the length adds the float window's, the head size
        comes from a constant)."""
        for use in list(past.uses()):
            node = use.node
            if node.op_type == "Concat":
                continue
            if node.op_type != "Shape":
                raise UnsupportedModelError(f"kv-quantize: {past.name} is read by {node.op_type} {node.name!r}; "
                                            "the packed form can only replace the cache Concat and Shape readers")
            ws = form.CacheWriter(model, f"{w.prefix}/shape")  # before the Shape: its readers come early
            shape = form.float_shape(ws, codes, head_dim, recent)
            start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", 4)
            if (start, end) != (0, 4):
                shape = ws.op("Slice", shape, ws.ints("shape_start", [start]), ws.ints("shape_end", [end]))
            self._insert(model, ws, node)
            node.outputs[0].replace_all_uses_with(shape, replace_graph_outputs=True)
            model.graph.remove(node, safe=True)

    def _insert(self, model: ir.Model, w: form.CacheWriter, anchor: ir.Node) -> None:
        model.graph.insert_before(anchor, w.nodes)

    def _grid(self, w, x, bits, grid, head_dim):
        if grid is not None:
            return form.channel_grid_levels(w, x, bits, *grid) + (None,)
        group = self._group(head_dim)
        q, step, low = form.per_token_grid(w, x, bits, group, head_dim, min_step=MIN_STEP)
        return q, step, low, group

    def _simulate(self, model, prefix, concat, new, bits, grid, head_dim) -> None:
        if self.options.recent_tokens:
            self._simulate_window(model, prefix, concat, new, bits, grid, head_dim)
            return
        w = form.CacheWriter(model, prefix)
        q, step, low, group = self._grid(w, new, bits, grid, head_dim)
        stored = form.dequantize(w, q, step, low, head_dim if group else None)
        if self.options.sink_tokens:
            sink = form.positions_below(w, concat.inputs[0], new, self.options.sink_tokens)
            stored = w.op("Where", sink, new, stored)
        self._insert(model, w, concat)
        concat.replace_input_with(1, stored)

    def _simulate_window(self, model, prefix, concat, new, bits, grid, head_dim) -> None:
        """The cache with a float window of the last ``recent_tokens`` positions: each call
        quantizes the window positions that fall out of it (and are past the sinks) for the
        cache it returns; the older positions come from the past as they were stored.

        Attention in the call reads the past as stored and the call's own tokens in float —
        KIVI's semantics: a prefill attends in full precision, and a decode step reads the
        quantized old tokens, the float window and itself. The ``present`` output alone
        carries the quantization, so the packed form can give the same logits."""
        o = self.options
        w = form.CacheWriter(model, prefix)
        if new is not concat.inputs[1]:
            concat.replace_input_with(1, new)
        settled, window, positions, limit = form.recent_window(w, concat.inputs[0], new, o.recent_tokens)
        q, step, low, group = self._grid(w, window, bits, grid, head_dim)
        quantized = form.dequantize(w, q, step, low, head_dim if group else None)
        leaving = w.op("Less", positions, limit)
        if o.sink_tokens:
            sinks = w.const("sinks", np.array(o.sink_tokens, dtype=np.int64))
            leaving = w.op("And", leaving, w.op("Not", w.op("Less", positions, sinks)))
        stored = w.op("Concat", settled, w.op("Where", leaving, quantized, window), axis=2)
        self._insert(model, w, concat)
        present = concat.outputs[0]
        name, stored.type, stored.shape = present.name, present.type, present.shape
        outputs = list(model.graph.outputs)
        present.name = f"{prefix}/attended"
        outputs[outputs.index(present)] = stored
        model.graph.outputs.clear()
        model.graph.outputs.extend(outputs)
        stored.name = name

    def _pack(self, model, prefix, concat, new, bits, grid, head_dim) -> None:
        graph = model.graph
        recent = self.options.recent_tokens
        w = form.CacheWriter(model, prefix)
        past = concat.inputs[0]
        base = past.name  # past_key_values.i.kind
        present = concat.outputs[0]
        batch, heads = past.shape[0], past.shape[1]
        window = recent_in = None
        settling = new  # the tokens whose codes this call appends
        if recent:
            recent_in = ir.Value(name=f"{base}.recent", type=ir.TensorType(ir.DataType.FLOAT),
                                 shape=ir.Shape([batch, heads, "recent_length", head_dim]))
            window = w.op("Concat", recent_in, new, axis=2)
            settling, kept = form.leave_window(w, window, recent)
        q, step, low, group = self._grid(w, settling, bits, grid, head_dim)
        width = head_dim if recent else None  # explicit widths: `settling` can be empty
        parts = {"codes": (form.pack(w, q, bits, width), ir.DataType.UINT8, head_dim * bits // 8)}
        if group:
            groups = head_dim // group
            parts["step"] = (form.store_scale(w, step, groups if recent else None), ir.DataType.FLOAT16, groups)
            parts["min"] = (form.store_scale(w, low, groups if recent else None), ir.DataType.FLOAT16, groups)
        stored: dict[str, ir.Value] = {}
        new_inputs, new_outputs = [], []
        for part, (value, dtype, width) in parts.items():
            name_in, name_out = f"{base}.{part}", f"{present.name}.{part}"
            cache_in = ir.Value(name=name_in, type=ir.TensorType(dtype),
                                shape=ir.Shape([batch, heads, past.shape[2], width]))
            joined = w.op("Concat", cache_in, value, axis=2)
            new_inputs.append(cache_in)
            new_outputs.append((joined, name_out, width, dtype))
            # without a window attention reads the whole grown cache; with one, the settled
            # past (the call's own tokens are in the float window)
            stored[part] = cache_in if recent else joined
        codes = form.unpack(w, stored["codes"], bits, group, head_dim)
        if group:
            cache = form.dequantize(w, codes, form.load_scale(w, stored["step"]), form.load_scale(w, stored["min"]),
                                    head_dim)
        else:
            cache = form.dequantize(w, codes, step, low, None)
        if recent:
            cache = w.op("Concat", cache, window, axis=2)
            new_inputs.append(recent_in)
            new_outputs.append((kept, f"{present.name}.recent", head_dim, ir.DataType.FLOAT))
        if self.options.sink_tokens:
            sink_in = ir.Value(name=f"{base}.sink", type=ir.TensorType(ir.DataType.FLOAT),
                               shape=ir.Shape([batch, heads, "sink_length", head_dim]))
            sink = form.keep_sinks(w, sink_in, new, self.options.sink_tokens)
            cache = form.replace_first(w, cache, sink)
            new_inputs.append(sink_in)
            new_outputs.append((sink, f"{present.name}.sink", head_dim, ir.DataType.FLOAT))
        self._reshape_readers(model, w, past, new_inputs[0], head_dim, recent_in)
        self._insert(model, w, concat)
        # the float present output and past input go; attention reads the dequantized cache
        outputs = list(graph.outputs)
        slot = outputs.index(present)
        graph.outputs.pop(slot)
        present.replace_all_uses_with(cache)
        lengths = {".sink": "sink_length", ".recent": "recent_length"}
        for value, name, width, dtype in new_outputs:
            value.name = name
            value.type = ir.TensorType(dtype)
            length = next((dim for suffix, dim in lengths.items() if name.endswith(suffix)),
                          "settled_length" if recent else "total_length")
            value.shape = ir.Shape([batch, heads, length, width])
        outputs[slot:slot + 1] = [value for value, *_ in new_outputs]
        graph.outputs.clear()
        graph.outputs.extend(outputs)
        inputs = list(graph.inputs)
        slot = inputs.index(past)
        inputs[slot:slot + 1] = new_inputs
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        graph.remove(concat, safe=True)
