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

import logging
from collections import deque
from collections.abc import Mapping
from typing import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from outlierquant.graph.channels import ChannelState, Trace
from outlierquant.graph.matchers import _is_constant_derived, match_linear, match_norm, norm_channels
from outlierquant.graph.records import GraphAnalysis, Linear, LinearGroup, Norm, Producer
from outlierquant.graph.shapes import axes_of, cast_target, evaluate_shape, is_int, propagate_ranks
from outlierquant.graph.values import FLOAT_TYPES, MS_DOMAIN, SHAPE_ONLY_OPS, constant_array, is_constant

logger = logging.getLogger(__name__)

__all__ = [
    "analyze_graph",
]

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
#: named in the reason when a linear's input is a block cut from one fused projection
_FUSED_NOTE = "a fused projection such as q/k/v or gate/up"


# --------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------


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
        self.ranks = propagate_ranks(graph, self.nodes)
        self.linears: list[Linear] = []
        self.linear_by_node: dict[ir.Node, Linear] = {}
        self.linear_by_output: dict[ir.Value, Linear] = {}
        self.norms: list[Norm] = []
        self.norm_by_output: dict[ir.Value, Norm] = {}
        self._last_sizes: dict[ir.Value, int] | None = None

    def run(self) -> GraphAnalysis:
        for node in self.nodes:
            linear = match_linear(node)
            if linear is not None:
                self.linears.append(linear)
                self.linear_by_node[node] = linear
                self.linear_by_output[linear.output] = linear
        for node in self.nodes:
            norm = match_norm(node)
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
        traces: dict[ir.Value, Trace] = {}
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
        fused = []
        for operand in operands:
            root = self._find_root(operand, depth + 1)
            if isinstance(root, str):
                if _FUSED_NOTE in root:
                    fused.append(root)
                continue
            produced = root[1].output
            others = [v for v in node.inputs[:2] if v is not operand]
            if not any(self._depends_on(other, produced) for other in others):
                return root
        if fused:  # act(gate) ⊙ up with gate and up cut from one gate_up projection
            return f"input comes from {node.op_type} {node.name}: {fused[0]}"
        activations = self._activations_above(node)
        if activations:
            return (f"input comes through a nonlinear activation ({', '.join(activations)}) at "
                    f"{node.op_type} {node.name}: no per-channel linear producer")
        return (f"input comes from {node.op_type} {node.name} whose operands share a producer: "
                "not linear in either")

    def _no_producer_reason(self, node: ir.Node) -> str:
        op = node.op_type
        if node.domain == "" and op in ("Split", "Slice"):
            fused = self._sliced_linear(node.inputs[0])
            if fused is not None:
                return (f"input is one block of the output of the fused linear {fused.name} ({op} {node.name}: "
                        f"{_FUSED_NOTE}): a scale or rotation would have to fold into that block of its "
                        "columns, which the folding edits do not do")
        if node.domain == "" and op == "Concat":
            cache = next((v for v in node.inputs if v is not None and v.is_graph_input()), None)
            if cache is not None:
                return (f"input comes from Concat {node.name} of the KV cache (graph input {cache.name!r}) with "
                        "the new values: folding into V would change the cache the model reads and returns "
                        "(its present outputs)")
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

    def _last_axis_sizes(self) -> dict[ir.Value, int]:
        """Static last-axis sizes of tensors whose shape the model does not record, in one
        sweep: embedding Gathers, linears, norms, casts and broadcasts of known sizes."""
        if self._last_sizes is not None:
            return self._last_sizes
        sizes: dict[ir.Value, int] = {}

        def size(value: ir.Value | None) -> int | None:
            if value is None:
                return None
            if value in sizes:
                return sizes[value]
            if value.shape is not None and len(value.shape) and is_int(value.shape[-1]):
                return int(value.shape[-1])
            array = constant_array(value) if is_constant(value) else None
            return int(array.shape[-1]) if array is not None and array.ndim else None

        for node in self.nodes:
            if node.domain not in ("", MS_DOMAIN) or not node.outputs:
                continue
            op, result = node.op_type, None
            linear = self.linear_by_node.get(node)
            if linear is not None and node.op_type in ("MatMul", "Gemm"):
                result = linear.out_features
            elif op == "Gather" and node.attributes.get_int("axis", 0) == 0 and is_constant(node.inputs[0]):
                table = constant_array(node.inputs[0])
                result = int(table.shape[-1]) if table is not None and table.ndim >= 2 else None
            elif op in _LAST_AXIS_UNARY_OPS:
                result = size(node.inputs[0])
            elif op in ("Add", "Sub", "Mul", "Div"):
                operands = [v for v in node.inputs if v is not None and self.ranks.get(v) != 0
                            and not (is_constant(v) and constant_array(v) is not None and constant_array(v).ndim == 0)]
                known = [size(v) for v in operands]
                if operands and all(k is not None for k in known) and len(set(known) - {1}) <= 1:
                    result = max(known)
            if result is not None:
                sizes[node.outputs[0]] = result
        self._last_sizes = sizes
        return sizes

    def _sliced_linear(self, value: ir.Value | None) -> Linear | None:
        """The linear whose output ``value`` is, through layout ops (the input of a Split/Slice)."""
        current = value
        for _ in range(6):
            if current is None:
                return None
            if current in self.linear_by_output:
                return self.linear_by_output[current]
            node = current.producer()
            if node is None or node.domain != "" or node.op_type not in ("Reshape", "Transpose", "Cast", "Identity",
                                                                          "Squeeze", "Unsqueeze"):
                return None
            current = node.inputs[0]
        return None

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
            if node is None or self.order.get(node, -1) < floor or node.op_type in SHAPE_ONLY_OPS:
                continue
            stack.extend(v for v in node.inputs if v is not None)
        return False

    # -- forward channel tracking ------------------------------------------------------

    def _trace_forward(self, kind: str, record) -> "Trace":
        root = record.output
        trace = Trace(root)
        rank = self.ranks.get(root)
        if kind == "linear":
            channels = record.out_features
            channel_axis = 1 if record.op_type == "Conv" else -1
        else:
            channels = norm_channels(record)
            channel_axis = record.axis
        if rank is None or channels is None:
            trace.blockers.append(f"rank or channel count of {root.name!r} unknown")
            return trace
        axis = channel_axis % rank
        entries: list[int | None] = [None] * rank
        entries[axis] = channels
        trace.states[root] = ChannelState(entries, np.arange(channels))
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
                if node.op_type in SHAPE_ONLY_OPS:
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

    def _step(self, node: ir.Node, index: int, value: ir.Value, state: "ChannelState", trace: "Trace"):
        """Push the channel state through ``node``; returns (output, state, tag) or a reason."""
        op = node.op_type
        blocked = f"{value.name} also feeds {op} {node.name}, which cannot absorb a per-channel scale: {{owner}} would change its result"
        if op in ("Add", "Sum", "Sub"):
            blocked = (f"{value.name} also feeds {op} {node.name} (residual or sum): "
                       "{owner} would change the residual stream")
        if node.domain != "":
            return blocked
        if op in ("Identity", "Dropout") or (op == "Cast" and cast_target(node) in FLOAT_TYPES):
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
            axes = axes_of(node)
            new = state.unsqueeze(axes) if op == "Unsqueeze" else state.squeeze(axes)
            return (node.outputs[0], new, "layout") if new is not None else blocked
        if op in ("Reshape", "Expand") and index == 0:
            new = target = None
            # second try: also read static last-axis sizes of untracked tensors (GPT-2 reshapes its final
            # norm's output to ``(-1, S) + (embeddings.size(-1),)``, a Shape of the embedding sum)
            for tracked in (trace.states, _ShapeHints(trace.states, self._last_axis_sizes(), self.ranks)):
                target = evaluate_shape(node.inputs[1], tracked, self.ranks)
                if target is None:
                    continue
                if op == "Reshape":
                    new = state.reshape(list(target), allow_zero=bool(node.attributes.get_int("allowzero", 0)))
                else:
                    new = state.expand(list(target))
                if new is not None:
                    break
            if target is None:
                return f"cannot evaluate the target shape of {op} {node.name}: channel mapping unknown"
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


#: ops whose output has their first input's last axis
_LAST_AXIS_UNARY_OPS = {"Cast", "Identity", "Dropout", "Neg", "Relu", "Erf", "Tanh", "Sigmoid", "Gelu",
                        "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}


class _ShapeHints(Mapping):
    """The traced channel states, and for any other tensor of known rank whose last-axis
    size is known statically, a state with just that size (what ``Shape`` reads)."""

    def __init__(self, states: dict, sizes: dict, ranks: dict) -> None:
        self.states, self.sizes, self.ranks = states, sizes, ranks

    def __getitem__(self, value):
        if value in self.states:
            return self.states[value]
        rank, size = self.ranks.get(value), self.sizes.get(value)
        if not rank or size is None:
            raise KeyError(value)
        return ChannelState([None] * (rank - 1) + [size], np.arange(size))

    def __contains__(self, value) -> bool:
        return value in self.states or (bool(self.ranks.get(value)) and value in self.sizes)

    def __iter__(self):
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)


# --------------------------------------------------------------------------------------
# Forward trace bookkeeping
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Pattern matchers
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Ranks and shape expressions
# --------------------------------------------------------------------------------------


