"""OliVe outlier-victim pair (OVP) quantization, simulated in the graph.

Guo et al., ISCA 2023, "OliVe: Accelerating Large Language Models via Hardware-friendly
Outlier-Victim Pair Quantization". The observation: outliers matter, the ordinary values
next to them do not. Values are grouped in adjacent pairs along the reduction axis ``K``
of each linear (``x[..., 2i], x[..., 2i+1]`` and ``W[2i, n], W[2i+1, n]``), so a pair is
one aligned ``2b``-bit word in memory and in the GEMM's inner loop.

**Formats** (``b`` = 4 or 8 bits, ``B = b − 1`` value bits, scale ``s``, ``u = x / s``):

- *normal*: signed int, levels ``{−q, …, q}`` with ``q = 2^B − 1``; the unused code
  ``−2^B`` (``1000`` for int4) marks the victim slot;
- *outlier* ("abfloat", adaptive-bias float): sign, 2 exponent bits, ``m = B − 2`` mantissa
  bits, exponent bias ``B``: magnitudes ``2^e · (1 + j / 2^m)`` for ``e ∈ [B, B + 3]``,
  ``j ∈ [0, 2^m)``, leaving out ``2^B`` itself. The bias puts the whole float range just
  above the int range. In units of the int step: int4 outliers are ``{12, 16, 24, 32, 48,
  64, 96}`` beside normals ``0..7``; int8 outliers run from ``132`` to ``2016`` beside
  ``0..127`` (the grids of the paper's released code, ``olive_quantization/antquant``).

**Encoding** of a pair ``(u₁, u₂)``: each value is first rounded to the nearest level of
``normal ∪ ±outlier``; a value that lands on an outlier level (``|u| > (q + a_min)/2``,
the midpoint between the largest int and the smallest abfloat) is an outlier. A pair with
no outlier keeps its two ints. A pair with one outlier stores it as abfloat in its slot
and the victim marker in the other slot: the neighbour (the *victim*) becomes ``0``. When
both are outliers the larger magnitude is kept (ties: the first), the other is pruned (the
released code always keeps the first; keeping the larger loses less).
Decoding is local to the pair, which is what makes the format hardware friendly.

**Scales.** Weights: per output channel, ``α = |μ| + k·σ`` of the channel (``k`` =
``threshold_sigmas``, 3 in the paper's code) as the largest int level, with the multiplier
of ``α`` searched for minimum squared error of the full pair encoding
(``weight_scale: mse``, the paper's search) or taken as is (``sigma``). Activations: one
static scale per tensor from calibration, ``α = |μ| + k·σ`` of the whole tensor from the
calibration statistics (``activation_scale: sigma``), optionally refined by the same
error search on activation rows captured from the calibration feeds (``mse``).

**Graph form.** Weights are encoded offline in numpy and stored back dequantized (float).
Before each quantized linear, the activation goes through standard ONNX ops::

    p = Reshape(x, [-1, K/2, 2]);  u = p / s;  a = |u|
    normal  = Clip(Round(u), −q, q)
    step    = 2^(B−m) · (1 + [a ≥ 2^(B+1)] + 2[a ≥ 2^(B+2)] + 4[a ≥ 2^(B+3)])
    outlier = a > (q + a_min) / 2
    value   = Where(outlier, Sign(u) · Min(Max(Round(a/step)·step, a_min), a_max), normal)
    victim  = partner_outlier ∧ ¬(outlier ∧ (a > partner_a ∨ (a = partner_a ∧ first)))
    y       = Reshape(Where(victim, 0, value) · s, Shape(x))

with ``partner_*`` the pair swapped (``Gather(·, [1, 0], axis=-1)``). It runs on any
onnxruntime with nothing registered. Everything is fake-quantized in float: the accuracy
is real, no speed-up is claimed (``record["simulated"]``). Linears with an odd ``K`` have
no pairing and are skipped with that reason; so are excluded names and, by default, the
layers whose output is a graph output (the lm_head).

``pairs: false`` is the ablation without OVP: the same scales, plain int round-to-nearest
with everything beyond the int range clipped, to show what the pairs buy.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import is_excluded, write_linear_weight
from outlierquant.graph.records import Linear
from outlierquant.graph.values import NodeWriter, add_initializer, constant_array
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)

#: multipliers of the k·σ scale tried by the error search (the paper's code sweeps a range too)
SEARCH_RATIOS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)


# -- the number formats ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairFormat:
    """The int / abfloat pair of one bit width, in units of the int step."""

    bits: int

    @property
    def int_max(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def mantissa_bits(self) -> int:
        return self.bits - 3

    @property
    def exponent_bias(self) -> int:
        return self.bits - 1

    def outlier_levels(self) -> np.ndarray:
        """Positive abfloat magnitudes, ascending."""
        bias, m = self.exponent_bias, self.mantissa_bits
        levels = [2.0**e * (1 + j / 2**m) for e in range(bias, bias + 4) for j in range(2**m)]
        return np.array(levels[1:])  # 2^bias itself is left out: the range starts above the ints

    @property
    def outlier_min(self) -> float:
        return float(self.outlier_levels()[0])

    @property
    def outlier_max(self) -> float:
        return float(self.outlier_levels()[-1])

    @property
    def outlier_cutoff(self) -> float:
        """``|u|`` above this rounds to an outlier level rather than to the largest int."""
        return (self.int_max + self.outlier_min) / 2

    def all_levels(self) -> np.ndarray:
        """Every representable value (int ∪ ±abfloat), ascending."""
        ints = np.arange(-self.int_max, self.int_max + 1, dtype=np.float64)
        out = self.outlier_levels()
        return np.concatenate([-out[::-1], ints, out])


def _check_bits(bits: int) -> PairFormat:
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r}: OliVe pairs are defined for 4 and 8 bits")
    return PairFormat(bits)


def ovp_quantize(x: np.ndarray, scale, bits: int, *, pairs: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Outlier-victim pair fake quantization of ``x`` along its last axis.

    ``scale``: broadcastable to ``x`` (a scalar, or ``[..., 1]`` per row). Returns the
    dequantized values (``x``'s dtype) and the ``[..., K/2]`` mask of pairs holding an
    outlier. The arithmetic is the graph form's (in ``x``'s dtype, same roundings), so the
    two agree to the last bit on the same input. ``pairs=False``: plain int round-to-nearest,
    clipped (the mask is then all False).
    """
    fmt = _check_bits(bits)
    x = np.asarray(x)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    x = x.astype(dtype, copy=False)
    k = x.shape[-1] if x.ndim else 0
    q = dtype.type(fmt.int_max)
    scale = np.asarray(scale, dtype=dtype)
    if not pairs:
        u = x / scale
        return (np.clip(np.rint(u), -q, q) * scale).astype(dtype), np.zeros(x.shape[:-1] + (k // 2,), bool)
    if x.ndim == 0 or k % 2:
        raise ValueError(f"OVP pairs run along the last axis, whose length must be even (got {k})")
    p = x.reshape(x.shape[:-1] + (k // 2, 2))
    if scale.ndim and scale.shape[-1] != 1:
        raise ValueError(f"scale must be a scalar or [..., 1] (constant along the pair axis), got {scale.shape}")
    s = scale.reshape(scale.shape[:-1] + (1, 1)) if scale.ndim else scale
    u = p / s
    a = np.abs(u)
    value = np.clip(np.rint(u), -q, q)
    outlier = a > dtype.type(fmt.outlier_cutoff)
    if outlier.any():
        # only outliers need the abfloat rounding; frexp's exponent is exact, so this equals
        # the graph's step from the 2^(B+i) comparisons
        au = a[outlier]
        exponent = np.clip(np.frexp(au)[1] - 1, fmt.exponent_bias, fmt.exponent_bias + 3)
        step = np.ldexp(np.ones_like(au), exponent - fmt.mantissa_bits)
        magnitude = np.minimum(np.maximum(np.rint(au / step) * step, dtype.type(fmt.outlier_min)),
                               dtype.type(fmt.outlier_max))
        value[outlier] = np.sign(u[outlier]) * magnitude
        partner_o = outlier[..., ::-1]
        both = outlier & partner_o
        victim = partner_o & ~outlier
        if both.any():
            # both outliers: the larger magnitude stays (ties: the first of the pair)
            first = np.broadcast_to(np.array([True, False]), a.shape)
            wins = (a[both] > a[..., ::-1][both]) | ((a[both] == a[..., ::-1][both]) & first[both])
            victim[both] = ~wins
        value[victim] = 0
    out = (value * s).reshape(x.shape)
    return out.astype(dtype, copy=False), outlier[..., 0] | outlier[..., 1]


def sigma_alpha(x: np.ndarray, sigmas: float, axis=None) -> np.ndarray:
    """``|μ| + k·σ`` of ``x`` (over ``axis``, kept), floored away from 0."""
    mean = x.mean(axis=axis, keepdims=axis is not None)
    std = x.std(axis=axis, keepdims=axis is not None)
    return np.maximum(np.abs(mean) + sigmas * std, 1e-8)


def search_scale(rows: np.ndarray, alpha: np.ndarray, bits: int, *, pairs: bool = True,
                 ratios=SEARCH_RATIOS, per_row: bool = True) -> np.ndarray:
    """The scale ``r·α / q`` (``r`` from ``ratios``) with the least squared encoding error.

    ``rows``: ``[R, K]``; ``alpha``: ``[R, 1]`` (``per_row``) or a scalar. Returns scales of
    ``alpha``'s shape.
    """
    q = PairFormat(bits).int_max
    best_scale = best_error = None
    for ratio in ratios:
        scale = alpha * ratio / q
        deq, _ = ovp_quantize(rows, scale, bits, pairs=pairs)
        diff = deq - rows
        error = np.einsum("...k,...k->...", diff, diff)[..., None]
        if not per_row:
            error = np.array(error.sum(dtype=np.float64))
        if best_error is None:
            best_scale, best_error = np.broadcast_to(scale, error.shape).copy(), error
        else:
            better = error < best_error
            best_scale = np.where(better, scale, best_scale)
            best_error = np.minimum(error, best_error)
    return best_scale.reshape(np.shape(alpha))


# -- the pass ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OliveOptions:
    """Options of :class:`OlivePass` (every number it produces is simulated).

    ``weight_bits`` 4 or 8; ``activation_bits`` 4, 8 or ``None`` (float activations).
    ``threshold_sigmas``: ``k`` of the ``|μ| + k·σ`` starting scale (largest int level).
    ``weight_scale`` / ``activation_scale``: ``sigma`` (that scale) or ``mse`` (its
    multiplier searched for least squared error; for activations on rows captured from
    the calibration feeds). ``pairs: false``: the no-pair ablation (plain clipped int).
    ``exclude``: node names left in float (substrings or fnmatch patterns). ``skip_output_layers``: leave
    linears whose output is a graph output (the lm_head) in float.
    ``activation_sample_rows``: at most this many rows per activation tensor are captured
    to search the scale and to measure the share of outlier pairs.
    """

    weight_bits: int = 4
    activation_bits: int | None = 4
    threshold_sigmas: float = 3.0
    weight_scale: Literal["sigma", "mse"] = "mse"
    activation_scale: Literal["sigma", "mse"] = "mse"
    pairs: bool = True
    exclude: tuple[str, ...] = ()
    skip_output_layers: bool = True
    activation_sample_rows: int = 2048

    def __post_init__(self) -> None:
        check_fields(self)
        if self.weight_bits not in (4, 8) or isinstance(self.weight_bits, bool):
            raise ValueError(f"weight_bits={self.weight_bits!r}: allowed 4, 8")
        if self.activation_bits is not None and (self.activation_bits not in (4, 8)
                                                 or isinstance(self.activation_bits, bool)):
            raise ValueError(f"activation_bits={self.activation_bits!r}: allowed 4, 8 or null")
        if isinstance(self.threshold_sigmas, bool) or not isinstance(self.threshold_sigmas, (int, float)) \
                or not 0.0 < float(self.threshold_sigmas) <= 100.0:
            raise ValueError(f"threshold_sigmas={self.threshold_sigmas!r}: a number in (0, 100]")
        for field in ("weight_scale", "activation_scale"):
            if getattr(self, field) not in ("sigma", "mse"):
                raise ValueError(f"{field}={getattr(self, field)!r}: allowed 'sigma', 'mse'")
        if not isinstance(self.pairs, bool):
            raise ValueError(f"pairs={self.pairs!r}: true or false")
        if not isinstance(self.skip_output_layers, bool):
            raise ValueError(f"skip_output_layers={self.skip_output_layers!r}: true or false")
        if not isinstance(self.exclude, tuple) or not all(isinstance(p, str) and p for p in self.exclude):
            raise ValueError(f"exclude={self.exclude!r}: a list of node-name patterns")
        if isinstance(self.activation_sample_rows, bool) or not isinstance(self.activation_sample_rows, int) \
                or self.activation_sample_rows < 16:
            raise ValueError(f"activation_sample_rows={self.activation_sample_rows!r}: an integer >= 16")


class OlivePass(OutlierPass):
    """Fake-quantize linears with OliVe outlier-victim pairs along K (simulated)."""

    name = "olive"
    options_type = OliveOptions

    needs_stats = True  # activation_bits: the activation scale search
    needs_feeds = True

    def reads(self) -> frozenset[str]:
        return frozenset({"stats", "feeds"}) if self.options.activation_bits is not None else frozenset()

    def _select(self, model: ir.Model) -> tuple[list[Linear], dict[str, str]]:
        layers, skipped = [], {}
        for linear in analyze_graph(model).linears:
            if linear.op_type == "Conv":
                skipped[linear.name] = "Conv"
            elif is_excluded(linear, self.options.exclude):
                skipped[linear.name] = "excluded"
            elif self.options.skip_output_layers and linear.output.is_graph_output():
                skipped[linear.name] = "output layer (skip_output_layers)"
            elif constant_array(linear.weight).dtype != np.float32:
                skipped[linear.name] = "weight is not float32"
            elif linear.in_features % 2:
                skipped[linear.name] = f"odd K={linear.in_features}: no pairs along the reduction axis"
            else:
                layers.append(linear)
        return layers, skipped

    def calibration_targets(self, model: ir.Model) -> list:
        return sorted({linear.input.name for linear in self._select(model)[0]})

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        options = self.options
        layers, skipped = self._select(model)
        sources = sorted({linear.input.name for linear in layers})
        samples = self._capture(model, sources) if options.activation_bits is not None else {}
        activation_scales = {name: self._activation_scale(name, samples.get(name)) for name in sources} \
            if options.activation_bits is not None else {}

        per_layer: dict[str, dict[str, Any]] = {}
        for linear in layers:
            weight, share = self._encode_weight(linear.weight_array())
            write_linear_weight(model.graph, linear, weight, f"{linear.name}_weight_olive")
            per_layer[linear.name] = {"weight_outlier_pairs": share}
        shared: dict[str, ir.Value] = {}
        outlier_pairs: dict[str, float] = {}  # per activation tensor, measured on the captured rows
        for linear in layers:
            source = linear.input
            if options.activation_bits is None:
                continue
            scale = activation_scales[source.name]
            entry = per_layer[linear.name]
            entry["activation_scale"] = scale
            entry["activation_outlier_threshold"] = scale * PairFormat(options.activation_bits).outlier_cutoff
            rows = samples.get(source.name)
            if rows is not None and source.name not in outlier_pairs:
                _, mask = ovp_quantize(rows, np.float32(scale), options.activation_bits, pairs=options.pairs)
                outlier_pairs[source.name] = float(mask.mean())
            if source.name in outlier_pairs:
                entry["activation_outlier_pairs"] = outlier_pairs[source.name]
            if source.name not in shared:
                shared[source.name] = self._activation_nodes(model, source, linear.node, scale, linear.in_features)
            linear.node.replace_input_with(0, shared[source.name])

        def mean(key):
            values = [e[key] for e in per_layer.values() if e.get(key) is not None]
            return float(np.mean(values)) if values else None

        record = {
            "simulated": True,
            "config": dataclasses.asdict(options),
            "quantized_layers": len(layers),
            "quantized_activations": len(shared),
            "mean_weight_outlier_pairs": mean("weight_outlier_pairs"),
            "mean_activation_outlier_pairs": mean("activation_outlier_pairs"),
            "layers": per_layer,
            "skipped": skipped,
        }
        logger.info("olive: W%d A%s on %d linears (simulated), %d skipped", options.weight_bits,
                    options.activation_bits, len(layers), len(skipped))
        return bool(layers), record

    # -- weights (offline, numpy) -----------------------------------------------------

    def _encode_weight(self, weight_kn: np.ndarray) -> tuple[np.ndarray, float]:
        """The ``[K, N]`` weight after OVP encoding (pairs along K, per-output-channel
        scales) and the share of its pairs that hold an outlier."""
        options = self.options
        rows = np.ascontiguousarray(weight_kn.T.astype(np.float32))  # [N, K]: pairs on the last axis
        alpha = sigma_alpha(rows.astype(np.float64), options.threshold_sigmas, axis=-1).astype(np.float32)
        q = PairFormat(options.weight_bits).int_max
        if options.weight_scale == "mse":
            scale = search_scale(rows, alpha, options.weight_bits, pairs=options.pairs)
        else:
            scale = alpha / np.float32(q)
        encoded, mask = ovp_quantize(rows, scale.astype(np.float32), options.weight_bits, pairs=options.pairs)
        return encoded.T, float(mask.mean()) if mask.size else 0.0

    # -- activations (static scale, graph ops) ----------------------------------------

    def _activation_scale(self, name: str, rows: np.ndarray | None) -> float:
        options = self.options
        stats = self.require_stats()[name]
        mean = float(stats.mean.mean())
        variance = max(float(stats.mean_sq.mean()) - mean * mean, 0.0)
        alpha = max(abs(mean) + options.threshold_sigmas * variance**0.5, 1e-8)
        q = PairFormat(options.activation_bits).int_max
        if options.activation_scale == "sigma":
            return alpha / q
        if rows is None:
            raise RuntimeError(f"olive: activation_scale='mse' needs calibration feeds (no rows for {name!r})")
        return float(search_scale(rows, np.float32(alpha), options.activation_bits, pairs=options.pairs,
                                  per_row=False))

    def _capture(self, model: ir.Model, names: list[str]) -> dict[str, np.ndarray]:
        """Up to ``activation_sample_rows`` rows of each named tensor, evenly spread over
        the calibration feeds (padded positions dropped); empty without feeds."""
        if not self.feeds or not names:
            if self.options.activation_scale == "mse" and names:
                raise RuntimeError("olive: activation_scale='mse' needs calibration feeds "
                                   "(the pipeline hands them over; or call with_feeds)")
            return {}
        from outlierquant.calibration.collect import capture_activations

        return capture_activations(model, self.feeds, names, max_rows=self.options.activation_sample_rows)

    def _activation_nodes(self, model: ir.Model, x: ir.Value, anchor: ir.Node, scale: float, k: int) -> ir.Value:
        """Insert the OVP fake-quantizer of ``x`` before ``anchor``; return its output."""
        graph = model.graph
        bits = int(self.options.activation_bits)
        fmt = PairFormat(bits)
        base = f"{x.name}_olive_a{bits}"

        def const(tag, array, dtype=np.float32):
            return add_initializer(graph, f"{base}_{tag}", np.asarray(array, dtype=dtype))

        writer = NodeWriter(base)
        nodes, op = writer.nodes, writer.op

        s = const("scale", scale)
        q = fmt.int_max
        if not self.options.pairs:
            out = op("Mul", op("Clip", op("Round", op("Div", x, s)), const("qmin", -q), const("qmax", q)), s)
        else:
            bias, m = fmt.exponent_bias, fmt.mantissa_bits
            p = op("Reshape", x, const("pair_shape", [-1, k // 2, 2], np.int64))
            u = op("Div", p, s)
            a = op("Abs", u)
            normal = op("Clip", op("Round", u), const("qmin", -q), const("qmax", q))

            def at_least(tag, exponent):
                return op("Cast", op("GreaterOrEqual", a, const(tag, 2.0 ** exponent)), to=ir.DataType.FLOAT)

            steps = op("Add", op("Add", op("Add", const("one", 1.0), at_least("t1", bias + 1)),
                                 op("Mul", const("two", 2.0), at_least("t2", bias + 2))),
                       op("Mul", const("four", 4.0), at_least("t3", bias + 3)))
            step = op("Mul", const("step0", 2.0 ** (bias - m)), steps)
            magnitude = op("Min", op("Max", op("Mul", op("Round", op("Div", a, step)), step),
                                     const("amin", fmt.outlier_min)), const("amax", fmt.outlier_max))
            outlier = op("Greater", a, const("cutoff", fmt.outlier_cutoff))
            value = op("Where", outlier, op("Mul", op("Sign", u), magnitude), normal)
            swap = const("swap", [1, 0], np.int64)
            partner_a = op("Gather", a, swap, axis=-1)
            partner_o = op("Gather", outlier, swap, axis=-1)
            wins = op("Or", op("Greater", a, partner_a),
                      op("And", op("Equal", a, partner_a), const("first", [True, False], np.bool_)))
            victim = op("And", partner_o, op("Not", op("And", outlier, wins)))
            kept = op("Where", victim, const("zero", 0.0), value)
            out = op("Reshape", op("Mul", kept, s), op("Shape", x))
        out.type = x.type
        out.shape = x.shape
        graph.insert_before(anchor, nodes)
        return out
