"""Fake quantization: quantize-dequantize written with float ops (Round, Clip, Mul), for
formats onnxruntime has no kernel for (int4 activations, say). The result is simulated:
the accuracy is that of the format, the speed is that of float."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from outlierquant.graph.values import NodeWriter, add_initializer, opset_version


def fake_quantize_activation(model: ir.Model, x: ir.Value, anchor: ir.Node, bits: int, mode: str, *,
                             clip: float = 1.0, tensor_range: tuple[float, float] | None = None) -> ir.Value:
    """``x`` rounded to ``bits`` in float, inserted before ``anchor``.

    ``mode="per_token"``: symmetric, one scale per row ``max|x_t| / (qmax / clip)`` computed at
    run time; otherwise static asymmetric over ``tensor_range`` (the calibrated min and max).
    """
    graph = model.graph
    base = f"{x.name}_a{bits}"

    def const(tag, array):
        return add_initializer(graph, f"{base}_{tag}", np.asarray(array, dtype=np.float32))

    writer = NodeWriter(base)
    nodes, op = writer.nodes, writer.op

    if mode == "per_token":
        qmax = 2 ** (bits - 1) - 1
        if opset_version(model) >= 18:
            absmax = op("ReduceMax", op("Abs", x), add_initializer(graph, f"{base}_axes", np.array([-1], np.int64)),
                         keepdims=1)
        else:
            absmax = op("ReduceMax", op("Abs", x), axes=[-1], keepdims=1)
        scale = op("Div", op("Max", absmax, const("eps", 1e-8)), const("qmax_over_clip", qmax / clip))
        levels = op("Clip", op("Round", op("Div", x, scale)), const("qmin", -qmax - 1), const("qmax", qmax))
        out = op("Mul", levels, scale)
    else:
        if tensor_range is None:
            raise ValueError(f"{x.name}: static fake quantization needs the calibrated range")
        low, high = min(tensor_range[0], 0.0), max(tensor_range[1], 0.0)
        levels_max = 2 ** bits - 1
        scale = (high - low) / levels_max or 1.0
        zero = float(np.clip(np.rint(-low / scale), 0, levels_max))
        q = op("Clip", op("Add", op("Round", op("Div", x, const("scale", scale))), const("zero", zero)),
               const("low", 0.0), const("high", levels_max))
        out = op("Mul", op("Sub", q, const("zero2", zero)), const("scale2", scale))
    out.type = x.type
    out.shape = x.shape
    graph.insert_before(anchor, nodes)
    return out
