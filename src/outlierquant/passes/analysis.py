"""Graph structure analysis: linears, norms, and who produces each linear's input channels.

Every equivalence rewrite of this package (SmoothQuant, Outlier Suppression+, rotations,
per-channel rescaling, outlier split) rests on one identity. For a linear
``y = x @ W`` (``W`` is ``[K, N]``) and any ``s > 0`` of length ``K``::

    y = (x · diag(s)⁻¹) @ (diag(s) · W)

The scale ``diag(s)⁻¹`` must go somewhere. It can be *folded* into whatever produced
``x`` when that producer is per-channel linear in its output channels:

- a **norm** (LayerNorm, RMSNorm, fused or decomposed): ``γ ← γ / s`` and ``β ← β / s``;
- another **linear** ``x = z @ W₀ + b₀``: columns of ``W₀`` and ``b₀`` divided by ``s``;

and only when *every* consumer of the produced tensor is a linear that takes the inverse
scale on its weight rows. A norm output that also feeds the residual ``Add`` (post-norm
BERT) or a graph output is not foldable: the scale would change that other use.

Between the producer and the consumers the channels may travel through ops that commute
with a per-channel scale — the **path**. The analysis tracks, through the path, which
producer channel each consumer input channel carries (``channel_map``):

- ``Reshape``/``Transpose``/``Unsqueeze``/``Squeeze``/``Expand``/``Cast``: head split and
  merge, and the ``repeat_kv`` of grouped-query attention, where one value channel feeds
  several heads: ``channel_map[j]`` is the V output channel that O's input channel ``j``
  carries, so O's row ``j`` takes ``s[channel_map[j]]``;
- ``probs @ V`` (``MatMul`` with the tracked tensor on the right, contracting a
  non-channel axis): ``probs @ (V · diag(s)) = (probs @ V) · diag(s)`` — **V → O**;
- an elementwise ``Mul`` by a tensor that does not depend on the producer:
  ``act(gate) ⊙ (up · diag(s)) = (act(gate) ⊙ up) · diag(s)`` — **up → down** of gated MLPs.

An activation between two linears (GELU, ReLU, SiLU of the gate) ends the path: the
consumer has no per-channel linear producer (relation ``none``) and a pass must either
insert an explicit scale op or skip it. (ReLU commutes with *positive* scales, but the
analysis keeps one notion of foldability that rotations can use as well.)

All structure is found by pattern — op types, constants, data flow — never by node
names or per-architecture tables. Norm spellings recognised: ``LayerNormalization``,
``RMSNormalization`` (opset 23), com.microsoft ``SimplifiedLayerNormalization``,
``SkipLayerNormalization`` and ``SkipSimplifiedLayerNormalization``, and the decomposed
forms ``ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div[/Mul γ][/Add β]`` (LayerNorm) and
``Pow/ReduceMean/Add/Sqrt/(Div | Reciprocal | Div(1, ·))/Mul[/Mul γ]`` (RMSNorm), with
``Cast`` nodes anywhere along the chain. Weights stored as ``Constant`` nodes are read
too; run :class:`~outlierquant.passes.canonicalize.CanonicalizePass` first when a pass
will *write* weights (it lifts them into initializers).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, deque
from typing import Any, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from outlierquant.passes.base import KEEP_FLOAT_KEY, constant_array, is_constant

logger = logging.getLogger(__name__)

__all__ = [
    "GraphAnalysis",
    "Linear",
    "LinearGroup",
    "Norm",
    "Producer",
    "analyze_graph",
]

_MS_DOMAIN = "com.microsoft"
_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
#: ops that only read a tensor's shape: a scale on their input changes nothing
_SHAPE_ONLY_OPS = {"Shape", "Size"}
#: activation ops named in reasons when a path ends at a nonlinearity
_ACTIVATION_NAMES = {
    "Erf": "GELU (Erf)",
    "Gelu": "GELU",
    "FastGelu": "GELU",
    "BiasGelu": "GELU",
    "Tanh": "Tanh/GELU-tanh",
    "Sigmoid": "Sigmoid/SiLU",
    "Relu": "ReLU",
    "LeakyRelu": "LeakyReLU",
    "Softmax": "Softmax",
    "Elu": "ELU",
    "Selu": "SELU",
    "Softplus": "Softplus",
    "HardSigmoid": "HardSigmoid",
    "HardSwish": "HardSwish",
    "Mish": "Mish",
    "QuickGelu": "QuickGELU",
}
_MAX_PATH_NODES = 64


# --------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Linear:
    """A MatMul / Gemm / Conv with a constant weight, plus its bias when there is one.

    ``weight_layout``: ``"in_out"`` (MatMul, Gemm ``transB=0``: ``[K, N]``), ``"out_in"``
    (Gemm ``transB=1``: ``[N, K]``) or ``"conv"`` (``[N, K, *kernel]``). ``bias`` is Gemm's
    ``C``, Conv's ``B``, or the constant of an ``Add`` right after a MatMul that broadcasts
    along the output axis (then ``bias_node`` is that Add). ``output`` is the value after
    the bias.
    """

    node: ir.Node
    op_type: str
    input: ir.Value
    weight: ir.Value
    weight_layout: str
    bias: ir.Value | None
    bias_node: ir.Node | None
    in_features: int
    out_features: int
    output: ir.Value

    @property
    def name(self) -> str:
        return self.node.name or self.output.name or "?"

    def weight_array(self) -> np.ndarray:
        """The weight as ``[K, N]`` (input channels × output channels), whatever the layout.

        For Conv the rows are ``(input channel, kernel position)`` pairs, input channel
        major: ``[K·kh·kw, N]``.
        """
        array = constant_array(self.weight)
        if self.weight_layout == "in_out":
            return array
        if self.weight_layout == "out_in":
            return array.T
        return array.reshape(array.shape[0], -1).T

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else constant_array(self.bias)


@dataclasses.dataclass(frozen=True, eq=False)
class Norm:
    """A normalisation, fused or decomposed. ``output`` is the value after γ (and β).

    ``kind``: ``"layernorm"``, ``"rmsnorm"``, ``"skiplayernorm"`` or ``"skiprmsnorm"``.
    ``input`` is the tensor being normalised (for decomposed forms: the value fed to the
    mean/square, i.e. after any leading Cast). ``axis`` is the normalised axis.
    """

    kind: str
    nodes: tuple[ir.Node, ...]
    input: ir.Value
    output: ir.Value
    gamma: ir.Value | None
    beta: ir.Value | None
    axis: int

    @property
    def fused(self) -> bool:
        return len(self.nodes) == 1

    @property
    def name(self) -> str:
        return self.nodes[-1].name or self.output.name or "?"


@dataclasses.dataclass(frozen=True, eq=False)
class Producer:
    """What produces a linear group's input channels, and whether a scale can fold into it.

    ``kind``: ``"norm"``, ``"linear"`` or ``"none"``. ``relation``: ``"norm"``,
    ``"linear"`` (linear → channel-preserving ops → linear), ``"v_to_o"``,
    ``"up_to_down"``, or ``"none"``. ``value`` is the produced tensor a scale would be
    applied to (the norm output, or the producing linear's output after its bias).
    ``path`` lists the channel-preserving nodes between ``value`` and the group's input.
    ``channel_map[j]`` is the producer output channel carried by the group's input
    channel ``j`` (identity when the path does not move channels; one-to-many for GQA).
    """

    kind: str
    relation: str
    foldable: bool
    reason: str
    norm: Norm | None = None
    linear: Linear | None = None
    value: ir.Value | None = None
    path: tuple[ir.Node, ...] = ()
    channel_map: np.ndarray | None = None

    def describe(self) -> str:
        if self.kind == "norm":
            source = f"{self.norm.kind} {self.norm.name}"
        elif self.kind == "linear":
            source = f"linear {self.linear.name}"
        else:
            source = "no producer"
        verdict = "foldable" if self.foldable else "not foldable"
        return f"{self.relation}: {source}, {verdict}" + (f" ({self.reason})" if self.reason else "")


@dataclasses.dataclass(frozen=True, eq=False)
class LinearGroup:
    """Linears reading one tensor (``input``), e.g. ``norm → {q, k, v}``, ``{gate, up}``."""

    producer: Producer
    linears: tuple[Linear, ...]
    input: ir.Value

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features


@dataclasses.dataclass(eq=False)
class GraphAnalysis:
    """Everything :func:`analyze_graph` found. Lists are in graph (topological) order."""

    linears: list[Linear]
    groups: list[LinearGroup]
    norms: list[Norm]
    dynamic_matmuls: list[ir.Node]
    _group_by_linear: dict[int, LinearGroup] = dataclasses.field(default_factory=dict, repr=False)

    def group_of(self, linear: Linear) -> LinearGroup:
        return self._group_by_linear[id(linear)]

    def producer_of(self, linear: Linear) -> Producer:
        return self.group_of(linear).producer

    def input_names(self, *, groups: bool = False) -> list[str]:
        """The distinct input tensors of every linear (or linear group), sorted."""
        return sorted({item.input.name for item in (self.groups if groups else self.linears) if item.input.name})

    def linear_for_node(self, node: ir.Node) -> Linear | None:
        for linear in self.linears:
            if linear.node is node:
                return linear
        return None

    def summary(self) -> dict[str, Any]:
        """Counts, JSON-serialisable."""
        relations = Counter(group.producer.relation for group in self.groups)
        foldable = Counter(group.producer.relation for group in self.groups if group.producer.foldable)
        return {
            "linears": len(self.linears),
            "linear_ops": dict(Counter(linear.op_type for linear in self.linears)),
            "linears_with_bias": sum(1 for linear in self.linears if linear.bias is not None),
            "groups": len(self.groups),
            "foldable_groups": sum(1 for group in self.groups if group.producer.foldable),
            "foldable_linears": sum(len(g.linears) for g in self.groups if g.producer.foldable),
            "relations": dict(relations),
            "foldable_by_relation": dict(foldable),
            "norms": dict(Counter(norm.kind for norm in self.norms)),
            "decomposed_norms": sum(1 for norm in self.norms if not norm.fused),
            "dynamic_matmuls": len(self.dynamic_matmuls),
        }

    def describe(self) -> str:
        lines = [f"{len(self.linears)} linears in {len(self.groups)} groups, {len(self.norms)} norms, "
                 f"{len(self.dynamic_matmuls)} activation×activation MatMuls"]
        for group in self.groups:
            names = ", ".join(linear.name for linear in group.linears)
            lines.append(f"  [{names}] <- {group.producer.describe()}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def analyze_graph(model: ir.Model) -> GraphAnalysis:
    """Find linears, norms, linear groups and their producers in ``model.graph``.

    Read-only: the model is not changed.
    """
    return _Analyzer(model.graph).run()


class _Analyzer:
    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes = list(graph)
        self.order = {node: index for index, node in enumerate(self.nodes)}
        self.ranks = _propagate_ranks(graph, self.nodes)
        self.linears: list[Linear] = []
        self.linear_by_node: dict[ir.Node, Linear] = {}
        self.linear_by_output: dict[ir.Value, Linear] = {}
        self.norms: list[Norm] = []
        self.norm_by_output: dict[ir.Value, Norm] = {}

    def run(self) -> GraphAnalysis:
        for node in self.nodes:
            linear = _match_linear(node)
            if linear is not None:
                self.linears.append(linear)
                self.linear_by_node[node] = linear
                self.linear_by_output[linear.output] = linear
        for node in self.nodes:
            norm = _match_norm(node)
            if norm is not None and norm.output not in self.norm_by_output:
                self.norms.append(norm)
                self.norm_by_output[norm.output] = norm
        self.norms.sort(key=lambda norm: self.order[norm.nodes[-1]])
        dynamic = [
            node
            for node in self.nodes
            if node.op_type == "MatMul" and node.domain == "" and node not in self.linear_by_node
            and not any(_is_constant_derived(value) for value in node.inputs)
        ]

        inputs: dict[ir.Value, list[Linear]] = {}
        for linear in self.linears:
            inputs.setdefault(linear.input, []).append(linear)
        traces: dict[ir.Value, _Trace] = {}
        groups: list[LinearGroup] = []
        by_linear: dict[int, LinearGroup] = {}
        for value, members in inputs.items():
            producer = self._producer_for(value, members, traces)
            group = LinearGroup(producer=producer, linears=tuple(members), input=value)
            groups.append(group)
            for linear in members:
                by_linear[id(linear)] = group
        groups.sort(key=lambda group: self.order[group.linears[0].node])
        analysis = GraphAnalysis(self.linears, groups, self.norms, dynamic, by_linear)
        logger.info("graph analysis: %s", analysis.summary())
        return analysis

    # -- producer search -------------------------------------------------------------

    def _producer_for(self, value: ir.Value, members: list[Linear], traces) -> Producer:
        root = self._find_root(value, depth=0)
        if isinstance(root, str):
            return Producer(kind="none", relation="none", foldable=False, reason=root)
        kind, record = root
        produced = record.output
        if produced not in traces:
            traces[produced] = self._trace_forward(kind, record)
        trace = traces[produced]
        norm = record if kind == "norm" else None
        linear = record if kind == "linear" else None
        relation = "norm" if kind == "norm" else trace.relation_to(value)
        channel_map = trace.channel_maps.get(value)
        path = tuple(trace.path_to(value))
        blockers = list(trace.blockers)
        if channel_map is None and not blockers:
            blockers.append(f"could not follow channels from {produced.name} to {value.name}")
        outside = [lin.name for lin in trace.consumers if lin.input is not value]
        if outside:
            blockers.append(
                "producer also feeds linears through another tensor "
                f"({', '.join(outside[:4])}): a scale would have to be shared across groups"
            )
        if kind == "norm" and norm.gamma is None:
            blockers.append("norm has no constant γ to absorb a scale")
        reason = "; ".join(blockers)
        return Producer(
            kind=kind,
            relation=relation,
            foldable=not blockers,
            reason=reason,
            norm=norm,
            linear=linear,
            value=produced,
            path=path,
            channel_map=channel_map,
        )

    def _find_root(self, value: ir.Value, depth: int):
        """Walk back from ``value`` through channel-preserving ops to a norm or a linear.

        Returns ``("norm", Norm)``, ``("linear", Linear)`` or a reason string.
        """
        current = value
        for _ in range(_MAX_PATH_NODES):
            if current in self.norm_by_output:
                return "norm", self.norm_by_output[current]
            if current in self.linear_by_output:
                return "linear", self.linear_by_output[current]
            node = current.producer()
            if node is None:
                if current.is_graph_input():
                    return f"input is the graph input {current.name!r}: no producer to fold into"
                return f"input {current.name!r} is a constant"
            op = node.op_type
            if node.domain == "" and op in ("Cast", "Identity", "Dropout", "Reshape", "Transpose",
                                             "Unsqueeze", "Squeeze", "Expand", "Flatten"):
                current = node.inputs[0]
                continue
            if node.domain == "" and op == "MatMul" and not any(is_constant(v) for v in node.inputs):
                current = node.inputs[1]  # the output's last axis comes from the right operand
                continue
            if node.domain == "" and op in ("Mul", "Div"):
                operands = list(node.inputs[:1]) if op == "Div" else list(node.inputs[:2])
                constant_sides = [is_constant(v) for v in node.inputs[:2]]
                if any(constant_sides):
                    if op == "Div" and constant_sides[0]:
                        return f"input comes from Div {node.name} with a constant numerator: not linear"
                    current = node.inputs[constant_sides.index(False)]
                    continue
                if depth > 4:
                    return f"input comes from nested Mul {node.name}: too deep to resolve"
                return self._resolve_product(node, operands, depth)
            return self._no_producer_reason(node)
        return f"channel path from {value.name!r} is longer than {_MAX_PATH_NODES} nodes"

    def _resolve_product(self, node: ir.Node, operands: Sequence[ir.Value], depth: int):
        """For ``a ⊙ b``: the operand whose producer the other operand does not depend on."""
        for operand in operands:
            root = self._find_root(operand, depth + 1)
            if isinstance(root, str):
                continue
            produced = root[1].output
            others = [v for v in node.inputs[:2] if v is not operand]
            if not any(self._depends_on(other, produced) for other in others):
                return root
        activations = self._activations_above(node)
        if activations:
            return (f"input comes through a nonlinear activation ({', '.join(activations)}) at "
                    f"{node.op_type} {node.name}: no per-channel linear producer")
        return (f"input comes from {node.op_type} {node.name} whose operands share a producer: "
                "not linear in either")

    def _no_producer_reason(self, node: ir.Node) -> str:
        op = node.op_type
        if op in _ACTIVATION_NAMES:
            reason = f"input comes from {op} {node.name} ({_ACTIVATION_NAMES[op]}): no per-channel linear producer"
            if op in ("Relu", "LeakyRelu"):
                reason += " (ReLU commutes only with positive scales; not folded through)"
            return reason
        activations = self._activations_above(node)
        if activations:
            return (f"input comes through a nonlinear activation ({', '.join(activations)}) at "
                    f"{op} {node.name}: no per-channel linear producer")
        if op in ("Add", "Sub", "Sum"):
            return f"input comes from {op} {node.name} (residual or non-constant sum): no per-channel producer"
        if op == "Gather":
            return f"input comes from Gather {node.name} (embedding lookup): no per-channel producer"
        return f"input comes from {op} {node.name}: not a norm, linear, or channel-preserving op"

    def _activations_above(self, node: ir.Node, limit: int = 12) -> list[str]:
        """Activation op types among the few nodes just above ``node``."""
        seen: list[str] = []
        stack, visited = [node], set()
        while stack and len(visited) < limit:
            current = stack.pop()
            if current in visited:
                continue
            visited.add(current)
            if current.op_type in _ACTIVATION_NAMES and current.op_type not in seen:
                seen.append(current.op_type)
            if current in self.linear_by_node:
                continue
            for value in current.inputs:
                if value is not None and value.producer() is not None:
                    stack.append(value.producer())
        return seen

    def _depends_on(self, value: ir.Value | None, root: ir.Value, tracked: Iterable[ir.Value] = ()) -> bool:
        """Whether ``value`` is computed from ``root`` (nodes before ``root``'s are pruned)."""
        if value is None:
            return False
        tracked = set(tracked)
        root_node = root.producer()
        floor = self.order.get(root_node, -1) if root_node is not None else -1
        stack, visited = [value], set()
        while stack:
            current = stack.pop()
            if current is root or current in tracked:
                return True
            if current in visited:
                continue
            visited.add(current)
            node = current.producer()
            if node is None or self.order.get(node, -1) < floor or node.op_type in _SHAPE_ONLY_OPS:
                continue
            stack.extend(v for v in node.inputs if v is not None)
        return False

    # -- forward channel tracking ------------------------------------------------------

    def _trace_forward(self, kind: str, record) -> "_Trace":
        root = record.output
        trace = _Trace(root)
        rank = self.ranks.get(root)
        if kind == "linear":
            channels = record.out_features
            channel_axis = 1 if record.op_type == "Conv" else -1
        else:
            channels = _norm_channels(record)
            channel_axis = record.axis
        if rank is None or channels is None:
            trace.blockers.append(f"rank or channel count of {root.name!r} unknown")
            return trace
        axis = channel_axis % rank
        entries: list[int | None] = [None] * rank
        entries[axis] = channels
        trace.states[root] = _ChannelState(entries, np.arange(channels))
        if kind == "norm":
            owner = "scaling γ/β"
        else:
            owner = "scaling its output channels"
        queue = deque([root])
        while queue:
            value = queue.popleft()
            state = trace.states[value]
            if value.is_graph_output():
                trace.blockers.append(f"{value.name} is a graph output: {owner} would change it")
            for node, index in value.uses():
                if node.op_type in _SHAPE_ONLY_OPS:
                    continue
                linear = self.linear_by_node.get(node)
                if linear is not None and index == 0:
                    channel_map = state.channel_map(linear)
                    if channel_map is None:
                        trace.blockers.append(
                            f"channels of {value.name} do not line up with the input axis of {linear.name}")
                        continue
                    if linear not in trace.consumers:
                        trace.consumers.append(linear)
                        trace.channel_maps[value] = channel_map
                    continue
                if len(trace.path) >= _MAX_PATH_NODES:
                    trace.blockers.append(f"channel path longer than {_MAX_PATH_NODES} nodes")
                    return trace
                result = self._step(node, index, value, state, trace)
                if isinstance(result, str):
                    trace.blockers.append(result.replace("{owner}", owner))
                    continue
                output, new_state, tag = result
                if output in trace.states:
                    continue
                trace.path.append(node)
                trace.parent[output] = (node, value)
                trace.tags[node] = tag
                trace.states[output] = new_state
                queue.append(output)
        return trace

    def _step(self, node: ir.Node, index: int, value: ir.Value, state: "_ChannelState", trace: "_Trace"):
        """Push the channel state through ``node``; returns (output, state, tag) or a reason."""
        op = node.op_type
        blocked = f"{value.name} also feeds {op} {node.name}, which cannot absorb a per-channel scale: {{owner}} would change its result"
        if op in ("Add", "Sum", "Sub"):
            blocked = (f"{value.name} also feeds {op} {node.name} (residual or sum): "
                       "{owner} would change the residual stream")
        if node.domain != "":
            return blocked
        if op in ("Identity", "Dropout") or (op == "Cast" and _cast_target(node) in _FLOAT_TYPES):
            if index != 0:
                return blocked
            return node.outputs[0], state, "copy"
        if op == "Transpose" and index == 0:
            perm = node.attributes.get_ints("perm", None)
            if perm is None:
                perm = list(reversed(range(len(state.entries))))
            new = state.transpose(list(perm))
            return (node.outputs[0], new, "layout") if new is not None else blocked
        if op in ("Unsqueeze", "Squeeze") and index == 0:
            axes = _axes_of(node)
            new = state.unsqueeze(axes) if op == "Unsqueeze" else state.squeeze(axes)
            return (node.outputs[0], new, "layout") if new is not None else blocked
        if op in ("Reshape", "Expand") and index == 0:
            target = _evaluate_shape(node.inputs[1], trace.states, self.ranks)
            if target is None:
                return f"cannot evaluate the target shape of {op} {node.name}: channel mapping unknown"
            if op == "Reshape":
                new = state.reshape(list(target), allow_zero=bool(node.attributes.get_int("allowzero", 0)))
            else:
                new = state.expand(list(target))
            if new is None:
                return f"{op} {node.name} mixes channel and non-channel axes: channel mapping unknown"
            return node.outputs[0], new, "layout"
        if op == "MatMul":
            other = node.inputs[1 - index]
            if other is None or is_constant(other):
                return blocked
            if self._depends_on(other, trace.root, trace.states):
                return f"both operands of MatMul {node.name} depend on {trace.root.name}: not linear in it"
            new = state.matmul(right=index == 1, other_rank=self.ranks.get(other))
            if new is None:
                return f"MatMul {node.name} contracts a channel axis of {value.name}: {{owner}} cannot pass it"
            return node.outputs[0], new, "attention"
        if op in ("Mul", "Div"):
            other = node.inputs[1 - index]
            if op == "Div" and index != 0:
                return blocked
            if other is None:
                return blocked
            if self._depends_on(other, trace.root, trace.states):
                activations = self._activations_above(node)
                suffix = f" ({', '.join(activations)})" if activations else ""
                return f"{value.name} is multiplied by a function of itself at {op} {node.name}{suffix}: nonlinear"
            new = state.broadcast(self.ranks.get(other))
            if new is None:
                return blocked
            tag = "scale" if is_constant(other) else "gate"
            return node.outputs[0], new, tag
        return blocked


# --------------------------------------------------------------------------------------
# Forward trace bookkeeping
# --------------------------------------------------------------------------------------


class _Trace:
    def __init__(self, root: ir.Value) -> None:
        self.root = root
        self.states: dict[ir.Value, _ChannelState] = {}
        self.path: list[ir.Node] = []
        self.parent: dict[ir.Value, tuple[ir.Node, ir.Value]] = {}
        self.tags: dict[ir.Node, str] = {}
        self.consumers: list[Linear] = []
        self.channel_maps: dict[ir.Value, np.ndarray] = {}
        self.blockers: list[str] = []

    def path_to(self, value: ir.Value) -> list[ir.Node]:
        nodes = []
        while value in self.parent:
            node, value = self.parent[value]
            nodes.append(node)
        return list(reversed(nodes))

    def relation_to(self, value: ir.Value) -> str:
        tags = {self.tags[node] for node in self.path_to(value)}
        if "attention" in tags:
            return "v_to_o"
        if "gate" in tags:
            return "up_to_down"
        return "linear"


class _ChannelState:
    """Which axes of a tensor carry producer channels, and which channel sits where.

    ``entries[i]`` is ``None`` for a non-channel axis (batch, sequence, ...) or the size
    of a channel axis. ``labels`` has one dimension per channel axis (in order) and holds
    the producer channel index at each position.
    """

    def __init__(self, entries: list[int | None], labels: np.ndarray) -> None:
        self.entries = entries
        self.labels = labels

    def _channel_positions(self) -> list[int]:
        return [i for i, entry in enumerate(self.entries) if entry is not None]

    def transpose(self, perm: list[int]) -> "_ChannelState | None":
        if sorted(perm) != list(range(len(self.entries))):
            return None
        positions = self._channel_positions()
        order = [positions.index(p) for p in perm if self.entries[p] is not None]
        return _ChannelState([self.entries[p] for p in perm], self.labels.transpose(order))

    def unsqueeze(self, axes: list[int] | None) -> "_ChannelState | None":
        if axes is None:
            return None
        rank = len(self.entries) + len(axes)
        entries: list[int | None] = list(self.entries)
        for axis in sorted(a % rank for a in axes):
            entries.insert(axis, 1)
        return _ChannelState(entries, self.labels.reshape([e for e in entries if e is not None]))

    def squeeze(self, axes: list[int] | None) -> "_ChannelState | None":
        if axes is None:
            return None
        rank = len(self.entries)
        drop = {a % rank for a in axes}
        if any(self.entries[a] not in (None, 1) for a in drop):
            return None
        entries = [e for i, e in enumerate(self.entries) if i not in drop]
        return _ChannelState(entries, self.labels.reshape([e for e in entries if e is not None]))

    def reshape(self, target: list, allow_zero: bool = False) -> "_ChannelState | None":
        source = self.entries
        resolved = []
        for i, dim in enumerate(target):
            if _is_int(dim) and dim == 0 and not allow_zero:
                if i >= len(source):
                    return None
                resolved.append(_Sym() if source[i] is None else source[i])
            else:
                resolved.append(dim)
        out: list[int | None] = []
        i = j = 0
        while i < len(source) or j < len(resolved):
            if i < len(source) and source[i] == 1 and (j >= len(resolved) or not _is_int(resolved[j])):
                i += 1  # a size-1 channel axis disappears
                continue
            if j < len(resolved) and _is_int(resolved[j]) and resolved[j] == 1 and (
                    i >= len(source) or source[i] is None):
                out.append(1)
                j += 1
                continue
            if i >= len(source) or j >= len(resolved):
                return None
            dim = resolved[j]
            if not _is_int(dim):
                if source[i] is not None:
                    return None  # an unknown target dim over a channel axis
                out.append(None)
                i += 1
                j += 1
                continue
            if dim == -1 and source[i] is None:
                while i < len(source) and source[i] is None:
                    i += 1
                out.append(None)
                j += 1
                continue
            run_source = []
            while i < len(source) and source[i] is not None:
                run_source.append(source[i])
                i += 1
            run_target = []
            while j < len(resolved) and _is_int(resolved[j]):
                run_target.append(int(resolved[j]))
                j += 1
            if not run_source:
                return None
            total = int(np.prod(run_source))
            if run_target.count(-1) > 1:
                return None
            if -1 in run_target:
                known = int(np.prod([d for d in run_target if d != -1]))
                if known <= 0 or total % known:
                    return None
                run_target[run_target.index(-1)] = total // known
            if int(np.prod(run_target)) != total:
                return None
            out.extend(run_target)
        return _ChannelState(out, self.labels.reshape([e for e in out if e is not None]))

    def expand(self, target: list) -> "_ChannelState | None":
        rank = max(len(target), len(self.entries))
        entries = [None] * (rank - len(self.entries)) + list(self.entries)
        target = [1] * (rank - len(target)) + list(target)
        labels = self.labels.reshape([e for e in entries if e is not None])
        label_axis = 0
        new_entries: list[int | None] = []
        for entry, dim in zip(entries, target):
            if entry is None:
                new_entries.append(None)
                continue
            if entry == 1 and _is_int(dim) and dim > 1:
                labels = np.repeat(labels, int(dim), axis=label_axis)
                new_entries.append(int(dim))
            elif entry == 1 and not _is_int(dim):
                return None
            else:
                if _is_int(dim) and dim not in (1, entry, -1):
                    return None
                new_entries.append(entry)
            label_axis += 1
        return _ChannelState(new_entries, labels)

    def matmul(self, right: bool, other_rank: int | None) -> "_ChannelState | None":
        entries = self.entries
        if len(entries) < 2:
            return None
        if right:
            if entries[-2] is not None:
                return None  # the contracted axis carries channels
            new = list(entries[:-2]) + [None, entries[-1]]
        else:
            if entries[-1] is not None:
                return None
            new = list(entries[:-1]) + [None]
        pad = max(0, (other_rank or 0) - len(new))
        new = [None] * pad + new
        return _ChannelState(new, self.labels.reshape([e for e in new if e is not None]))

    def broadcast(self, other_rank: int | None) -> "_ChannelState | None":
        if other_rank is None:
            return None
        pad = max(0, other_rank - len(self.entries))
        return _ChannelState([None] * pad + list(self.entries), self.labels)

    def channel_map(self, linear: Linear) -> np.ndarray | None:
        """The producer channel of each input channel of ``linear``, or None if misaligned."""
        entries = self.entries
        axis = 1 if linear.op_type == "Conv" else len(entries) - 1
        if axis >= len(entries) or entries[axis] != linear.in_features:
            return None
        if any(e not in (None, 1) for i, e in enumerate(entries) if i != axis):
            return None
        return self.labels.reshape(-1).astype(np.int64)


class _Sym:
    """An unknown dimension (a batch or sequence length read from a Shape)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "?"


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------
# Pattern matchers
# --------------------------------------------------------------------------------------


def _match_linear(node: ir.Node) -> Linear | None:
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm", "Conv"):
        return None
    if KEEP_FLOAT_KEY in node.metadata_props:  # a pass's float side path, not a layer to quantize
        return None
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    activation, weight = node.inputs[0], node.inputs[1]
    if is_constant(activation) or not is_constant(weight):
        return None
    shape = _const_shape(weight)
    if shape is None:
        return None
    bias = None
    bias_node = None
    output = node.outputs[0]
    if node.op_type == "MatMul":
        if len(shape) != 2:
            return None
        layout, in_features, out_features = "in_out", shape[0], shape[1]
        bias, bias_node = _following_bias(output, out_features)
        if bias_node is not None:
            output = bias_node.outputs[0]
    elif node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0) != 0 or attrs.get_float("alpha", 1.0) != 1.0 or len(shape) != 2:
            logger.debug("Gemm %s with transA/alpha not recognised as a linear", node.name)
            return None
        trans_b = attrs.get_int("transB", 0)
        layout = "out_in" if trans_b else "in_out"
        in_features, out_features = (shape[1], shape[0]) if trans_b else (shape[0], shape[1])
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias_shape = _const_shape(node.inputs[2])
            if not is_constant(node.inputs[2]) or attrs.get_float("beta", 1.0) != 1.0 or bias_shape is None \
                    or int(np.prod(bias_shape)) != out_features:
                logger.debug("Gemm %s with a non-constant or scaled C not recognised as a linear", node.name)
                return None
            bias = node.inputs[2]
    else:
        if len(shape) < 3 or node.attributes.get_int("group", 1) != 1:
            return None
        layout, in_features, out_features = "conv", shape[1], shape[0]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if not is_constant(node.inputs[2]):
                return None
            bias = node.inputs[2]
    return Linear(
        node=node,
        op_type=node.op_type,
        input=activation,
        weight=weight,
        weight_layout=layout,
        bias=bias,
        bias_node=bias_node,
        in_features=int(in_features),
        out_features=int(out_features),
        output=output,
    )


def _following_bias(output: ir.Value, out_features: int) -> tuple[ir.Value | None, ir.Node | None]:
    """The constant of an Add right after a MatMul that broadcasts along the output axis."""
    uses = [use for use in output.uses() if use.node.op_type not in _SHAPE_ONLY_OPS]
    if len(uses) != 1 or output.is_graph_output():
        return None, None
    add = uses[0].node
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1 - uses[0].idx]
    if not is_constant(other):
        return None, None
    shape = _const_shape(other)
    if shape is None or len(shape) == 0 or shape[-1] != out_features or any(d != 1 for d in shape[:-1]):
        return None, None
    return other, add


def _is_constant_derived(value: ir.Value | None, depth: int = 0) -> bool:
    """A constant, or computed from constants only (e.g. ``Transpose(W)`` of a tied weight)."""
    if value is None or is_constant(value):
        return value is not None
    node = value.producer()
    if node is None or depth > 4 or not node.inputs:
        return False
    return all(v is None or _is_constant_derived(v, depth + 1) for v in node.inputs)


def _const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(int(d) for d in value.const_value.shape.numpy())
    array = constant_array(value)
    return None if array is None else tuple(array.shape)


def _match_norm(node: ir.Node) -> Norm | None:
    op, domain = node.op_type, node.domain
    if domain == "" and op in ("LayerNormalization", "RMSNormalization"):
        kind = "layernorm" if op == "LayerNormalization" else "rmsnorm"
        gamma = _input_or_none(node, 1)
        beta = _input_or_none(node, 2) if kind == "layernorm" else None
        return Norm(kind, (node,), node.inputs[0], node.outputs[0], gamma, beta,
                    node.attributes.get_int("axis", -1))
    if domain == _MS_DOMAIN and op in ("SimplifiedLayerNormalization", "SkipLayerNormalization",
                                       "SkipSimplifiedLayerNormalization"):
        if op == "SimplifiedLayerNormalization":
            return Norm("rmsnorm", (node,), node.inputs[0], node.outputs[0], _input_or_none(node, 1), None,
                        node.attributes.get_int("axis", -1))
        kind = "skiplayernorm" if op == "SkipLayerNormalization" else "skiprmsnorm"
        beta = _input_or_none(node, 3) if kind == "skiplayernorm" else None
        return Norm(kind, (node,), node.inputs[0], node.outputs[0], _input_or_none(node, 2), beta, -1)
    if domain == "" and op == "ReduceMean":
        return _match_decomposed_norm(node)
    return None


def _input_or_none(node: ir.Node, index: int) -> ir.Value | None:
    if len(node.inputs) > index and node.inputs[index] is not None and is_constant(node.inputs[index]):
        return node.inputs[index]
    return None


def _real_uses(value: ir.Value) -> list:
    return [use for use in value.uses() if use.node.op_type not in _SHAPE_ONLY_OPS]


def _sole_consumer(value: ir.Value, nodes: list[ir.Node]) -> ir.Node | None:
    """The single consumer of ``value`` after skipping a chain of Casts (recorded in ``nodes``)."""
    current = value
    while True:
        uses = _real_uses(current)
        if len(uses) != 1 or current.is_graph_output():
            return None
        node = uses[0].node
        if node.op_type == "Cast" and node.domain == "":
            nodes.append(node)
            current = node.outputs[0]
            continue
        return node


def _skip_casts_forward(value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    current = value
    while True:
        uses = _real_uses(current)
        if len(uses) == 1 and uses[0].node.op_type == "Cast" and not current.is_graph_output():
            nodes.append(uses[0].node)
            current = uses[0].node.outputs[0]
            continue
        return current


def _strip_casts(value: ir.Value | None) -> ir.Value | None:
    while value is not None and value.producer() is not None and value.producer().op_type == "Cast":
        value = value.producer().inputs[0]
    return value


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(_strip_casts(value)) if value is not None else None
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def _reduce_axes(node: ir.Node) -> list[int] | None:
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_array(node.inputs[1])
        axes = None if array is None else [int(a) for a in array.reshape(-1)]
    if axes is None or node.attributes.get_int("keepdims", 1) != 1:
        return None
    return list(axes)


def _squared_operand(value: ir.Value) -> tuple[ir.Value, ir.Node] | None:
    node = value.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "Pow" and _scalar(node.inputs[1]) == 2.0:
        return node.inputs[0], node
    if node.op_type == "Mul" and node.inputs[0] is node.inputs[1] and node.inputs[0] is not None:
        return node.inputs[0], node
    return None


def _match_decomposed_norm(reduce_node: ir.Node) -> Norm | None:
    """Match a decomposed LayerNorm/RMSNorm whose variance is ``reduce_node``."""
    axes = _reduce_axes(reduce_node)
    if axes is None or len(axes) != 1:
        return None
    squared = _squared_operand(reduce_node.inputs[0])
    if squared is None:
        return None
    base, square_node = squared
    nodes: list[ir.Node] = [square_node, reduce_node]
    kind, norm_input = "rmsnorm", base
    centered = _strip_casts(base).producer()
    if centered is not None and centered.op_type == "Sub" and centered.domain == "":
        mean_node = _strip_casts(centered.inputs[1]).producer()
        if (mean_node is not None and mean_node.op_type == "ReduceMean" and _reduce_axes(mean_node) == axes
                and _strip_casts(mean_node.inputs[0]) is _strip_casts(centered.inputs[0])):
            kind, norm_input = "layernorm", centered.inputs[0]
            nodes = [mean_node, centered, *nodes]
    add = _sole_consumer(reduce_node.outputs[0], nodes)
    if add is None or add.op_type != "Add" or not any(is_constant(v) for v in add.inputs):
        return None
    nodes.append(add)
    sqrt = _sole_consumer(add.outputs[0], nodes)
    if sqrt is None or sqrt.op_type != "Sqrt":
        return None
    nodes.append(sqrt)
    step = _sole_consumer(sqrt.outputs[0], nodes)
    if step is None:
        return None
    numerator = None
    normalize_node = None
    if step.op_type == "Div" and _strip_casts(step.inputs[1]) is not None and not is_constant(step.inputs[0]):
        numerator, normalize_node = step.inputs[0], step
    elif (step.op_type == "Reciprocal") or (step.op_type == "Div" and _scalar(step.inputs[0]) == 1.0):
        nodes.append(step)
        multiply = _sole_consumer(step.outputs[0], nodes)
        if multiply is None or multiply.op_type != "Mul":
            return None
        inverse = [v for v in multiply.inputs if _strip_casts(v) is _strip_casts(step.outputs[0])
                   or v is step.outputs[0]]
        others = [v for v in multiply.inputs if v not in inverse]
        if len(others) != 1:
            return None
        numerator, normalize_node = others[0], multiply
    if numerator is None or not _same_source(numerator, base):
        return None
    nodes.append(normalize_node)
    output = _skip_casts_forward(normalize_node.outputs[0], nodes)
    gamma = beta = None
    gamma_node = _affine_consumer(output, "Mul")
    if gamma_node is not None:
        gamma = next(v for v in gamma_node.inputs if is_constant(v))
        nodes.append(gamma_node)
        output = _skip_casts_forward(gamma_node.outputs[0], nodes)
        beta_node = _affine_consumer(output, "Add")
        if beta_node is not None:
            beta = next(v for v in beta_node.inputs if is_constant(v))
            nodes.append(beta_node)
            output = beta_node.outputs[0]
    return Norm(kind, tuple(nodes), norm_input, output, gamma, beta, axes[0])


def _same_source(a: ir.Value, b: ir.Value) -> bool:
    a, b = _strip_casts(a), _strip_casts(b)
    if a is b:
        return True
    pa, pb = a.producer(), b.producer()
    # LayerNorm spellings compute ``x - mean`` twice (once for the variance)
    return (pa is not None and pb is not None and pa.op_type == pb.op_type == "Sub"
            and list(pa.inputs) == list(pb.inputs))


def _affine_consumer(value: ir.Value, op: str) -> ir.Node | None:
    """The γ Mul / β Add right after a normalised value: one consumer, a 1-D-ish constant."""
    uses = _real_uses(value)
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.op_type != op or node.domain != "" or len(node.inputs) != 2:
        return None
    constants = [v for v in node.inputs if is_constant(v)]
    if len(constants) != 1:
        return None
    shape = _const_shape(constants[0])
    if shape is None or len(shape) == 0 or shape[-1] <= 1 or any(d != 1 for d in shape[:-1]):
        return None
    return node


def _norm_channels(norm: Norm) -> int | None:
    if norm.gamma is not None:
        shape = _const_shape(norm.gamma)
        if shape:
            return int(shape[-1])
    shape = norm.output.shape
    if shape is not None and len(shape) and _is_int(shape[norm.axis]):
        return int(shape[norm.axis])
    return None


def _cast_target(node: ir.Node):
    to = node.attributes.get_int("to", None)
    return None if to is None else ir.DataType(to)


def _axes_of(node: ir.Node) -> list[int] | None:
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_array(node.inputs[1])
        axes = None if array is None else [int(a) for a in array.reshape(-1)]
    return None if axes is None else list(axes)


# --------------------------------------------------------------------------------------
# Ranks and shape expressions
# --------------------------------------------------------------------------------------

_UNARY_RANK_OPS = {
    "Cast", "Identity", "Dropout", "Relu", "Erf", "Sqrt", "Sigmoid", "Tanh", "Neg", "Softmax", "Reciprocal",
    "LayerNormalization", "RMSNormalization", "Gelu", "LeakyRelu", "Exp", "Log", "Abs", "IsNaN", "Not",
    "Cos", "Sin", "Softplus", "HardSigmoid", "HardSwish", "Elu", "Selu", "Mish", "Clip", "Trilu",
    "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "Conv",
    "Slice", "Concat", "Tile", "Pad", "ScatterND", "ScatterElements", "Split", "CumSum", "GatherElements",
    "Floor", "Ceil", "Round", "Sign", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
}
_BROADCAST_RANK_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "Greater", "And", "Or",
                       "Max", "Min", "LessOrEqual", "GreaterOrEqual", "Mod", "Sum"}


def _propagate_ranks(graph: ir.Graph, nodes: list[ir.Node]) -> dict[ir.Value, int]:
    """Rank of every value we can tell, in one topological sweep."""
    ranks: dict[ir.Value, int] = {}

    def rank(value: ir.Value | None) -> int | None:
        if value is None:
            return None
        if value in ranks:
            return ranks[value]
        if value.shape is not None:
            return len(value.shape)
        if value.const_value is not None:
            return len(value.const_value.shape)
        array = constant_array(value)
        return None if array is None else array.ndim

    for value in list(graph.inputs) + list(graph.initializers.values()):
        r = rank(value)
        if r is not None:
            ranks[value] = r
    for node in nodes:
        op = node.op_type
        result: int | None = None
        inputs = [rank(v) for v in node.inputs]
        if op == "Constant":
            result = rank(node.outputs[0])
        elif op in _UNARY_RANK_OPS or (op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2")
                                       and node.attributes.get_int("keepdims", 1) == 1):
            result = inputs[0] if inputs else None
        elif op in _BROADCAST_RANK_OPS:
            known = [r for r, v in zip(inputs, node.inputs) if v is not None]
            result = max(known) if known and all(r is not None for r in known) else None
        elif op == "MatMul" and None not in inputs[:2]:
            result = max(inputs[0], inputs[1])
        elif op == "Gemm":
            result = 2
        elif op == "Gather" and None not in inputs[:2]:
            result = inputs[0] - 1 + inputs[1]
        elif op == "Transpose":
            result = inputs[0]
        elif op in ("Unsqueeze", "Squeeze"):
            axes = _axes_of(node)
            if inputs[0] is not None and axes is not None:
                result = inputs[0] + (len(axes) if op == "Unsqueeze" else -len(axes))
        elif op in ("Reshape", "Expand", "ConstantOfShape"):
            shape_input = node.inputs[1] if op != "ConstantOfShape" else node.inputs[0]
            length = _shape_length(shape_input, ranks)
            if length is not None:
                result = length if op != "Expand" or inputs[0] is None else max(length, inputs[0])
        elif op in ("Shape", "Range"):
            result = 1
        elif op == "Flatten":
            result = 2
        for output in node.outputs:
            r = result if output.shape is None else len(output.shape)
            if r is not None:
                ranks[output] = r
    return ranks


def _shape_length(value: ir.Value | None, ranks: dict) -> int | None:
    if value is None:
        return None
    if value.shape is not None and len(value.shape) == 1 and _is_int(value.shape[0]):
        return int(value.shape[0])
    evaluated = _evaluate_shape(value, {}, ranks)
    return None if evaluated is None else len(evaluated)


def _evaluate_shape(value: ir.Value | None, tracked: dict, ranks: dict, depth: int = 0) -> np.ndarray | None:
    """:func:`_evaluate_shape_expression`, with None for expressions numpy rejects."""
    budget = [_SHAPE_EVAL_BUDGET]
    try:
        return _evaluate_shape_expression(value, tracked, ranks, depth, budget)
    except (ValueError, TypeError, IndexError, ZeroDivisionError):
        return None


_SHAPE_EVAL_BUDGET = 256
_SHAPE_DTYPES = {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL}


def _evaluate_shape_expression(
    value: ir.Value | None, tracked: dict, ranks: dict, depth: int, budget: list[int]
) -> np.ndarray | None:
    """Partially evaluate a small int64 shape expression.

    Elements are ints or :class:`_Sym` (an unknown dim). ``Shape`` of a tracked tensor
    gives its channel axes' sizes; everything else read from a ``Shape`` is unknown.
    Returns a 1-D object array (or 0-D for scalars), or None when not evaluable.
    """
    if value is None or depth > 40 or budget[0] <= 0:
        return None
    budget[0] -= 1
    array = constant_array(value)
    if array is not None:
        return np.asarray(array).astype(object)
    if value.dtype is not None and value.dtype not in _SHAPE_DTYPES:
        return None  # a data tensor, not a shape expression
    node = value.producer()
    if node is None or node.domain != "":
        return None
    op = node.op_type

    def evaluate(item: ir.Value | None) -> np.ndarray | None:
        return _evaluate_shape_expression(item, tracked, ranks, depth + 1, budget)

    args = lambda: [evaluate(v) for v in node.inputs]  # noqa: E731
    if op == "Shape":
        source = node.inputs[0]
        if source in tracked:
            dims = np.array([_Sym() if e is None else e for e in tracked[source].entries], dtype=object)
        elif source.shape is not None:
            dims = np.array([int(d) if _is_int(d) else _Sym() for d in source.shape], dtype=object)
        elif ranks.get(source, 0) > 1:
            dims = np.array([_Sym() for _ in range(ranks[source])], dtype=object)
        else:
            inner = evaluate(source)  # the shape of a shape expression
            if inner is not None:
                dims = np.array(list(inner.shape), dtype=object)
            elif source in ranks:
                dims = np.array([_Sym() for _ in range(ranks[source])], dtype=object)
            else:
                return None
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", None)
        return dims[start:end]
    if op in ("Cast", "Identity"):
        return args()[0]
    if op == "Gather":
        data, indices = args()[:2]
        if data is None or indices is None or node.attributes.get_int("axis", 0) != 0:
            return None
        try:
            return data[np.asarray(indices, dtype=np.int64)]
        except (IndexError, TypeError, ValueError):
            return None
    if op in ("Unsqueeze", "Squeeze", "Reshape", "Flatten"):
        data = args()[0]
        if data is None:
            return None
        if op == "Unsqueeze":
            axes = _axes_of(node)
            if axes is None:
                return None
            for axis in sorted(axes):
                data = np.expand_dims(data, axis)
            return data
        if op == "Squeeze":
            axes = _axes_of(node)
            return np.squeeze(data, axis=tuple(axes)) if axes is not None else np.squeeze(data)
        if op == "Reshape":
            target = evaluate(node.inputs[1])
            if target is None or not all(_is_int(t) for t in target):
                return None
            return data.reshape([int(t) for t in target])
        return data.reshape(-1)
    if op == "Concat":
        parts = args()
        if any(p is None for p in parts):
            return None
        return np.concatenate([np.atleast_1d(p) for p in parts], axis=node.attributes.get_int("axis", 0))
    if op == "ConstantOfShape":
        shape = args()[0]
        if shape is None or not all(_is_int(s) for s in shape):
            return None
        fill = node.attributes.get("value")
        fill_value = fill.as_tensor().numpy().reshape(-1)[0].item() if fill is not None else 0
        return np.full([int(s) for s in shape], fill_value, dtype=object)
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = args()[:2]
        if a is None or b is None:
            return None
        function = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y,
                    "Div": lambda x, y: x // y if y else _Sym()}[op]
        combine = np.frompyfunc(lambda x, y: function(x, y) if _is_int(x) and _is_int(y) else _Sym(), 2, 1)
        return np.asarray(combine(a, b), dtype=object)
    if op == "Equal":
        a, b = args()[:2]
        if a is None or b is None:
            return None
        outcome = np.asarray(np.frompyfunc(_symbolic_equal, 2, 1)(a, b), dtype=object)
        if any(o is None for o in np.atleast_1d(outcome)):
            return None
        return outcome
    if op == "Where":
        condition, a, b = args()[:3]
        if condition is None or a is None or b is None:
            return None
        return np.where(condition.astype(bool), a, b).astype(object)
    if op == "Slice":
        data, starts, ends = args()[:3]
        axes = args()[3] if len(node.inputs) > 3 and node.inputs[3] is not None else None
        steps = args()[4] if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if data is None or starts is None or ends is None or data.ndim != 1:
            return None
        if axes is not None and [int(a) for a in axes] not in ([0], [-1]):
            return None
        step = int(steps[0]) if steps is not None else 1
        return data[int(starts[0]):int(ends[0]):step]
    return None


def _symbolic_equal(x, y):
    if _is_int(x) and _is_int(y):
        return bool(x == y)
    if x is y:
        return True
    # an unknown dim is a size, never negative
    if (_is_int(y) and y < 0 and isinstance(x, _Sym)) or (_is_int(x) and x < 0 and isinstance(y, _Sym)):
        return False
    return None
