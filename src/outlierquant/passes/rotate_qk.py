"""QuaRot R3: an online per-head rotation of queries and keys after RoPE.

**R3 — queries and keys after RoPE** (:class:`RotateQueryKeyPass`). RoPE sits between
the Q/K projections and the score MatMul, so nothing folds there; an online per-head
rotation ``H`` (``head_dim × head_dim``) on both operands leaves the scores unchanged::

    (Q H)(K H)ᵀ = Q H Hᵀ Kᵀ = Q Kᵀ

while Q and K lose their outlier channels (what quantizing the ``QKᵀ`` MatMul's operands,
or a KV cache, suffers from). The score MatMul is found from the graph: both operands are
activations, its output flows into a last-axis Softmax (through mask/scale ops), and its
right operand is a Transpose of the key (behind scalar scales) that puts the key's last
axis on the contraction axis. ``H`` goes on the query operand itself (a scale applied
to Q before it commutes with ``H``) and on the key *before* its Transpose, so ``Kᵀ``
becomes ``Hᵀ Kᵀ``. The inserted ops are R4's forms (the kernel or the standard-op
Kronecker form with constants on the left) and are listed in the record.

Every rotation pass claims equivalence and is tested for it (fp32 outputs before/after
agree to 1e-4 relative).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.emit.kernels import use_kernel
from outlierquant.emit.rotation import dense_left_form, hadamard_kernel_node, hadamard_left_form
from outlierquant.graph.attention import find_score_matmuls
from outlierquant.graph.tags import QK_ROTATION_KEY
from outlierquant.numerics.estimates import _profile_entry
from outlierquant.numerics.hadamard import hadamard_block, hadamard_rotation, random_orthogonal
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RotateQueryKeyOptions:
    """Options of :class:`RotateQueryKeyPass`.

    ``rotation``: ``hadamard`` (``M ⊗ H_n/√n``, with random signs when ``seed`` is not 0)
    or ``random`` (Haar, a dense constant MatMul; standard ops only). ``kernels``:
    ``auto`` (the custom HadamardTransform kernel when available), ``standard`` or
    ``custom`` (error when unavailable), as :class:`OnlineHadamardOptions`. ``profile``:
    collect calibration statistics of Q and K to record their outlier profile before and
    (predicted) after the rotation.
    """

    rotation: Literal["hadamard", "random"] = "hadamard"
    kernels: Literal["auto", "standard", "custom"] = "auto"
    seed: int = 0
    profile: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.kernels not in ("auto", "standard", "custom"):
            raise ValueError(f"kernels={self.kernels!r}: allowed 'auto', 'standard', 'custom'")
        if self.rotation == "random" and self.kernels == "custom":
            raise ValueError("kernels='custom' needs rotation='hadamard' (a random rotation has no kernel)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed={self.seed!r}: must be an integer")
        if not isinstance(self.profile, bool):
            raise ValueError(f"profile={self.profile!r}: must be true or false")


class RotateQueryKeyPass(OutlierPass):
    """R3: the same online per-head rotation on the queries and on the keys after RoPE."""

    name = "rotate-qk"
    claims_equivalence = True
    options_type = RotateQueryKeyOptions

    needs_stats = True  # profile: the outlier profile before and after, for the record

    def reads(self) -> frozenset[str]:
        return frozenset({"stats"}) if self.options.profile else frozenset()

    def use_kernel(self) -> bool:
        if self.options.rotation != "hadamard":
            return False
        return use_kernel(self.options.kernels)

    def calibration_targets(self, model: ir.Model) -> list:
        return [name for match in find_score_matmuls(model) if match.head_dim is not None
                for name in (match.query.name, match.key.name)]

    def covariance_targets(self, model: ir.Model) -> list[str]:
        return self.calibration_targets(model)

    def _rotation(self, dim: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(R, block, signs)`` with ``x ← x R``; ``R = diag(signs) (M ⊗ H_n/√n)`` for Hadamard."""

        rng = np.random.default_rng(self.options.seed)
        if self.options.rotation == "random":
            return random_orthogonal(dim, rng), None, None
        block = hadamard_block(dim)
        rotation = hadamard_rotation(dim, block)
        signs = rng.choice([-1.0, 1.0], size=dim) if self.options.seed else None
        if signs is not None:
            rotation = signs[:, None] * rotation
        return rotation, block, signs

    def _insert(self, model: ir.Model, x: ir.Value, dim: int, kernel: bool, anchor: ir.Node, side: str,
                name: str) -> ir.Value:
        rotation, block, signs = self._rotation(dim)
        if self.options.rotation == "random":
            nodes, out = dense_left_form(model, x, rotation, name)
        elif kernel:
            nodes, out = hadamard_kernel_node(model, x, block, name, signs)
        else:
            nodes, out = hadamard_left_form(model, x, dim, block, name, signs)
        for node in nodes:
            node.metadata_props[QK_ROTATION_KEY] = side
        model.graph.insert_before(anchor, nodes)
        return out

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        kernel = self.use_kernel()
        rotated, skipped = [], []
        for index, match in enumerate(find_score_matmuls(model)):
            label = match.node.name
            if match.reason is not None:
                skipped.append({"scores": label, "skipped": match.reason})
                continue
            if match.query.dtype not in (None, ir.DataType.FLOAT):
                skipped.append({"scores": label, "skipped": f"query dtype {match.query.dtype} is not float32"})
                continue
            dim = match.head_dim
            entry: dict[str, Any] = {"scores": label, "head_dim": dim, "query": match.query.name,
                                     "key": match.key.name}
            rotation = self._rotation(dim)[0]
            for side, value in (("query", match.query), ("key", match.key)):
                stats = self.stats.get(value.name) if self.stats is not None else None
                if stats is not None and len(stats.absmax) == dim:
                    entry[f"{side}_outliers"] = _profile_entry(stats, rotation)
            query = self._insert(model, match.query, dim, kernel, match.node, "query", f"qk_rotation_{index}_query")
            match.node.replace_input_with(0, query)
            key = self._insert(model, match.key, dim, kernel, match.key_transpose, "key", f"qk_rotation_{index}_key")
            match.key_transpose.replace_input_with(0, key)
            rotated.append(entry)
        form = "dense_standard_ops" if self.options.rotation == "random" else (
            "custom_kernel" if kernel else "standard_ops")
        record = {
            "rotation": self.options.rotation,
            "seed": self.options.seed,
            "form": form,
            "rotated": rotated,
            "skipped": skipped,
            "inserted_ops": 2 * len(rotated),
        }
        logger.info("rotate-qk: %d score MatMuls get an online rotation of Q and K (%s), %d skipped",
                    len(rotated), form, len(skipped))
        return bool(rotated), record
