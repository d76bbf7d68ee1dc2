"""Rotation forms: ``x ← x Q`` written as our ``HadamardTransform`` kernel or with standard ops
(the Kronecker form, two small constant MatMuls with the constant on the *left*, so no
quantizer mistakes them for a linear; or one dense MatMul), and the RMSNorm written with
standard ops that replaces a LayerNorm on a centred, rotated stream.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from outlierquant.graph.tags import ONLINE_ROTATION_KEY
from outlierquant.graph.values import NodeWriter, add_initializer, opset_version
from outlierquant.numerics.hadamard import kronecker_split, sylvester_hadamard


def rms_norm_nodes(model: ir.Model, x: ir.Value, epsilon: float, name: str) -> tuple[list[ir.Node], ir.Value]:
    """``x / sqrt(mean(x², last axis) + ε)`` with standard ops."""
    graph = model.graph
    eps = add_initializer(graph, f"{name}_epsilon", np.array(epsilon, dtype=np.float32))
    writer = NodeWriter(name)
    nodes, op = writer.nodes, writer.op

    square = op("Mul", x, x)
    if opset_version(model) >= 18:
        axes = add_initializer(graph, f"{name}_axes", np.array([-1], dtype=np.int64))
        mean = op("ReduceMean", square, axes, keepdims=1)
    else:
        mean = op("ReduceMean", square, axes=[-1], keepdims=1)
    out = op("Div", x, op("Sqrt", op("Add", mean, eps)))
    out.type = x.type
    return nodes, out


def kronecker_left_form(model: ir.Model, x: ir.Value, p1: np.ndarray, p2: np.ndarray, name: str,
                        prescale: np.ndarray | None = None, *,
                        metadata_key: str = ONLINE_ROTATION_KEY) -> tuple[list[ir.Node], ir.Value]:
    """``x (P₁ ⊗ P₂)`` (after ``x · prescale``) as Reshape / two MatMuls / Transposes.

    A row reshaped to ``Z [k₁, k₂]`` maps to ``P₁ᵀ Z P₂``, computed as
    ``(P₂ᵀ (P₁ᵀ Z)ᵀ)ᵀ`` so that both constants are the *left* operand of their MatMul and
    no pass or quantizer reads them as a linear layer's weight. Every inserted node carries
    ``metadata_key`` (naming ``x``) so passes can find the online transforms.
    """
    graph = model.graph
    k1, k2 = p1.shape[0], p2.shape[0]
    if k1 == 1:  # a 1 × 1 factor is a scalar: carried by the other one
        p1, p2 = np.eye(1), p2 * float(p1[0, 0])
    elif k2 == 1:
        p1, p2 = p1 * float(p2[0, 0]), np.eye(1)
    writer = NodeWriter(name, {metadata_key: x.name or ""})
    nodes, op = writer.nodes, writer.op

    current = x
    if prescale is not None:
        current = op("Mul", current, add_initializer(graph, f"{name}_prescale", prescale.astype(np.float32)))
    shape = op("Shape", x)
    grid = add_initializer(graph, f"{name}_grid", np.array([-1, k1, k2], dtype=np.int64))
    z = op("Reshape", current, grid)
    if k1 > 1:
        z = op("MatMul", add_initializer(graph, f"{name}_left", np.ascontiguousarray(p1.T, dtype=np.float32)), z)
    if k2 > 1:
        z = op("Transpose", z, perm=[0, 2, 1])
        z = op("MatMul", add_initializer(graph, f"{name}_right", np.ascontiguousarray(p2.T, dtype=np.float32)), z)
        z = op("Transpose", z, perm=[0, 2, 1])
    out = op("Reshape", z, shape)
    out.type = x.type
    out.shape = x.shape
    return nodes, out


def hadamard_left_form(model: ir.Model, x: ir.Value, dim: int, block: np.ndarray | None, name: str,
                       prescale: np.ndarray | None = None) -> tuple[list[ir.Node], ir.Value]:
    """``x @ R`` (``R = M ⊗ H_n/√n``) with Reshape/MatMul/Transpose, constants on the left.

    With ``d = p·q`` (the split of :func:`~outlierquant.custom_ops.standard_forms.kronecker_split`)
    and ``R = L ⊗ H_q``, a row reshaped to ``Z [p, q]`` maps to ``Lᵀ Z H_q``; computed as
    ``(H_q (Lᵀ Z)ᵀ)ᵀ`` (``H_q`` is symmetric) so that both constant matrices are the
    *left* operand and no quantizer reads them as a linear layer's weight. ``prescale``
    (length ``d``) multiplies ``x`` first.
    """

    m = 1 if block is None else block.shape[0]
    n = dim // m
    p, q = kronecker_split(dim, block)
    mix = np.eye(1) if block is None else np.asarray(block, dtype=np.float64)
    left = np.kron(mix, sylvester_hadamard(n // q) / np.sqrt(n // q))
    right = sylvester_hadamard(q) / np.sqrt(q)
    return kronecker_left_form(model, x, left, right, name, prescale)


def hadamard_kernel_node(model: ir.Model, x: ir.Value, block: np.ndarray | None, name: str,
                         prescale: np.ndarray | None = None) -> tuple[list[ir.Node], ir.Value]:
    """One ``ai.outlierquant::HadamardTransform`` (after a ``Mul`` when ``prescale``)."""
    from outlierquant.custom_ops import DOMAIN

    graph = model.graph
    nodes = []
    current = x
    tag = {ONLINE_ROTATION_KEY: x.name or ""}
    if prescale is not None:
        mul = ir.node("Mul", inputs=[x, add_initializer(graph, f"{name}_prescale", prescale.astype(np.float32))],
                      name=f"{name}/Mul", metadata_props=dict(tag))
        mul.outputs[0].name = f"{name}/Mul_output"
        nodes.append(mul)
        current = mul.outputs[0]
    inputs = [current]
    if block is not None:
        inputs.append(add_initializer(graph, f"{name}_block", np.asarray(block, dtype=np.float32)))
    node = ir.node("HadamardTransform", inputs=inputs, domain=DOMAIN, version=1, name=f"{name}/HadamardTransform",
                   metadata_props=dict(tag))
    node.outputs[0].name = f"{name}/HadamardTransform_output"
    node.outputs[0].type = x.type
    node.outputs[0].shape = x.shape
    nodes.append(node)
    if DOMAIN not in model.opset_imports:
        model.opset_imports[DOMAIN] = 1
    return nodes, node.outputs[0]


def dense_left_form(model: ir.Model, x: ir.Value, rotation: np.ndarray, name: str) -> tuple[list[ir.Node], ir.Value]:
    """``x @ R`` on the last axis of a tensor of any rank as ``(Rᵀ (x_2d)ᵀ)ᵀ``: the constant
    is the left operand, so no quantizer reads it as a linear layer's weight."""
    graph = model.graph
    dim = rotation.shape[0]
    writer = NodeWriter(name, {ONLINE_ROTATION_KEY: x.name or ""})
    nodes, op = writer.nodes, writer.op

    shape = op("Shape", x)
    rows = op("Reshape", x, add_initializer(graph, f"{name}_rows", np.array([-1, dim], dtype=np.int64)))
    columns = op("Transpose", rows, perm=[1, 0])
    rotated = op("MatMul", add_initializer(graph, f"{name}_matrix", rotation.T.astype(np.float32)), columns)
    out = op("Reshape", op("Transpose", rotated, perm=[1, 0]), shape)
    out.type = x.type
    out.shape = x.shape
    return nodes, out
