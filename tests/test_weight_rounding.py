"""AdaDim group layouts and QuantEase rounding: the error model, the int4 emissions
against numpy, the layout choice on an outlier channel, the float outlier side path."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import synthetic
from onnx import TensorProto, helper, numpy_helper

from outlierquant.calibration.collect import collect_statistics
from outlierquant.calibration.stats import ActivationStats, ChannelStats
from outlierquant.calibration.targets import quantizable_targets
from outlierquant.emit.weights import matmul_nbits_tensors
from outlierquant.errors import CalibrationError, RecipeError
from outlierquant.numerics.grids import (
    BlockwiseWeight,
    GroupGrid,
    dequantize_levels,
    group_grid,
    rtn_levels,
    unpack_levels,
)
from outlierquant.numerics.rounding import (
    InputMoments,
    gptaq_objective,
    output_error,
    quantease_round,
    refit_scales,
    second_moment,
    select_outlier_weights,
)
from outlierquant.passes.canonicalize import CanonicalizePass
from outlierquant.passes.weight_rounding import AdaDimOptions, AdaDimQuantizePass, QuantEaseOptions, QuantEaseRoundPass
from outlierquant.recipes import load_recipe, validate_pass_options

K, N = 96, 64


def activations(rng, rows=2048, outlier=None, scale=60.0):
    mixing = rng.normal(size=(K, K)) / np.sqrt(K)
    x = rng.normal(size=(rows, K)) @ (np.eye(K) + 0.8 * mixing)  # correlated channels
    if outlier is not None:
        x[:, outlier] *= scale
    return x.astype(np.float32)


def stats_of(x: np.ndarray, name="x") -> ActivationStats:
    st = ChannelStats.empty(x.shape[1], -1, covariance=True)
    st.update(x)
    return ActivationStats({name: st})


def one_linear_model(weight: np.ndarray) -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")],
        "one_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ir.serde.deserialize_model(proto)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# -- math ------------------------------------------------------------------------------------


def test_output_error_is_the_mean_squared_output_error():
    rng = np.random.default_rng(0)
    x = activations(rng).astype(np.float64)
    delta = rng.normal(size=(K, N)) * 0.01
    sigma = x.T @ x / x.shape[0]
    assert output_error(delta, sigma) == pytest.approx(float(((x @ delta) ** 2).sum(axis=1).mean()), rel=1e-9)


@pytest.mark.parametrize("dimension", ["per_oc", "per_ic"])
def test_quantease_beats_round_to_nearest(dimension):
    rng = np.random.default_rng(1)
    x = activations(rng)
    weight = rng.normal(size=(K, N))
    sigma, full = second_moment(stats_of(x)["x"])
    assert full
    grid = group_grid(weight, dimension, 32, 4)
    rtn = output_error(dequantize_levels(rtn_levels(weight, grid), grid) - weight, sigma)
    q = quantease_round(weight, sigma, grid, iterations=10)
    assert q.min() >= 0 and q.max() <= 15 and np.array_equal(q, np.rint(q))  # on the grid
    assert output_error(dequantize_levels(q, grid) - weight, sigma) < 0.7 * rtn


def test_clip_search_never_worsens_the_weighted_error():
    rng = np.random.default_rng(2)
    weight = rng.standard_t(3, size=(K, N))
    row_weight = rng.uniform(0.1, 10, size=K)
    sigma = np.diag(row_weight)
    errors = []
    for ratios in ((1.0,), (1.0, 0.9, 0.8, 0.7)):
        grid = group_grid(weight, "per_oc", 32, 4, row_weight=row_weight, clip_ratios=ratios)
        errors.append(output_error(dequantize_levels(rtn_levels(weight, grid), grid) - weight, sigma))
    assert errors[1] <= errors[0]


# -- emission and layout choice ----------------------------------------------------------------


@pytest.mark.parametrize("dimension,op", [("per_oc", "MatMulNBits"), ("per_ic", "BitShift")])
def test_int4_emission_matches_numpy(dimension, op):
    rng = np.random.default_rng(3)
    x = activations(rng, rows=512)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    model = one_linear_model(weight)
    result = AdaDimQuantizePass(dimension=dimension, clip_ratios=(1.0,)).with_stats(stats_of(x))(model)
    assert result.record["layers"][0]["dimension"] == dimension
    ops = collections.Counter(node.op_type for node in model.graph)
    assert ops[op] >= 1 and "MatMul" not in ops or dimension == "per_ic"
    grid = group_grid(weight.astype(np.float64), dimension, 32, 4)
    expected = x[:8] @ dequantize_levels(rtn_levels(weight.astype(np.float64), grid), grid)
    np.testing.assert_allclose(run(model, x[:8]), expected, rtol=1e-4, atol=1e-3)


def test_adadim_picks_the_layout_that_isolates_the_outliers():
    rng = np.random.default_rng(4)
    # an activation-outlier channel whose weight row is small (as after a norm): only
    # per-input-channel groups give that row its own fine grid
    weight = rng.normal(size=(K, N)).astype(np.float32)
    weight[5] *= 0.05
    x = activations(rng, outlier=[5], scale=80.0)
    result = AdaDimQuantizePass().with_stats(stats_of(x))(one_linear_model(weight))
    layer = result.record["layers"][0]
    assert layer["dimension"] == "per_ic" and layer["errors"]["per_ic"] < layer["errors"]["per_oc"]
    # a weight-outlier output column and ordinary activations: per-output-channel groups
    weight = rng.normal(size=(K, N)).astype(np.float32)
    weight[:, 10] *= 8.0
    result = AdaDimQuantizePass().with_stats(stats_of(activations(rng)))(one_linear_model(weight))
    assert result.record["layers"][0]["dimension"] == "per_oc"


def test_outlier_side_path_reduces_the_error():
    rng = np.random.default_rng(5)
    x = activations(rng, outlier=[7, 40], scale=30.0)
    weight = rng.standard_t(2.5, size=(K, N)).astype(np.float32)
    stats = stats_of(x)
    errors = {}
    for fraction in (0.0, 0.01):
        model = one_linear_model(weight)
        result = QuantEaseRoundPass(bits=3, outlier_fraction=fraction).with_stats(stats)(model)
        y = run(model, x[:256])
        errors[fraction] = float(((y - x[:256] @ weight) ** 2).mean())
        if fraction:
            layer = result.record["layers"][0]
            assert layer["float_weights"] == int(np.ceil(0.01 * K * N))
            assert collections.Counter(n.op_type for n in model.graph)["Gather"] == 1
    assert errors[0.01] < 0.8 * errors[0.0]


def test_outlier_rows_cap_keeps_the_side_path_to_the_rows_that_matter():
    """Outliers spread over many rows made the dense side path a float copy of the layer;
    capped, it holds at most the share of rows asked for, those with the largest summed
    impact (here the two activation outlier channels), and still lowers the error."""
    rng = np.random.default_rng(6)
    x = activations(rng, outlier=[7, 40], scale=30.0)
    weight = rng.standard_t(2.5, size=(K, N)).astype(np.float32)
    stats = stats_of(x)
    side_rows, errors = {}, {}
    for rows in (1.0, 0.03):
        model = one_linear_model(weight)
        QuantEaseRoundPass(bits=3, outlier_fraction=0.01, outlier_rows=rows).with_stats(stats)(model)
        gather = next(n for n in model.graph if n.op_type == "Gather")
        side_rows[rows] = gather.inputs[1].const_value.numpy().reshape(-1)
        y = run(model, x[:256])
        errors[rows] = float(((y - x[:256] @ weight) ** 2).mean())
    assert side_rows[1.0].size > 2  # uncapped: outliers in several rows
    assert sorted(side_rows[0.03].tolist()) == [7, 40]  # floor(0.03 * 96) = 2: the outlier channels
    baseline = QuantEaseRoundPass(bits=3).with_stats(stats)
    model = one_linear_model(weight)
    baseline(model)
    plain = float(((run(model, x[:256]) - x[:256] @ weight) ** 2).mean())
    assert errors[0.03] < plain
    with pytest.raises(ValueError, match="outlier_rows"):
        QuantEaseOptions(outlier_rows=0.0)


def test_tiny_llama_quantizes_and_runs(tmp_path):
    path = synthetic.build_tiny_llama(tmp_path / "tiny")
    calibration = synthetic.random_feeds(path, 4, seed=1)
    evaluation = synthetic.random_feeds(path, 2, seed=2)
    model = ir.load(str(path))
    CanonicalizePass()(model)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pass_ = AdaDimQuantizePass(rounding="quantease", iterations=3)
    stats = collect_statistics(model, calibration, tensors=quantizable_targets(model, outputs=False),
                               covariance_for=pass_.covariance_targets(model), progress=False)
    result = pass_.with_stats(stats)(model)
    assert result.record["diagonal_covariance_layers"] == 0
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in evaluation:
        a = reference.run(None, feed)[0].reshape(-1)
        b = session.run(None, feed)[0].reshape(-1)
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.95  # random weights, 4 bits


def test_options_and_recipes():
    with pytest.raises(ValueError, match="bits"):
        AdaDimOptions(bits=2)
    with pytest.raises(ValueError, match="group_size"):
        QuantEaseOptions(group_size=24)
    with pytest.raises(ValueError, match="outlier_fraction"):
        QuantEaseOptions(outlier_fraction=0.5)
    with pytest.raises(RecipeError, match="rounding"):
        validate_pass_options("adadim", {"rounding": "gptq"})
    for name, pass_name in (("adadim-w4a16", "adadim"), ("quantease-w4a16", "quantease"),
                            ("quantease-w3a16", "quantease")):
        assert load_recipe(name).passes[1].name == pass_name


# -- scale refit, warm start, the shared writer, the float side path ---------------------------


def test_scale_refit_is_the_least_squares_optimum_and_refits_never_worsen():

    rng = np.random.default_rng(6)
    x = activations(rng, outlier=[3], scale=20.0)
    weight = rng.normal(size=(K, N))
    sigma, _ = second_moment(stats_of(x)["x"])
    grid = group_grid(weight, "per_oc", 32, 4, row_weight=np.diag(sigma), clip_ratios=(1.0, 0.9, 0.8))
    q = quantease_round(weight, sigma, grid, iterations=6)
    before = output_error(dequantize_levels(q, grid) - weight, sigma)
    refitted = refit_scales(weight, sigma, q, grid)
    assert np.array_equal(refitted.zero, grid.zero) and not np.array_equal(refitted.scale, grid.scale)
    after = output_error(dequantize_levels(q, refitted) - weight, sigma)
    assert after < before
    for _ in range(4):  # a stationary point: any small change of the scales costs error
        noisy = refitted.scale * (1 + 1e-3 * rng.normal(size=refitted.scale.shape))
        jittered = GroupGrid("per_oc", 32, 4, noisy.astype(np.float32), refitted.zero)
        assert output_error(dequantize_levels(q, jittered) - weight, sigma) > after
    # warm-started sweeps from the current levels only go down
    q2 = quantease_round(weight, sigma, refitted, iterations=6, levels=q)
    assert output_error(dequantize_levels(q2, refitted) - weight, sigma) <= after
    with pytest.raises(ValueError, match="per_oc"):
        refit_scales(weight, sigma, q, group_grid(weight, "per_ic", 32, 4))


def test_scale_refits_option_lowers_the_pass_error():
    rng = np.random.default_rng(7)
    x = activations(rng, outlier=[9], scale=15.0)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    stats = stats_of(x)
    errors = {}
    for refits in (0, 2):
        model = one_linear_model(weight)
        result = QuantEaseRoundPass(iterations=4, scale_refits=refits).with_stats(stats)(model)
        errors[refits] = result.record["layers"][0]["relative_output_error"]
        y = run(model, x[:64])
        measured = float(((y - x[:64] @ weight) ** 2).sum(axis=1).mean())
        assert measured > 0
    assert errors[2] < errors[0]


def test_rtn_and_quantease_share_one_matmul_nbits_writer():

    rng = np.random.default_rng(8)
    x = activations(rng, rows=256)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    for bits in (3, 4):
        model = one_linear_model(weight)
        QuantEaseRoundPass(bits=bits, iterations=2).with_stats(stats_of(x))(model)
        node = next(n for n in model.graph if n.op_type == "MatMulNBits")
        assert node.attributes["bits"].as_int() == 4  # 3-bit levels travel in 4-bit containers
        levels = None
        initializers = {v.name.rsplit("_", 1)[-1]: v.const_value.numpy() for v in node.inputs[1:]}
        # decode B back to levels and re-encode through weight_only's writer: identical bytes

        b = initializers["B"]
        levels = unpack_levels(b, 4, 32).reshape(N, -1).T[:K]
        zero = unpack_levels(initializers["points"].reshape(N, -1), 4, K // 32).T

        grid = GroupGrid("per_oc", 32, bits, initializers["scales"].reshape(N, -1).T.copy(), zero)
        tensors = matmul_nbits_tensors(BlockwiseWeight(levels, grid, symmetric=False))
        np.testing.assert_array_equal(tensors["B"], b)
        np.testing.assert_array_equal(tensors["zero_points"], initializers["points"])
        assert levels.max() <= 2**bits - 1


@pytest.mark.parametrize("bits", [3, 4])
def test_outlier_path_keeps_exactly_the_chosen_weights_in_float(bits):

    rng = np.random.default_rng(9)
    x = activations(rng, outlier=[7, 40], scale=30.0)
    weight = rng.standard_t(2.5, size=(K, N)).astype(np.float32)
    stats = stats_of(x)
    fraction = 0.01
    model = one_linear_model(weight)
    result = QuantEaseRoundPass(bits=bits, iterations=3, outlier_fraction=fraction).with_stats(stats)(model)
    sigma, _ = second_moment(stats["x"], 0.01)
    chosen = select_outlier_weights(weight.astype(np.float64), np.diag(sigma), fraction)
    assert chosen.sum() == int(np.ceil(fraction * K * N)) == result.record["layers"][0]["float_weights"]
    nodes = {n.op_type: n for n in model.graph}
    rows = nodes["Gather"].inputs[1].const_value.numpy()
    side = nodes["MatMul"].inputs[1].const_value.numpy()
    np.testing.assert_array_equal(rows, np.flatnonzero(chosen.any(axis=1)))
    full_side = np.zeros((K, N), np.float32)
    full_side[rows] = side
    assert np.array_equal(full_side != 0, chosen)  # float exactly where chosen, nowhere else
    # the int4 path holds the zero point there, so int4 + float reproduces W on the chosen
    # weights and the dequantized grid value everywhere else
    combined = run(model, np.eye(K, dtype=np.float32))  # the effective weight Ŵ + H, row by row
    int_part = combined - full_side
    np.testing.assert_allclose(combined[chosen], weight[chosen], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(int_part[chosen], 0.0, atol=1e-6)
    # elsewhere the int path is on the group grid: few distinct values per (group, column)
    for g in range(K // 32):
        column = int_part[g * 32:(g + 1) * 32, 0]
        assert len(np.unique(np.round(column, 6))) <= 2**bits


def test_bias_correction_removes_the_mean_output_error():
    rng = np.random.default_rng(10)
    x = activations(rng) + rng.normal(size=K).astype(np.float32) * 3.0  # channels with a large mean
    weight = rng.normal(size=(K, N)).astype(np.float32)
    bias = rng.normal(size=N).astype(np.float32)
    stats = stats_of(x)
    mean_error, total = {}, {}
    for correct in (False, True):
        proto = ir.serde.serialize_model(one_linear_model(weight))
        proto.graph.node[0].output[0] = "xw"
        proto.graph.node.append(helper.make_node("Add", ["xw", "b"], ["y"], name="bias"))
        proto.graph.initializer.append(numpy_helper.from_array(bias, "b"))
        model = ir.serde.deserialize_model(proto)
        result = QuantEaseRoundPass(iterations=3, bias_correction=correct).with_stats(stats)(model)
        error = run(model, x) - (x @ weight + bias)
        mean_error[correct] = float(np.abs(error.mean(axis=0)).max())
        total[correct] = float((error**2).sum(axis=1).mean())
        if correct:
            assert result.record["layers"][0]["bias_correction"] == "folded"
            ops = collections.Counter(n.op_type for n in model.graph)
            assert ops["Add"] == 1  # folded into the existing bias, no node added
    assert mean_error[True] < 1e-3 * max(mean_error[False], 1e-9) + 1e-4
    assert total[True] < total[False]
    # without a bias to fold into, an Add carries the correction
    model = one_linear_model(weight)
    result = QuantEaseRoundPass(iterations=3, bias_correction=True).with_stats(stats)(model)
    assert result.record["layers"][0]["bias_correction"] == "inserted Add"
    assert float(np.abs((run(model, x) - x @ weight).mean(axis=0)).max()) < 1e-3


def test_refit_options_are_validated():
    with pytest.raises(ValueError, match="scale_refits"):
        QuantEaseOptions(scale_refits=-1)
    with pytest.raises(ValueError, match="scale_refits"):
        AdaDimOptions(scale_refits=1, rounding="rtn")
    assert AdaDimOptions(scale_refits=1, rounding="quantease").scale_refits == 1


# -- sequential calibration (GPTQ order, GPTAQ fp32-output target) ----------------------------


def paired_rows(rng, rows=1024):
    """``x_f`` and a perturbed copy ``x_q`` (an upstream layer's quantization noise)."""
    x_f = activations(rng, rows).astype(np.float64) + rng.normal(size=K) * 2.0
    x_q = x_f + 0.2 * rng.normal(size=x_f.shape) + 0.1 * x_f @ (rng.normal(size=(K, K)) / np.sqrt(K))
    return x_q, x_f


@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_fp32_output_target_reduction_is_exact(damp):
    """||X_q Q − X_f W||²/n + λ||Q − W||² = tr((Q − W')ᵀ Σ (Q − W')) + const, for any Q."""

    rng = np.random.default_rng(11)
    x_q, x_f = paired_rows(rng)
    weight = rng.normal(size=(K, N))
    moments = InputMoments.from_rows(x_q, x_f, damp, centered=False)
    target = moments.target(weight)
    assert np.abs(target - weight).max() > 1e-2  # the upstream noise does move the target
    gaps = []
    for scale in (0.0, 0.1, 1.0):
        q = weight + scale * rng.normal(size=(K, N))
        direct = gptaq_objective(x_q, x_f, weight, q, damp)
        gaps.append(direct - output_error(q - target, moments.sigma))
    # the constant does not depend on Q (relative to the objective's size)
    scale = gptaq_objective(x_q, x_f, weight, weight + rng.normal(size=(K, N)), damp)
    assert max(gaps) - min(gaps) <= 1e-6 * scale
    # and W' is the minimiser: no perturbation of it does better
    best = gptaq_objective(x_q, x_f, weight, target, damp)
    assert best <= gptaq_objective(x_q, x_f, weight, target + 1e-3 * rng.normal(size=(K, N)), damp)


def test_centered_moments_and_correction_give_the_fp32_output_mean():
    """With bias correction the mean of X_q Q + b − X_f W is zero and the rest is the centred objective."""

    rng = np.random.default_rng(12)
    x_q, x_f = paired_rows(rng)
    weight = rng.normal(size=(K, N))
    q = weight + 0.05 * rng.normal(size=(K, N))
    moments = InputMoments.from_rows(x_q, x_f, 0.0, centered=True)
    residual = x_q @ q + moments.correction(weight, q) - x_f @ weight
    assert np.abs(residual.mean(axis=0)).max() < 1e-9 * np.abs(x_f @ weight).max()
    target = moments.target(weight)
    q2 = weight + 0.05 * rng.normal(size=(K, N))
    residual2 = x_q @ q2 + moments.correction(weight, q2) - x_f @ weight
    direct = ((residual**2).sum(axis=1).mean() - (residual2**2).sum(axis=1).mean())
    reduced = output_error(q - target, moments.sigma) - output_error(q2 - target, moments.sigma)
    assert direct == pytest.approx(reduced, rel=1e-6)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_sequential_equals_plain_with_nothing_upstream(bias_correction):
    """One linear: its quantized input is its fp32 input, so sequential == non-sequential."""
    rng = np.random.default_rng(13)
    x = activations(rng, rows=1024) + rng.normal(size=K).astype(np.float32)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    feeds = [{"x": x[i:i + 256]} for i in range(0, 1024, 256)]
    outputs, records = {}, {}
    for sequential in (False, True):
        model = one_linear_model(weight)
        pass_ = QuantEaseRoundPass(iterations=4, bias_correction=bias_correction, sequential=sequential)
        assert pass_.reads() == ({"feeds"} if sequential else {"stats"})
        pass_ = pass_.with_feeds(feeds) if sequential else pass_.with_stats(stats_of(x))
        result = pass_(model)
        records[sequential] = result.record["layers"][0]
        outputs[sequential] = run(model, x)
    assert result.record["sequential"] == {"stages": 1, "rows": 1024, "target": "fp32_output"}
    assert records[True]["relative_output_error"] == pytest.approx(records[False]["relative_output_error"], rel=1e-4)
    reference = x @ weight
    assert np.abs(outputs[True] - outputs[False]).max() <= 1e-4 * np.abs(reference).max()


def _llama_error(path, model_pass, calibration, evaluation) -> tuple[float, dict]:
    model = ir.load(str(path))
    CanonicalizePass()(model)
    if "stats" in model_pass.reads():
        model_pass.with_stats(collect_statistics(model, calibration, tensors=quantizable_targets(model, outputs=False),
                                                 covariance_for=model_pass.covariance_targets(model), progress=False))
    if "feeds" in model_pass.reads():
        model_pass.with_feeds(calibration)
    record = model_pass(model).record
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    assert "ai.outlierquant" not in {o.domain for o in proto.opset_import}  # plain onnxruntime runs it
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    error = signal = 0.0
    for feed in evaluation:
        a, b = reference.run(None, feed)[0], session.run(None, feed)[0]
        error += float(((a - b) ** 2).sum())
        signal += float((a**2).sum())
    return error / signal, record


def test_sequential_rounding_lowers_the_tiny_llama_output_error(tiny_llama):
    """Held-out output error vs fp32 (onnxruntime): the fp32-output target beats per-layer fp32 rounding."""
    calibration = synthetic.random_feeds(tiny_llama, 16, seed=1)
    evaluation = synthetic.random_feeds(tiny_llama, 4, seed=2)
    errors = {}
    for sequential in (False, True):
        pass_ = QuantEaseRoundPass(iterations=3, bias_correction=True, group_size=16, damp=0.3, sequential=sequential)
        errors[sequential], record = _llama_error(tiny_llama, pass_, calibration, evaluation)
        if sequential:
            assert 1 < record["sequential"]["stages"] < len(record["layers"])  # q/k/v share a stage
    assert errors[True] < errors[False]


def test_sequential_options_are_validated():
    with pytest.raises(ValueError, match="sequential_target"):
        QuantEaseOptions(sequential=True, sequential_target="input")
    with pytest.raises(ValueError, match="sequential_rows"):
        QuantEaseOptions(sequential=True, sequential_rows=4)
    with pytest.raises(ValueError, match="sequential="):
        QuantEaseOptions(sequential="yes")
    with pytest.raises(ValueError, match="activation_bits"):
        AdaDimOptions(sequential=True, activation_bits=8)
    with pytest.raises(RecipeError, match="sequential_target"):
        validate_pass_options("quantease", {"sequential": True, "sequential_target": "gptq"})
    with pytest.raises(CalibrationError, match="quantease reads the calibration samples"):
        QuantEaseRoundPass(sequential=True)(one_linear_model(np.ones((K, N), np.float32)))


@pytest.mark.parametrize("case", ["quantease-outliers", "adadim-adaptive", "sequential-holdout"])
def test_column_slabs_give_the_one_slab_rounding(case, monkeypatch):
    """The rounding of a linear goes a slab of output columns at a time on large weights
    (an LM head): everything it decides is per column (per_ic: per group of columns), so
    slabs must give the one-pass result: the same levels, layout, outlier weights, bias
    correction and errors (scored sums to float precision)."""
    from outlierquant.passes import weight_rounding

    rng = np.random.default_rng(21)
    n = 160  # five groups of 32 columns: slabs of 64 cut it 64 + 64 + 32
    x = activations(rng, outlier=[7, 40], scale=30.0)
    weight = rng.standard_t(2.5, size=(K, n)).astype(np.float32)
    feeds = [{"x": x[i:i + 128]} for i in range(0, 1024, 128)]

    def make():
        if case == "quantease-outliers":
            return QuantEaseRoundPass(bits=3, iterations=3, outlier_fraction=0.01, scale_refits=1,
                                      bias_correction=True).with_stats(stats_of(x))
        if case == "adadim-adaptive":
            return AdaDimQuantizePass(dimension="adaptive", rounding="quantease", iterations=3, scale_refits=1,
                                      bias_correction=True).with_stats(stats_of(x))
        return AdaDimQuantizePass(dimension="adaptive", rounding="quantease", iterations=3, bias_correction=True,
                                  sequential=True, damp_candidates=(0.01, 1.0)).with_feeds(feeds)

    results = {}
    for width in (None, 64):
        if width is not None:
            monkeypatch.setattr(weight_rounding, "_column_slabs",
                                lambda k, count, group: [slice(s, s + width) for s in range(0, count, width)])
        model = one_linear_model(weight)
        record = make()(model).record
        tensors = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()
                   if v.const_value is not None}
        results[width] = (record["layers"][0], tensors, run(model, x[:64]))
    (whole, whole_tensors, whole_y), (slabbed, slab_tensors, slab_y) = results[None], results[64]
    assert whole["dimension"] == slabbed["dimension"]
    assert whole.get("float_weights") == slabbed.get("float_weights")
    assert whole["relative_output_error"] == pytest.approx(slabbed["relative_output_error"], rel=1e-9)
    for layout, error in whole["errors"].items():
        assert slabbed["errors"][layout] == pytest.approx(error, rel=1e-9)
    if "holdout" in whole:
        assert whole["holdout"]["damp"] == slabbed["holdout"]["damp"]
        for damp, error in whole["holdout"]["errors"].items():
            assert slabbed["holdout"]["errors"][damp] == pytest.approx(error, rel=1e-9)
    assert whole_tensors.keys() == slab_tensors.keys()
    for name, array in whole_tensors.items():
        if array.dtype == np.uint8:  # packed levels: identical
            np.testing.assert_array_equal(slab_tensors[name], array, err_msg=name)
        else:
            np.testing.assert_allclose(slab_tensors[name], array, rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(slab_y, whole_y, rtol=1e-5, atol=1e-5)
