"""SmoothQuant: fp32 equivalence of the float rewrite, op counts, α search, skip reasons."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import synthetic
from helpers import load_canonical as load
from helpers import run_outputs as outputs

from outlierquant.calibration.collect import collect_statistics
from outlierquant.errors import RecipeError
from outlierquant.numerics.estimates import (
    DEFAULT_ALPHA_GRID,
    estimated_output_error,
    estimated_static_sqnr_db,
    search_alpha,
    smoothed_weight_error,
    smoothing_scales,
)
from outlierquant.passes.online_hadamard import OnlineHadamardPass
from outlierquant.passes.smooth import SmoothQuantOptions, SmoothQuantPass
from outlierquant.recipes import load_recipe, validate_pass_options

RTOL = 1e-4


def assert_equivalent(before, after, rtol=RTOL) -> None:
    for sample_before, sample_after in zip(before, after):
        for a, b in zip(sample_before, sample_after):
            scale = float(np.abs(a).max()) or 1.0
            assert float(np.abs(a - b).max()) <= rtol * scale


def rewrite_and_compare(path: Path, calibration, evaluation_sets, pass_):
    model = load(path)
    references = [outputs(model, feeds) for feeds in evaluation_sets]
    ops_before = collections.Counter(node.op_type for node in model.graph)
    result = pass_.with_stats(collect_statistics(model, calibration, progress=False))(model)
    onnx.checker.check_model(ir.serde.serialize_model(model))
    for feeds, reference in zip(evaluation_sets, references):
        assert_equivalent(reference, outputs(model, feeds))
    ops_after = collections.Counter(node.op_type for node in model.graph)
    return result, ops_before, ops_after


# -- unit math -----------------------------------------------------------------------------------


def test_scales_follow_the_smoothquant_formula():
    rng = np.random.default_rng(0)
    act = np.array([1.0, 4.0, 100.0, 0.5])
    weights = [rng.normal(size=(4, 3)), rng.normal(size=(4, 5))]
    w_max = np.maximum(np.abs(weights[0]).max(1), np.abs(weights[1]).max(1))
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = smoothing_scales(act, weights, alpha)
        expected = act**alpha / w_max ** (1 - alpha)
        np.testing.assert_allclose(s / s[0], expected / expected[0], rtol=1e-12)  # up to a global factor


def test_error_estimate_prefers_smoothing_for_an_outlier_channel():
    from outlierquant.calibration.stats import ChannelStats

    rng = np.random.default_rng(1)
    x = rng.normal(size=(512, 16))
    x[:, 3] *= 60.0
    st = ChannelStats.empty(16, -1)
    st.update(x)
    w = [rng.normal(size=(16, 8))]
    none = estimated_output_error(st, w, np.ones(16))
    half = estimated_output_error(st, w, smoothing_scales(st.absmax, w, 0.5))
    assert half < 0.5 * none


def test_options_are_validated_with_the_field_name():
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantOptions(alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantOptions(alpha="auto")
    with pytest.raises(RecipeError, match="insert_mul"):
        validate_pass_options("smoothquant", {"insert_mull": True})
    assert load_recipe("smoothquant-w8a8").passes[1].name == "smoothquant"


def test_weight_only_full_covariance_score_is_the_measured_output_error():
    """SmoothQuant+ scores α by tr(E'ᵀ Σ_s E'), the exact mean squared output error of the group."""
    from outlierquant.calibration.stats import ChannelStats

    rng = np.random.default_rng(2)
    k = 64
    x = rng.normal(size=(2048, k)) @ (np.eye(k) + 0.5 * rng.normal(size=(k, k)) / 8) + 0.3
    x[:, 5] *= 40.0
    st = ChannelStats.empty(k, -1, covariance=True)
    st.update(x)
    weights = [rng.normal(size=(k, 24)), rng.normal(size=(k, 40))]
    sigma = st.covariance + np.outer(st.mean, st.mean)
    ratios = (1.0, 0.9, 0.8)
    for alpha in (0.0, 0.5, 0.8):
        s = smoothing_scales(st.absmax, weights, alpha)
        measured = 0.0
        for w in weights:  # quantize diag(s)·W, undo s on the input side, measure on x
            w_hat = (w * s[:, None] + smoothed_weight_error(w, s, 4, 32, st.mean_sq / s**2, ratios)) / s[:, None]
            measured += float((((x @ w_hat) - x @ w) ** 2).sum(axis=1).mean())
        scored = estimated_output_error(st, weights, s, activation_bits=0, weight_bits=4, weight_block=32,
                                        sigma=sigma, clip_ratios=ratios)
        assert scored == pytest.approx(measured, rel=1e-6)
    # the diagonal estimate ignores the channel correlations and the mean: it differs
    diagonal = estimated_output_error(st, weights, s, activation_bits=0, weight_bits=4, weight_block=32,
                                      clip_ratios=ratios)
    assert diagonal != pytest.approx(measured, rel=1e-3)
    with pytest.raises(ValueError, match="sigma"):
        estimated_output_error(st, weights, s, activation_bits=8, sigma=sigma)


def test_weight_only_options_leave_w8a8_alone():
    plain = SmoothQuantPass(alpha=0.5)
    assert plain.covariance_targets(None) == []  # W8A8: no covariance collected
    with pytest.raises(ValueError, match="full_covariance"):
        SmoothQuantOptions(full_covariance=True)  # activation_bits 8
    with pytest.raises(ValueError, match="clip_ratios"):
        SmoothQuantOptions(clip_ratios=(1.0, 0.9))
    with pytest.raises(ValueError, match="clip_ratios"):
        SmoothQuantOptions(activation_bits=0, weight_bits=4, weight_block=32, clip_ratios=(1.2,))
    # with full_covariance the group inputs are covariance targets (next test: 9 on tiny Llama)


def test_smoothquant_plus_full_covariance_is_equivalent(tiny_llama):
    calibration = synthetic.random_feeds(tiny_llama, 6, seed=1)
    evaluation = synthetic.random_feeds(tiny_llama, 3, seed=2)
    model = load(tiny_llama)
    reference = outputs(model, evaluation)
    pass_ = SmoothQuantPass(alpha="search", weight_bits=4, weight_block=32, activation_bits=0, full_covariance=True,
                            clip_ratios=(1.0, 0.9, 0.8))
    targets = pass_.covariance_targets(model)
    assert len(targets) == 9
    stats = collect_statistics(model, calibration, covariance_for=targets, progress=False)
    result = pass_.with_stats(stats)(model)
    assert result.modified
    assert not any("covariance" in g for g in result.record["groups"])  # the full Σ was there
    assert_equivalent(reference, outputs(model, evaluation))


# -- equivalence on exported decoders and encoders -------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, "search"])
def test_tiny_llama_equivalent_all_groups_folded(tiny_llama, alpha):
    calibration = synthetic.random_feeds(tiny_llama, 6, seed=1)
    evaluation = synthetic.random_feeds(tiny_llama, 3, seed=2)
    result, before, after = rewrite_and_compare(tiny_llama, calibration, [evaluation], SmoothQuantPass(alpha=alpha))
    record = result.record
    assert result.modified
    # 2 layers x (norm -> qkv, v -> o, norm -> gate/up, up -> down) + final norm -> lm_head
    assert len(record["groups"]) == 9
    assert record["inserted_ops"] == 0 and before == after  # folded, no node added
    relations = collections.Counter(g["relation"] for g in record["groups"] if "skipped" not in g)
    if alpha == 0.5:
        assert relations == {"norm": 5, "v_to_o": 2, "up_to_down": 2}


def test_planted_outliers_are_smoothed(planted_llama):
    calibration = synthetic.random_feeds(planted_llama, 6, seed=1)
    evaluation = synthetic.random_feeds(planted_llama, 3, seed=2)
    result, _, _ = rewrite_and_compare(planted_llama, calibration, [evaluation], SmoothQuantPass(alpha="search"))
    norm_groups = [g for g in result.record["groups"] if g["relation"] == "norm" and "skipped" not in g]
    assert norm_groups
    for group in norm_groups[:2]:  # q/k/v and gate/up of layer 0 carry the planted channels
        assert group["max_median_before"] > 20
        assert group["max_median_after"] < group["max_median_before"] / 10


def test_tiny_opt_gemm_and_relu_skip(tiny_opt):
    calibration = synthetic.random_feeds(tiny_opt, 6, seed=1)
    evaluation = synthetic.random_feeds(tiny_opt, 3, seed=2)
    result, before, after = rewrite_and_compare(tiny_opt, calibration, [evaluation], SmoothQuantPass(alpha=0.5))
    skipped = [g for g in result.record["groups"] if "skipped" in g]
    assert len(skipped) == 2  # fc2 after ReLU, both layers
    assert all("no foldable producer" in g["skipped"] and "insert_mul is off" in g["skipped"] for g in skipped)
    assert before == after
    result, before, after = rewrite_and_compare(tiny_opt, calibration, [evaluation],
                                                SmoothQuantPass(alpha=0.5, insert_mul=True))
    assert result.record["inserted_ops"] == 2
    assert after["Mul"] == before["Mul"] + 2


def test_minilm_equivalent_on_real_and_random_inputs(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    random = synthetic.random_feeds(minilm_onnx, 3, seed=3)
    result, before, after = rewrite_and_compare(
        minilm_onnx, calibration, [heldout, random], SmoothQuantPass(alpha=0.5, insert_mul=True)
    )
    record = result.record
    assert record["rewritten_groups"] == 24
    # post-norm: the 12 norm groups also feed the residual; FFN2 (6) follows GELU; V->O (6) folds
    assert record["inserted_ops"] == 18
    assert after["Mul"] == before["Mul"] + 18


def test_minilm_ffn2_after_gelu_is_skipped_without_insert_mul(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    result, before, after = rewrite_and_compare(minilm_onnx, calibration, [heldout], SmoothQuantPass(alpha=0.5))
    by_name = {g["linears"][0]: g for g in result.record["groups"]}
    ffn2 = by_name["/0/encoder/layer.0/output/dense/MatMul"]
    assert "Erf" in ffn2["skipped"] and "insert_mul is off" in ffn2["skipped"]
    qkv = by_name["/0/encoder/layer.0/attention/self/query/MatMul"]
    assert "residual" in qkv["skipped"]
    assert result.record["rewritten_groups"] == 6  # V -> O only
    assert before == after


def _measured_static_sqnr_db(x: np.ndarray, w: np.ndarray, s: np.ndarray) -> float:
    """Quantize ``x / s`` per tensor (uint8, zero included) and ``diag(s)·W`` per output channel."""
    xs = x / s
    lo, hi = min(float(xs.min()), 0.0), max(float(xs.max()), 0.0)
    step = (hi - lo) / 255.0
    zero = np.rint(-lo / step)
    xq = (np.clip(np.rint(xs / step) + zero, 0, 255) - zero) * step
    ws = w * s[:, None]
    wscale = np.abs(ws).max(axis=0, keepdims=True) / 127.0
    wq = np.clip(np.rint(ws / wscale), -127, 127) * wscale
    reference = x @ w
    return float(10 * np.log10((reference**2).sum() / ((xq @ wq - reference) ** 2).sum()))


def test_static_sqnr_estimate_tracks_the_measured_error_and_flags_token_spikes():
    """The gate of the split rotation: close to a measured static int8 SQNR, and far lower for
    spikes that move from channel to channel (no per-channel scale absorbs them)."""
    from outlierquant.calibration.stats import ChannelStats

    rng = np.random.default_rng(3)
    w = rng.normal(size=(64, 32))
    smooth_rows = rng.normal(size=(4096, 64))
    smooth_rows[:, 5] *= 20.0  # a fixed outlier channel: per-channel scales handle it
    spiky_rows = rng.normal(size=(4096, 64))
    hits = rng.integers(0, 64, size=200)
    spiky_rows[rng.choice(4096, 200, replace=False), hits] *= 80.0  # a rare spike in a random channel
    estimates = {}
    for label, x in (("smooth", smooth_rows), ("spiky", spiky_rows)):
        st = ChannelStats.empty(64, -1)
        st.update(x)
        estimates[label] = estimated_static_sqnr_db(st, [w])
        _, s, _ = search_alpha(st, [w], DEFAULT_ALPHA_GRID)
        assert abs(estimates[label] - _measured_static_sqnr_db(x, w, s)) < 2.0, label
    assert estimates["spiky"] < estimates["smooth"] - 10.0


def test_static_sqnr_of_a_zero_input_is_minus_infinity_and_the_gate_skips_it(tiny_llama):
    from outlierquant.calibration.stats import ChannelStats

    st = ChannelStats.empty(8, -1)
    st.update(np.zeros((16, 8)))
    assert estimated_static_sqnr_db(st, [np.ones((8, 4))]) == float("-inf")
    model = load(tiny_llama)
    online = OnlineHadamardPass(kernels="standard", groups="activation", rotate_below_db=30.0)
    stats = collect_statistics(model, synthetic.random_feeds(tiny_llama, 2, seed=1),
                               tensors=online.calibration_targets(model), progress=False)
    zero = {name: ChannelStats.empty(stats[name].channels, -1) for name in stats}  # same tensors, all zero
    for st in zero.values():
        st.update(np.zeros((4, st.channels)))
    from outlierquant.calibration.stats import ActivationStats

    result = online.with_stats(ActivationStats(zero))(model)
    assert not result.modified
    assert {g["skipped"] for g in result.record["skipped"]} == {"its input is zero on the calibration data"}


@pytest.mark.parametrize("trans_b", [0, 1])
def test_rescaled_weights_in_slabs_are_the_float64_formula_bit_for_bit(trans_b, monkeypatch):
    """rescale_linear_weight works a slab of the stored weight at a time (an LM head must not
    be copied several times over); the stored values are those of the one-shot float64
    product cast back, in either layout (MatMul [K, N], Gemm transB [N, K])."""
    from outlierquant.graph import edit
    from outlierquant.numerics import slabs
    from outlierquant.graph.analysis import analyze_graph

    rng = np.random.default_rng(3)
    k, n = 24, 40
    weight = (rng.standard_normal((n, k) if trans_b else (k, n)) * 3).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "w"], ["y"], transB=trans_b)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5, n])],
        [onnx.numpy_helper.from_array(weight, "w")])
    rows, columns = rng.lognormal(0, 1, k), rng.lognormal(0, 1, n)
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", 50)  # slabs of 2 stored rows (or 1), the last one short
    for scales in ({"rows": rows}, {"columns": columns}, {"rows": rows, "columns": columns}):
        model = ir.serde.deserialize_model(onnx.helper.make_model(graph))
        (linear,) = analyze_graph(model).linears
        w_kn = np.asarray(linear.weight_array(), dtype=np.float64)
        expected = w_kn * scales.get("rows", np.ones(k))[:, None] * scales.get("columns", np.ones(n))[None, :]
        expected = np.ascontiguousarray((expected.T if trans_b else expected).astype(np.float32))
        edit.rescale_linear_weight(model.graph, linear, "w_scaled", **scales)
        stored = model.graph.node(0).inputs[1].const_value.numpy()
        assert stored.flags.c_contiguous and stored.dtype == np.float32
        np.testing.assert_array_equal(stored, expected)


@pytest.mark.parametrize("block", [0, 16])
def test_output_error_estimate_in_row_slabs_is_the_whole_matrix_formula(block, monkeypatch):
    """The α search scores each candidate a slab of weight rows at a time (an LM head held
    five float64 copies of itself per α); the estimate is the one-shot formula's, and the
    search picks the same α."""
    from outlierquant.calibration.stats import ChannelStats
    from outlierquant.numerics import slabs
    from outlierquant.numerics.estimates import activation_steps, weight_rounding_error

    rng = np.random.default_rng(5)
    k, n = 48, 20
    x = rng.standard_normal((200, k)) * rng.lognormal(0, 1.5, k)
    st = ChannelStats.empty(k, -1)
    st.update(x)
    weights = [rng.standard_normal((k, n)), rng.standard_normal((k, 7)) * 3]
    bits = 4 if block else 8

    def one_shot(s):
        steps = activation_steps(st, s)
        total = 0.0
        for w in weights:
            error = weight_rounding_error(w * s[:, None], bits, block) / s[:, None]
            total += float(st.mean_sq @ (error**2).sum(axis=1)) + float((steps**2 / 12.0) @ (w**2).sum(axis=1))
        return total

    options = dict(activation_bits=8, weight_bits=bits, weight_block=block)
    expected = {alpha: one_shot(smoothing_scales(st.absmax, weights, alpha)) for alpha in DEFAULT_ALPHA_GRID}
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", 20 * 5)  # 5 rows a slab (blocked: one block of 16)
    alpha, _, errors = search_alpha(st, weights, DEFAULT_ALPHA_GRID, **options)
    for a in DEFAULT_ALPHA_GRID:
        assert errors[a] == pytest.approx(expected[a], rel=1e-12)
    assert alpha == min(expected, key=expected.get)


@pytest.mark.parametrize("block", [0, 16])
def test_float32_group_weights_give_the_float64_estimates_exactly(block):
    """group_weight_rows hands the passes the stored float32 weights (an LM head's float64
    copy was 256 MiB); the estimates widen them a slab at a time, and float32 -> float64 is
    exact, so scales, errors and the chosen alpha are those of float64 copies, bit for bit."""
    from outlierquant.calibration.stats import ChannelStats
    from outlierquant.numerics.estimates import estimated_output_error

    rng = np.random.default_rng(8)
    k = 48
    x = rng.standard_normal((200, k)) * rng.lognormal(0, 1.5, k)
    st = ChannelStats.empty(k, -1)
    st.update(x)
    single = [(rng.standard_normal((k, 20)) * 3).astype(np.float32), rng.standard_normal((k, 7)).astype(np.float32)]
    double = [w.astype(np.float64) for w in single]
    options = dict(activation_bits=8, weight_bits=4 if block else 8, weight_block=block)
    for alpha in DEFAULT_ALPHA_GRID:
        s32, s64 = smoothing_scales(st.absmax, single, alpha), smoothing_scales(st.absmax, double, alpha)
        assert s32.dtype == np.float64 and np.array_equal(s32, s64)
        assert estimated_output_error(st, single, s32, **options) == estimated_output_error(st, double, s64, **options)
    assert search_alpha(st, single, DEFAULT_ALPHA_GRID, **options)[2] == search_alpha(st, double, DEFAULT_ALPHA_GRID,
                                                                                       **options)[2]


@pytest.mark.parametrize("full_covariance", [False, True])
def test_weight_only_estimate_in_column_slabs_is_the_whole_matrix_score(full_covariance, monkeypatch):
    """smoothquant+'s weight-only score (blocked clip search, optionally tr(EᵀΣE)) goes a slab
    of output columns at a time: the blocks lie within a column and the score sums over
    columns, so it is the one-pass value."""
    from outlierquant.calibration.stats import ChannelStats
    from outlierquant.numerics import slabs
    from outlierquant.numerics.estimates import estimated_output_error

    rng = np.random.default_rng(6)
    k = 32
    x = rng.standard_normal((400, k)) * rng.lognormal(0, 1.5, k)
    st = ChannelStats.empty(k, -1, covariance=True)
    st.update(x)
    st.finish()
    weights = [(rng.standard_normal((k, 23)) * 2).astype(np.float32)]
    s = rng.lognormal(0, 0.5, k)
    options = dict(activation_bits=0, weight_bits=4, weight_block=16, clip_ratios=(1.0, 0.9, 0.8))
    if full_covariance:
        options["sigma"] = st.covariance + np.outer(st.mean, st.mean)
    whole = estimated_output_error(st, weights, s, **options)
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", k * 5)  # 5 columns a slab, the last one short
    assert estimated_output_error(st, weights, s, **options) == pytest.approx(whole, rel=1e-12)
