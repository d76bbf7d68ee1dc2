"""onnxruntime-fuse's decoder attention: a with-past decoder layer → ``GroupQueryAttention``.

The rewrite behind :class:`~outlierquant.passes.fuse_ort.FuseOnnxRuntimePass`'s
``decoder_attention`` option (the matcher is :mod:`outlierquant.graph.decoder_attention`),
and the pieces the pass's encoder fusions share with it: :class:`Ranks`, the rank lookup
that sees through the Q/DQ a quantizer inserted, and :func:`evaluate_cone`, which runs a
small subgraph (the rotary tables, an additive mask) in onnxruntime. Kept apart from the
pass so that module stays under the line limit; a layer that does not match comes back in
the skipped list with the reason, for the pass to record and log.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from outlierquant.graph.decoder_attention import DecoderAttention, NoMatch, match_decoder_attention
from outlierquant.graph.shapes import evaluate_shape, propagate_ranks
from outlierquant.graph.values import MS_DOMAIN, add_initializer, unique_name

_STD = ("", "ai.onnx")


class Ranks(dict):
    """:func:`propagate_ranks`, which stops at the Q/DQ pairs a quantizer inserted, plus a
    lazy fallback through the ops that keep or broadcast the rank (Q/DQ, bias and scale
    arithmetic, MatMul) so the quantized graph's attention and norms are seen too."""

    _KEEP = {"QuantizeLinear", "DequantizeLinear", "Cast", "Identity", "Erf", "Sqrt", "Softmax", "Relu", "Gelu",
             "Tanh", "Sigmoid", "LayerNormalization", "SkipLayerNormalization", "Transpose",
             "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding",  # what onnxruntime-fuse writes
             "Abs", "Round", "Clip", "Neg", "Floor", "Ceil", "Reciprocal"}  # per-token int8 forms
    _BROADCAST = {"Add", "Sub", "Mul", "Div", "MatMul", "Where", "Pow", "Equal", "Max", "Min", "Less", "Greater"}
    #: linear kernels with a weight operand (ours: llm-int8's MixedInt8MatMul)
    _LINEAR = {"MatMulInteger", "MatMulIntegerToFloat", "MatMulNBits", "MixedInt8MatMul", "DynamicQuantizeMatMul"}

    def get(self, value, default=None, depth: int = 24):
        if value is None:
            return default
        if dict.__contains__(self, value):
            return dict.__getitem__(self, value)
        node = value.producer()
        result = len(value.shape) if value.shape is not None else None
        if result is None and node is not None and node.op_type == "Reshape" and node.domain in _STD:
            target = evaluate_shape(node.inputs[1], {}, self)
            result = len(target) if target is not None and target.ndim == 1 else None
        elif result is None and depth > 0 and node is not None and node.op_type == "DynamicQuantizePerToken":
            result = self.get(node.inputs[0], None, depth - 1)  # codes and [..., 1] scales alike
        elif result is None and depth > 0 and node is not None \
                and (node.domain in (*_STD, MS_DOMAIN) or node.op_type in self._LINEAR) and len(node.outputs) >= 1 \
                and node.outputs[0] is value:
            if node.op_type in self._KEEP:
                result = self.get(node.inputs[0], None, depth - 1)
            elif node.op_type.startswith("Reduce") and node.attributes.get_int("keepdims", 1) == 1:
                result = self.get(node.inputs[0], None, depth - 1)
            elif node.op_type in self._LINEAR:  # [..., K] x weight: the activation's rank
                result = self.get(node.inputs[0], None, depth - 1)
            elif node.op_type == "Gather":  # the float outlier channels of a split linear
                data, index = (self.get(v, None, depth - 1) for v in node.inputs[:2])
                result = None if data is None or index is None else data - 1 + index
            elif node.op_type in self._BROADCAST:
                known = [self.get(v, None, depth - 1) for v in node.inputs if v is not None]
                result = max(known) if known and None not in known else None
        if result is None:
            return default
        self[value] = result
        return result

    def __contains__(self, value) -> bool:
        return self.get(value) is not None

    def __getitem__(self, value):
        result = self.get(value)
        if result is None:
            raise KeyError(value)
        return result


def lazy_ranks(graph: ir.Graph) -> Ranks:
    """:class:`Ranks` of ``graph``: what :func:`propagate_ranks` finds, the rest on demand."""
    return Ranks(propagate_ranks(graph, list(graph)))


# -- subgraph evaluation ----------------------------------------------------------------


def _named_tensor(value: ir.Value):
    proto = ir.serde.serialize_tensor(value.const_value)
    proto.name = value.name  # the tensor's own name can differ from the value's after renames
    return proto


