"""Rotations: orthogonal changes of basis that spread outlier channels, folded into weights.

QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs")
rests on computational invariance: for an orthogonal ``Q`` (``Q Qᵀ = I``) and a linear
``y = x W + b``::

    y = (x Q) (Qᵀ W) + b

so a rotation applied to a tensor is undone by the weights that read it. A rotation
spreads a channel with a huge magnitude over all channels (a normalized Hadamard matrix
turns ``x = c·e_k`` into ``±c/√d`` everywhere), which removes the channel outliers that
ruin per-tensor activation quantization, and flattens the weights' rows in the same way.
Four places take a rotation (R1–R4):

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
:mod:`outlierquant.custom_ops.reference`; for a ``d`` whose odd part has no Hadamard
matrix, e.g. 576 = 9·64, ``M`` is a seeded random orthogonal 9×9), a Haar-random
orthogonal matrix, or the KLT below.

**R2 — values to out-projection** (:class:`RotateHeadsPass`). ``probs_h @ (V_h H) =
(probs_h @ V_h) H`` for a rotation ``H`` that acts inside each head, so a per-head
Hadamard folds into the V projection's columns and the O projection's rows
(``W_o ← (I ⊗ H)ᵀ W_o``), GQA included: O's input channel ``j`` carries the V channel
``channel_map[j]`` given by the analysis.

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

**R4 — online Hadamard** (:class:`OnlineHadamardPass`). A linear whose input has no
producer a rotation folds into — the FFN down projection after ``SiLU(gate) ⊙ up`` or
GELU, the linears after a post-norm LayerNorm whose output also feeds the residual —
gets an explicit rotation ``x ← x H`` inserted in front of it and ``W ← Hᵀ W`` folded into
its weight. The inserted op costs run time and is listed in the record: the
``ai.outlierquant::HadamardTransform`` kernel when it is available and the option
``kernels`` is ``auto`` (or ``custom``), otherwise the Kronecker form with standard ops
(two small constant MatMuls, ``p×p`` and ``q×q``, ``d = p·q``), written with the
constant on the *left* of both MatMuls so that the quantizer never mistakes the rotation
for a linear layer and quantizes its (outlier-heavy) input.

*Outlier split before the rotation* (``outlier_ratio``; LLM.int8()'s decomposition, Dettmers
et al. 2022, in front of R4). A Hadamard spreads one huge channel over every channel of
its token, so a token that carries a massive activation stretches the *per-tensor* range
of the whole rotated tensor. With the input channels ``O`` whose calibrated ``max |x_j|``
reaches ``outlier_ratio`` × the group's median channel max taken out first::

    x W = ((x ⊙ m) H)(Hᵀ W_I) + Gather(x, O) W_O

(``m`` the 0/1 mask of the other channels, ``W_I`` = ``W`` with the rows of ``O`` zeroed,
``W_O`` = those rows): the mask is the rotation's prescale, and the thin float side path
is tagged :data:`~outlierquant.passes.base.KEEP_FLOAT_KEY` so no quantizer touches it.
On SmolLM2's down projections this takes the static per-tensor int8 output error of
the inlier part 10-20× below the unrotated one (and below per-token int8 without the
rotation).

*Gate* (``rotate_below_db``). The rotation costs run time, and per-channel activation
scales already serve an input whose outlier channels are the same from token to token.
A group is rotated only when the estimated SQNR of its output under static int8 with
the best such scales (:func:`~outlierquant.passes.smooth.estimated_static_sqnr_db`, from
the calibration statistics) is below the threshold. Measured: 23-30 dB on 28 of
SmolLM2's 30 down projections (rare spikes that move from channel to channel), 31.9-39.9
dB on MiniLM's FFN2.

**KLT / smooth-fused rotation** (MambaQuant: Xu et al. 2025, "MambaQuant: Quantizing the
Mamba Family with Variance Aligned Rotation Methods"). With the calibration covariance
``Σ = K Λ Kᵀ`` of a rotated tensor, ``x K`` has uncorrelated channels of variance ``Λ``
and ``x K H`` spreads those variances evenly over all channels (the KLT-enhanced
rotation); ``rotation: klt`` uses ``Q = K H`` for R1 (``Σ`` pooled over the stream's
normalized reader inputs). ``smooth_alpha`` applies SmoothQuant-style scales
``s = max|x|^α`` before an online rotation (``x ← (x / s) H``, ``W ← Hᵀ diag(s) W``),
folded into the inserted op's constant, so the rotation starts from equalized channels.

Every rotation pass claims equivalence and is tested for it (fp32 outputs before/after
agree to 1e-4 relative).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.errors import CalibrationError
from outlierquant.passes.analysis import (
    GraphAnalysis,
    Linear,
    LinearGroup,
    Norm,
    analyze_graph,
)
from outlierquant.passes.base import (
    OutlierPass,
    add_initializer,
    constant_array,
    first_in_graph,
    is_constant,
    set_input_constant,
    KEEP_FLOAT_KEY,
    write_linear_weight,
)

logger = logging.getLogger(__name__)

__all__ = [
    "OnlineHadamardOptions",
    "OnlineHadamardPass",
    "RotateHeadsOptions",
    "RotateHeadsPass",
    "RotateQueryKeyOptions",
    "RotateQueryKeyPass",
    "RotateResidualOptions",
    "RotateResidualPass",
    "ScoreMatMul",
    "find_score_matmuls",
    "online_rotation_nodes",
    "orthogonal_matrix",
    "outlier_profile",
    "qk_rotation_nodes",
]

#: metadata key set on every node an online rotation inserts (value: the group input name)
ONLINE_ROTATION_KEY = "outlierquant.online_rotation"
#: metadata key set on the norms whose output R1 rotated
ROTATED_NORM_KEY = "outlierquant.rotated_norm"

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_PASSTHROUGH_OPS = {"Cast", "Identity", "Reshape"}
_SHAPE_ONLY_OPS = {"Shape", "Size"}


# --------------------------------------------------------------------------------------
# Orthogonal matrices
# --------------------------------------------------------------------------------------


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random ``n × n`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def _has_hadamard(m: int) -> bool:
    from outlierquant.custom_ops.reference import _paley_hadamard, is_power_of_two

    return is_power_of_two(m) or _paley_hadamard(m) is not None


def hadamard_block(dim: int, rng: np.random.Generator | None = None) -> np.ndarray | None:
    """The ``m × m`` block of ``M ⊗ H_n`` for ``dim``: a Hadamard matrix where one exists,
    else (with ``rng``) a random orthogonal one, else the reference's default block."""
    from outlierquant.custom_ops.reference import (
        default_hadamard_block,
        hadamard_factorization,
    )

    m, _ = hadamard_factorization(dim)
    if m == 1:
        return None
    if rng is not None and not _has_hadamard(m):
        return random_orthogonal(m, rng)
    return default_hadamard_block(dim).astype(np.float64)


