"""Fuse a (quantized or fp32) transformer encoder into onnxruntime's contrib ops.

A final, onnxruntime-only pass. The graph stays the standard-op form when it is absent;
with it the model needs onnxruntime (the ``com.microsoft`` domain), which runs these ops on
its CPU execution provider:

* **Attention.** The per-layer core ``q/k/v → Reshape [B,S,N,H] → Transpose → (scale) →
  Q·Kᵀ → (+ key padding mask) → Softmax → P·V → Transpose → Reshape [B,S,N·H]`` becomes one
  ``MultiHeadAttention`` node fed by the q/k/v linear outputs. Its ``scale`` is the product
  of the scalar factors found on the Q, Kᵀ and score paths (evaluated from the head size
  when the exporter computes them from a ``Shape``); the q/k/v bias Adds move into its
  ``bias`` input; the additive mask, when the graph builds it from a ``[B, T]`` 0/1 input
  (checked by running its subgraph on a small mask), becomes ``key_padding_mask``. Any Q/DQ
  a quantizer put around Q·Kᵀ and P·V is dropped: **the attention then runs in float** inside
  the fused op (the linears around it stay int8). Masked keys get onnxruntime's filter
  value (-10000) instead of the export's ``finfo.min``; both give a probability of exactly
  0 after the Softmax as long as one key is unmasked.
* **Residual + LayerNormalization.** ``LayerNormalization(Add(Add(x, bias), residual))``
  becomes ``SkipLayerNormalization(x, residual, γ, β, bias)``: the linear's bias Add and
  the residual Add disappear into the normalization kernel. Same sum, same normalization.

Everything else the graph holds (the int8 linears, their Q/DQ, OutlierTune's channel
scales) is left as it is. A Softmax or a LayerNormalization that does not match is
recorded with the reason (decoders with a KV cache, a causal mask, rotary embeddings,
a fused qkv projection, a probs residual MatMul ...), and the model is unchanged there.
The with-past decoder's fusion into ``GroupQueryAttention`` (``decoder_attention``) is
written by :mod:`outlierquant.emit.ort_attention`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from outlierquant.emit.ort_attention import evaluate_cone, fuse_decoder_attention, lazy_ranks
from outlierquant.graph.attention import quantized_source
from outlierquant.graph.decoder_attention import NoMatch
from outlierquant.graph.shapes import evaluate_shape, is_int
from outlierquant.graph.values import MS_DOMAIN, constant_array, is_constant, single_use, unique_name
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)

_STD = ("", "ai.onnx")


@dataclasses.dataclass(frozen=True)
class FuseOrtOptions:
    """``attention``: fuse the attention core into ``MultiHeadAttention`` (the attention
    then runs in float). ``skip_layernorm``: residual Add (+ the linear's bias Add) +
    LayerNormalization into ``SkipLayerNormalization``. ``decoder_attention``: a with-past
    decoder's attention core (rotary, KV-cache Concat, grouped heads) into
    ``GroupQueryAttention``, whose rotary tables cover positions below ``max_positions``
    (off by default until it is measured inside the full ``default`` pipeline on SmolLM2).
    ``nbits_accuracy_level``: set every ``MatMulNBits``' compute type (4: int8, which also
    rounds the activations per block and is 1.3-1.5x faster at batch-1 decode on SmolLM2;
    0: float), or leave each as its pass wrote it (null)."""

    attention: bool = True
    matmul_bias: bool = True
    skip_layernorm: bool = False
    decoder_attention: bool = False
    max_positions: int = 8192
    nbits_accuracy_level: int | None = None
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_positions < 1:
            raise ValueError(f"max_positions={self.max_positions}: must be >= 1")
        if self.nbits_accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ValueError(f"nbits_accuracy_level={self.nbits_accuracy_level}: allowed 0, 1, 2, 3, 4 (or null)")


_NoMatch = NoMatch  # the reason a candidate is left alone (shared with the decoder matcher)


def _perm(node: ir.Node) -> list[int] | None:
    perm = node.attributes.get_ints("perm", None)
    return list(perm) if perm is not None else None


# -- scalar factors ---------------------------------------------------------------------


def _scalar(value: ir.Value | None, dims: dict[int, list], depth: int = 12) -> float | None:
    """The value of a scalar expression of constants and the shape of a head tensor.

    Exporters write the attention scale as ``sqrt(1 / sqrt(Cast(Shape(q)[-1])))``; ``dims``
    holds the partially known shape of the head tensors (None for the batch and sequence
    axes), so a ``Shape → Slice/Gather`` that picks the head size evaluates.
    """
    array = _evaluate(value, dims, depth)
    if array is None or array.dtype == object or array.size != 1:
        return None
    result = float(array.reshape(-1)[0])
    return result if np.isfinite(result) else None


def _evaluate(value: ir.Value | None, dims: dict[int, list], depth: int):
    if value is None or depth < 0:
        return None
    array = constant_array(value)
    if array is not None:
        return np.asarray(array)
    node = value.producer()
    if node is None or node.domain not in _STD:
        return None
    op = node.op_type
    if op == "Shape":
        shape = dims.get(id(node.inputs[0]))
        if shape is None:
            if node.inputs[0].shape is None:
                return None
            shape = [int(d) if is_int(d) else None for d in node.inputs[0].shape]
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(shape))
        return np.array(shape[start:end], dtype=object)
    args = [_evaluate(v, dims, depth - 1) for v in node.inputs]
    if any(a is None for a in args[:1]):
        return None
    x = args[0]
    if op == "Slice":
        if any(a is None or a.dtype == object for a in args[1:]) or x.ndim != 1:
            return None
        starts, ends = int(args[1].reshape(-1)[0]), int(args[2].reshape(-1)[0])
        steps = int(args[4].reshape(-1)[0]) if len(args) > 4 and args[4] is not None else 1
        if len(args) > 3 and args[3] is not None and int(args[3].reshape(-1)[0]) != 0:
            return None
        return x[starts:min(ends, len(x)):steps]
    if op == "Gather":
        if args[1] is None or args[1].dtype == object or x.ndim != 1:
            return None
        return x[np.asarray(args[1], dtype=np.int64)]
    if x.dtype == object:
        if any(d is None for d in x.reshape(-1)):
            return None
        x = x.astype(np.int64)
    if op == "Cast":
        return x.astype(np.float64)
    if op == "Sqrt":
        return np.sqrt(x.astype(np.float64))
    if op == "Reciprocal":
        return 1.0 / x.astype(np.float64)
    if op in ("Identity", "Squeeze", "Unsqueeze", "Reshape"):
        return x.reshape(-1) if x.size == 1 else None
    if op in ("Mul", "Div", "Add", "Sub") and len(args) == 2 and args[1] is not None:
        y = args[1]
        if y.dtype == object:
            return None
        a, b = x.astype(np.float64), y.astype(np.float64)
        return {"Mul": a * b, "Div": a / b, "Add": a + b, "Sub": a - b}[op]
    return None


# -- attention ---------------------------------------------------------------------------


@dataclasses.dataclass
class _HeadPath:
    """The path from a linear output to an operand of an attention MatMul."""

    linear: ir.Value  # [B, S, N·H]
    heads: int
    head_size: int
    perm: list[int]  # composite permutation of the [B, S, N, H] split
    factor: float  # product of the scalar factors on the path
    qdq: int  # Q/DQ pairs dropped
    scales: list = dataclasses.field(default_factory=list)  # (Mul | Div, scalar value) on the path


def _head_path(value: ir.Value, ranks: dict, label: str, dims: dict[int, list]) -> _HeadPath:
    """Walk up from an attention MatMul operand through Q/DQ, scalar Mul/Div and Transposes
    to the head-splitting Reshape of a rank-3 linear output."""
    chain: list[tuple[str, Any]] = []  # from the MatMul back to the Reshape
    current, qdq = value, 0
    reshape = None
    for _ in range(16):
        source = quantized_source(current)
        if source is not None:
            current, qdq = source, qdq + 1
            continue
        node = current.producer()
        if node is None or node.domain not in _STD:
            break
        if node.op_type == "Transpose" and _perm(node) is not None:
            chain.append(("perm", node))
            current = node.inputs[0]
        elif node.op_type in ("Mul", "Div") and len(node.inputs) == 2:
            data = [i for i, v in enumerate(node.inputs) if v is not None and (ranks.get(v) or 0) >= 2]
            if len(data) != 1 or (ranks.get(node.inputs[1 - data[0]]) not in (0, 1)
                                  and not is_constant(node.inputs[1 - data[0]])) or (node.op_type == "Div" and data[0] != 0):
                raise _NoMatch(f"{label}: {node.op_type} {node.name} is not a scale by a scalar")
            chain.append((node.op_type, node.inputs[1 - data[0]]))
            current = node.inputs[data[0]]
        elif node.op_type == "Reshape":
            reshape = node
            break
        else:
            break
    if reshape is None:
        where = current.producer()
        raise _NoMatch(f"{label}: reaches {where.op_type + ' ' + (where.name or '') if where else 'a graph input'}"
                       ", not a head-splitting Reshape of a linear output")
    linear = reshape.inputs[0]
    if ranks.get(linear) != 3:
        raise _NoMatch(f"{label}: the Reshape {reshape.name} input is not rank 3 [B, S, hidden]")
    target = evaluate_shape(reshape.inputs[1], {}, ranks)
    if target is None or target.ndim != 1 or len(target) != 4 or not all(is_int(t) for t in target[2:]) \
            or min(int(t) for t in target[2:]) < 1:
        raise _NoMatch(f"{label}: Reshape {reshape.name} is not a [B, S, heads, head_size] split with "
                       "constant heads and head size")
    heads, head_size = int(target[2]), int(target[3])
    width = linear.shape[-1] if linear.shape is not None and len(linear.shape) == 3 else None
    if is_int(width) and int(width) != heads * head_size:
        raise _NoMatch(f"{label}: width {width} != {heads} heads x {head_size}")
    # partially known shapes of the values on the path, for a scale computed from Shape()
    shape: list = [None, None, heads, head_size]
    dims[id(reshape.outputs[0])] = shape
    perm = [0, 1, 2, 3]
    scales: list[tuple[str, ir.Value]] = []
    for kind, item in reversed(chain):
        if kind == "perm":
            p = _perm(item)
            if len(p) != 4:
                raise _NoMatch(f"{label}: Transpose {item.name} is not rank 4")
            perm = [perm[i] for i in p]
            shape = [shape[i] for i in p]
            dims[id(item.outputs[0])] = shape
        else:
            scales.append((kind, item))
    path = _HeadPath(linear, heads, head_size, perm, 1.0, qdq)
    path.scales = scales
    return path


def _path_factor(path: "_HeadPath", dims: dict[int, list], label: str) -> float:
    """The product of the scalar factors on a path; ``dims`` holds the head tensors' shapes of
    the whole attention (the key's scale is often computed from the query's Shape)."""
    factor = 1.0
    for kind, item in path.scales:
        f = _scalar(item, dims)
        if f is None:
            raise _NoMatch(f"{label}: the scale {item.name!r} does not evaluate to a constant")
        factor = factor * f if kind == "Mul" else factor / f
    return factor


def _strip_value_qdq(value: ir.Value) -> tuple[ir.Value, int]:
    source = quantized_source(value)
    return (source, 1) if source is not None else (value, 0)


@dataclasses.dataclass
class _Attention:
    q: _HeadPath
    k: _HeadPath
    v: _HeadPath
    scale: float
    mask: ir.Value | None  # the additive mask value
    output: ir.Value  # the [B, S, N·H] Reshape output the fused op replaces
    qdq: int


def _match_attention(softmax: ir.Node, ranks: dict) -> _Attention:
    axis = softmax.attributes.get_int("axis", -1)
    if axis not in (-1, 3):
        raise _NoMatch(f"Softmax over axis {axis}, not the key axis")
    # score side: Softmax ← [Add mask] ← [scalar Mul/Div] ← MatMul(Q, Kᵀ)
    current, mask, factor = softmax.inputs[0], None, 1.0
    scores = None
    for _ in range(6):
        node = current.producer()
        if node is None or node.domain not in _STD:
            break
        if not single_use(current):
            raise _NoMatch(f"the scores {current.name!r} are also read elsewhere")
        if node.op_type == "MatMul":
            scores = node
            break
        if node.op_type == "Add" and mask is None:
            data = [v for v in node.inputs if v is not None and not is_constant(v)]
            if len(data) != 2:
                raise _NoMatch(f"Add {node.name} before the Softmax is not scores + a run-time mask")
            ahead = [v for v in data if v.producer() is not None and v.producer().op_type in ("MatMul", "Mul", "Div")
                     and v.producer().domain in _STD]
            if len(ahead) != 1 and not (len(ahead) == 2 and ahead[0].producer().op_type == "MatMul"):
                raise _NoMatch(f"Add {node.name}: cannot tell the scores from the mask")
            current = ahead[0]
            mask = data[1] if data[0] is current else data[0]
            continue
        if node.op_type in ("Mul", "Div"):
            f = _scalar(node.inputs[1], {}) if ranks.get(node.inputs[1]) in (0, 1) or is_constant(node.inputs[1]) \
                else None
            if f is None:
                raise _NoMatch(f"{node.op_type} {node.name} before the Softmax is not a constant scale")
            factor = factor * f if node.op_type == "Mul" else factor / f
            current = node.inputs[0]
            continue
        break
    if scores is None:
        raise _NoMatch("no Q·Kᵀ MatMul behind the Softmax through a mask Add and scalar scales")
    dims: dict[int, list] = {}
    q = _head_path(scores.inputs[0], ranks, "query", dims)
    k = _head_path(scores.inputs[1], ranks, "key", dims)
    q.factor, k.factor = _path_factor(q, dims, "query"), _path_factor(k, dims, "key")
    if q.perm != [0, 2, 1, 3]:
        raise _NoMatch(f"query layout {q.perm}, expected the [B, N, S, H] transpose (0, 2, 1, 3)")
    if k.perm != [0, 2, 3, 1]:
        raise _NoMatch(f"key layout {k.perm}, expected the [B, N, H, S] transpose (0, 2, 3, 1)")
    # probabilities: Softmax → [Q → DQ] → MatMul(P, V)
    probs, qdq = softmax.outputs[0], q.qdq + k.qdq
    if not single_use(probs):
        raise _NoMatch("the probabilities are read by more than the P·V MatMul (a probs residual or an output)")
    user = next(iter(probs.uses())).node
    if user.op_type == "QuantizeLinear":
        q_out = user.outputs[0]
        dq = next(iter(q_out.uses())).node if single_use(q_out) else None
        if dq is None or dq.op_type != "DequantizeLinear" or not single_use(dq.outputs[0]):
            raise _NoMatch("the quantized probabilities have more than one reader")
        user, qdq = next(iter(dq.outputs[0].uses())).node, qdq + 1
    if user.op_type != "MatMul" or user.domain not in _STD or user.inputs[0] is None \
            or (user.inputs[0] is not probs and quantized_source(user.inputs[0]) is not probs):
        raise _NoMatch(f"the probabilities feed {user.op_type} {user.name}, not the left side of P·V")
    v = _head_path(user.inputs[1], ranks, "value", dims)
    if v.perm != [0, 2, 1, 3]:
        raise _NoMatch(f"value layout {v.perm}, expected (0, 2, 1, 3)")
    if v.scales:
        raise _NoMatch("the value path is scaled")
    qdq += v.qdq
    if len({(p.heads, p.head_size) for p in (q, k, v)}) != 1:
        raise _NoMatch(f"q/k/v heads differ: {[(p.heads, p.head_size) for p in (q, k, v)]}")
    # output: MatMul → [Q → DQ] → Transpose (0, 2, 1, 3) → Reshape [B, S, N·H]
    out, extra = _strip_forward_qdq(user.outputs[0])
    qdq += extra
    node = next(iter(out.uses())).node if single_use(out) else None
    if node is None or node.op_type != "Transpose" or _perm(node) != [0, 2, 1, 3]:
        raise _NoMatch("P·V is not followed by the head-merging Transpose (0, 2, 1, 3) alone")
    reshape = next(iter(node.outputs[0].uses())).node if single_use(node.outputs[0]) else None
    if reshape is None or reshape.op_type != "Reshape":
        raise _NoMatch("the head-merging Transpose is not followed by a Reshape alone")
    target = evaluate_shape(reshape.inputs[1], {}, ranks)
    hidden = q.heads * q.head_size
    if target is None or target.ndim != 1 or len(target) != 3 or not is_int(target[2]) or int(target[2]) != hidden:
        raise _NoMatch(f"Reshape {reshape.name} does not merge the heads into [B, S, {hidden}]")
    scale = q.factor * k.factor * factor
    if not scale > 0:
        raise _NoMatch(f"attention scale {scale} is not positive")
    return _Attention(q, k, v, scale, mask, reshape.outputs[0], qdq)


def _strip_forward_qdq(value: ir.Value) -> tuple[ir.Value, int]:
    if not single_use(value):
        return value, 0
    q = next(iter(value.uses())).node
    if q.op_type != "QuantizeLinear" or not single_use(q.outputs[0]):
        return value, 0
    dq = next(iter(q.outputs[0].uses())).node
    if dq.op_type != "DequantizeLinear":
        return value, 0
    return dq.outputs[0], 1


#: ops an HF extended attention mask is built from: broadcast, dtype and the (1 - m) · min
#: arithmetic; no Range/Trilu/Less, so nothing causal can hide in it
_MASK_OPS = {"Unsqueeze", "Expand", "Cast", "Sub", "Mul", "Where", "Equal", "Not", "Shape", "Gather", "Concat",
             "ConstantOfShape", "Reshape", "Slice", "Constant", "Identity", "Squeeze"}


def _mask_source(mask: ir.Value, graph: ir.Graph) -> ir.Value:
    """The rank-2 graph input the additive mask is computed from, after checking that only
    broadcast and elementwise ops lie between them."""
    inputs: set[ir.Value] = set()
    frontier, seen = [mask], set()
    while frontier:
        value = frontier.pop()
        if id(value) in seen or value is None or is_constant(value):
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None:
            if value in graph.inputs:
                inputs.add(value)
                continue
            raise _NoMatch(f"mask reads {value.name!r}, which is neither a graph input nor computed")
        if node.domain not in _STD or node.op_type not in _MASK_OPS:
            raise _NoMatch(f"the mask is computed with {node.op_type} {node.name} (not a key padding mask)")
        if node.op_type != "Shape":  # a Shape reads only the size of another input (input_ids)
            frontier.extend(node.inputs)
    if len(inputs) != 1:
        raise _NoMatch(f"the mask reads {len(inputs)} graph inputs ({sorted(v.name for v in inputs)}), not one")
    source = next(iter(inputs))
    if source.shape is None or len(source.shape) != 2:
        raise _NoMatch(f"mask input {source.name!r} is not [batch, keys]")
    return source


def _check_mask_semantics(model: ir.Model, mask: ir.Value, source: ir.Value) -> None:
    """Run the mask's subgraph on a small 0/1 input: it must be 0 on kept keys, at most
    -1e4 on padded ones, for every query and head ([B, 1|N, 1|S, T])."""
    keep = np.array([[1, 1, 0], [1, 0, 0]], dtype=source.type.dtype.numpy() if source.type is not None else np.int64)

    def zeros(reader: ir.Value) -> np.ndarray:  # inputs whose Shape sizes the mask (input_ids)
        return np.zeros((2, 3), dtype=reader.type.dtype.numpy() if reader.type is not None else np.int64)

    try:
        out = np.asarray(evaluate_cone(model.graph, [mask], {source.name: keep}, fill=zeros)[0], dtype=np.float64)
    except Exception as error:  # the subgraph has shape dependencies we cannot feed
        raise _NoMatch(f"could not evaluate the mask subgraph: {str(error).splitlines()[0][:120]}") from None
    if out.ndim != 4 or out.shape[0] != 2 or out.shape[3] != 3:
        raise _NoMatch(f"the mask has shape {out.shape} on a [2, 3] input, not [B, 1, 1, T]")
    kept = np.broadcast_to(keep[:, None, None, :].astype(bool), out.shape)
    if np.any(out[kept] != 0.0) or np.any(out[~kept] > -1e4):
        raise _NoMatch("the mask is not 0 on kept keys and <= -1e4 on padded ones")


def _bias_of(value: ir.Value, width: int) -> tuple[ir.Value, np.ndarray] | None:
    """``(x, b)`` when ``value = Add(x, b)`` (either order) with a constant 1-D ``b`` of
    ``width`` and ``value`` read only once."""
    node = value.producer()
    if node is None or node.op_type != "Add" or node.domain not in _STD or not single_use(value):
        return None
    for i in (0, 1):
        bias = constant_array(node.inputs[i])
        if bias is not None and bias.ndim == 1 and bias.shape[0] == width and bias.dtype == np.float32 \
                and not is_constant(node.inputs[1 - i]):
            return node.inputs[1 - i], bias
    return None


def _fuse_attention(model: ir.Model) -> tuple[list[dict], list[dict]]:
    graph = model.graph
    ranks = lazy_ranks(graph)
    fused, skipped = [], []
    masks: dict[int, ir.Value] = {}  # graph input -> its int32 Cast
    checked: dict[int, str | None] = {}
    for softmax in list(graph):
        if softmax.op_type != "Softmax" or softmax.domain not in _STD:
            continue
        try:
            match = _match_attention(softmax, ranks)
            source = None
            if match.mask is not None:
                source = _mask_source(match.mask, graph)
                if id(match.mask) not in checked:
                    try:
                        _check_mask_semantics(model, match.mask, source)
                        checked[id(match.mask)] = None
                    except _NoMatch as error:
                        checked[id(match.mask)] = str(error)
                if checked[id(match.mask)]:
                    raise _NoMatch(checked[id(match.mask)])
        except _NoMatch as error:
            skipped.append({"node": softmax.name, "skipped": str(error)})
            logger.info("onnxruntime-fuse: attention at %s skipped: %s", softmax.name, error)
            continue
        heads, hidden = match.q.heads, match.q.heads * match.q.head_size
        inputs: list[ir.Value | None] = [match.q.linear, match.k.linear, match.v.linear]
        biases = [_bias_of(v, hidden) for v in inputs]
        bias_value = None
        if all(b is not None for b in biases):
            inputs = [b[0] for b in biases]
            name = unique_name(graph, f"{softmax.name}_qkv_bias")
            array = np.concatenate([b[1] for b in biases]).astype(np.float32)
            bias_value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            bias_value.shape, bias_value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.FLOAT)
            graph.register_initializer(bias_value)
        mask_value = None
        if source is not None:
            if id(source) not in masks:
                cast = ir.node("Cast", [source], attributes={"to": ir.DataType.INT32},
                               name=unique_name(graph, f"{source.name}_int32_cast"))
                cast.outputs[0].name = unique_name(graph, f"{source.name}_int32")
                cast.outputs[0].type = ir.TensorType(ir.DataType.INT32)
                cast.outputs[0].shape = source.shape
                graph.insert_before(next(iter(graph)), cast)
                masks[id(source)] = cast.outputs[0]
            mask_value = masks[id(source)]
        reshape = match.output.producer()
        mha = ir.node("MultiHeadAttention", [*inputs, bias_value, mask_value], domain=MS_DOMAIN,
                      attributes={"num_heads": heads, "scale": float(match.scale)},
                      name=unique_name(graph, f"{softmax.name}_MultiHeadAttention"))
        mha.outputs[0].name = unique_name(graph, f"{softmax.name}_attention")
        mha.outputs[0].type = match.output.type
        mha.outputs[0].shape = match.output.shape
        graph.insert_before(reshape, mha)
        match.output.replace_all_uses_with(mha.outputs[0], replace_graph_outputs=True)
        fused.append({"node": softmax.name, "heads": heads, "head_size": match.q.head_size,
                      "scale": float(match.scale), "bias_folded": bias_value is not None,
                      "mask": source.name if source is not None else None, "qdq_dropped": match.qdq})
    return fused, skipped


# -- SkipLayerNormalization --------------------------------------------------------------


def _fuse_skip_layernorm(model: ir.Model) -> tuple[list[dict], list[dict]]:
    graph = model.graph
    ranks = lazy_ranks(graph)
    fused, skipped = [], []
    for norm in list(graph):
        if norm.op_type != "LayerNormalization" or norm.domain not in _STD:
            continue
        reason = None
        add = norm.inputs[0].producer()
        gamma = constant_array(norm.inputs[1])
        width = gamma.shape[-1] if gamma is not None and gamma.ndim == 1 else None
        if norm.attributes.get_int("axis", -1) not in (-1, 2) or ranks.get(norm.inputs[0]) != 3:
            reason = "normalizes other than the last axis of a rank-3 tensor"
        elif width is None or gamma.dtype != np.float32:
            reason = "γ is not a constant float32 vector"
        elif any(v.uses() or v.is_graph_output() for v in norm.outputs[1:]):
            reason = "its mean / inverse std outputs are read"
        elif add is None or add.op_type != "Add" or add.domain not in _STD or not single_use(norm.inputs[0]):
            reason = "its input is not a residual Add read only by the norm"
        elif any(v is None or is_constant(v) or ranks.get(v) not in (None, 3) for v in add.inputs) \
                or 3 not in [ranks.get(v) for v in add.inputs]:
            # rank propagation loses some Reshape outputs (None): one known rank-3 operand
            # and no other known rank is enough for the [B, S, hidden] sum
            reason = "the Add is not of two rank-3 activations"
        if reason:
            skipped.append({"node": norm.name, "skipped": reason})
            continue
        x, skip = add.inputs
        bias = _bias_of(x, width)
        if bias is None:
            bias = _bias_of(skip, width)
            if bias is not None:
                x, skip = skip, x
        inputs = [x, skip, norm.inputs[1], norm.inputs[2] if len(norm.inputs) > 2 else None]
        if bias is not None:
            inputs[0] = bias[0]
            name = unique_name(graph, f"{norm.name}_skip_bias")
            value = ir.Value(name=name, const_value=ir.tensor(bias[1], name=name))
            value.shape, value.type = ir.Shape(bias[1].shape), ir.TensorType(ir.DataType.FLOAT)
            graph.register_initializer(value)
            inputs.append(value)
        eps = norm.attributes.get_float("epsilon", 1e-5)
        node = ir.node("SkipLayerNormalization", inputs, domain=MS_DOMAIN, attributes={"epsilon": float(eps)},
                       name=unique_name(graph, f"{norm.name}_Skip"))
        node.outputs[0].name = unique_name(graph, f"{norm.outputs[0].name}_skip")
        node.outputs[0].type, node.outputs[0].shape = norm.outputs[0].type, norm.outputs[0].shape
        graph.insert_before(norm, node)
        norm.outputs[0].replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
        fused.append({"node": norm.name, "bias_folded": bias is not None})
    return fused, skipped


# -- MatMulIntegerToFloat with its bias ----------------------------------------------------


def _dq_parts(value: ir.Value | None, *, weight: bool) -> tuple[ir.Value, ir.Value, ir.Value | None] | None:
    """``(levels, scale, zero_point)`` of ``value = DequantizeLinear(levels, scale, zp)``: for
    the activation a per-tensor 8-bit grid, for the weight constant 8-bit ``[K, N]`` levels
    with a per-tensor or per-column (axis 1) scale — what ``MatMulIntegerToFloat`` takes."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in _STD or len(dq.inputs) < 2:
        return None
    if "block_size" in dq.attributes and dq.attributes.get_int("block_size", 0):
        return None
    levels, scale = dq.inputs[0], dq.inputs[1]
    zero_point = dq.inputs[2] if len(dq.inputs) > 2 else None
    scale_array = constant_array(scale)
    if scale_array is None or scale_array.dtype != np.float32:
        return None
    # a QuantizeLinear output often has no type in the IR: its zero point's dtype is its own
    zero_array = constant_array(zero_point)
    if zero_array is None or zero_array.size != scale_array.size or zero_array.dtype not in (np.int8, np.uint8):
        return None
    if levels.type is not None and levels.type.dtype not in (ir.DataType.INT8, ir.DataType.UINT8):
        return None
    if not weight:
        return (levels, scale, zero_point) if scale_array.size == 1 and not is_constant(levels) else None
    array = constant_array(levels)
    if array is None or array.ndim != 2 or array.dtype not in (np.int8, np.uint8):  # numerics/int8.py: either
        return None
    if scale_array.size != 1 and (scale_array.shape != (array.shape[1],) or dq.attributes.get_int("axis", 1) != 1):
        return None
    return levels, scale, zero_point