def evaluate_cone(graph: ir.Graph, outputs: list[ir.Value], feeds: dict[str, np.ndarray],
                  fill=None) -> list[np.ndarray]:
    """Run the part of ``graph`` that computes ``outputs`` on ``feeds`` (small subgraphs such
    as the rotary tables or a mask; only their nodes and constants are serialized, not the
    weights). ``fill(value)`` gives an array for a graph input that ``feeds`` lacks."""
    import onnx
    import onnxruntime as ort

    nodes, frontier, seen, constants, inputs = [], list(outputs), set(), {}, {}
    while frontier:
        value = frontier.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None:
            if value.const_value is not None:
                constants[value.name] = value
            elif value in graph.inputs:
                inputs[value.name] = value
            else:
                raise NoMatch(f"{value.name!r} is neither computed, a constant nor a graph input")
            continue
        if id(node) not in {id(n) for n in nodes}:
            nodes.append(node)
            frontier.extend(node.inputs)
    feeds = dict(feeds)
    for name in set(inputs) - set(feeds):
        if fill is None:
            raise NoMatch(f"the subgraph also reads {name!r}")
        feeds[name] = fill(inputs[name])
    order = {id(n): i for i, n in enumerate(graph)}
    nodes.sort(key=lambda n: order[id(n)])

    def info(value: ir.Value):
        dtype = value.type.dtype.value if value.type is not None else onnx.TensorProto.FLOAT
        return onnx.helper.make_tensor_value_info(value.name, dtype, None)

    sub = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "cone", [info(v) for v in inputs.values()],
        [info(v) for v in outputs], [_named_tensor(v) for v in constants.values()])
    model = onnx.helper.make_model(sub, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                       for d, v in graph.opset_imports.items()], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: feeds[k] for k in inputs})


# -- decoder attention with a KV cache ---------------------------------------------------


def _rotary_caches(graph: ir.Graph, match: DecoderAttention, positions: int) -> tuple[np.ndarray, np.ndarray, ir.Value]:
    """``(cos_cache, sin_cache, position input)``: the rotary tables evaluated for positions
    ``0 .. positions-1``, after checking that they are a per-position lookup of one integer
    graph input (rows picked by any position ids equal the table's rows) with equal halves
    (``rotate_half``'s non-interleaved layout)."""
    readers = set()
    frontier, seen = [match.cos, match.sin], set()
    while frontier:
        value = frontier.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        if value in graph.inputs:
            readers.add(value)
        elif value.producer() is not None:
            frontier.extend(value.producer().inputs)
    if len(readers) != 1:
        raise NoMatch(f"the rotary tables read {sorted(v.name for v in readers)}, not one position input")
    source = next(iter(readers))
    if source.type is None or source.type.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        raise NoMatch(f"the rotary tables are computed from {source.name!r}, not integer positions")
    dtype = source.type.dtype.numpy()
    try:
        cos, sin = evaluate_cone(graph, [match.cos, match.sin], {source.name: np.arange(positions, dtype=dtype)[None]})
        sample = np.array([[7, 0, positions - 1, 3], [1, 2, 5, 4]], dtype=dtype)
        cos_s, sin_s = evaluate_cone(graph, [match.cos, match.sin], {source.name: sample})
    except NoMatch:
        raise
    except Exception as error:  # shape logic that a [1, P] position input does not satisfy
        raise NoMatch(f"could not evaluate the rotary tables: {str(error).splitlines()[0][:120]}") from None
    half = match.head_size // 2
    if cos.shape != (1, positions, match.head_size) or sin.shape != cos.shape:
        raise NoMatch(f"the rotary tables have shape {cos.shape}, not [1, positions, {match.head_size}]")
    if not (np.array_equal(cos[..., :half], cos[..., half:]) and np.array_equal(sin[..., :half], sin[..., half:])):
        raise NoMatch("the rotary tables' halves differ (not rotate_half's layout)")
    if not (np.allclose(cos_s, cos[0][sample], rtol=0, atol=1e-6) and np.allclose(sin_s, sin[0][sample], rtol=0, atol=1e-6)):
        raise NoMatch("the rotary tables are not a lookup of the position ids")
    return cos[0, :, :half].astype(np.float32), sin[0, :, :half].astype(np.float32), source