def orthogonal_matrix(dim: int, kind: str = "hadamard", *, seed: int = 0,
                      covariance: np.ndarray | None = None) -> np.ndarray:
    """A ``dim × dim`` orthogonal matrix (float64) of the given ``kind``.

    ``hadamard``: ``diag(±1)·(M ⊗ H_n/√n)`` with seeded random signs; ``random``: Haar;
    ``klt``: ``K · (M ⊗ H_n/√n)`` with ``K`` the eigenvectors of ``covariance``
    (descending eigenvalues); ``identity``: ``I`` (for tests).
    """
    from outlierquant.custom_ops.reference import hadamard_rotation

    rng = np.random.default_rng(seed)
    if kind == "identity":
        return np.eye(dim)
    if kind == "random":
        return random_orthogonal(dim, rng)
    hadamard = hadamard_rotation(dim, hadamard_block(dim, rng))
    if kind == "hadamard":
        signs = rng.choice([-1.0, 1.0], size=dim)
        return signs[:, None] * hadamard
    if kind == "klt":
        if covariance is None:
            raise ValueError("rotation 'klt' needs a covariance")
        eigenvalues, vectors = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
        vectors = vectors[:, np.argsort(eigenvalues)[::-1]]
        return vectors @ hadamard
    raise ValueError(f"rotation {kind!r}: allowed 'hadamard', 'random', 'klt', 'identity'")


# --------------------------------------------------------------------------------------
# Outlier profile (for the records)
# --------------------------------------------------------------------------------------


def outlier_profile(absmax: np.ndarray | None = None, mean_sq: np.ndarray | None = None) -> dict[str, float]:
    """Channel-outlier measures of one tensor from its per-channel statistics.

    ``max_median``: max / median of the per-channel abs-max (what per-tensor activation
    quantization suffers from); ``kurtosis``: Pearson kurtosis of the per-channel abs-max
    values (3 for Gaussian-like channel magnitudes, large when a few channels dominate);
    ``rms_max_median``: the same ratio for the per-channel root-mean-square.
    """
    from outlierquant.evaluate.metrics import kurtosis

    profile: dict[str, float] = {}
    if absmax is not None:
        values = np.abs(np.asarray(absmax, dtype=np.float64))
        median = float(np.median(values))
        profile["max_median"] = round(float(values.max() / median) if median > 0 else float("inf"), 3)
        profile["kurtosis"] = round(float(kurtosis(values)), 3)
    if mean_sq is not None:
        rms = np.sqrt(np.maximum(np.asarray(mean_sq, dtype=np.float64), 0.0))
        median = float(np.median(rms))
        profile["rms_max_median"] = round(float(rms.max() / median) if median > 0 else float("inf"), 3)
    return profile


def _rotated_rms(stats, rotation: np.ndarray, left_scale: np.ndarray | None = None) -> np.ndarray | None:
    """Per-channel mean square of ``x · diag(left_scale) · rotation`` from a covariance."""
    if stats is None or stats.covariance is None:
        return None
    second = stats.covariance + np.outer(stats.mean, stats.mean)
    if left_scale is not None:
        second = second * np.outer(left_scale, left_scale)
    return np.einsum("ij,ik,kj->j", rotation, second, rotation)


def _profile_entry(stats, rotation: np.ndarray | None = None, left_scale: np.ndarray | None = None) -> dict:
    if stats is None:
        return {}
    entry = {"before": outlier_profile(stats.absmax, stats.mean_sq)}
    if rotation is not None:
        rms = _rotated_rms(stats, rotation, left_scale)
        if rms is not None:
            entry["after_predicted"] = outlier_profile(None, rms)
    return entry


# --------------------------------------------------------------------------------------
# Small IR helpers
# --------------------------------------------------------------------------------------


def _bias_slot(linear: Linear) -> tuple[ir.Node, int]:
    if linear.bias_node is not None:
        return linear.bias_node, next(i for i, v in enumerate(linear.bias_node.inputs) if v is linear.bias)
    return linear.node, 2


def write_bias(graph: ir.Graph, linear: Linear, bias: np.ndarray, hint: str) -> None:
    """Set the linear's bias (adding an ``Add`` after it when it has none)."""
    if linear.bias is not None:
        node, index = _bias_slot(linear)
        old_shape = constant_array(linear.bias).shape
        set_input_constant(graph, node, index, bias.reshape(old_shape), hint)
        return
    if not np.any(bias):
        return
    output = linear.node.outputs[0]
    value = add_initializer(graph, hint, bias.astype(np.float32))
    add = ir.node("Add", inputs=[output, value], name=f"{linear.name}_rotation_bias")
    add.outputs[0].name = f"{output.name}_biased"
    add.outputs[0].type = output.type
    add.outputs[0].shape = output.shape
    for use in list(output.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, add.outputs[0])
    if output.is_graph_output():  # the Add takes over the output's place and name
        name = output.name
        output.name = f"{name}_unbiased"
        add.outputs[0].name = name
        for i, value in enumerate(graph.outputs):
            if value is output:
                graph.outputs[i] = add.outputs[0]
    graph.insert_after(linear.node, [add])


def _f64(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))


def _reshape_keeps_last_axis(node: ir.Node, width: int) -> bool:
    """Whether a Reshape keeps ``width`` channels on the last axis (unknown counts as yes)."""
    from outlierquant.passes.analysis import _evaluate_shape, _is_int

    shape = node.outputs[0].shape
    if shape is not None and len(shape) and _is_int(shape[-1]):
        return int(shape[-1]) == width
    target = _evaluate_shape(node.inputs[1], {}, {})
    if target is None or target.ndim != 1 or not len(target):
        return True  # checked by the equivalence tests; the exporters' reshapes keep it
    last = target[-1]
    return not _is_int(last) or int(last) == width


def online_rotation_nodes(model: ir.Model) -> list[ir.Node]:
    """The nodes online rotations inserted (tagged with :data:`ONLINE_ROTATION_KEY`)."""
    return [node for node in model.graph if ONLINE_ROTATION_KEY in node.metadata_props]


# --------------------------------------------------------------------------------------
# R1: the residual stream
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class ResidualStream:
    """The residual stream of a pre-norm model, found from the graph."""

    width: int
    values: set
    writers: list[Linear]
    embeddings: list[ir.Node]
    norms: list[Norm]
    readers: dict[int, list[LinearGroup]]  # id(norm) -> groups reading its output

    def summary(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "writers": len(self.writers),
            "embeddings": len(self.embeddings),
            "norms": len(self.norms),
            "norm_kinds": sorted({n.kind for n in self.norms}),
            "readers": sum(len(g.linears) for groups in self.readers.values() for g in groups),
        }


def _embedding_table(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0) != 0:
        return None
    table = constant_array(node.inputs[0])
    if table is None or table.ndim != 2 or table.dtype.kind != "f":
        return None
    return table


def _is_scalar_constant(value: ir.Value | None) -> bool:
    array = constant_array(value) if value is not None else None
    return array is not None and array.size == 1


