"""The records graph analysis hands to the passes: a linear (MatMul / Gemm / Conv with a
constant weight, its bias and weight layout), a norm (fused or decomposed), the producer of
a group's input channels, a norm→linear group, and the whole analysis of a graph.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np
import onnx_ir as ir

from outlierquant.graph.values import constant_array


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
