"""QuaRot R1: rotate the residual stream, folded into its writers and readers.

QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs")
rests on computational invariance: for an orthogonal ``Q`` (``Q Qᵀ = I``) and a linear
``y = x W + b``::

    y = (x Q) (Qᵀ W) + b

so a rotation applied to a tensor is undone by the weights that read it. A rotation
spreads a channel with a huge magnitude over all channels (a normalized Hadamard matrix
turns ``x = c·e_k`` into ``±c/√d`` everywhere), which removes the channel outliers that
ruin per-tensor activation quantization, and flattens the weights' rows in the same way.
This module does R1 (``rotate_heads``, ``rotate_qk`` and ``online_hadamard`` do the
others).

**R1 — the residual stream** (:class:`RotateResidualPass`). In a pre-norm decoder every
tensor added into the residual stream is written by the embedding or by a linear
(attention out-projection, FFN down-projection), and every tensor read from it passes
through a norm first. RMSNorm commutes with a rotation once its γ is folded away::

    RMSNorm_γ(x) W = (x / rms(x)) (diag(γ) W),    rms(x Q) = rms(x)

so with ``γ`` folded into the readers (``W ← diag(γ) W``), rotating every writer's
output (``W ← W Q``, ``b ← b Q``, embedding table ``E ← E Q``) rotates the whole stream,
each norm's output becomes ``(x / rms(x)) Q`` and the readers take ``W ← Qᵀ W``.
LayerNorm also subtracts the mean, which does not commute with ``Q``. With the centering
matrix ``C = I − 11ᵀ/d``, ``LN(x) = LN(x C)``, and ``x C`` is written by the writers
themselves (``W ← W C``, ``b ← b C``, ``E ← E C``, exact because the stream is read only
by norms). On a mean-free stream LayerNorm *is* RMSNorm (same ε), so each LayerNorm
is replaced by an RMSNorm written with standard ops, its β folded into the readers'
biases (``b ← b + β W``) and its γ into their weights. The stream is found from the graph
— norm inputs traced back through residual ``Add``s, ``Cast``s and ``Reshape``s to
linears and embedding ``Gather``s, and checked forward (every use of a stream tensor is
an ``Add`` of the stream, a norm, or a shape read) — never from node names. A post-norm
encoder (BERT: a norm output feeds the next residual ``Add``) has no such stream and is
reported as skipped with the reason.

``Q`` is a randomized Hadamard matrix ``diag(±1) · (M ⊗ H_n/√n)`` (the construction of
`outlierquant.numerics.hadamard`; for a ``d`` whose odd part has no Hadamard
matrix, e.g. 576 = 9·64, ``M`` is a seeded random orthogonal 9×9), a Haar-random
orthogonal matrix, or the KLT below.

**KLT / smooth-fused rotation** (MambaQuant: Xu et al. 2025, "MambaQuant: Quantizing the
Mamba Family with Variance Aligned Rotation Methods"). With the calibration covariance
``Σ = K Λ Kᵀ`` of a rotated tensor, ``x K`` has uncorrelated channels of variance ``Λ``
and ``x K H`` spreads those variances evenly over all channels (the KLT-enhanced
rotation); ``rotation: klt`` uses ``Q = K H`` for R1 (``Σ`` pooled over the stream's
normalized reader inputs).

Every rotation pass claims equivalence and is tested for it (fp32 outputs before/after
agree to 1e-4 relative).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.emit.rotation import rms_norm_nodes
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import map_linear_weight_columns, write_bias, write_linear_weight
from outlierquant.graph.records import Norm
from outlierquant.graph.residual import ResidualStream, embedding_table, find_residual_stream, norm_epsilon
from outlierquant.graph.tags import ROTATED_NORM_KEY
from outlierquant.graph.values import constant_array, set_input_constant
from outlierquant.numerics.estimates import _profile_entry
from outlierquant.numerics.grids import as_f64
from outlierquant.numerics.hadamard import orthogonal_matrix
from outlierquant.numerics.slabs import slabs
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RotateResidualOptions:
    """Options of :class:`RotateResidualPass`.

    ``rotation``: ``hadamard`` (randomized Hadamard, default), ``random`` (Haar) or
    ``klt`` (eigenvectors of the pooled covariance of the normalized stream, composed with
    Hadamard; needs statistics with covariances). ``seed`` fixes the random signs/blocks.
    ``center``: for LayerNorm models, make the stream mean-free and turn the norms into
    RMSNorm (required for the rotation; ``False`` skips LayerNorm models).
    """

    rotation: Literal["hadamard", "random", "klt"] = "hadamard"
    seed: int = 0
    center: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: must be an integer")


class RotateResidualPass(OutlierPass):
    """R1: one orthogonal ``Q`` on the residual stream, fused into embeddings and weights."""

    name = "rotate-residual"
    claims_equivalence = True
    options_type = RotateResidualOptions

    needs_stats = True  # rotation: klt

    def reads(self) -> frozenset[str]:
        return frozenset({"stats"}) if self.options.rotation == "klt" else frozenset()

    def calibration_targets(self, model: ir.Model) -> list:
        analysis = analyze_graph(model)
        stream = find_residual_stream(analysis)
        if isinstance(stream, str):
            return []
        return [groups[0].input.name for groups in stream.readers.values()]

    def covariance_targets(self, model: ir.Model) -> list[str]:
        return list(self.calibration_targets(model)) if self.options.rotation == "klt" else []

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        analysis = analyze_graph(model)
        stream = find_residual_stream(analysis)
        if isinstance(stream, str):
            logger.info("rotate-residual skipped: %s", stream)
            return False, {"skipped": stream}
        has_layernorm = any(n.kind == "layernorm" for n in stream.norms)
        if has_layernorm and not self.options.center:
            reason = "LayerNorm stream and center is off"
            return False, {"skipped": reason}
        width = stream.width
        covariance = self._pooled_covariance(stream) if self.options.rotation == "klt" else None
        q = orthogonal_matrix(width, self.options.rotation, seed=self.options.seed, covariance=covariance)
        graph = model.graph
        center = np.eye(width) - np.full((width, width), 1.0 / width) if has_layernorm else np.eye(width)
        writer_map = center @ q

        # profiles from the statistics of the model as it is (before)
        profiles = {}
        for norm in stream.norms:
            for group in stream.readers[id(norm)]:
                st = self.stats.get(group.input.name) if self.stats is not None else None
                gamma = as_f64(constant_array(norm.gamma)).reshape(-1) if norm.gamma is not None else None
                inverse_gamma = None if gamma is None else np.where(gamma != 0, 1.0 / gamma, 0.0)
                entry = _profile_entry(st, q, inverse_gamma)
                if entry:
                    profiles[group.input.name] = entry

        # 1. writers: W ← W C Q, b ← b C Q
        for writer in stream.writers:
            weight = as_f64(writer.weight_array()) @ writer_map
            write_linear_weight(graph, writer, weight, f"{writer.name}_weight_rotated")
            if writer.bias is not None:
                bias = as_f64(writer.bias_array()).reshape(-1) @ writer_map
                write_bias(graph, writer, bias, f"{writer.name}_bias_rotated")
        for node in stream.embeddings:  # a slab of rows at a time: a vocabulary's table is large
            table = embedding_table(node)
            rotated = np.empty(table.shape, table.dtype)
            for part in slabs(*table.shape):
                rotated[part] = as_f64(table[part]) @ writer_map
            set_input_constant(graph, node, 0, rotated, f"{node.inputs[0].name}_rotated")
            del table, rotated  # the old table would otherwise live on beside the LM head's rotation

        # 2. readers: W ← Qᵀ diag(γ) W, b ← b + β W; then the norms lose γ/β
        for norm in stream.norms:
            gamma = as_f64(constant_array(norm.gamma)).reshape(-1) if norm.gamma is not None else np.ones(width)
            beta = as_f64(constant_array(norm.beta)).reshape(-1) if norm.beta is not None else None
            for group in stream.readers[id(norm)]:
                for linear in group.linears:
                    if beta is not None and np.any(beta):
                        bias = beta @ as_f64(linear.weight_array())
                        if linear.bias is not None:
                            bias = bias + as_f64(linear.bias_array()).reshape(-1)
                        write_bias(graph, linear, bias, f"{linear.name}_bias_folded")
                    map_linear_weight_columns(graph, linear, f"{linear.name}_weight_rotated",
                                              lambda block: q.T @ (gamma[:, None] * block))
            self._strip_norm(model, norm)

        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        record: dict[str, Any] = {
            "rotation": self.options.rotation,
            "seed": self.options.seed,
            "stream": stream.summary(),
            "centered": has_layernorm,
            "layernorms_replaced": sum(1 for n in stream.norms if n.kind == "layernorm"),
            "inserted_ops": 0,
        }
        if profiles:
            record["outliers"] = profiles
        logger.info("rotate-residual: %s rotation of width %d, %d writers, %d readers",
                    self.options.rotation, width, len(stream.writers), record["stream"]["readers"])
        return True, record

    def _pooled_covariance(self, stream: ResidualStream) -> np.ndarray:
        stats = self.require_stats()
        pooled = np.zeros((stream.width, stream.width))
        used = 0
        for norm in stream.norms:
            group = stream.readers[id(norm)][0]
            st = stats.get(group.input.name)
            if st is None or st.covariance is None:
                continue
            gamma = as_f64(constant_array(norm.gamma)).reshape(-1) if norm.gamma is not None else np.ones(stream.width)
            inverse = np.where(gamma != 0, 1.0 / gamma, 0.0)
            second = (st.covariance + np.outer(st.mean, st.mean)) * np.outer(inverse, inverse)
            pooled += second / max(np.trace(second), 1e-30)
            used += 1
        if not used:
            raise ValueError("rotation 'klt' needs covariance statistics of the norm outputs "
                             "(collect_statistics(covariance_for=pass.covariance_targets(model)))")
        return pooled / used

    @staticmethod
    def _strip_norm(model: ir.Model, norm: Norm) -> None:
        """Remove γ/β from ``norm`` (already folded); a LayerNorm becomes an RMSNorm.

        The norm's nodes are tagged :data:`ROTATED_NORM_KEY`: its output is rotated, so
        :class:`OnlineHadamardPass` leaves the linears behind it alone.
        """
        graph = model.graph
        for node in norm.nodes:
            node.metadata_props[ROTATED_NORM_KEY] = "1"
        if norm.kind == "layernorm":
            nodes, out = rms_norm_nodes(model, norm.input, norm_epsilon(norm), f"{norm.name}_rms")
            for node in nodes:
                node.metadata_props[ROTATED_NORM_KEY] = "1"
            out.shape = norm.output.shape
            anchor = norm.nodes[0]
            graph.insert_before(anchor, nodes)
            norm.output.replace_all_uses_with(out)
            return
        if norm.fused:
            node = norm.nodes[0]
            if norm.gamma is not None:
                index = next(i for i, v in enumerate(node.inputs) if v is norm.gamma)
                set_input_constant(graph, node, index, np.ones(constant_array(norm.gamma).shape, np.float32),
                                    f"{norm.name}_unit_scale")
            return
        for node in norm.nodes:
            if norm.gamma is not None and any(v is norm.gamma for v in node.inputs) and node.op_type == "Mul":
                other = next(v for v in node.inputs if v is not norm.gamma)
                node.outputs[0].replace_all_uses_with(other)
                return