def find_residual_stream(analysis: GraphAnalysis) -> ResidualStream | str:
    """The residual stream (writers, embeddings, norms, readers), or why there is none."""
    norms = [n for n in analysis.norms if n.kind in ("rmsnorm", "layernorm")]
    if not norms:
        return "no LayerNorm/RMSNorm found"
    others = [n for n in analysis.norms if n.kind not in ("rmsnorm", "layernorm")]
    if others:
        return f"norm {others[0].name} is a {others[0].kind} (fused skip-norms are not supported)"
    linear_by_output = {id(linear.output): linear for linear in analysis.linears}
    norm_nodes = {id(node) for norm in norms for node in norm.nodes}
    values: dict[int, ir.Value] = {}
    writers: list[Linear] = []
    embeddings: list[ir.Node] = []
    queue = [norm.input for norm in norms]
    width = None
    while queue:
        value = queue.pop()
        if id(value) in values:
            continue
        values[id(value)] = value
        linear = linear_by_output.get(id(value))
        if linear is not None:
            writers.append(linear)
            continue
        node = value.producer()
        if node is None:
            return f"graph input {value.name!r} feeds the residual stream directly"
        table = _embedding_table(node)
        if table is not None:
            embeddings.append(node)
            width = width or table.shape[1]
            continue
        op = node.op_type
        if node.domain == "" and op in _PASSTHROUGH_OPS:
            if op == "Cast" and ir.DataType(node.attributes.get_int("to", 1)) not in _FLOAT_TYPES:
                return f"residual value {value.name!r} comes from a non-float Cast {node.name}"
            queue.append(node.inputs[0])
            continue
        if node.domain == "" and op in ("Add", "Sum") and not any(is_constant(v) for v in node.inputs):
            queue.extend(v for v in node.inputs if v is not None)
            continue
        if node.domain == "" and op in ("Mul", "Div") and _is_scalar_constant(node.inputs[1]):
            queue.append(node.inputs[0])
            continue
        if node.domain == "" and op == "Mul" and _is_scalar_constant(node.inputs[0]):
            queue.append(node.inputs[1])
            continue
        return (f"residual value {value.name!r} comes from {op} {node.name}: not a linear, an embedding, "
                "or a residual sum (post-norm models have no rotatable residual stream)")
    if not writers and not embeddings:
        return "the residual stream has no writers"
    width = width or writers[0].out_features
    for writer in writers:
        if writer.out_features != width:
            return f"writer {writer.name} has {writer.out_features} outputs, the stream {width}"
        if writer.op_type == "Conv":
            return f"writer {writer.name} is a Conv"
    stream_nodes = {id(v.producer()) for v in values.values() if v.producer() is not None}
    # forward check: the stream is read only by norms, residual sums and shape reads
    for value in values.values():
        if value.is_graph_output():
            return f"residual value {value.name!r} is a graph output"
        for use in value.uses():
            node = use.node
            if id(node) in norm_nodes or node.op_type in _SHAPE_ONLY_OPS:
                continue
            if id(node) in stream_nodes:
                if node.op_type == "Reshape" and not _reshape_keeps_last_axis(node, width):
                    return f"Reshape {node.name} moves the residual channels"
                continue
            linear = next((w for w in writers if w.node is node or w.bias_node is node), None)
            if linear is not None:
                continue
            return (f"residual value {value.name!r} also feeds {node.op_type} {node.name}, "
                    "which is neither a norm nor a residual sum")
    readers: dict[int, list[LinearGroup]] = {}
    for group in analysis.groups:
        producer = group.producer
        if producer.kind == "norm" and producer.norm in norms:
            readers.setdefault(id(producer.norm), []).append(group)
    for norm in norms:
        groups = readers.get(id(norm), [])
        if not groups:
            return f"norm {norm.name} feeds no linear"
        for group in groups:
            producer = group.producer
            if not producer.foldable:
                return f"norm {norm.name}: {producer.reason}"
            if producer.channel_map is not None and not np.array_equal(
                    producer.channel_map, np.arange(len(producer.channel_map))):
                return f"norm {norm.name}: its channels are permuted on the way to {group.linears[0].name}"
            if any(node.op_type not in ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze")
                   for node in producer.path):
                return f"norm {norm.name}: the path to {group.linears[0].name} is not channel-preserving"
        if norm.axis not in (-1,) and not (norm.input.shape is not None and norm.axis == len(norm.input.shape) - 1):
            return f"norm {norm.name} normalizes axis {norm.axis}, not the last"
        if norm.gamma is not None and constant_array(norm.gamma).size != width:
            return f"norm {norm.name}: γ has {constant_array(norm.gamma).size} channels, the stream {width}"
    return ResidualStream(width, set(values), writers, embeddings, norms, readers)


def _norm_epsilon(norm: Norm) -> float:
    if norm.fused:
        attribute = norm.nodes[0].attributes.get("epsilon")
        return float(attribute.value) if attribute is not None else 1e-5
    for node in norm.nodes:
        if node.op_type == "Add":
            for value in node.inputs:
                array = constant_array(value)
                if array is not None and array.size == 1:
                    return float(array.reshape(-1)[0])
    return 1e-5


def _rms_norm_nodes(model: ir.Model, x: ir.Value, epsilon: float, name: str) -> tuple[list[ir.Node], ir.Value]:
    """``x / sqrt(mean(x², last axis) + ε)`` with standard ops."""
    graph = model.graph
    eps = add_initializer(graph, f"{name}_epsilon", np.array(epsilon, dtype=np.float32))
    nodes = []

    def op(op_type, *inputs, **attributes):
        node = ir.node(op_type, inputs=list(inputs), attributes=attributes or None, name=f"{name}/{op_type}_{len(nodes)}")
        node.outputs[0].name = f"{name}/{op_type}_{len(nodes)}_output"
        nodes.append(node)
        return node.outputs[0]

    square = op("Mul", x, x)
    if _opset(model) >= 18:
        axes = add_initializer(graph, f"{name}_axes", np.array([-1], dtype=np.int64))
        mean = op("ReduceMean", square, axes, keepdims=1)
    else:
        mean = op("ReduceMean", square, axes=[-1], keepdims=1)
    out = op("Div", x, op("Sqrt", op("Add", mean, eps)))
    out.type = x.type
    return nodes, out


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
        if self.rotation not in ("hadamard", "random", "klt"):
            raise ValueError(f"rotation={self.rotation!r}: allowed 'hadamard', 'random', 'klt'")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: must be an integer")


