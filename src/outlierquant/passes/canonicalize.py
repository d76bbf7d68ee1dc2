"""Canonicalize exporter spellings so that analysis and the rewrites see one form.

What the pass does (each step is exact — the fp32 function does not change):

1. **Identity elimination** (onnx-ir's ``IdentityEliminationPass``): ``y = Identity(x)``
   is dropped and ``y``'s uses read ``x``.
2. **Constant weights become initializers**: a float ``Constant`` node holding more
   than one element (a weight, bias, γ or β) is replaced by an initializer of the same
   name and value. Passes then rewrite weights in one place, ``value.const_value``.
3. **Transposed constant weights are folded**: ``MatMul(x, Transpose(W))`` — how
   exporters spell a linear whose weight is tied to the embedding — becomes
   ``MatMul(x, Wᵀ)`` with ``Wᵀ`` a new initializer. This *unties* the weight (the
   embedding keeps ``W``), which is what an equivalence pass needs anyway: scaling the
   lm_head's rows must not scale the embedding. While ``W`` is also read elsewhere, ``Wᵀ``
   is an ``ir.LazyTensor`` computed from ``W``'s tensor as it was at the fold whenever it
   is read or written, so the run does not hold a second copy of the table. The copy is
   tagged (:data:`outlierquant.graph.tied.TIED_KEY`) with the table's name, and the
   ``tie-weights`` pass (:func:`outlierquant.graph.tied.retie_transposed_weights`), run
   last, reads the table through ``Transpose`` again wherever no pass changed either side,
   so an lm_head left in float is not saved as a second copy of the embedding.

What it deliberately does **not** do: rewrite decomposed norms into fused
``LayerNormalization`` (opset ≥ 17) or ``RMSNormalization`` (opset ≥ 23) ops. A fused op
would need an opset bump for many exported models, changes the floating-point order of
operations (so "no-op" would only hold to a tolerance), and buys nothing at run time —
onnxruntime fuses these chains itself when the session is created. The analysis
(:mod:`outlierquant.graph.analysis`) recognises both spellings instead, and the γ/β of
a decomposed norm are initializers after step 2, which is all a folding pass touches.
Likewise ``MatMul + Add`` is not fused into ``Gemm`` (Gemm is 2-D only) — the analysis
reads the bias ``Add`` as part of the linear.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass, LiftConstantsToInitializersPass

from outlierquant.graph.tied import TIED_KEY, retie_transposed_weights
from outlierquant.graph.values import FLOAT_TYPES, unique_name
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)

__all__ = ["CanonicalizePass", "TieWeightsPass"]


class CanonicalizePass(OutlierPass):
    """Identity elimination, Constant → initializer, and ``Transpose(const)`` folding.

    Options: ``fold_transposed_weights`` (default True) turns step 3 on or off.
    """

    #: Statistics collected on a canonicalized model stay valid after this pass runs
    #: again on the same source: it is deterministic and changes no activation's value.
    preserves_statistics = True

    name = "canonicalize"
    claims_equivalence = True

    def __init__(self, *, fold_transposed_weights: bool = True) -> None:
        super().__init__()
        self.fold_transposed_weights = fold_transposed_weights

    def run(self, model: ir.Model) -> tuple[bool, dict]:
        modified = IdentityEliminationPass()(model).modified
        graph = model.graph
        lifted = _LiftFloatConstantsPass()(model).modified
        untied: list[str] = []
        folded = self._fold_transposed_constants(graph, untied) if self.fold_transposed_weights else 0
        if lifted or folded:
            logger.info("canonicalize: float constants lifted to initializers, %d transposed weights folded", folded)
        record = {"constants_lifted": bool(lifted), "transposed_weights_folded": folded}
        if untied:
            # the table is also read elsewhere (the embedding's Gather): this is a second copy
            record["tied_weights_untied"] = untied
        return modified or bool(lifted or folded), record

    @staticmethod
    def _fold_transposed_constants(graph: ir.Graph, untied: list[str]) -> int:
        count = 0
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain != "":
                continue
            source = node.inputs[0]
            if source is None or source.const_value is None or node.outputs[0].is_graph_output():
                continue
            output = node.outputs[0]
            if not any(use.node.op_type in ("MatMul", "Gemm") and use.idx == 1 for use in output.uses()):
                continue  # only weights; other constant transposes are not ours to fold
            original = source.const_value
            perm = node.attributes.get_ints("perm", None)
            shape = tuple(int(d) for d in original.shape.numpy())
            perm = tuple(perm) if perm is not None else tuple(reversed(range(len(shape))))
            name = unique_name(graph, f"{source.name}_transposed")
            tied = any(use.node is not node for use in source.uses()) or source.is_graph_output()
            if tied:
                # the table stays (the embedding's Gather reads it): the transpose is computed
                # when read or written, from the tensor as it is now, instead of held as a
                # second copy for the whole run (a 262k-token table is most of a model)
                def transpose(original=original, perm=perm, name=name) -> ir.Tensor:
                    return ir.tensor(np.ascontiguousarray(np.transpose(original.numpy(), perm)), name=name)

                tensor = ir.LazyTensor(transpose, dtype=original.dtype,
                                       shape=ir.Shape([shape[i] for i in perm]), name=name)
            else:
                tensor = ir.tensor(np.ascontiguousarray(np.transpose(original.numpy(), perm)), name=name)
            initializer = ir.Value(
                name=name,
                shape=ir.Shape([shape[i] for i in perm]),
                type=ir.TensorType(original.dtype),
                const_value=tensor,
            )
            graph.register_initializer(initializer)
            output.replace_all_uses_with(initializer)
            graph.remove(node, safe=True)
            if not source.uses() and not source.is_graph_output() and source.name in graph.initializers:
                del graph.initializers[source.name]
            elif source.name in graph.initializers and perm == (1, 0):
                initializer.metadata_props[TIED_KEY] = source.name
                untied.append(f"{name} (transpose of {source.name}, also read by "
                              f"{', '.join(sorted({use.node.op_type for use in source.uses()}))})")
            count += 1
        return count


class TieWeightsPass(OutlierPass):
    """Read an untied lm_head through ``Transpose(table)`` again where no pass changed it.

    Exact: the replaced initializer is bit for bit the transpose of the table. Run it last:
    a pass after it that rewrites the lm_head would have to untie it again. Where a pass
    did change one side (an lm_head quantized or smoothed differently from the embedding
    rows), the weight stays untied and the record says so.
    """

    name = "tie-weights"
    claims_equivalence = True

    def run(self, model: ir.Model) -> tuple[bool, dict]:
        result = retie_transposed_weights(model.graph)
        if result["retied"]:
            logger.info("tie-weights: %s read their embedding table through Transpose again",
                        ", ".join(result["retied"]))
        record = {"retied": result["retied"]}
        if result["untied"]:
            record["untied"] = result["untied"]
        return bool(result["retied"]), record


class _LiftFloatConstantsPass(LiftConstantsToInitializersPass):
    """onnx_ir's lifting, restricted to float tensors of two or more elements (weights,
    biases, γ, β): integer constants (shapes, axes) stay ``Constant`` nodes, so the graph
    keeps the form the exporter wrote everywhere a pass does not need to write."""

    def __init__(self) -> None:
        super().__init__(lift_all_constants=False, size_limit=2)

    def _constant_node_attribute_to_tensor(self, node, attr_name, attr_value, initializer_name):
        tensor = super()._constant_node_attribute_to_tensor(node, attr_name, attr_value, initializer_name)
        return tensor if tensor is not None and tensor.dtype in FLOAT_TYPES else None
