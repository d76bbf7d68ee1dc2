"""Symbolic dimensions: which runtime sizes of a graph are the same size, and which small
integer tensors (the ``Shape → Gather → Unsqueeze → Concat`` arithmetic exporters write)
are known in terms of them.

Exporters compute every Reshape target, Expand shape and Slice bound at run time from
``Shape`` of some tensor, so a decoder layer carries ~50 such nodes beside its ~10 that
compute (SmolLM2 with past: 3,153 nodes after onnxruntime's own optimizations, 242 of them
MatMuls). At batch-1 decoding each node costs its launch overhead whatever its size. Once
each dimension is an expression over the graph inputs' named dimensions, most of those
targets become constants (``[0, 0, -1, 64]``) or provably equal a dimension already there.

onnx's shape inference names too few intermediate dimensions for this, and onnxruntime's
symbolic shape inference needs sympy (not a dependency of the core install) and works on
protobuf; this is the small subset we need on onnx_ir: linear expressions over named
dimensions (sums and integer multiples, which is what KV-cache concatenation and head
splitting produce), anything else an opaque but structurally compared term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from outlierquant.graph.values import constant_array


@dataclass(frozen=True)
class Lin:
    """``const + Σ coeff·term``: a dimension or a shape-tensor entry. ``terms`` is a sorted
    tuple of ``(term, coeff)``; a term is a dimension name or a nested tuple for an opaque
    product or quotient, so two structurally equal expressions compare equal."""

    terms: tuple = ()
    const: int = 0

    @staticmethod
    def of(value) -> "Lin":
        if isinstance(value, Lin):
            return value
        return Lin((), int(value))

    @staticmethod
    def symbol(name) -> "Lin":
        return Lin(((name, 1),), 0)

    def is_int(self) -> bool:
        return not self.terms

    def __add__(self, other) -> "Lin":
        other = Lin.of(other)
        merged: dict = dict(self.terms)
        for term, coeff in other.terms:
            merged[term] = merged.get(term, 0) + coeff
        return Lin(tuple(sorted(((t, c) for t, c in merged.items() if c), key=repr)), self.const + other.const)

    def scaled(self, factor: int) -> "Lin":
        if factor == 0:
            return Lin()
        return Lin(tuple((t, c * factor) for t, c in self.terms), self.const * factor)

    def __sub__(self, other) -> "Lin":
        return self + Lin.of(other).scaled(-1)

    def __mul__(self, other) -> "Lin":
        other = Lin.of(other)
        if other.is_int():
            return self.scaled(other.const)
        if self.is_int():
            return other.scaled(self.const)
        return Lin.symbol(("mul",) + tuple(sorted((self, other), key=repr)))

    def floordiv(self, other) -> "Lin":
        other = Lin.of(other)
        if other.is_int() and other.const > 0:
            d = other.const
            if all(c % d == 0 for _, c in self.terms) and self.const % d == 0:
                return Lin(tuple((t, c // d) for t, c in self.terms), self.const // d)
        if other == self and not self.is_int():
            return Lin.of(1)  # a size divided by itself (sizes here are > 0 where they divide)
        return Lin.symbol(("div", self, other))

    def __repr__(self) -> str:
        parts = [f"{c}*{t}" if c != 1 else str(t) for t, c in self.terms]
        if self.const or not parts:
            parts.append(str(self.const))
        return "+".join(parts)


Shape = tuple  # of Lin, one per axis

_INTEGER_TYPES = {int(t) for t in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.INT16, ir.DataType.INT8,
                                   ir.DataType.UINT64, ir.DataType.UINT32, ir.DataType.UINT16, ir.DataType.UINT8)}


class SymbolicShapes:
    """Shapes (tuples of :class:`Lin`) of the values of ``graph`` we can tell, and the
    contents of the small integer tensors computed from them, in one topological sweep.

    Graph inputs' dimensions are named by their ``dim_param`` (the same name is the same
    size, as ONNX declares), or by input and axis when unnamed. Nodes with subgraphs, and
    ops this module does not know, leave their outputs unknown; nothing downstream of an
    unknown value is rewritten.
    """

    #: integer tensors tracked by content: shapes and their arithmetic, never data
    MAX_CONTENT = 16

    def __init__(self, graph: ir.Graph):
        self.shapes: dict[ir.Value, Shape] = {}
        self.contents: dict[ir.Value, tuple] = {}  # flat entries (Lin or bool), row-major
        self.dtypes: dict[ir.Value, np.dtype] = {}  # of the values with contents
        for value in graph.inputs:
            self._input(value)
        for value in graph.initializers.values():
            self._constant(value)
        for node in graph:
            try:
                self._visit(node)
            except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError, OverflowError):
                continue  # an unexpected pattern (or a required attribute missing): its outputs stay unknown

    # -- sources ---------------------------------------------------------------------------

    def _input(self, value: ir.Value) -> None:
        if value.shape is None:
            return
        dims = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                dims.append(Lin.of(dim))
            elif isinstance(dim, ir.SymbolicDim) and dim.value:
                dims.append(_parse_dim(str(dim.value)))
            else:
                dims.append(Lin.symbol(f"{value.name}[{axis}]"))
        self.shapes[value] = tuple(dims)

    def _constant(self, value: ir.Value) -> None:
        array = constant_array(value)
        if array is None:
            return
        self.shapes[value] = tuple(Lin.of(d) for d in array.shape)
        if array.dtype.kind in "iu" and array.size <= self.MAX_CONTENT:
            self.contents[value] = tuple(Lin.of(int(x)) for x in array.reshape(-1))
            self.dtypes[value] = array.dtype
        elif array.dtype == np.bool_ and array.size <= self.MAX_CONTENT:
            self.contents[value] = tuple(bool(x) for x in array.reshape(-1))
            self.dtypes[value] = array.dtype

    # -- helpers ---------------------------------------------------------------------------

    def shape(self, value: ir.Value | None) -> Shape | None:
        if value is None:
            return None
        if value not in self.shapes and value.const_value is not None:
            self._constant(value)
        return self.shapes.get(value)

    def content(self, value: ir.Value | None) -> tuple | None:
        if value is None:
            return None
        if value not in self.contents and value.const_value is not None:
            self._constant(value)
        return self.contents.get(value)

    def _set(self, value: ir.Value, shape: Shape | None, content: tuple | None = None, dtype=None) -> None:
        if shape is not None:
            self.shapes[value] = tuple(Lin.of(d) if not isinstance(d, Lin) else d for d in shape)
        if content is not None and len(content) <= self.MAX_CONTENT:
            if dtype is None:
                producer = value.producer()
                dtype = next((self.dtypes[v] for v in (producer.inputs if producer else ()) if v in self.dtypes),
                             None)
            if all(isinstance(e, bool) for e in content):
                dtype = np.dtype(np.bool_)
            if dtype is not None:
                self.contents[value] = tuple(content)
                self.dtypes[value] = np.dtype(dtype)

    @staticmethod
    def _broadcast(a: Shape, b: Shape) -> Shape | None:
        n = max(len(a), len(b))
        a = (Lin.of(1),) * (n - len(a)) + tuple(a)
        b = (Lin.of(1),) * (n - len(b)) + tuple(b)
        out = []
        for x, y in zip(a, b):
            if x == y or y == Lin.of(1):
                out.append(x)
            elif x == Lin.of(1):
                out.append(y)
            elif x.is_int() != y.is_int():
                out.append(x if x.is_int() else y)  # a valid broadcast: the size is that int
            else:
                return None
        return tuple(out)

    @staticmethod
    def _axis(axis: int, rank: int) -> int:
        if not -rank <= axis < rank:
            raise ValueError(axis)
        return axis % rank

    def _ints(self, value: ir.Value | None) -> list[int] | None:
        entries = self.content(value)
        if entries is None or not all(isinstance(e, Lin) and e.is_int() for e in entries):
            return None
        return [e.const for e in entries]

    # -- one node --------------------------------------------------------------------------

    _SAME_SHAPE = {
        "Cast", "Identity", "Relu", "Erf", "Sqrt", "Sigmoid", "Tanh", "Neg", "Softmax", "Reciprocal",
        "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "Gelu", "FastGelu", "BiasGelu",
        "QuickGelu", "LeakyRelu", "Exp", "Log", "Abs", "IsNaN", "IsInf", "Not", "Cos", "Sin", "Softplus",
        "HardSigmoid", "HardSwish", "Elu", "Selu", "Mish", "Clip", "Trilu", "Floor", "Ceil", "Round", "Sign",
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "CumSum", "LogSoftmax",
    }
    _BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "Greater", "And", "Or", "Max",
                  "Min", "LessOrEqual", "GreaterOrEqual", "Mod", "Xor", "BitwiseAnd", "BitwiseOr"}

    #: com.microsoft linears our passes write (weight-only, onnxruntime-fuse): without their
    #: shapes every size read after a quantized linear stays unknown
    _MS_LINEARS = {"MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}

    def _visit(self, node: ir.Node) -> None:
        if node.domain == "com.microsoft" and node.op_type in self._MS_LINEARS:
            self._ms_linear(node)
            return
        if node.domain == "com.microsoft" and node.op_type in ("RotaryEmbedding", "GroupQueryAttention"):
            self._ms_attention(node)
            return
        if node.domain not in ("", "ai.onnx") and node.op_type not in ("SimplifiedLayerNormalization",):
            return
        if any(isinstance(a.value, (ir.Graph, list)) and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values()):
            return
        op = node.op_type
        ins = list(node.inputs)
        out = node.outputs[0] if node.outputs else None
        if out is None:
            return
        shape = self.shape(ins[0]) if ins and ins[0] is not None else None
        if op == "Constant":
            self._constant(out)
        elif op in self._SAME_SHAPE:
            content = self.content(ins[0]) if op in ("Cast", "Identity") else None
            dtype = None
            if op == "Cast":
                to = node.attributes["to"].as_int()
                if to not in _INTEGER_TYPES:
                    content = None  # contents are integers (sizes) only: float arithmetic is not tracked
                else:
                    dtype = ir.DataType(to).numpy()
            self._set(out, shape, content, dtype)
        elif op in self._BROADCAST:
            shapes = [self.shape(v) for v in ins]
            if all(s is not None for s in shapes):
                result = shapes[0]
                for s in shapes[1:]:
                    result = self._broadcast(result, s) if result is not None else None
                self._set(out, result, self._elementwise(op, ins))
        elif op == "Shape":
            if shape is not None:
                rank = len(shape)
                start = node.attributes.get("start")
                end = node.attributes.get("end")
                s = start.as_int() if start is not None else 0
                e = end.as_int() if end is not None else rank
                s, e = max(0, s + rank if s < 0 else s), min(rank, e + rank if e < 0 else e)
                dims = shape[s:e]
                self._set(out, (Lin.of(len(dims)),), dims, np.int64)
        elif op == "Size":
            if shape is not None:
                total = Lin.of(1)
                for d in shape:
                    total = total * d
                self._set(out, (), (total,), np.int64)
        elif op == "Gather":
            self._gather(node, ins, out)
        elif op == "Unsqueeze":
            axes = self._ints(ins[1]) if len(ins) > 1 else list(node.attributes["axes"].as_ints())
            if shape is not None and axes is not None:
                rank = len(shape) + len(axes)
                axes = sorted(self._axis(a, rank) for a in axes)
                dims = list(shape)
                for a in axes:
                    dims.insert(a, Lin.of(1))
                self._set(out, tuple(dims), self.content(ins[0]))
        elif op == "Squeeze":
            if shape is not None:
                if len(ins) > 1 and ins[1] is not None:
                    axes = self._ints(ins[1])
                elif "axes" in node.attributes:
                    axes = list(node.attributes["axes"].as_ints())
                else:
                    axes = [i for i, d in enumerate(shape) if d == Lin.of(1)]
                if axes is not None:
                    axes = {self._axis(a, len(shape)) for a in axes}
                    self._set(out, tuple(d for i, d in enumerate(shape) if i not in axes), self.content(ins[0]))
        elif op == "Concat":
            shapes = [self.shape(v) for v in ins]
            if all(s is not None for s in shapes) and shapes:
                axis = self._axis(node.attributes["axis"].as_int(), len(shapes[0]))
                total = Lin.of(0)
                for s in shapes:
                    total = total + s[axis]
                dims = list(shapes[0])
                dims[axis] = total
                contents = [self.content(v) for v in ins]
                content = None
                if len(dims) == 1 and all(c is not None for c in contents):
                    content = tuple(e for c in contents for e in c)
                self._set(out, tuple(dims), content)
        elif op == "Reshape":
            self._reshape(node, ins, out, shape)
        elif op == "Transpose":
            if shape is not None:
                perm = node.attributes.get("perm")
                perm = list(perm.as_ints()) if perm is not None else list(reversed(range(len(shape))))
                self._set(out, tuple(shape[p] for p in perm))
        elif op in ("MatMul", "MatMulInteger"):
            self._matmul(ins, out)
        elif op in ("ScatterND", "ScatterElements"):
            self._set(out, shape)
        elif op == "Split" and shape is not None:
            axis = node.attributes.get("axis")
            axis = self._axis(axis.as_int() if axis is not None else 0, len(shape))
            sizes = self._ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None
            if sizes is None and "split" in node.attributes:
                sizes = list(node.attributes["split"].as_ints())
            if sizes is None and shape[axis].is_int() and shape[axis].const % len(node.outputs) == 0:
                sizes = [shape[axis].const // len(node.outputs)] * len(node.outputs)
            if sizes is not None and len(sizes) == len(node.outputs):
                for value, size in zip(node.outputs, sizes):
                    self._set(value, shape[:axis] + (Lin.of(size),) + shape[axis + 1:])
        elif op == "Gemm":
            a, b = self.shape(ins[0]), self.shape(ins[1])
            if a is not None and b is not None and len(a) == 2 and len(b) == 2:
                trans_a, trans_b = (node.attributes.get(k) for k in ("transA", "transB"))
                rows = a[1] if trans_a is not None and trans_a.as_int() else a[0]
                cols = b[0] if trans_b is not None and trans_b.as_int() else b[1]
                self._set(out, (rows, cols))
        elif op == "Expand":
            target = self.content(ins[1])
            if shape is not None and target is not None and all(isinstance(t, Lin) for t in target):
                self._set(out, self._broadcast(shape, tuple(target)))
        elif op == "ConstantOfShape":
            target = self.content(ins[0])
            if target is not None and all(isinstance(t, Lin) for t in target):
                content = None
                attr = node.attributes.get("value")
                fill = attr.as_tensor().numpy().reshape(-1) if attr is not None else None
                if fill is not None and fill.dtype.kind in "iu" and all(t.is_int() for t in target):
                    count = int(np.prod([t.const for t in target]))
                    content = (Lin.of(int(fill[0])),) * count if count <= self.MAX_CONTENT else None
                self._set(out, tuple(target), content)
        elif op == "Range":
            start, limit, delta = (self.content(v) for v in ins[:3])
            if start and limit and delta and delta[0] == Lin.of(1) and isinstance(limit[0], Lin):
                self._set(out, (limit[0] - start[0],))
        elif op == "Slice":
            self._slice(node, ins, out, shape)
        elif op.startswith("Reduce") and shape is not None:
            self._reduce(node, ins, out, shape)
        elif op == "Flatten" and shape is not None:
            axis = node.attributes.get("axis")
            axis = self._axis(axis.as_int() if axis is not None else 1, len(shape) + 1)
            left, right = Lin.of(1), Lin.of(1)
            for d in shape[:axis]:
                left = left * d
            for d in shape[axis:]:
                right = right * d
            self._set(out, (left, right))

    def _reduce(self, node: ir.Node, ins: list, out: ir.Value, shape: Shape) -> None:
        keepdims = node.attributes.get("keepdims")
        keep = keepdims.as_int() if keepdims is not None else 1
        if len(ins) > 1 and ins[1] is not None:
            axes = self._ints(ins[1])
        elif "axes" in node.attributes:
            axes = list(node.attributes["axes"].as_ints())
        else:
            axes = list(range(len(shape)))  # no axes: all of them (noop_with_empty_axes aside)
            noop = node.attributes.get("noop_with_empty_axes")
            if noop is not None and noop.as_int():
                axes = []
        if axes is None:
            return
        axes = {self._axis(a, len(shape)) for a in axes}
        if keep:
            self._set(out, tuple(Lin.of(1) if i in axes else d for i, d in enumerate(shape)))
        else:
            self._set(out, tuple(d for i, d in enumerate(shape) if i not in axes))

    def _elementwise(self, op: str, ins: list) -> tuple | None:
        contents = [self.content(v) for v in ins]
        if any(c is None for c in contents):
            return None
        n = max(len(c) for c in contents)
        if any(len(c) not in (1, n) for c in contents):
            return None
        rows = [c if len(c) == n else c * n for c in contents]
        out = []
        for items in zip(*rows):
            value = _apply(op, items)
            if value is None:
                return None
            out.append(value)
        return tuple(out)

    def _gather(self, node: ir.Node, ins: list, out: ir.Value) -> None:
        data, indices = self.shape(ins[0]), self.shape(ins[1])
        axis = node.attributes.get("axis")
        axis = axis.as_int() if axis is not None else 0
        if data is None or indices is None:
            return
        axis = self._axis(axis, len(data))
        self._set(out, data[:axis] + indices + data[axis + 1:])
        content, index = self.content(ins[0]), self._ints(ins[1])
        if content is not None and index is not None and len(data) == 1:
            size = len(content)
            self._set(out, None, tuple(content[i % size] for i in index), self.dtypes.get(ins[0]))

    def _reshape(self, node: ir.Node, ins: list, out: ir.Value, shape: Shape | None) -> None:
        target = self.content(ins[1])
        allowzero = node.attributes.get("allowzero")
        if target is None or not all(isinstance(t, Lin) for t in target) or shape is None:
            return
        if allowzero is not None and allowzero.as_int():
            return
        dims = [shape[i] if t == Lin.of(0) and i < len(shape) else t for i, t in enumerate(target)]
        if sum(1 for d in dims if d == Lin.of(-1)) == 1:
            known = [d for d in dims if d != Lin.of(-1)]
            dims[dims.index(Lin.of(-1))] = _quotient(list(shape), known)
        self._set(out, tuple(dims), self.content(ins[0]))

    def _ms_linear(self, node: ir.Node) -> None:
        ins, out = list(node.inputs), node.outputs[0]
        if node.op_type != "MatMulNBits":
            self._matmul(ins, out)  # A @ B shapes, the scales and zero points aside
            return
        shape, n = self.shape(ins[0]), node.attributes.get("N")
        if shape and n is not None:  # A [..., K] -> [..., N]; B is packed blocks, not [K, N]
            self._set(out, shape[:-1] + (Lin.of(n.as_int()),))

    def _ms_attention(self, node: ir.Node) -> None:
        """onnxruntime-fuse's decoder attention: RotaryEmbedding keeps its input's shape;
        GroupQueryAttention writes the query's shape and a cache of past + new positions."""
        query = self.shape(node.inputs[0])
        if query is not None:
            self._set(node.outputs[0], query)
        if node.op_type == "GroupQueryAttention" and query is not None and len(query) == 3:
            for past, present in zip(node.inputs[3:5], node.outputs[1:3]):
                cache = self.shape(past) if past is not None else None
                if cache is not None and len(cache) == 4:
                    self._set(present, (cache[0], cache[1], cache[2] + query[1], cache[3]))

    def _matmul(self, ins: list, out: ir.Value) -> None:
        a, b = self.shape(ins[0]), self.shape(ins[1])
        if a is None or b is None or not a or not b:
            return
        if len(a) == 1 and len(b) == 1:
            self._set(out, ())
            return
        if len(b) == 1:
            self._set(out, a[:-1])
            return
        if len(a) == 1:
            self._set(out, b[:-2] + b[-1:])
            return
        batch = self._broadcast(a[:-2], b[:-2])
        if batch is not None:
            self._set(out, batch + (a[-2], b[-1]))

    def _slice(self, node: ir.Node, ins: list, out: ir.Value, shape: Shape | None) -> None:
        if shape is None:
            return
        starts, ends = self.content(ins[1]), self.content(ins[2])
        axes = self._ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        steps = self._ints(ins[4]) if len(ins) > 4 and ins[4] is not None else None
        if starts is None or ends is None or not all(isinstance(e, Lin) for e in starts + ends):
            return
        if not all(e.is_int() for e in starts):
            return
        starts = [e.const for e in starts]
        # an end that is the axis's own size is "to the end"
        whole = 2**63 - 1
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        dims = list(shape)
        content = self.content(ins[0])
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = self._axis(axis, len(dims))
            dim = dims[axis]
            if end == dim:
                end = whole
            elif end.is_int():
                end = end.const
            elif dim.is_int() and start == 0 and step == 1 and _nonnegative(end):
                # the first `end` rows of a fixed table (position ids, a rotary cache) up to a
                # sequence length: that length fits the table wherever the model can run at all
                dims[axis] = end
                content = None
                continue
            else:
                return
            if step != 1:
                if not dim.is_int():
                    return
                dims[axis] = Lin.of(len(range(*slice(start, end, step).indices(dim.const))))
                content = None
                continue
            if dim.is_int():
                lo, hi, _ = slice(start, end).indices(dim.const)
                dims[axis] = Lin.of(max(0, hi - lo))
                if content is not None and len(dims) == 1:
                    content = content[lo:hi]
            elif start == 0 and end >= 2**31 - 1:
                pass  # the whole axis
            elif 0 <= start and 0 <= end < 2**31 - 1:
                return  # a slice of an unknown size may be shorter than asked: unknown
            else:
                return
        self._set(out, tuple(dims), content)