class RotateResidualPass(OutlierPass):
    """R1: one orthogonal ``Q`` on the residual stream, fused into embeddings and weights."""

    name = "rotate-residual"
    claims_equivalence = True
    options_type = RotateResidualOptions

    @property
    def needs_stats(self) -> bool:  # type: ignore[override]
        return self.options.rotation == "klt"

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
                gamma = _f64(constant_array(norm.gamma)).reshape(-1) if norm.gamma is not None else None
                inverse_gamma = None if gamma is None else np.where(gamma != 0, 1.0 / gamma, 0.0)
                entry = _profile_entry(st, q, inverse_gamma)
                if entry:
                    profiles[group.input.name] = entry

        # 1. writers: W ← W C Q, b ← b C Q
        for writer in stream.writers:
            weight = _f64(writer.weight_array()) @ writer_map
            write_linear_weight(graph, writer, weight, f"{writer.name}_weight_rotated")
            if writer.bias is not None:
                bias = _f64(writer.bias_array()).reshape(-1) @ writer_map
                write_bias(graph, writer, bias, f"{writer.name}_bias_rotated")
        for node in stream.embeddings:
            table = _f64(_embedding_table(node)) @ writer_map
            set_input_constant(graph, node, 0, table, f"{node.inputs[0].name}_rotated")

        # 2. readers: W ← Qᵀ diag(γ) W, b ← b + β W; then the norms lose γ/β
        for norm in stream.norms:
            gamma = _f64(constant_array(norm.gamma)).reshape(-1) if norm.gamma is not None else np.ones(width)
            beta = _f64(constant_array(norm.beta)).reshape(-1) if norm.beta is not None else None
            for group in stream.readers[id(norm)]:
                for linear in group.linears:
                    weight = _f64(linear.weight_array())
                    if beta is not None and np.any(beta):
                        bias = beta @ weight
                        if linear.bias is not None:
                            bias = bias + _f64(linear.bias_array()).reshape(-1)
                        write_bias(graph, linear, bias, f"{linear.name}_bias_folded")
                    write_linear_weight(graph, linear, q.T @ (gamma[:, None] * weight), f"{linear.name}_weight_rotated")
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
            gamma = _f64(constant_array(norm.gamma)).reshape(-1) if norm.gamma is not None else np.ones(stream.width)
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
            nodes, out = _rms_norm_nodes(model, norm.input, _norm_epsilon(norm), f"{norm.name}_rms")
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


# --------------------------------------------------------------------------------------
# R2: per-head rotation of V → O
# --------------------------------------------------------------------------------------


def group_head_dim(group: LinearGroup, ranks: dict) -> int | None:
    """The head size of a V → O path: the last axis of the first head-splitting Reshape."""
    from outlierquant.passes.analysis import _evaluate_shape, _is_int

    producer = group.producer
    width = producer.linear.out_features
    for node in producer.path:
        if node.op_type != "Reshape":
            continue
        shape = node.outputs[0].shape
        if shape is not None and len(shape) and _is_int(shape[-1]):
            last = int(shape[-1])
        else:
            target = _evaluate_shape(node.inputs[1], {}, ranks)
            if target is None or target.ndim != 1 or not len(target) or not _is_int(target[-1]):
                continue
            last = int(target[-1])
        if 1 < last < width and width % last == 0:
            return last
    return None


@dataclasses.dataclass(frozen=True)
class RotateHeadsOptions:
    """Options of :class:`RotateHeadsPass`: ``seed`` for the random signs (0: plain Hadamard)."""

    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: must be an integer")


