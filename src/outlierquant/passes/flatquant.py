"""FlatQuant: learned affine transforms per linear group, in Kronecker form.

FlatQuant (Sun et al. 2024, "FlatQuant: Flatness Matters for LLM Quantization") replaces
the fixed rotation of QuaRot by an *invertible* matrix learned for each linear group. For
the group's input ``x`` (``[T, K]``) and each of its weights ``W`` (``[K, N]``)::

    y = x W + b = (x P) (P⁻¹ W) + b

holds for any invertible ``P``; quantizing ``x P`` and ``P⁻¹ W`` instead of ``x`` and ``W``
is what the transform buys. A full ``K × K`` matrix applied online would cost as much as
the linear itself, so ``P`` is a Kronecker product ``P = P₁ ⊗ P₂`` (``P₁`` is ``k₁ × k₁``,
``P₂`` is ``k₂ × k₂``, ``k₁·k₂ = K``, ``k₁ ≈ k₂ ≈ √K``). With a row of ``x`` reshaped
row-major to ``X`` (``[k₁, k₂]``)::

    x (P₁ ⊗ P₂)  ≙  P₁ᵀ X P₂          (P₁ ⊗ P₂)⁻¹ = P₁⁻¹ ⊗ P₂⁻¹

so the online transform is two small MatMuls. A learnable per-channel scale ``c`` (a
diagonal, SmoothQuant-like) comes first: ``x ← (x / c) P``, ``W ← P⁻¹ diag(c) W``; it is
folded into the group's producer (norm γ/β, or the producing linear's columns) when that
producer is foldable, else inserted as one ``Mul``.

**Objective** (per group; every linear reading the same input shares ``P`` and the loss
sums their outputs): on activation rows captured from the model as it stands,

    L(P, c) = ‖ Q_a(x diag(c)⁻¹ P) · Q_w(P⁻¹ diag(c) W) − x W ‖² / ‖ x W ‖²

with ``Q_a`` symmetric per-token and ``Q_w`` symmetric per-group round-to-nearest (the
quantization the ``simulate-quant`` pass that follows applies; the options must match it),
rounding passed straight through for the gradient, minimised with AdamW from ``P = I``,
``c = 1``. A transform whose loss on all captured rows is not below the identity's is
dropped (the group is left as it was).

**Folded transforms.** Attention ``V → O``: ``probs_h @ (V_h A) = (probs_h @ V_h) A`` for
a matrix ``A`` acting inside every head, so ``P = I_H ⊗ A`` (``A`` is ``d × d``, the
head size) folds into V's columns (``W_v ← W_v (I ⊗ A)``, ``b_v ← b_v (I ⊗ A)``) and
costs nothing at run time; grouped-query attention is handled through the analysis'
channel map (one ``A`` for all heads, as the heads share V channels).

The pass claims equivalence: the fp32 function is unchanged whatever ``P`` was learned
(tested on real and random inputs to 1e-4 relative). Learned clipping (the paper learns
weight and activation clipping thresholds too) is not transferred: the quantizer that
follows searches its own weight clipping.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.emit.rotation import kronecker_left_form
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.attention import group_head_dim
from outlierquant.graph.edit import fold_into_producer, group_label, write_bias, write_linear_weight
from outlierquant.graph.records import LinearGroup
from outlierquant.graph.shapes import propagate_ranks
from outlierquant.graph.tags import FLATQUANT_KEY
from outlierquant.graph.values import constant_array, first_in_graph
from outlierquant.numerics.estimates import outlier_profile
from outlierquant.numerics.grids import as_f64
from outlierquant.numerics.hadamard import kronecker_factors
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)

__all__ = [
    "FlatQuantOptions",
    "FlatQuantPass",
    "LearnedTransform",
    "learn_transform",
]


@dataclasses.dataclass(frozen=True)
class FlatQuantOptions:
    """Options of :class:`FlatQuantPass`.

    The quantization the objective targets — ``weight_bits`` / ``weight_group_size``
    (0: per output channel), ``activation_bits`` (``None``: weight-only), ``activations``
    (``per_token``) and ``activation_clip`` — should match the ``simulate-quant`` pass that
    follows. Learning: ``steps`` of AdamW (``learning_rate``, cosine decay) on random
    mini-batches of ``batch_rows`` rows out of at most ``max_rows`` captured rows per
    group input (``steps: 0`` keeps the identity), each step on ``max_columns`` output
    columns drawn at random (the loss sums independent columns — every column has its own
    weight scales — so a column subset is an unbiased estimate of it). ``learn_scale``: learn the per-channel
    scale ``c`` too. ``fold_heads``: learn ``V → O`` transforms per head and fold them
    into V (else those groups get an online transform). ``skip_output_layers``: leave
    groups whose linears write graph outputs (the lm_head) alone. ``min_features``:
    narrower groups are left alone.
    """

    weight_bits: int | None = 4
    weight_group_size: int = 128
    activation_bits: int | None = 8
    activations: Literal["per_token"] = "per_token"
    activation_clip: float = 1.0
    steps: int = 100
    batch_rows: int = 256
    learning_rate: float = 5e-3
    max_rows: int = 2048
    max_columns: int = 256
    learn_scale: bool = True
    fold_heads: bool = True
    skip_output_layers: bool = True
    min_features: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if self.weight_bits is not None and self.weight_bits not in (2, 3, 4, 5, 6, 7, 8):
            raise ValueError(f"weight_bits={self.weight_bits!r}: allowed 2..8 or null")
        if not isinstance(self.weight_group_size, int) or self.weight_group_size < 0:
            raise ValueError(f"weight_group_size={self.weight_group_size!r}: a non-negative integer")
        if self.activation_bits is not None and self.activation_bits not in (4, 6, 8):
            raise ValueError(f"activation_bits={self.activation_bits!r}: allowed 4, 6, 8 or null")
        if self.activations != "per_token":
            raise ValueError(f"activations={self.activations!r}: allowed 'per_token' (the objective "
                             "quantizes activations per token)")
        if not 0.0 < float(self.activation_clip) <= 1.0:
            raise ValueError(f"activation_clip={self.activation_clip!r}: in (0, 1]")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps={self.steps!r}: a non-negative integer")
        if not isinstance(self.batch_rows, int) or self.batch_rows < 1:
            raise ValueError(f"batch_rows={self.batch_rows!r}: an integer >= 1")
        if not float(self.learning_rate) > 0.0:
            raise ValueError(f"learning_rate={self.learning_rate!r}: must be > 0")
        if not isinstance(self.max_rows, int) or self.max_rows < 16:
            raise ValueError(f"max_rows={self.max_rows!r}: an integer >= 16")
        if not isinstance(self.max_columns, int) or self.max_columns < 1:
            raise ValueError(f"max_columns={self.max_columns!r}: an integer >= 1")
        if not isinstance(self.min_features, int) or self.min_features < 2:
            raise ValueError(f"min_features={self.min_features!r}: an integer >= 2")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: must be an integer")


# --------------------------------------------------------------------------------------
# Learning one transform (torch, CPU)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LearnedTransform:
    """``P = P₁ ⊗ P₂`` and the channel scale ``c`` (float64), with the objective's values."""

    p1: np.ndarray
    p2: np.ndarray
    scale: np.ndarray
    loss_identity: float
    loss_learned: float
    kept: bool

    def matrix(self) -> np.ndarray:
        return np.kron(self.p1, self.p2)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``(x / c) (P₁ ⊗ P₂)`` through the Kronecker identity."""
        k1, k2 = self.p1.shape[0], self.p2.shape[0]
        z = (np.asarray(x, dtype=np.float64) / self.scale).reshape(-1, k1, k2)
        return np.matmul(np.matmul(self.p1.T, z), self.p2).reshape(x.shape)


def _round_ste(torch, value):
    return value + (torch.round(value) - value).detach()


def _fake_quant_rows(torch, x, bits: int | None, clip: float):
    """Symmetric per-row (per-token) fake quantization, as ``simulate-quant`` does it."""
    if bits is None:
        return x
    qmax = 2 ** (bits - 1) - 1
    scale = torch.clamp(x.abs().amax(dim=-1, keepdim=True), min=1e-8) * (clip / qmax)
    levels = _round_ste(torch, x / scale)
    return (torch.clamp(levels, -qmax - 1, qmax) if clip < 1.0 else levels) * scale


def _fake_quant_weight(torch, w, bits: int | None, group_size: int):
    """Symmetric abs-max round-to-nearest per output column, per group of input rows."""
    if bits is None:
        return w
    qmax = 2 ** (bits - 1) - 1
    k, n = w.shape
    g = group_size if group_size and group_size < k else k
    pad = (-k) % g
    padded = torch.cat([w, w.new_zeros(pad, n)]) if pad else w
    blocks = padded.reshape(-1, g, n)
    scale = torch.clamp(blocks.abs().amax(dim=1, keepdim=True), min=1e-12) / qmax
    q = _round_ste(torch, blocks / scale) * scale  # |W / scale| <= qmax: nothing to clip
    return q.reshape(-1, n)[:k]


def _kron_rows(x, a, b):
    """``x (A ⊗ B)`` for rows ``x`` (``[T, k₁·k₂]``) as two plain GEMMs (no small batched ones)."""
    rows, k1, k2 = x.shape[0], a.shape[0], b.shape[0]
    z = (x.reshape(rows * k1, k2) @ b).reshape(rows, k1, k2)
    z = (z.transpose(1, 2).reshape(rows * k2, k1) @ a).reshape(rows, k2, k1).transpose(1, 2)
    return z.reshape(rows, k1 * k2)


def _kron_weight(w, a, b):
    """``(A ⊗ B) W`` for a ``[k₁·k₂, N]`` weight, as two plain GEMMs."""
    k1, k2, n = a.shape[0], b.shape[0], w.shape[1]
    u = (a @ w.reshape(k1, k2 * n)).reshape(k1, k2, n)
    u = (b @ u.transpose(0, 1).reshape(k2, k1 * n)).reshape(k2, k1, n).transpose(0, 1)
    return u.reshape(k1 * k2, n)


def learn_transform(
    x: np.ndarray,
    weight: np.ndarray,
    k1: int,
    k2: int,
    options: FlatQuantOptions,
    *,
    learn_left: bool = True,
    learn_scale: bool | None = None,
    seed: int = 0,
) -> LearnedTransform:
    """Learn ``P₁ ⊗ P₂`` (and ``c``) for rows ``x`` (``[T, K]``) and weights ``[K, N]``.

    ``learn_left=False`` keeps ``P₁ = I`` (the per-head ``I_H ⊗ A`` of ``V → O``).
    The returned transform is the identity (``kept=False``) when the learned one does not
    lower the objective on all rows.
    """
    import torch

    learn_scale = options.learn_scale if learn_scale is None else learn_scale
    rows, features = x.shape
    if k1 * k2 != features or weight.shape[0] != features:
        raise ValueError(f"{k1}×{k2} does not factor {features} features (weight {weight.shape})")
    generator = torch.Generator().manual_seed(seed)
    xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    p1 = torch.eye(k1, requires_grad=learn_left)
    p2 = torch.eye(k2, requires_grad=True)
    log_scale = torch.zeros(features, requires_grad=learn_scale)
    params = [t for t in (p1, p2, log_scale) if t.requires_grad]

    def objective(batch, w_columns, reference):
        scale = torch.exp(log_scale)
        transformed = _kron_rows(batch / scale, p1, p2)
        w_transformed = _kron_weight(scale[:, None] * w_columns, torch.linalg.inv(p1), torch.linalg.inv(p2))
        qx = _fake_quant_rows(torch, transformed, options.activation_bits, float(options.activation_clip))
        qw = _fake_quant_weight(torch, w_transformed, options.weight_bits, options.weight_group_size)
        error = torch.matmul(qx, qw) - reference
        return (error ** 2).mean() / (reference ** 2).mean().clamp(min=1e-30)

    # the objective on all rows is measured on a fixed subset of (at most 4·max_columns) columns
    columns = w.shape[1]
    evaluated = w
    if columns > 4 * options.max_columns:
        picked = torch.randperm(columns, generator=generator)[: 4 * options.max_columns]
        evaluated = w[:, torch.sort(picked).values]

    def full_loss() -> float:
        with torch.no_grad():
            total, norm = 0.0, 0.0
            for start in range(0, rows, 1024):
                batch = xs[start:start + 1024]
                reference = batch @ evaluated
                energy = float((reference ** 2).mean()) * batch.shape[0]
                total += float(objective(batch, evaluated, reference)) * energy
                norm += energy
            return total / norm if norm > 0 else 0.0

    loss_identity = full_loss()
    if options.steps and params and rows:
        optimizer = torch.optim.AdamW(params, lr=float(options.learning_rate), weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.steps)
        batch_rows = min(options.batch_rows, rows)
        for _ in range(options.steps):
            batch = xs[torch.randint(0, rows, (batch_rows,), generator=generator)]
            w_columns = w
            if columns > options.max_columns:
                w_columns = w[:, torch.randperm(columns, generator=generator)[: options.max_columns]]
            with torch.no_grad():
                reference = batch @ w_columns
            loss = objective(batch, w_columns, reference)
            if not torch.isfinite(loss):
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    learned = (p1.detach().double().numpy(), p2.detach().double().numpy(),
               np.exp(log_scale.detach().double().numpy()))
    finite = all(np.isfinite(a).all() for a in learned)
    loss_learned = full_loss() if finite else float("inf")
    well_conditioned = finite and max(np.linalg.cond(learned[0]), np.linalg.cond(learned[1])) < 1e4
    if well_conditioned and loss_learned < loss_identity:
        return LearnedTransform(*learned, loss_identity, loss_learned, kept=True)
    return LearnedTransform(np.eye(k1), np.eye(k2), np.ones(features), loss_identity, loss_learned, kept=False)


# --------------------------------------------------------------------------------------
# Graph form
# --------------------------------------------------------------------------------------


def _flatquant_kronecker(model: ir.Model, x: ir.Value, p1: np.ndarray, p2: np.ndarray, name: str,
                         prescale: np.ndarray | None = None) -> tuple[list[ir.Node], ir.Value]:
    """``x (P₁ ⊗ P₂)`` in the standard Kronecker form, its nodes marked as FlatQuant's."""
    return kronecker_left_form(model, x, p1, p2, name, prescale, metadata_key=FLATQUANT_KEY)