def _parse_dim(text: str) -> Lin:
    """A ``dim_param``: a name, or a sum of names and integers as optimum declares the mask
    of a with-past model (``past_sequence_length + sequence_length``)."""
    parts = [part.strip() for part in text.split("+")]
    if len(parts) > 1 and all(part and (part.isidentifier() or part.isdigit()) for part in parts):
        total = Lin.of(0)
        for part in parts:
            total = total + (Lin.of(int(part)) if part.isdigit() else Lin.symbol(part))
        return total
    return Lin.symbol(text)


def _quotient(numerator: list, denominator: list) -> Lin:
    """``prod(numerator) / prod(denominator)`` for Reshape's -1, cancelling equal factors."""
    num = list(numerator)
    den = []
    for d in denominator:
        if d in num:
            num.remove(d)
        else:
            den.append(d)
    num_int = math.prod(d.const for d in num if d.is_int())
    den_int = math.prod(d.const for d in den if d.is_int())
    num_sym = [d for d in num if not d.is_int()]
    den_sym = [d for d in den if not d.is_int()]
    if den_sym:
        return Lin.symbol(("div", tuple(num), tuple(den)))
    if den_int == 0 or num_int % den_int:
        if len(num_sym) == 1 and num_int == 1:
            return num_sym[0].floordiv(den_int)
        return Lin.symbol(("div", tuple(num), tuple(den)))
    result = Lin.of(num_int // den_int)
    for d in num_sym:
        result = result * d
    return result


def _apply(op: str, items: tuple):
    """One entry of an elementwise op on shape contents, or None when it is not known."""
    if op == "Where":
        cond, a, b = items
        return (a if cond else b) if isinstance(cond, bool) else None
    if op in ("And", "Or", "Xor"):
        if not all(isinstance(i, bool) for i in items):
            return None
        x, y = items
        return {"And": x and y, "Or": x or y, "Xor": x != y}[op]
    if not all(isinstance(i, Lin) for i in items):
        return None
    x, y = items
    if op == "Add":
        return x + y
    if op == "Sub":
        return x - y
    if op == "Mul":
        return x * y
    if op == "Div":
        if x.is_int() and y.is_int():
            if y.const == 0:
                return None
            q = abs(x.const) // abs(y.const)  # integer Div truncates toward zero
            return Lin.of(q if (x.const >= 0) == (y.const >= 0) else -q)
        return x.floordiv(y) if y.is_int() and y.const > 0 and _nonnegative(x) else None
    if op == "Equal":
        if x.is_int() and y.is_int():
            return x.const == y.const
        if x == y:
            return True
        # a size (a non-negative combination of sizes) is never a negative number
        for sym, num in ((x, y), (y, x)):
            if num.is_int() and num.const < 0 and _nonnegative(sym):
                return False
        return None
    if op in ("Max", "Min") and x.is_int() and y.is_int():
        return Lin.of(max(x.const, y.const) if op == "Max" else min(x.const, y.const))
    if op in ("Less", "Greater", "LessOrEqual", "GreaterOrEqual") and x.is_int() and y.is_int():
        return {"Less": x.const < y.const, "Greater": x.const > y.const,
                "LessOrEqual": x.const <= y.const, "GreaterOrEqual": x.const >= y.const}[op]
    return None


def _nonnegative(x: Lin) -> bool:
    """Whether ``x`` is a size: non-negative coefficients over sizes plus a non-negative constant."""
    return x.const >= 0 and all(c > 0 for _, c in x.terms)