class RotateHeadsPass(OutlierPass):
    """R2: a Hadamard inside every attention head, folded into V's columns and O's rows."""

    name = "rotate-heads"
    claims_equivalence = True
    options_type = RotateHeadsOptions

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        from outlierquant.custom_ops.reference import hadamard_rotation
        from outlierquant.passes.analysis import _propagate_ranks

        analysis = analyze_graph(model)
        graph = model.graph
        ranks = _propagate_ranks(graph, list(graph))
        rotated, skipped = [], []
        for group in analysis.groups:
            producer = group.producer
            if producer.relation != "v_to_o":
                continue
            label = group.linears[0].name
            if not producer.foldable:
                skipped.append({"group": label, "skipped": producer.reason})
                continue
            head_dim = group_head_dim(group, ranks)
            if head_dim is None:
                skipped.append({"group": label, "skipped": "head size not found on the V → O path"})
                continue
            v = producer.linear
            channel_map = producer.channel_map
            if channel_map is None:
                channel_map = np.arange(group.in_features)
            if np.any(channel_map % head_dim != np.arange(len(channel_map)) % head_dim):
                skipped.append({"group": label, "skipped": "V → O channel map does not keep head offsets"})
                continue
            rng = np.random.default_rng(self.options.seed) if self.options.seed else None
            h = hadamard_rotation(head_dim, hadamard_block(head_dim, rng))
            if rng is not None:
                h = rng.choice([-1.0, 1.0], size=head_dim)[:, None] * h
            v_heads = v.out_features // head_dim
            v_rotation = np.kron(np.eye(v_heads), h)
            write_linear_weight(graph, v, _f64(v.weight_array()) @ v_rotation, f"{v.name}_weight_rotated")
            if v.bias is not None:
                write_bias(graph, v, _f64(v.bias_array()).reshape(-1) @ v_rotation, f"{v.name}_bias_rotated")
            # O's row j carries V channel channel_map[j]: block by head of O's input
            o_rotation = np.kron(np.eye(group.in_features // head_dim), h)
            for linear in group.linears:
                write_linear_weight(graph, linear, o_rotation.T @ _f64(linear.weight_array()),
                              f"{linear.name}_weight_rotated")
            rotated.append({"group": label, "v": v.name, "head_dim": head_dim,
                            **_profile_entry(self.stats.get(group.input.name) if self.stats else None)})
        record = {"rotated": rotated, "skipped": skipped, "inserted_ops": 0}
        logger.info("rotate-heads: %d V → O pairs rotated, %d skipped", len(rotated), len(skipped))
        return bool(rotated), record


# --------------------------------------------------------------------------------------
# R4: online Hadamard
# --------------------------------------------------------------------------------------


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
    nodes: list[ir.Node] = []

    def op(op_type, *inputs, **attributes):
        node = ir.node(op_type, inputs=list(inputs), attributes=attributes or None,
                       name=f"{name}/{op_type}_{len(nodes)}", metadata_props={metadata_key: x.name or ""})
        node.outputs[0].name = f"{name}/{op_type}_{len(nodes)}_output"
        nodes.append(node)
        return node.outputs[0]

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
    from outlierquant.custom_ops.reference import sylvester_hadamard
    from outlierquant.custom_ops.standard_forms import kronecker_split

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


@dataclasses.dataclass(frozen=True)
class OnlineHadamardOptions:
    """Options of :class:`OnlineHadamardPass`.

    ``groups``: ``unfoldable`` — every linear group a rotation cannot fold into its
    producer (after an activation, ``act(gate) ⊙ up``, post-norm norms); ``all`` — also
    the groups behind a foldable norm (for models where R1 is not applied);
    ``activation`` — only the groups behind a nonlinearity (the FFN down projection),
    not those behind a post-norm LayerNorm.
    ``kernels``: ``auto`` (the custom kernel when available, else standard ops),
    ``standard`` or ``custom`` (error when unavailable).
    ``smooth_alpha``: smooth-fused rotation (MambaQuant): ``x ← (x / s) H`` with
    ``s = max|x|^α`` (needs statistics); ``None`` for a plain Hadamard.
    ``min_features``: groups narrower than this are left alone.
    ``outlier_ratio``: take the input channels whose calibrated max |x_j| reaches this
    multiple of the group's median channel max out of the rotation, into a float side
    path (needs statistics); ``None``: rotate every channel.
    ``rotate_below_db``: rotate a group only when the estimated SQNR of its static int8
    output with the best per-channel activation scales
    (:func:`~outlierquant.passes.smooth.estimated_static_sqnr_db`, from calibration
    statistics) is below this many dB; the others are left to the quantizer as they are
    (needs statistics). ``None``: rotate every candidate.
    """

    groups: Literal["unfoldable", "all", "activation"] = "unfoldable"
    kernels: Literal["auto", "standard", "custom"] = "auto"
    smooth_alpha: float | None = None
    min_features: int = 2
    outlier_ratio: float | None = None
    rotate_below_db: float | None = None

    def __post_init__(self) -> None:
        if self.groups not in ("unfoldable", "all", "activation"):
            raise ValueError(f"groups={self.groups!r}: allowed 'unfoldable', 'all', 'activation'")
        if self.outlier_ratio is not None and not (
                isinstance(self.outlier_ratio, (int, float)) and self.outlier_ratio > 1.0):
            raise ValueError(f"outlier_ratio={self.outlier_ratio!r}: a number > 1 or null")
        if self.rotate_below_db is not None and not (
                isinstance(self.rotate_below_db, (int, float)) and not isinstance(self.rotate_below_db, bool)
                and np.isfinite(self.rotate_below_db)):
            raise ValueError(f"rotate_below_db={self.rotate_below_db!r}: a number of dB or null")
        if self.kernels not in ("auto", "standard", "custom"):
            raise ValueError(f"kernels={self.kernels!r}: allowed 'auto', 'standard', 'custom'")
        if self.smooth_alpha is not None and not (
                isinstance(self.smooth_alpha, (int, float)) and 0.0 <= self.smooth_alpha <= 1.0):
            raise ValueError(f"smooth_alpha={self.smooth_alpha!r}: a number in [0, 1] or null")


def _finite(value: float) -> float | None:
    """``value`` rounded for the report (JSON has no infinities: ``None`` for those)."""
    return round(value, 2) if np.isfinite(value) else None


def _online_candidate(group: LinearGroup, mode: str) -> bool:
    """Whether ``group`` gets an online rotation: never V → O (R2 folds it); groups behind
    a foldable norm only in mode ``all`` (R1 rotates them when it applies)."""
    producer = group.producer
    if producer.relation == "v_to_o":
        return False
    if producer.norm is not None and any(ROTATED_NORM_KEY in node.metadata_props for node in producer.norm.nodes):
        return False
    if producer.relation in ("none", "up_to_down"):
        return True
    if mode == "activation":
        return False
    return not producer.foldable or (mode == "all" and producer.relation == "norm")


class OnlineHadamardPass(OutlierPass):
    """R4: insert ``x ← x H`` before linears with no foldable producer; fold ``Hᵀ`` into them."""

    name = "online-hadamard"
    claims_equivalence = True
    options_type = OnlineHadamardOptions

    @property
    def needs_stats(self) -> bool:  # type: ignore[override]
        return (self.options.smooth_alpha is not None or self.options.outlier_ratio is not None
                or self.options.rotate_below_db is not None)

    def use_kernel(self) -> bool:
        from outlierquant import custom_ops

        if self.options.kernels == "standard":
            return False
        if custom_ops.available():
            return True
        if self.options.kernels == "custom":
            raise custom_ops.KernelsUnavailableError(custom_ops.unavailable_reason())
        custom_ops.warn_once_unavailable()
        return False

    def calibration_targets(self, model: ir.Model) -> list:
        analysis = analyze_graph(model)
        return [g.input.name for g in analysis.groups if _online_candidate(g, self.options.groups)]

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        analysis = analyze_graph(model)
        kernel = self.use_kernel()
        rotated, skipped = [], []
        for index, group in enumerate(analysis.groups):
            if not _online_candidate(group, self.options.groups):
                continue
            label = group.linears[0].name
            dim = group.in_features
            if dim < self.options.min_features:
                skipped.append({"group": label, "skipped": f"{dim} input features < min_features"})
                continue
            if any(linear.op_type == "Conv" for linear in group.linears):
                skipped.append({"group": label, "skipped": "Conv layers are not rotated"})
                continue
            if group.input.dtype not in (None, ir.DataType.FLOAT):
                skipped.append({"group": label, "skipped": f"input dtype {group.input.dtype} is not float32"})
                continue
            stats = self.stats.get(group.input.name) if self.stats is not None else None
            if stats is None and self.needs_stats:
                skipped.append({"group": label, "skipped": "no calibration statistics for its input"})
                continue
            sqnr = None
            if self.options.rotate_below_db is not None:
                from outlierquant.passes.smooth import estimated_static_sqnr_db

                sqnr = estimated_static_sqnr_db(stats, [_f64(linear.weight_array()) for linear in group.linears])
                if sqnr == float("-inf"):
                    skipped.append({"group": label, "skipped": "its input is zero on the calibration data"})
                    continue
                if sqnr >= self.options.rotate_below_db:
                    skipped.append({"group": label, "static_sqnr_db": _finite(sqnr),
                                    "skipped": f"estimated static int8 SQNR {sqnr:.1f} dB >= rotate_below_db "
                                               f"{self.options.rotate_below_db:g}: not rotated"})
                    continue
            smooth = None
            if self.options.smooth_alpha is not None:
                absmax = np.maximum(_f64(stats.absmax), 1e-5)
                smooth = absmax ** float(self.options.smooth_alpha)
                smooth = smooth / np.exp(np.mean(np.log(smooth)))  # geometric mean 1
            outliers = np.zeros(0, np.int64)
            if self.options.outlier_ratio is not None:
                from outlierquant.passes.split import LlmInt8Options, select_outlier_channels

                criterion = LlmInt8Options(criterion="relative", ratio=float(self.options.outlier_ratio))
                outliers = select_outlier_channels(stats.absmax, stats.maximum - stats.minimum, criterion)
            self._insert(model, group, dim, kernel, smooth, f"online_hadamard_{index}", outliers)
            from outlierquant.custom_ops.reference import hadamard_rotation

            block = hadamard_block(dim)
            entry = {"group": label, "features": dim, "relation": group.producer.relation,
                     "linears": [linear.name for linear in group.linears],
                     "block": 1 if block is None else int(block.shape[0])}
            if self.options.outlier_ratio is not None:
                entry["float_channels"] = int(outliers.size)
            if sqnr is not None:
                entry["static_sqnr_db"] = _finite(sqnr)
            if stats is not None:
                prescale = None if smooth is None else 1.0 / smooth
                if outliers.size:
                    from outlierquant.passes.split import without_channels

                    stats = without_channels(stats, outliers)
                entry.update(_profile_entry(stats, hadamard_rotation(dim, block), prescale))
            rotated.append(entry)
        record = {
            "form": "custom_kernel" if kernel else "standard_ops",
            "rotated": rotated,
            "skipped": skipped,
            "inserted_ops": len(rotated),
            "smooth_alpha": self.options.smooth_alpha,
        }
        logger.info("online-hadamard: %d online rotations inserted (%s), %d skipped", len(rotated),
                    record["form"], len(skipped))
        return bool(rotated), record

    @staticmethod
    def _insert(model: ir.Model, group: LinearGroup, dim: int, kernel: bool, smooth: np.ndarray | None,
                name: str, outliers: np.ndarray | None = None) -> None:
        from outlierquant.custom_ops.reference import hadamard_rotation

        graph = model.graph
        block = hadamard_block(dim)
        rotation = hadamard_rotation(dim, block)
        prescale = None if smooth is None else 1.0 / smooth
        split = outliers is not None and outliers.size > 0
        if split:  # the outlier channels leave through the side path: the rotation sees zeros
            keep = np.ones(dim) if prescale is None else prescale.copy()
            keep[outliers] = 0.0
            prescale = keep
        if kernel:
            nodes, out = hadamard_kernel_node(model, group.input, block, name, prescale)
        else:
            nodes, out = hadamard_left_form(model, group.input, dim, block, name, prescale)
        first = first_in_graph(graph, [linear.node for linear in group.linears])
        graph.insert_before(first, nodes)
        gathered = None
        if split:
            gather = ir.node("Gather", inputs=[group.input, add_initializer(graph, f"{name}_outlier_channels",
                                                                            outliers.astype(np.int64))],
                             attributes={"axis": -1}, name=f"{name}/Gather",
                             metadata_props={KEEP_FLOAT_KEY: "outlier side path"})
            gather.outputs[0].name = f"{name}/Gather_output"
            graph.insert_before(first, [gather])
            gathered = gather.outputs[0]
        for linear in group.linears:
            weight = _f64(linear.weight_array())
            side = weight[outliers] if split else None
            if split:
                weight = weight.copy()
                weight[outliers] = 0.0
            if smooth is not None:
                weight = smooth[:, None] * weight
            write_linear_weight(graph, linear, rotation.T @ weight, f"{linear.name}_weight_rotated")
            for slot, value in enumerate(linear.node.inputs):
                if value is group.input:
                    linear.node.replace_input_with(slot, out)
            if split:
                _add_float_side_path(model, gathered, linear, side, name)


def _add_float_side_path(model: ir.Model, gathered: ir.Value, linear: Linear, weight: np.ndarray, name: str) -> None:
    """``linear.output += gathered @ weight``, its nodes tagged to stay in float."""
    from outlierquant.passes.split import replace_value

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


# --------------------------------------------------------------------------------------
# R3: queries and keys after RoPE
# --------------------------------------------------------------------------------------

#: metadata key set on the nodes :class:`RotateQueryKeyPass` inserts (value: ``query`` or ``key``)
QK_ROTATION_KEY = "outlierquant.qk_rotation"

#: ops between the score MatMul and its Softmax (mask, scale, soft-capping, casts)
_SCORE_TO_SOFTMAX_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Tanh", "Max", "Min", "Clip"}
#: ops that keep the last axis of their first input (for finding the head size)
_LAST_AXIS_KEEPING_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Cast", "Identity", "Where", "Expand", "Unsqueeze",
                          "Squeeze"}


@dataclasses.dataclass
class ScoreMatMul:
    """An attention score MatMul ``scores = Q @ Kᵀ`` found from the graph.

    ``key_transpose`` is the Transpose that makes ``Kᵀ`` (its input's last axis is the
    head size, the contraction axis of the MatMul); ``reason`` says why it is not rotated.
    """

    node: ir.Node
    key_transpose: ir.Node | None = None
    head_dim: int | None = None
    reason: str | None = None

    @property
    def query(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def key(self) -> ir.Value | None:
        return None if self.key_transpose is None else self.key_transpose.inputs[0]


def _reaches_softmax(value: ir.Value, depth: int = 6) -> bool:
    """Whether ``value`` flows into a last-axis Softmax through mask/scale/cast ops only."""
    for use in value.uses():
        node = use.node
        if node.domain != "":
            continue
        if node.op_type == "Softmax":
            axis = node.attributes.get_int("axis", -1)
            if axis == -1 or (value.shape is not None and axis == len(value.shape) - 1):
                return True
            continue
        if depth > 0 and node.op_type in _SCORE_TO_SOFTMAX_OPS and _reaches_softmax(node.outputs[0], depth - 1):
            return True
    return False


def _key_transpose(value: ir.Value, ranks: dict) -> tuple[ir.Node | None, str | None]:
    """The Transpose producing ``Kᵀ`` behind scalar scales and casts, or why there is none.

    A scale may be any tensor of rank 0 or 1 (BERT exports compute ``1/√√d`` from the
    shape at run time): broadcast against ``Kᵀ [..., d, S]`` it varies along ``S`` at
    most, so it commutes with a rotation of the ``d`` axis. Every value from the
    Transpose to the MatMul must have that one use, so that rotating the Transpose's input
    changes nothing but this score MatMul.
    """

    def scalar(v: ir.Value | None) -> bool:
        return v is not None and (_is_scalar_constant(v) or ranks.get(v) in (0, 1))

    current = value
    for _ in range(8):
        node = current.producer()
        if node is None or node.domain != "":
            return None, f"the key operand {value.name!r} is not produced by a Transpose"
        if len(current.uses()) != 1 or current.is_graph_output():
            return None, f"the key operand path {current.name!r} is also read elsewhere"
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            if perm is None or len(perm) < 2 or perm[-2] != len(perm) - 1:
                return None, f"Transpose {node.name} does not move the key's last axis to the contraction axis"
            return node, None
        if node.op_type in ("Cast", "Identity"):
            current = node.inputs[0]
            continue
        if node.op_type in ("Mul", "Div") and scalar(node.inputs[1]):
            current = node.inputs[0]
            continue
        if node.op_type == "Mul" and scalar(node.inputs[0]):
            current = node.inputs[1]
            continue
        return None, f"the key operand comes from {node.op_type} {node.name}, not a transposed key"
    return None, f"no Transpose within 8 ops of the key operand {value.name!r}"


def _last_axis_size(value: ir.Value, ranks: dict, depth: int = 12) -> int | None:
    """The static size of ``value``'s last axis: from its shape, else from the head-splitting
    Reshape found upstream through ops that keep the last axis."""
    from outlierquant.passes.analysis import _evaluate_shape, _is_int

    seen: set[int] = set()
    frontier = [value]
    for _ in range(depth):
        following = []
        for current in frontier:
            if current is None or id(current) in seen or is_constant(current):
                continue
            seen.add(id(current))
            if current.shape is not None and len(current.shape) and _is_int(current.shape[-1]):
                return int(current.shape[-1])
            node = current.producer()
            if node is None or node.domain != "":
                continue
            op = node.op_type
            if op == "Reshape":
                target = _evaluate_shape(node.inputs[1], {}, ranks)
                if target is not None and target.ndim == 1 and len(target) and _is_int(target[-1]) \
                        and int(target[-1]) > 0:
                    return int(target[-1])
            elif op == "Transpose":
                perm = node.attributes.get_ints("perm", None)
                if perm is not None and perm[-1] == len(perm) - 1:
                    following.append(node.inputs[0])
            elif op == "Where":
                following.extend(node.inputs[1:])
            elif op in ("Expand", "Unsqueeze", "Squeeze"):
                following.append(node.inputs[0])
            elif op in _LAST_AXIS_KEEPING_OPS:
                following.extend(node.inputs)
        frontier = following
    return None


def find_score_matmuls(model: ir.Model) -> list[ScoreMatMul]:
    """Every attention score MatMul: both operands activations and the output flowing into
    a Softmax over the last axis; with the key's Transpose and the head size, or a reason."""
    from outlierquant.passes.analysis import _propagate_ranks

    ranks = _propagate_ranks(model.graph, list(model.graph))
    found = []
    for node in model.graph:
        if node.domain != "" or node.op_type != "MatMul" or len(node.inputs) != 2:
            continue
        if any(v is None or is_constant(v) for v in node.inputs) or not _reaches_softmax(node.outputs[0]):
            continue
        match = ScoreMatMul(node)
        found.append(match)
        match.key_transpose, match.reason = _key_transpose(node.inputs[1], ranks)
        if match.reason is not None:
            continue
        producer = match.query.producer()
        if producer is not None and QK_ROTATION_KEY in producer.metadata_props:
            match.reason = "already rotated by rotate-qk"
            continue
        query_dim, key_dim = _last_axis_size(match.query, ranks), _last_axis_size(match.key, ranks)
        if query_dim is None and key_dim is None:
            match.reason = "head size not found on the query or key path"
        elif query_dim is not None and key_dim is not None and query_dim != key_dim:
            match.reason = f"query head size {query_dim} differs from the key's {key_dim}"
        else:
            match.head_dim = query_dim if query_dim is not None else key_dim
    return found


def _dense_left_form(model: ir.Model, x: ir.Value, rotation: np.ndarray, name: str) -> tuple[list[ir.Node], ir.Value]:
    """``x @ R`` on the last axis of a tensor of any rank as ``(Rᵀ (x_2d)ᵀ)ᵀ``: the constant
    is the left operand, so no quantizer reads it as a linear layer's weight."""
    graph = model.graph
    dim = rotation.shape[0]
    nodes: list[ir.Node] = []

    def op(op_type, *inputs, **attributes):
        node = ir.node(op_type, inputs=list(inputs), attributes=attributes or None,
                       name=f"{name}/{op_type}_{len(nodes)}", metadata_props={ONLINE_ROTATION_KEY: x.name or ""})
        node.outputs[0].name = f"{name}/{op_type}_{len(nodes)}_output"
        nodes.append(node)
        return node.outputs[0]

    shape = op("Shape", x)
    rows = op("Reshape", x, add_initializer(graph, f"{name}_rows", np.array([-1, dim], dtype=np.int64)))
    columns = op("Transpose", rows, perm=[1, 0])
    rotated = op("MatMul", add_initializer(graph, f"{name}_matrix", rotation.T.astype(np.float32)), columns)
    out = op("Reshape", op("Transpose", rotated, perm=[1, 0]), shape)
    out.type = x.type
    out.shape = x.shape
    return nodes, out


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
        if self.rotation not in ("hadamard", "random"):
            raise ValueError(f"rotation={self.rotation!r}: allowed 'hadamard', 'random'")
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

    @property
    def needs_stats(self) -> bool:  # type: ignore[override]
        return self.options.profile

    def use_kernel(self) -> bool:
        if self.options.rotation != "hadamard":
            return False
        return OnlineHadamardPass(kernels=self.options.kernels).use_kernel()

    def calibration_targets(self, model: ir.Model) -> list:
        return [name for match in find_score_matmuls(model) if match.head_dim is not None
                for name in (match.query.name, match.key.name)]

    def covariance_targets(self, model: ir.Model) -> list[str]:
        return self.calibration_targets(model)

    def _rotation(self, dim: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(R, block, signs)`` with ``x ← x R``; ``R = diag(signs) (M ⊗ H_n/√n)`` for Hadamard."""
        from outlierquant.custom_ops.reference import hadamard_rotation

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
            nodes, out = _dense_left_form(model, x, rotation, name)
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


def qk_rotation_nodes(model: ir.Model, side: str | None = None) -> list[ir.Node]:
    """The nodes :class:`RotateQueryKeyPass` inserted (``side``: ``query``, ``key`` or both)."""
    return [node for node in model.graph if QK_ROTATION_KEY in node.metadata_props
            and (side is None or node.metadata_props[QK_ROTATION_KEY] == side)]


# --------------------------------------------------------------------------------------
# Simulated low-bit quantization (W4 / A4) for the rotation recipes
# --------------------------------------------------------------------------------------
# onnxruntime has no int4-activation kernels, and this repository's weight-only int4
# module (passes/weight_only.py) did not exist when the rotation recipes were written:
# this pass fake-quantizes in float (round-to-nearest, or QuantEase rounding with
# ``weight_rounding: quantease``; stored dequantized) and says so.


def fake_quantize_weight(weight: np.ndarray, bits: int, group_size: int = 0, *,
                         clip_ratios: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """Symmetric round-to-nearest of a ``[K, N]`` weight, per output channel or per group of
    ``group_size`` input rows; returns the dequantized float weight.

    Each scale is ``r · max|W_group| / qmax`` with ``r`` the entry of ``clip_ratios`` that
    minimises that group's squared rounding error (``(1.0,)``: plain abs-max RTN).
    """
    qmax = 2 ** (bits - 1) - 1
    w = _f64(weight)
    k, n = w.shape
    g = group_size if group_size and group_size < k else k
    pad = (-k) % g
    padded = np.concatenate([w, np.zeros((pad, n))]) if pad else w
    blocks = padded.reshape(-1, g, n)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    best = None
    best_error = None
    for ratio in clip_ratios:
        scale = np.where(absmax > 0, absmax * ratio / qmax, 1.0)
        candidate = np.clip(np.rint(blocks / scale), -qmax - 1, qmax) * scale
        error = ((candidate - blocks) ** 2).sum(axis=1, keepdims=True)
        if best is None:
            best, best_error = candidate, error
        else:
            better = error < best_error
            best = np.where(better, candidate, best)
            best_error = np.minimum(error, best_error)
    return best.reshape(-1, n)[:k]


@dataclasses.dataclass(frozen=True)
class SimulateQuantizationOptions:
    """Options of :class:`SimulateQuantizationPass` (every number it produces is simulated).

    ``weight_bits`` / ``weight_group_size`` (0: per output channel): symmetric RTN weights,
    with the clipping ratio searched per group when ``weight_clip_search``.
    ``activation_bits`` (``None``: float activations) with ``activations``: ``per_token``
    (symmetric, scale ``clip · max|x_t| / qmax`` per row at run time) or ``static``
    (asymmetric per tensor from the calibrated range). ``skip_output_layers``: leave
    linears whose output is a graph output (the lm_head) in float, as QuaRot does.
    """

    weight_bits: int = 4
    weight_group_size: int = 0
    #: search the weight clipping ratio per group in [0.5, 1] (minimum squared error)
    weight_clip_search: bool = True
    activation_bits: int | None = 8
    activations: Literal["per_token", "static"] = "per_token"
    activation_clip: float = 1.0
    skip_output_layers: bool = True
    #: ``rtn``: symmetric round-to-nearest (above). ``quantease``: asymmetric group grid and
    #: QuantEase coordinate-descent rounding against Σ = E[xxᵀ] of each linear's calibrated
    #: input (``passes/weight_rounding.py``'s functions; needs calibration covariances)
    weight_rounding: Literal["rtn", "quantease"] = "rtn"
    #: QuantEase sweeps (``weight_rounding: quantease``)
    quantease_iterations: int = 4
    #: relative diagonal added to Σ (``weight_rounding: quantease``)
    quantease_damp: float = 0.01

    def __post_init__(self) -> None:
        if self.weight_rounding not in ("rtn", "quantease"):
            raise ValueError(f"weight_rounding={self.weight_rounding!r}: allowed 'rtn', 'quantease'")
        if self.weight_rounding == "quantease" and not self.weight_group_size:
            raise ValueError("weight_rounding='quantease' needs weight_group_size > 0 (groups of input rows)")
        if not isinstance(self.quantease_iterations, int) or self.quantease_iterations < 1:
            raise ValueError(f"quantease_iterations={self.quantease_iterations!r}: an integer >= 1")
        if not float(self.quantease_damp) >= 0.0:
            raise ValueError(f"quantease_damp={self.quantease_damp!r}: must be >= 0")
        if self.weight_bits not in (2, 3, 4, 5, 6, 7, 8):
            raise ValueError(f"weight_bits={self.weight_bits!r}: allowed 2..8")
        if not isinstance(self.weight_group_size, int) or self.weight_group_size < 0:
            raise ValueError(f"weight_group_size={self.weight_group_size!r}: a non-negative integer")
        if self.activation_bits is not None and self.activation_bits not in (4, 6, 8):
            raise ValueError(f"activation_bits={self.activation_bits!r}: allowed 4, 6, 8 or null")
        if self.activations not in ("per_token", "static"):
            raise ValueError(f"activations={self.activations!r}: allowed 'per_token', 'static'")
        if not 0.0 < float(self.activation_clip) <= 1.0:
            raise ValueError(f"activation_clip={self.activation_clip!r}: in (0, 1]")


class SimulateQuantizationPass(OutlierPass):
    """Fake-quantize linear weights (and activations) to low bit widths, in float (simulated)."""

    name = "simulate-quant"
    options_type = SimulateQuantizationOptions

    @property
    def needs_stats(self) -> bool:  # type: ignore[override]
        if self.options.weight_rounding == "quantease":
            return True
        return self.options.activation_bits is not None and self.options.activations == "static"

    def covariance_targets(self, model: ir.Model) -> list[str]:
        """Inputs whose covariance QuantEase rounding reads (none for round-to-nearest)."""
        if self.options.weight_rounding != "quantease":
            return []
        return self.calibration_targets(model)

    def _quantease_weight(self, linear: Linear) -> tuple[np.ndarray, float]:
        """QuantEase-rounded dequantized weight and its relative output error tr(ΔᵀΣΔ)/tr(WᵀΣW)."""
        from outlierquant.passes.weight_rounding import (
            DEFAULT_CLIP_RATIOS,
            _dequantize,
            group_grid,
            output_error,
            quantease_round,
            second_moment,
        )

        options = self.options
        stats = self.require_stats()[linear.input.name]
        if stats.covariance is None:
            raise CalibrationError(
                f"simulate-quant: weight_rounding=quantease needs the covariance of {linear.input.name!r}; collect "
                "statistics with covariance_for=pass.covariance_targets(model) (the pipeline does)")
        weight = _f64(linear.weight_array())
        sigma, _ = second_moment(stats, options.quantease_damp)
        ratios = DEFAULT_CLIP_RATIOS if options.weight_clip_search else (1.0,)
        grid = group_grid(weight, "per_oc", options.weight_group_size, options.weight_bits,
                          row_weight=np.diag(sigma), clip_ratios=ratios)
        q = quantease_round(weight, sigma, grid, iterations=options.quantease_iterations)
        dequantized = _dequantize(q, grid)
        signal = float(np.einsum("kn,kn->", weight, sigma @ weight)) or 1.0
        return dequantized, output_error(dequantized - weight, sigma) / signal

    def _layers(self, model: ir.Model) -> list[Linear]:
        analysis = analyze_graph(model)
        layers = []
        for linear in analysis.linears:
            if linear.op_type == "Conv":
                continue
            if self.options.skip_output_layers and linear.output.is_graph_output():
                continue
            if constant_array(linear.weight).dtype != np.float32:
                continue
            layers.append(linear)
        return layers

    def calibration_targets(self, model: ir.Model) -> list:
        return sorted({linear.input.name for linear in self._layers(model)})

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        options = self.options
        graph = model.graph
        layers = self._layers(model)
        shared: dict[str, ir.Value] = {}
        errors: dict[str, float] = {}
        for linear in layers:
            if options.weight_rounding == "quantease":
                weight, errors[linear.name] = self._quantease_weight(linear)
            else:
                ratios = tuple(np.linspace(1.0, 0.5, 11)) if options.weight_clip_search else (1.0,)
                weight = fake_quantize_weight(linear.weight_array(), options.weight_bits,
                                              options.weight_group_size, clip_ratios=ratios)
            write_linear_weight(graph, linear, weight, f"{linear.name}_weight_fake_quantized")
            if options.activation_bits is None:
                continue
            source = linear.input
            if source.name not in shared:
                shared[source.name] = self._activation(model, source, linear.node)
            linear.node.replace_input_with(0, shared[source.name])
        record = {
            "simulated": True,
            "config": dataclasses.asdict(options),
            "fake_quantized_weights": len(layers),
            "fake_quantized_activations": len(shared),
            "float_layers": [l.name for l in analyze_graph(model).linears if l.output.is_graph_output()]
            if options.skip_output_layers else [],
        }
        if errors:
            record["relative_output_error"] = errors
        logger.info("simulate-quant: W%d (group %d) A%s %s on %d linears (simulated)", options.weight_bits,
                    options.weight_group_size, options.activation_bits, options.activations, len(layers))
        return bool(layers), record

    def _activation(self, model: ir.Model, x: ir.Value, anchor: ir.Node) -> ir.Value:
        graph = model.graph
        bits = int(self.options.activation_bits)
        base = f"{x.name}_a{bits}"
        nodes: list[ir.Node] = []

        def const(tag, array):
            return add_initializer(graph, f"{base}_{tag}", np.asarray(array, dtype=np.float32))

        def op(op_type, *inputs, **attributes):
            node = ir.node(op_type, inputs=list(inputs), attributes=attributes or None, name=f"{base}/{op_type}_{len(nodes)}")
            node.outputs[0].name = f"{base}/{op_type}_{len(nodes)}_output"
            nodes.append(node)
            return node.outputs[0]

        if self.options.activations == "per_token":
            qmax = 2 ** (bits - 1) - 1
            if _opset(model) >= 18:
                absmax = op("ReduceMax", op("Abs", x), add_initializer(graph, f"{base}_axes", np.array([-1], np.int64)),
                             keepdims=1)
            else:
                absmax = op("ReduceMax", op("Abs", x), axes=[-1], keepdims=1)
            scale = op("Div", op("Max", absmax, const("eps", 1e-8)), const("qmax_over_clip", qmax / self.options.activation_clip))
            levels = op("Clip", op("Round", op("Div", x, scale)), const("qmin", -qmax - 1), const("qmax", qmax))
            out = op("Mul", levels, scale)
        else:
            stats = self.require_stats()[x.name]
            low, high = min(stats.tensor_min, 0.0), max(stats.tensor_max, 0.0)
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