def _fuse_matmul_bias(model: ir.Model) -> tuple[list[dict], int]:
    """``Add(b, MatMul(DQ(xq), DQ(wq)))`` → ``MatMulIntegerToFloat(xq, wq, …, bias=b)``.

    onnxruntime turns the DQ → MatMul into ``MatMulIntegerToFloat`` itself but leaves the
    bias Add as a separate kernel; written with its bias input the Add disappears and the
    result is the same float computation. A split linear (int8 part + float outlier
    MatMul, ``Add(b, Add(int8, float))``) gets the bias on its int8 part.
    """
    graph = model.graph
    fused: list[dict] = []
    unmatched = 0
    for add in list(graph):
        if add.op_type != "Add" or add.domain not in _STD or len(add.inputs) != 2:
            continue
        bias_index = next((i for i in (0, 1) if constant_array(add.inputs[i]) is not None), None)
        if bias_index is None:
            continue
        bias = constant_array(add.inputs[bias_index])
        other = add.inputs[1 - bias_index]
        if bias.ndim != 1 or bias.dtype != np.float32 or other is None or not single_use(other):
            continue
        producer = other.producer()
        inner = None  # the Add of a split linear's int8 and float parts
        matmul = producer
        if producer is not None and producer.op_type == "Add" and producer.domain in _STD:
            inner = producer
            matmul = next((v.producer() for v in inner.inputs if v is not None and single_use(v)
                           and v.producer() is not None and v.producer().op_type == "MatMul"
                           and _dq_parts(v.producer().inputs[1], weight=True) is not None), None)
        if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in _STD:
            continue
        activation = _dq_parts(matmul.inputs[0], weight=False)
        weights = _dq_parts(matmul.inputs[1], weight=True)
        if activation is None or weights is None:
            unmatched += 1
            continue
        if constant_array(weights[0]).shape[1] != bias.shape[0]:
            continue
        xq, x_scale, x_zero = activation
        wq, w_scale, w_zero = weights
        # the fused node takes the MatMul's name, and (unsplit) the bias Add's output name, so
        # layer matching by name or by output (evaluate.probes) still finds the linear
        name, matmul.name = matmul.name, f"{matmul.name}_unfused"
        node = ir.node("MatMulIntegerToFloat", [xq, wq, x_scale, w_scale, x_zero, w_zero, add.inputs[bias_index]],
                       domain=MS_DOMAIN, name=name or unique_name(graph, "MatMulIntegerToFloat"))
        if inner is None and add.outputs[0].name and not add.outputs[0].is_graph_output():
            output_name, add.outputs[0].name = add.outputs[0].name, f"{add.outputs[0].name}_unfused"
            node.outputs[0].name = output_name
        else:
            node.outputs[0].name = unique_name(graph, f"{matmul.outputs[0].name}_biased")
        node.outputs[0].type, node.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), matmul.outputs[0].shape
        graph.insert_before(matmul, node)
        if inner is None:
            add.outputs[0].replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
        else:
            inner.replace_input_with(list(inner.inputs).index(matmul.outputs[0]), node.outputs[0])
            add.outputs[0].replace_all_uses_with(inner.outputs[0], replace_graph_outputs=True)
        fused.append({"node": matmul.name, "split": inner is not None})
    return fused, unmatched