# --------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------


def _scale_foldable(group: LinearGroup) -> bool:
    """Whether ``x / c`` can go into the group's producer (norm γ/β or the linear's columns)."""
    producer = group.producer
    if not producer.foldable or producer.relation not in ("norm", "linear", "up_to_down"):
        return False
    cmap = producer.channel_map
    if cmap is not None and not np.array_equal(cmap, np.arange(group.in_features)):
        return False
    if producer.kind == "norm":
        return producer.norm.gamma is not None
    return producer.kind == "linear" and producer.linear.op_type != "Conv"


class FlatQuantPass(OutlierPass):
    """Learn ``P = P₁ ⊗ P₂`` per linear group on captured activations; apply it online or folded."""

    name = "flatquant"
    claims_equivalence = True
    needs_feeds = True
    options_type = FlatQuantOptions

    def _plan(self, model: ir.Model) -> tuple[list[tuple[LinearGroup, str, int, int]], list[dict]]:
        """(group, mode, k₁, k₂) for every group to transform, and the skipped ones with why."""

        options = self.options
        analysis = analyze_graph(model)
        ranks = None
        plan, skipped = [], []
        for group in analysis.groups:
            label = group_label(group)
            dim = group.in_features
            if any(linear.op_type == "Conv" for linear in group.linears):
                skipped.append({"group": label, "skipped": "Conv layers are not transformed"})
                continue
            if options.skip_output_layers and any(linear.output.is_graph_output() for linear in group.linears):
                skipped.append({"group": label, "skipped": "writes a graph output (kept in float)"})
                continue
            if any(constant_array(linear.weight).dtype != np.float32 for linear in group.linears):
                skipped.append({"group": label, "skipped": "weight is not float32"})
                continue
            if group.input.dtype not in (None, ir.DataType.FLOAT):
                skipped.append({"group": label, "skipped": f"input dtype {group.input.dtype} is not float32"})
                continue
            if dim < options.min_features:
                skipped.append({"group": label, "skipped": f"{dim} input features < min_features"})
                continue
            producer = group.producer
            if options.fold_heads and producer.relation == "v_to_o" and producer.foldable:
                if ranks is None:
                    ranks = propagate_ranks(model.graph, list(model.graph))
                head_dim = group_head_dim(group, ranks)
                cmap = producer.channel_map if producer.channel_map is not None else np.arange(dim)
                v = producer.linear
                if (head_dim is not None and v.out_features % head_dim == 0
                        and not np.any(cmap % head_dim != np.arange(len(cmap)) % head_dim)):
                    plan.append((group, "fold_heads", dim // head_dim, head_dim))
                    continue
            k1, k2 = kronecker_factors(dim)
            plan.append((group, "online", k1, k2))
        return plan, skipped

    def _capture(self, model: ir.Model, names: list[str], widths: dict[str, int]) -> dict[str, np.ndarray]:
        from outlierquant.calibration.collect import activation_budget, capture_activations

        captured: dict[str, np.ndarray] = {}
        chunk: list[str] = []
        budget = 0
        # tensors captured per session run: half the model's calibration budget of kept rows
        # (the transform's learning holds a second copy of them)
        limit = activation_budget(model) // 2
        for name in names + [None]:
            size = 0 if name is None else widths[name] * self.options.max_rows * 4
            if chunk and (name is None or budget + size > limit):
                captured.update(capture_activations(model, self.feeds, chunk, max_rows=self.options.max_rows))
                chunk, budget = [], 0
            if name is not None:
                chunk.append(name)
                budget += size
        return captured

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        if not self.feeds:
            raise ValueError("flatquant needs calibration feeds (pass.with_feeds(feeds); the pipeline hands them)")
        options = self.options
        graph = model.graph
        plan, skipped = self._plan(model)
        started = time.perf_counter()
        names = list(dict.fromkeys(group.input.name for group, *_ in plan))
        widths = {group.input.name: group.in_features for group, *_ in plan}
        captured = self._capture(model, names, widths) if names else {}
        capture_seconds = time.perf_counter() - started

        transformed: list[dict[str, Any]] = []
        inserted = 0
        for index, (group, mode, k1, k2) in enumerate(plan):
            label = group_label(group)
            x = captured[group.input.name]
            weight = np.concatenate([as_f64(linear.weight_array()) for linear in group.linears], axis=1)
            t0 = time.perf_counter()
            learned = learn_transform(x, weight, k1, k2, options, learn_left=(mode == "online"),
                                      learn_scale=options.learn_scale and mode == "online",
                                      seed=options.seed + index)
            entry: dict[str, Any] = {
                "group": label, "mode": mode, "kronecker": f"{k1}x{k2}",
                "relation": group.producer.relation, "rows": int(x.shape[0]),
                "loss_identity": round(learned.loss_identity, 6), "loss_learned": round(learned.loss_learned, 6),
                "kept": learned.kept, "seconds": round(time.perf_counter() - t0, 2),
                "before": outlier_profile(np.abs(x).max(axis=0)),
            }
            if not learned.kept:
                entry["skipped"] = "the learned transform did not lower the objective"
                transformed.append(entry)
                continue
            entry["after"] = outlier_profile(np.abs(learned.apply(x)).max(axis=0))
            if mode == "fold_heads":
                self._fold_heads(graph, group, learned.p2)
            else:
                entry["scale"] = self._apply_online(model, group, learned, f"flatquant_{index}")
                inserted += 1
            transformed.append(entry)

        kept = [e for e in transformed if e["kept"]]
        record = {
            "config": dataclasses.asdict(options),
            "groups": transformed,
            "skipped": skipped,
            "transformed_groups": len(kept),
            "online_transforms": inserted,
            "inserted_ops": inserted,
            "mean_loss_identity": round(float(np.mean([e["loss_identity"] for e in transformed])), 6)
            if transformed else None,
            "mean_loss_learned": round(float(np.mean([min(e["loss_learned"], e["loss_identity"])
                                                      for e in transformed])), 6) if transformed else None,
            "capture_seconds": round(capture_seconds, 2),
        }
        logger.info("flatquant: %d of %d groups transformed (%d online), mean loss %.4g -> %.4g",
                    len(kept), len(plan), inserted, record["mean_loss_identity"] or 0.0,
                    record["mean_loss_learned"] or 0.0)
        return bool(kept), record

    @staticmethod
    def _fold_heads(graph: ir.Graph, group: LinearGroup, head: np.ndarray) -> None:
        """``W_v ← W_v (I ⊗ A)``, ``b_v ← b_v (I ⊗ A)``, ``W_o ← (I ⊗ A)⁻¹ W_o``."""
        v = group.producer.linear
        d = head.shape[0]
        v_map = np.kron(np.eye(v.out_features // d), head)
        write_linear_weight(graph, v, as_f64(v.weight_array()) @ v_map, f"{v.name}_weight_flatquant")
        if v.bias is not None:
            write_bias(graph, v, as_f64(v.bias_array()).reshape(-1) @ v_map, f"{v.name}_bias_flatquant")
        o_inverse = np.kron(np.eye(group.in_features // d), np.linalg.inv(head))
        for linear in group.linears:
            write_linear_weight(graph, linear, o_inverse @ as_f64(linear.weight_array()),
                                f"{linear.name}_weight_flatquant")

    @staticmethod
    def _apply_online(model: ir.Model, group: LinearGroup, learned: LearnedTransform, name: str) -> str:
        """Insert ``x ← (x / c)(P₁ ⊗ P₂)`` before the group, fold ``P⁻¹ diag(c)`` into its weights.

        Returns where ``c`` went: ``"folded"`` (into the producer), ``"mul"`` (an inserted
        ``Mul``) or ``"none"`` (``c = 1``).
        """
        graph = model.graph
        scale = learned.scale
        where = "none"
        prescale = None
        if not np.allclose(scale, 1.0):
            if _scale_foldable(group):
                fold_into_producer(graph, group, scale)
                where = "folded"
            else:
                prescale = 1.0 / scale
                where = "mul"
        inverse = np.kron(np.linalg.inv(learned.p1), np.linalg.inv(learned.p2))
        nodes, out = _flatquant_kronecker(model, group.input, learned.p1, learned.p2, name, prescale)
        first = first_in_graph(graph, [linear.node for linear in group.linears])
        graph.insert_before(first, nodes)
        for linear in group.linears:
            weight = inverse @ (scale[:, None] * as_f64(linear.weight_array()))
            write_linear_weight(graph, linear, weight, f"{linear.name}_weight_flatquant")
            for slot, value in enumerate(linear.node.inputs):
                if value is group.input:
                    linear.node.replace_input_with(slot, out)
        return where


