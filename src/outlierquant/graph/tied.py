"""Tied weights: an lm_head that reads its embedding table through ``Transpose``.

Canonicalization unties such a weight (``MatMul(x, Transpose(W))`` becomes
``MatMul(x, Wᵀ)`` with ``Wᵀ`` an initializer of its own) so that a pass may rewrite the
lm_head without touching the embedding. The new initializer is tagged with
:data:`TIED_KEY` = the table's name. :func:`retie_transposed_weights` undoes the copy
where nothing rewrote either side: a tagged initializer still bit for bit the transpose
of its table is replaced by ``Transpose(table)`` again, so a model whose lm_head stays in
float (``default``, ``llm-int8`` keep it float) is not saved with the table twice.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from outlierquant.graph.values import unique_name

#: metadata key on an untied transposed weight: the name of the table it was read from
TIED_KEY = "outlierquant.tied_transpose_of"


def retie_transposed_weights(graph: ir.Graph) -> dict[str, list[str]]:
    """Re-tie what canonicalization untied and nothing changed since.

    Returns ``{"retied": [...], "untied": [...]}``: the weights read through
    ``Transpose(table)`` again, and those left untied with the reason (a pass rewrote the
    lm_head or the table — quantized, scaled or rotated — so the two differ).
    """
    retied: list[str] = []
    untied: list[str] = []
    for name, value in list(graph.initializers.items()):
        table_name = value.metadata_props.get(TIED_KEY)
        if table_name is None:
            continue
        table = graph.initializers.get(table_name)
        if not value.uses():
            continue  # replaced by a quantized form; the report of that pass says so
        if table is None or table.const_value is None or value.const_value is None:
            untied.append(f"{name}: the table {table_name} was replaced (quantized or rewritten)")
            continue
        if table.const_value.dtype != value.const_value.dtype or \
                not np.array_equal(table.const_value.numpy().T, value.const_value.numpy()):
            untied.append(f"{name}: differs from the transpose of {table_name} (a pass rewrote one of them)")
            continue
        output = ir.Value(name=unique_name(graph, f"{table_name}_transposed"),
                          shape=ir.Shape(tuple(value.const_value.shape)), type=value.type)
        node = ir.Node("", "Transpose", [table], attributes=[ir.AttrInt64s("perm", [1, 0])],
                       outputs=[output], name=unique_name(graph, f"{table_name}/Transpose_tied"))
        graph.insert_before(graph.node(0), node) if len(graph) else graph.append(node)
        value.replace_all_uses_with(output)
        del graph.initializers[name]
        retied.append(name)
    return {"retied": retied, "untied": untied}