class FuseOnnxRuntimePass(OutlierPass):
    """Attention → ``MultiHeadAttention``, residual + LayerNorm → ``SkipLayerNormalization``
    (onnxruntime's ``com.microsoft`` ops, CPU execution provider)."""

    name = "onnxruntime-fuse"
    options_type = FuseOrtOptions

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        record: dict[str, Any] = {"options": dataclasses.asdict(self.options)}
        attention, attention_skipped, norms, norms_skipped, biased, unmatched = [], [], [], [], [], 0
        # norms first: rank propagation knows SkipLayerNormalization but not MultiHeadAttention
        if self.options.skip_layernorm:
            norms, norms_skipped = _fuse_skip_layernorm(model)
        decoder, decoder_skipped = [], []
        if self.options.decoder_attention:
            decoder, decoder_skipped = fuse_decoder_attention(model, self.options.max_positions)
            for entry in decoder_skipped:
                logger.info("onnxruntime-fuse: decoder attention at %s skipped: %s",
                            entry["node"], entry["skipped"])
        if self.options.attention:
            attention, attention_skipped = _fuse_attention(model)
        if self.options.matmul_bias:
            biased, unmatched = _fuse_matmul_bias(model)
        retyped = 0
        if self.options.nbits_accuracy_level is not None:
            for node in model.graph:
                if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN \
                        and node.attributes.get_int("accuracy_level", 0) != self.options.nbits_accuracy_level:
                    node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", self.options.nbits_accuracy_level)
                    retyped += 1
        modified = bool(attention or norms or biased or decoder or retyped)
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            ir.passes.common.RemoveUnusedNodesPass()(model)
        record.update({
            "attention": attention, "attention_skipped": attention_skipped,
            "skip_layernorm": norms, "skip_layernorm_skipped": norms_skipped,
            "matmul_bias": biased, "bias_adds_not_int8": unmatched,
            "decoder_attention": decoder,
            "decoder_attention_skipped": decoder_skipped,
            "attention_in_float": bool(attention or decoder),
            "matmul_nbits_accuracy_level_set": retyped,
            "summary": [f"onnxruntime fused ops: {len(attention)} MultiHeadAttention, {len(decoder)} "
                        "GroupQueryAttention (attention in float), "
                        f"{len(norms)} SkipLayerNormalization, {len(biased)} MatMulIntegerToFloat with bias"
                        + (f", {retyped} MatMulNBits at accuracy level {self.options.nbits_accuracy_level}" if retyped else "")]
                       if modified else
                       [f"onnxruntime-fuse: nothing matched ({(attention_skipped or decoder_skipped or norms_skipped or [{}])[0].get('skipped', 'no attention or norm')})"],
        })
        return modified, record
