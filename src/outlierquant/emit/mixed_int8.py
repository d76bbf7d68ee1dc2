"""Mixed-precision forms of a linear: LLM.int8()'s decomposition (the inlier channels int8,
the outlier channels through a thin float MatMul) as our ``MixedInt8MatMul`` kernel, its
standard-op form (``MatMulInteger``) or a float split with per-token Q/DQ declarations, and
the float side path of a split rotation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np
import onnx_ir as ir

from outlierquant.emit.qdq import TensorQuant
from outlierquant.graph.edit import replace_value
from outlierquant.graph.records import Linear
from outlierquant.graph.tags import KEEP_FLOAT_KEY
from outlierquant.graph.values import add_initializer


def without_channels(stats, channels: np.ndarray):
    """The statistics of ``x ⊙ m``: the outlier channels read as constant zero."""
    zeroed = {}
    for field in ("absmax", "minimum", "maximum", "mean", "mean_sq"):
        array = np.array(getattr(stats, field), dtype=np.float64, copy=True)
        array[channels] = 0.0
        zeroed[field] = array
    return dataclasses.replace(stats, covariance=None, **zeroed)


def _without_rows(read: Callable[[], np.ndarray], rows: np.ndarray) -> ir.Tensor:
    weight = np.array(read(), dtype=np.float32, order="C")  # a copy of its own
    weight[rows] = 0.0
    return ir.tensor(weight)


def float_split_builder(weight: np.ndarray, channels: np.ndarray, label: str,
                         shared: dict | None = None, *, mask: bool = True,
                         source: Callable[[], np.ndarray] | None = None):
    """``Mul(x, m) @ W_I (+ Gather(x, O) @ W_O)`` and the per-token declarations for it.

    ``mask=False`` (static activations) drops the ``Mul``: ``W_I``'s outlier rows are
    zero, so ``x @ W_I`` is the same product, and a per-tensor QuantizeLinear calibrated on
    the inlier range clips the outlier channels to values those zero rows ignore.

    ``shared`` (keyed by input name and channel set) reuses the masked input and the
    gathered columns an earlier linear on the same input wrote; callers rewrite linears
    in graph order, so the shared values are defined before every later reader.

    ``source`` (a function returning ``weight`` again, e.g. ``Linear.weight_array``):
    ``W_I`` is then a lazy tensor made from it when read. Why: callers split every linear
    before quantizing any, so each ``W_I`` copy lived until then; a tied LM head (itself a
    lazy transpose of the embedding) became a second float table that way (128 MiB of
    ``default``'s peak on the 65k-vocabulary bench model).
    """
    if source is None:
        inlier_weight = weight.copy()
        inlier_weight[channels] = 0.0
        inlier_tensor = ir.tensor(inlier_weight)
    else:
        inlier_tensor = ir.LazyTensor(functools.partial(_without_rows, source, channels),
                                      dtype=ir.DataType.FLOAT, shape=ir.Shape(weight.shape))
    holder: dict[str, ir.Value] = {}

    def build(tape: ir.tape.Tape, x: ir.Value) -> ir.Value:
        key = (x.name, channels.tobytes())
        if shared is not None and key in shared:
            inliers, gathered = shared[key]
        else:
            inliers, gathered = x, None
            if channels.size:
                if mask:
                    keep = np.ones(weight.shape[0], np.float32)
                    keep[channels] = 0.0
                    inliers = tape.op("Mul", [x, tape.initializer(ir.tensor(keep), name=f"{label}_keep")])
                gathered = tape.op("Gather", [x, tape.initializer(ir.tensor(channels), name=f"{label}_outlier_channels")],
                                   {"axis": -1})
            if shared is not None:
                shared[key] = (inliers, gathered)
        holder["activation"] = inliers
        holder["weight"] = tape.initializer(inlier_tensor, name=f"{label}_inlier_weight")
        y = tape.op("MatMul", [inliers, holder["weight"]])
        holder["matmul_out"] = y
        if channels.size:
            outlier = tape.op("MatMul", [gathered, tape.initializer(ir.tensor(np.ascontiguousarray(weight[channels])),
                                                                        name=f"{label}_outlier_weight")])
            y = tape.op("Add", [y, outlier])
        return y

    def declarations(nodes: list[ir.Node], mode: str = "per_token"):

        matmul = holder["matmul_out"].producer()
        return [
            TensorQuant(holder["activation"].name, "activation", mode, matmul.name, 0),
            TensorQuant(holder["weight"].name, "weight", "per_channel", matmul.name, 1, 1),
        ]

    return build, declarations


def mixed_int8_builder(weight: np.ndarray, channels: np.ndarray, label: str, form: str, opset: int, *,
                       reduce_range: bool = False, runtime_threshold: float = 0.0,
                       prepared: tuple[np.ndarray, np.ndarray] | None = None, shared: dict | None = None):
    """A ``replace_linear`` builder of ``x @ W`` with the input ``channels`` in float and the
    rest int8, as our kernel node (``form="kernel"``), our per-token quantizer feeding
    onnxruntime's integer GEMM (``"gemm"``) or standard ops. ``prepared``: int8 ``[K, N]``
    weights (float-channel rows zero) and scales chosen elsewhere. ``shared``: the gemm
    form's quantized inputs by tensor (siblings quantize their input once)."""
    from outlierquant.custom_ops.reference import prepare_mixed_int8_weights
    from outlierquant.custom_ops.standard_forms import (
        mixed_int8_matmul_gemm_form,
        mixed_int8_matmul_kernel_form,
        mixed_int8_matmul_standard_form,
    )

    weight_q, weight_scale, channels, outlier_weight = prepare_mixed_int8_weights(
        weight, channels, reduce_range=reduce_range
    )
    if prepared is not None:  # the float channels' rows are zero in it too
        weight_q, weight_scale = prepared

    def build(tape: ir.tape.Tape, x: ir.Value) -> ir.Value:
        if form == "gemm":
            return mixed_int8_matmul_gemm_form(tape, x, weight_q, weight_scale, channels, outlier_weight, name=label,
                                               shared=shared)
        if form == "kernel":
            return mixed_int8_matmul_kernel_form(tape, x, weight_q, weight_scale, channels, outlier_weight,
                                                 threshold=runtime_threshold, name=label)
        return mixed_int8_matmul_standard_form(tape, x, weight_q, weight_scale, channels, outlier_weight,
                                               threshold=runtime_threshold, opset=max(opset, 13),
                                               name=label)

    return build


def add_float_side_path(model: ir.Model, gathered: ir.Value, linear: Linear, weight: np.ndarray, name: str) -> None:
    """``linear.output += gathered @ weight``, its nodes tagged to stay in float."""

    graph = model.graph
    tag = {KEEP_FLOAT_KEY: "outlier side path"}
    label = f"{name}/{linear.name.strip('/').replace('/', '_')}"
    side_weight = add_initializer(graph, f"{label}_outlier_weight", weight.astype(np.float32))
    matmul = ir.node("MatMul", inputs=[gathered, side_weight], name=f"{label}/MatMul", metadata_props=dict(tag))
    matmul.outputs[0].name = f"{label}/MatMul_output"
    out = linear.output
    add = ir.node("Add", inputs=[out, matmul.outputs[0]], name=f"{label}/Add", metadata_props=dict(tag))
    add.outputs[0].name = f"{label}/Add_output"
    add.outputs[0].type = out.type
    add.outputs[0].shape = out.shape
    graph.insert_after(out.producer(), [matmul, add])
    replace_value(graph, out, add.outputs[0])
    add.replace_input_with(0, out)  # replace_value rewired the Add's own input too