def fuse_decoder_attention(model: ir.Model, positions: int) -> tuple[list[dict], list[dict]]:
    """Each matched layer becomes one ``GroupQueryAttention`` reading the q/k/v linear outputs
    and the past cache and writing the present cache. The rotary embedding runs as
    onnxruntime's ``RotaryEmbedding`` on q and k, from the model's own position ids and
    tables evaluated from the graph (``merge-linears`` later moves it inside the attention,
    ``do_rotary``, where it merges q/k/v into one packed input);
    the model's additive mask goes in as ``attention_bias`` (so padding and any sliding
    window are kept exactly), with every row's ``seqlens_k`` at the full length, so that the
    kernel's own causal mask is the export's causal mask. Returns ``(fused, skipped)``, one
    record per layer, each skipped one with its reason."""
    graph = model.graph
    fused, skipped = [], []
    caches: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]] = {}
    lengths: tuple[ir.Value, ir.Value, ir.Value] | None = None
    ranks = lazy_ranks(graph)
    matches = []  # every layer is matched before any is rewritten: ranks are read lazily through the graph
    for softmax in list(graph):
        if softmax.op_type != "Softmax" or softmax.domain not in _STD:
            continue
        try:
            match = match_decoder_attention(softmax, graph, ranks)
            key = (id(match.cos), id(match.sin))
            if key not in caches:
                cos, sin, source = _rotary_caches(graph, match, positions)
                caches[key] = (add_initializer(graph, "gqa_cos_cache", cos),
                               add_initializer(graph, "gqa_sin_cache", sin), source)
            matches.append(match)
        except NoMatch as error:
            skipped.append({"node": softmax.name, "skipped": str(error)})
    for match in matches:
        softmax = match.softmax
        cos_cache, sin_cache, position_ids = caches[(id(match.cos), id(match.sin))]
        first = next(iter(graph))
        if lengths is None:  # total length = past + new, from the first matched layer's shapes
            tape = ir.tape.Tape()
            past_len = tape.op("Shape", [match.past_key], attributes={"start": 2, "end": 3})
            new_len = tape.op("Shape", [match.q], attributes={"start": 1, "end": 2})
            batch = tape.op("Shape", [match.q], attributes={"start": 0, "end": 1})
            total64 = tape.op("Add", [past_len, new_len])
            cache_shape = tape.op("Concat", [tape.op("Shape", [match.past_key], attributes={"start": 0, "end": 2}),
                                             total64,
                                             tape.op("Shape", [match.past_key], attributes={"start": 3})],
                                  attributes={"axis": 0})
            total = tape.op("Cast", [total64], attributes={"to": ir.DataType.INT32})
            one = add_initializer(graph, "gqa_one", np.array([1], np.int32))
            seqlens = tape.op("Expand", [tape.op("Sub", [total, one]), batch])
            scalar_shape = add_initializer(graph, "gqa_scalar_shape", np.array([], np.int64))
            total_scalar = tape.op("Reshape", [total, scalar_shape])
            for i, node in enumerate(tape.nodes):
                node.name = unique_name(graph, f"gqa_lengths_{i}_{node.op_type}")
            anchor = match.q.producer()
            if anchor is not None:
                graph.insert_after(anchor, tape.nodes)
            else:
                graph.insert_before(first, tape.nodes)
            seqlens.name, total_scalar.name = unique_name(graph, "gqa_seqlens_k"), unique_name(graph, "gqa_total_length")
            cache_shape.name = unique_name(graph, "gqa_cache_shape")
            lengths = (seqlens, total_scalar, cache_shape)
        rotated = []
        for value, heads, label in ((match.q, match.heads, "q"), (match.k, match.kv_heads, "k")):
            rotary = ir.node("RotaryEmbedding", [value, position_ids, cos_cache, sin_cache], domain=MS_DOMAIN,
                             attributes={"num_heads": heads, "interleaved": 0},
                             name=unique_name(graph, f"{softmax.name}_{label}_RotaryEmbedding"))
            rotary.outputs[0].name = unique_name(graph, f"{softmax.name}_{label}_rotated")
            rotary.outputs[0].type, rotary.outputs[0].shape = value.type, value.shape
            graph.insert_before(match.output.producer(), rotary)
            rotated.append(rotary.outputs[0])
        gqa = ir.node(
            "GroupQueryAttention",
            [*rotated, match.v, match.past_key, match.past_value, lengths[0], lengths[1],
             None, None, None, match.mask],
            domain=MS_DOMAIN, num_outputs=3,
            attributes={"num_heads": match.heads, "kv_num_heads": match.kv_heads, "scale": float(match.scale)},
            name=unique_name(graph, f"{softmax.name}_GroupQueryAttention"))
        output, present_key, present_value = gqa.outputs
        output.name = unique_name(graph, f"{softmax.name}_attention")
        output.type, output.shape = match.output.type, match.output.shape
        graph.insert_before(match.output.producer(), gqa)
        match.output.replace_all_uses_with(output, replace_graph_outputs=True)
        for reader in match.shape_readers:  # [B, ·, T, H] sizes, from the inputs, not the fused op's outputs
            reader.outputs[0].replace_all_uses_with(lengths[2])
        for new, old in ((present_key, match.present_key), (present_value, match.present_value)):
            name = old.name
            new.type, new.shape = old.type, old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name = unique_name(graph, f"{name}_unfused")
            new.name = name
        fused.append({"node": softmax.name, "heads": match.heads, "kv_heads": match.kv_heads,
                      "head_size": match.head_size, "scale": float(match.scale),
                      "mask": match.mask.name if match.mask is not None else None,
                      "quantization_dropped": match.quantized})
    return fused, skipped

