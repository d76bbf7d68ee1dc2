"""Calibration targets: which tensors a quantizer needs statistics of, and on which axis.

The activation input (and output) of each MatMul / Gemm / Conv with a constant weight, and
both inputs of activation x activation MatMuls (attention ``Q @ K^T`` and ``P @ V``). The
channel axis is the reduction axis of the consumer: the last axis of a MatMul input, axis
1 of a Gemm input (0 with ``transA``) and of a Conv input; outputs use the output-feature
axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import onnx_ir as ir

from outlierquant.errors import CalibrationError
from outlierquant.graph.values import is_constant

_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class CalibrationTarget:
    """A tensor to calibrate and the axis its channels lie on.

    ``role`` is ``"input"`` (activation input of a layer with a constant weight),
    ``"output"`` (that layer's output) or ``"dynamic_input"`` (an input of an
    activation x activation MatMul). ``node`` names the consuming (or producing) node.
    """

    tensor: str
    channel_axis: int
    node: str
    role: str


def quantizable_targets(model: ir.Model, *, outputs: bool = True) -> list[CalibrationTarget]:
    """The tensors whose statistics quantization needs, in graph order, one per tensor name.

    MatMul/Gemm/Conv nodes of the main graph with a constant weight (an initializer or a
    ``Constant`` node's value) contribute their activation input and, if ``outputs``, their
    output; activation x activation MatMuls contribute both inputs (``"dynamic_input"``,
    channel axis last). A tensor feeding several layers appears once; when a tensor is both
    a layer's output and another layer's input, the input role wins.
    """
    found: dict[str, CalibrationTarget] = {}

    def add(value: ir.Value | None, axis: int, node: ir.Node, role: str) -> None:
        if value is None or not value.name or is_constant(value):
            return
        existing = found.get(value.name)
        if existing is None or (existing.role == "output" and role != "output"):
            found[value.name] = CalibrationTarget(value.name, axis, node.name or "", role)

    for node in model.graph:
        if node.domain not in _ONNX_DOMAINS or node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        inputs = list(node.inputs) + [None, None]
        first, second = inputs[0], inputs[1]
        output = node.outputs[0] if node.outputs else None
        if node.op_type == "MatMul":
            if is_constant(second) and not is_constant(first):
                add(first, -1, node, "input")
                if outputs:
                    add(output, -1, node, "output")
            elif is_constant(first) and not is_constant(second):
                # W @ X: X's channels are the reduction axis, the second-to-last one.
                add(second, -2, node, "input")
                if outputs:
                    add(output, -2, node, "output")
            elif first is not None and second is not None and not is_constant(first):
                add(first, -1, node, "dynamic_input")
                add(second, -1, node, "dynamic_input")
        elif node.op_type == "Gemm":
            trans_a = _int_attr(node, "transA")
            trans_b = _int_attr(node, "transB")
            if is_constant(second) and not is_constant(first):
                add(first, 0 if trans_a else 1, node, "input")
                if outputs:
                    add(output, 1, node, "output")
            elif is_constant(first) and not is_constant(second):
                add(second, 1 if trans_b else 0, node, "input")
                if outputs:
                    add(output, 0, node, "output")
        else:  # Conv
            if is_constant(second) and not is_constant(first):
                add(first, 1, node, "input")
                if outputs:
                    add(output, 1, node, "output")
    return list(found.values())


def _int_attr(node: ir.Node, name: str) -> int:
    attr = node.attributes.get(name)
    return int(attr.as_int()) if attr is not None else 0


def resolve_targets(
    model: ir.Model, tensors: Iterable[str | CalibrationTarget] | None
) -> list[CalibrationTarget]:
    if tensors is None:
        targets = quantizable_targets(model)
    else:
        known = {t.tensor: t for t in quantizable_targets(model)}
        targets = []
        for item in tensors:
            if isinstance(item, CalibrationTarget):
                targets.append(item)
            elif isinstance(item, str):
                # A bare name gets the axis its consumer implies, else the last axis.
                targets.append(known.get(item, CalibrationTarget(item, -1, "", "input")))
            else:
                raise TypeError(f"tensors: expected names or CalibrationTarget, got {type(item).__name__}")
    graph_inputs = {v.name for v in model.graph.inputs}
    produced = set(graph_inputs)
    for node in model.graph:
        produced.update(out.name for out in node.outputs)
    unique: dict[str, CalibrationTarget] = {}
    for target in targets:
        if target.tensor in model.graph.initializers and target.tensor not in graph_inputs:
            raise CalibrationError(f"tensor {target.tensor!r} is a constant (initializer), not an activation")
        if target.tensor not in produced:
            raise CalibrationError(f"tensor {target.tensor!r} is not a value of the model's main graph")
        unique.setdefault(target.tensor, target)
    return list(unique.values())
