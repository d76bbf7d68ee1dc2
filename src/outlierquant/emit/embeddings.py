"""Int8 embedding tables: a row lookup on int8 levels, dequantized after the lookup.

``E[ids]`` with ``E ≈ diag(s) · Q`` (``Q`` int8, one symmetric scale per row ``s_r =
max_j |E_rj| / 127``) is written ``Cast(Gather(Q, ids)) · Gather(s, ids)``: only the rows a
batch reads are dequantized, so the table stays int8 in memory and on disk (a
``DequantizeLinear`` of the whole table before the ``Gather`` would rebuild the float table
on every run). Standard ops only, so any runtime runs it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from outlierquant.graph.values import add_initializer
from outlierquant.numerics.slabs import slabs


def quantize_rows(table: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row levels and scales of a ``[rows, width]`` table (round half to even)."""
    qmax = 2 ** (bits - 1) - 1
    # max(max, −min) = max |x| with no table-sized temporary (a 65k vocabulary's is 128+ MiB)
    absmax = np.maximum(table.max(axis=1), -table.min(axis=1)).astype(np.float32)
    scale = np.where(absmax > 0, absmax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    levels = np.empty(table.shape, np.int8)
    for part in slabs(*table.shape):  # elementwise: slabs give the one-pass values
        levels[part] = np.clip(np.rint(table[part] / scale[part, None]), -qmax, qmax)
    return levels, scale


def row_quantization_sqnr_db(table: np.ndarray, levels: np.ndarray, scale: np.ndarray) -> float:
    """SQNR of the dequantized rows against ``table``, in dB, a slab of rows at a time."""
    signal = noise = 0.0
    for part in slabs(*table.shape):
        rows = table[part]
        error = (levels[part].astype(np.float32) * scale[part, None] - rows).astype(np.float64)
        signal += float(np.sum(rows.astype(np.float64) ** 2))
        noise += float(np.sum(error**2))
    return float(10 * np.log10(signal / max(noise, 1e-30)))


def int8_gather_nodes(graph: ir.Graph, node: ir.Node, levels: np.ndarray, scale: np.ndarray,
                      name: str) -> list[ir.Node]:
    """The nodes that replace ``node`` (``Gather(table, ids)``, axis 0); its output keeps its name."""
    ids = node.inputs[1]
    out = node.outputs[0]
    q = add_initializer(graph, f"{name}_int8", levels)
    s = add_initializer(graph, f"{name}_row_scale", scale.reshape(-1, 1))

    def make(op_type: str, inputs: list, suffix: str, **attributes) -> ir.Node:
        made = ir.node(op_type, inputs=inputs, attributes=attributes or None, name=f"{name}/{suffix}")
        made.outputs[0].name = f"{name}/{suffix}_output"
        return made

    rows = make("Gather", [q, ids], "GatherInt8", axis=0)
    as_float = make("Cast", [rows.outputs[0]], "Cast", to=ir.DataType.FLOAT)
    scales = make("Gather", [s, ids], "GatherScale", axis=0)
    product = make("Mul", [as_float.outputs[0], scales.outputs[0]], "Dequantize")
    product.outputs[0].type, product.outputs[0].shape = out.type, out.shape
    return [rows, as_float, scales, product]
