"""Quantize embedding tables to int8 with one scale per row.

A transformer's token embedding is often the largest tensor it has (all-MiniLM-L6-v2:
30522 x 384, half of its parameters), and a linear-only quantizer leaves it in float.
Each table read by a ``Gather`` on token ids becomes int8 levels and per-row scales
(:mod:`outlierquant.emit.embeddings`): a row's scale follows that token's own range, so
one token with large values does not coarsen the others. The table's other readers (a
tied lm_head) keep the float table; the record says so, since the file then holds both.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from outlierquant.emit.embeddings import int8_gather_nodes, quantize_rows, row_quantization_sqnr_db
from outlierquant.graph.edit import name_excluded
from outlierquant.graph.values import constant_array, remove_if_unused
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QuantizeEmbeddingsOptions:
    """``min_rows``: smaller tables (position, token-type) stay float. ``exclude``: node-name
    substrings or fnmatch patterns left in float."""

    min_rows: int = 1024
    exclude: tuple[str, ...] = ()
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        if self.min_rows < 1:
            raise ValueError(f"min_rows={self.min_rows}: must be >= 1")


class QuantizeEmbeddingsPass(OutlierPass):
    """int8 embedding tables with per-row scales, dequantized after the row lookup."""

    name = "quantize-embeddings"
    options_type = QuantizeEmbeddingsOptions

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        graph = model.graph
        tables: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        for node in list(graph):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            table_value = node.inputs[0]
            table = constant_array(table_value)
            if table is None or node.inputs[1] is None or constant_array(node.inputs[1]) is not None:
                continue  # not a lookup of a constant table by run-time ids
            reason = None
            if table.dtype != np.float32 or table.ndim != 2:
                reason = f"table is {table.dtype} with rank {table.ndim} (a float32 matrix expected)"
            elif node.attributes.get_int("axis", 0) != 0:
                reason = "gathers along axis 1"
            elif table.shape[0] < self.options.min_rows:
                reason = f"{table.shape[0]} rows < min_rows {self.options.min_rows}"
            elif name_excluded(node.name or "", self.options.exclude):
                reason = "excluded by option"
            if reason:
                skipped.append({"node": node.name, "skipped": reason})
                continue
            levels, scale = quantize_rows(table)
            name = (table_value.name or node.name or "embedding").strip("/").replace("/", "_")
            nodes = int8_gather_nodes(graph, node, levels, scale, name)
            out = node.outputs[0]
            graph.insert_before(node, nodes)
            out.replace_all_uses_with(nodes[-1].outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            other_readers = len(list(table_value.uses()))
            remove_if_unused(graph, table_value)
            tables.append({"node": node.name, "rows": int(table.shape[0]), "width": int(table.shape[1]),
                           "float_bytes": int(table.nbytes), "int8_bytes": int(levels.nbytes + scale.nbytes),
                           "sqnr_db": row_quantization_sqnr_db(table, levels, scale),
                           "float_table_kept_for": other_readers})
        logger.info("quantize-embeddings: %d tables int8, %d left in float", len(tables), len(skipped))
        return bool(tables), {"options": dataclasses.asdict(self.options), "tables": tables, "skipped": skipped,
                              "summary": [f"int8 embedding tables: {len(tables)}"] if tables else []}
