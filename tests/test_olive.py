"""OliVe outlier-victim pairs: the pair encoding, its graph form, and the pass on MiniLM."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import load_canonical, run_outputs
from onnx import TensorProto, helper

from outlierquant.calibration.collect import collect_statistics
from outlierquant.errors import CalibrationError, RecipeError
from outlierquant.passes.olive import OlivePass, PairFormat, ovp_quantize, search_scale
from outlierquant.recipes import load_recipe, validate_pass_options

# -- formats ------------------------------------------------------------------------------


def test_abfloat_ranges_start_above_the_int_range():
    four, eight = PairFormat(4), PairFormat(8)
    np.testing.assert_array_equal(four.outlier_levels(), [12, 16, 24, 32, 48, 64, 96])
    assert four.int_max == 7 and four.outlier_cutoff == 9.5
    levels = eight.outlier_levels()
    assert eight.int_max == 127 and levels[0] == 132 and levels[-1] == 2016 and len(levels) == 127
    # 2^b - 1 codes per sign: the ints use 2^(b-1) - 1 of them, the abfloats the rest but one
    assert len(four.outlier_levels()) == 2 ** 3 - 1


# -- the pair encoding (numpy reference) --------------------------------------------------


def _nearest(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    index = np.abs(values[..., None] - levels).argmin(axis=-1)
    return levels[index]


@pytest.mark.parametrize("bits", [4, 8])
def test_one_outlier_zeroes_its_victim_and_is_representable(bits):
    fmt = PairFormat(bits)
    scale = 0.5
    # pairs: (normal, outlier), (outlier, normal), (normal, normal)
    x = np.array([[1.2, 37.0 * scale * fmt.int_max / 7, -50.0 * scale * fmt.int_max / 7, 0.7, 2.2, -1.4]])
    out, mask = ovp_quantize(x, scale, bits)
    np.testing.assert_array_equal(mask, [[True, True, False]])
    assert out[0, 0] == 0.0 and out[0, 3] == 0.0  # victims
    levels = fmt.all_levels() * scale
    for i in (1, 2):  # the outliers sit on abfloat levels, at the nearest one
        assert np.abs(out[0, i]) > fmt.int_max * scale
        assert out[0, i] == _nearest(x[0, i], levels)
    np.testing.assert_array_equal(out[0, 4:], np.rint(x[0, 4:] / scale) * scale)


def test_normal_values_are_plain_round_to_nearest():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3.4, 3.4, size=(16, 32)).astype(np.float32)
    scale = np.float32(0.5)
    out, mask = ovp_quantize(x, scale, 4)
    assert not mask.any()
    np.testing.assert_array_equal(out, np.rint(x / scale) * scale)
    assert np.abs(out - x).max() <= scale / 2 + 1e-7


def test_two_outliers_keep_the_larger_and_ties_keep_the_first():
    out, mask = ovp_quantize(np.array([20.0, -44.0, 30.0, 30.0, 64.0, 20.0]), 1.0, 4)
    np.testing.assert_array_equal(out, [0.0, -48.0, 32.0, 0.0, 64.0, 0.0])
    assert mask.all()


@pytest.mark.parametrize("bits", [4, 8])
def test_every_kept_value_is_the_nearest_level(bits):
    fmt = PairFormat(bits)
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((64, 48)) * np.where(rng.random((64, 48)) < 0.05, 40.0, 1.0)
    scale = 3.0 / fmt.int_max
    out, mask = ovp_quantize(x, scale, bits)
    assert 0 < mask.mean() < 0.5
    expected = _nearest(np.clip(x / scale, -fmt.outlier_max, fmt.outlier_max), fmt.all_levels()) * scale
    pairs = out.reshape(64, 24, 2)
    victims = (pairs == 0) & (np.abs(expected.reshape(64, 24, 2)) > 0) & mask[..., None]
    kept = ~victims.reshape(64, 48)
    np.testing.assert_allclose(out[kept], expected[kept], rtol=1e-12)
    # exactly one victim per outlier pair, never in a pair without outliers
    assert (victims.sum(axis=-1) <= 1).all() and not victims[~mask].any()


def test_values_beyond_the_range_clip_to_the_largest_outlier():
    out, _ = ovp_quantize(np.array([1000.0, 0.5]), 1.0, 4)
    np.testing.assert_array_equal(out, [96.0, 0.0])


def test_odd_pair_axis_is_rejected_clearly():
    with pytest.raises(ValueError, match="must be even"):
        ovp_quantize(np.ones((2, 7)), 1.0, 4)
    with pytest.raises(ValueError, match="4 and 8"):
        ovp_quantize(np.ones((2, 8)), 1.0, 3)


def test_scale_search_beats_or_matches_every_fixed_ratio():
    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((8, 64)) * np.where(rng.random((8, 64)) < 0.03, 30.0, 1.0)).astype(np.float32)
    alpha = np.abs(rows).std(axis=-1, keepdims=True).astype(np.float32) * 3
    scale = search_scale(rows, alpha, 4)
    assert scale.shape == (8, 1)
    best = ((ovp_quantize(rows, scale, 4)[0] - rows) ** 2).sum(axis=-1)
    plain = ((ovp_quantize(rows, alpha / 7, 4)[0] - rows) ** 2).sum(axis=-1)
    assert (best <= plain + 1e-6).all()


# -- the graph form -----------------------------------------------------------------------


def _linear_model(k: int, n: int = 6, seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="linear"), helper.make_node("Relu", ["h"], ["y"])],
        "olive_test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _feeds(k: int, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(count):
        x = rng.standard_normal((1, 5 + i % 3, k)).astype(np.float32)
        x[..., 3] *= 25.0  # an outlier channel, as in LLM activations
        feeds.append({"x": x})
    return feeds


def _prepared(model: ir.Model, pass_: OlivePass, feeds) -> OlivePass:
    stats = collect_statistics(model, feeds, tensors=pass_.calibration_targets(model), progress=False)
    return pass_.with_stats(stats).with_feeds(feeds)


@pytest.mark.parametrize(("bits", "activation_scale", "sigmas"), [(4, "mse", 3.0), (8, "sigma", 1.0)])
def test_graph_form_matches_the_numpy_reference(bits, activation_scale, sigmas):
    k = 16
    model = _linear_model(k)
    feeds = _feeds(k, 6, seed=1)
    pass_ = _prepared(model, OlivePass(weight_bits=bits, activation_bits=bits, activation_scale=activation_scale,
                                       threshold_sigmas=sigmas), feeds)
    record = pass_(model).record
    entry = record["layers"]["linear"]
    assert record["simulated"] and record["quantized_layers"] == 1
    assert entry["activation_outlier_pairs"] > 0.05  # channel 3 makes every token's pair 1 an outlier pair
    assert entry["weight_outlier_pairs"] >= 0.0
    scale = np.float32(entry["activation_scale"])
    weight = model.graph.initializers["w"].const_value.numpy()

    linear = next(node for node in model.graph if node.op_type == "MatMul")
    model.graph.outputs.append(linear.inputs[0])  # the fake-quantized activation
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    # a dense sweep over the whole int + abfloat range (and beyond), in random pair order
    fmt = PairFormat(bits)
    sweep = np.linspace(-1.1 * fmt.outlier_max, 1.1 * fmt.outlier_max, 64 * 32 * k, dtype=np.float32) * scale
    sweep = np.random.default_rng(5).permutation(sweep).reshape(1, -1, k // 2, 2)
    sweep[:, ::4, :, 1] = sweep[:, ::4, :, 0]  # pairs of equal magnitudes: the tie rule
    sweep[:, 1::4, :, 1] = -sweep[:, 1::4, :, 0]
    sweep = sweep.reshape(1, -1, k)
    (_, activation) = session.run(None, {"x": sweep})
    np.testing.assert_array_equal(activation, ovp_quantize(sweep, scale, bits)[0])
    test = _feeds(k, 3, seed=7) + [{"x": np.random.default_rng(9).standard_normal((2, 4, k)).astype(np.float32) * 4}]
    for feed in test:
        (got, _) = session.run(None, feed)
        reference = np.maximum(ovp_quantize(feed["x"], scale, bits)[0] @ weight, 0)
        assert np.abs(got - reference).max() <= 1e-4 * np.abs(reference).max()
        # and the fake quantization is real: fp32 differs
        fp32 = np.maximum(feed["x"] @ _linear_model(k).graph.initializers["w"].const_value.numpy(), 0)
        assert not np.allclose(got, fp32)


def test_weights_are_encoded_per_output_channel_along_k():
    k = 32
    model = _linear_model(k, n=5)
    original = model.graph.initializers["w"].const_value.numpy().copy()
    original[7, 2] = 30.0  # a weight outlier: its pair partner (row 6, column 2) becomes the victim
    model.graph.initializers["w"].const_value = ir.tensor(original, name="w")
    record = OlivePass(weight_bits=4, activation_bits=None, weight_scale="sigma")(model).record
    encoded = model.graph.initializers["w"].const_value.numpy()
    assert encoded[6, 2] == 0.0 and abs(encoded[7, 2] - 30.0) < 30.0 * 0.25
    assert record["layers"]["linear"]["weight_outlier_pairs"] >= 1 / (5 * 16)
    column = original[:, 2]
    alpha = abs(column.mean()) + 3 * column.std()
    np.testing.assert_allclose(encoded[:, 2], ovp_quantize(column.astype(np.float32), np.float32(alpha / 7), 4)[0],
                               rtol=1e-6)


def test_odd_k_and_excluded_layers_are_skipped_with_the_reason():
    model = _linear_model(7)
    record = OlivePass(activation_bits=None)(model).record
    assert record["quantized_layers"] == 0 and "odd K=7" in record["skipped"]["linear"]
    model = _linear_model(8)
    record = OlivePass(activation_bits=None, exclude=("lin*",))(model).record
    assert record["skipped"] == {"linear": "excluded"}


def test_no_pair_ablation_clips_outliers():
    k = 16
    model = _linear_model(k)
    feeds = _feeds(k, 4, seed=2)
    pass_ = _prepared(model, OlivePass(activation_bits=4, pairs=False, activation_scale="sigma"), feeds)
    record = pass_(model).record
    assert record["layers"]["linear"]["activation_outlier_pairs"] == 0.0
    assert collections.Counter(n.op_type for n in model.graph)["Gather"] == 0


# -- options and recipes ------------------------------------------------------------------


@pytest.mark.parametrize(("options", "field"), [
    ({"weight_bits": 3}, "weight_bits"),
    ({"activation_bits": 6}, "activation_bits"),
    ({"threshold_sigmas": 0}, "threshold_sigmas"),
    ({"weight_scale": "max"}, "weight_scale"),
    ({"activation_scale": "percentile"}, "activation_scale"),
    ({"exclude": [""]}, "exclude"),
    ({"activation_sample_rows": 2}, "activation_sample_rows"),
])
def test_bad_options_are_rejected_naming_the_field(options, field):
    with pytest.raises(RecipeError, match=field):
        validate_pass_options("olive", options)


def test_recipes_load_and_say_simulated():
    for name, bits in (("olive-w4a4", 4), ("olive-w8a8", 8)):
        recipe = load_recipe(name)
        assert "SIMULATED" in recipe.description
        spec = next(s for s in recipe.passes if s.name == "olive")
        options = dict(spec.options)
        assert options["weight_bits"] == options["activation_bits"] == bits


def test_mse_activation_scale_needs_feeds():
    model = _linear_model(8)
    feeds = _feeds(8, 2, seed=0)
    stats = collect_statistics(model, feeds, progress=False)
    with pytest.raises(CalibrationError, match="olive reads the calibration samples"):
        OlivePass(activation_bits=8).with_stats(stats)(model)


# -- MiniLM end to end --------------------------------------------------------------------


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_minilm_w8a8_end_to_end(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    model = load_canonical(minilm_onnx)
    reference = run_outputs(model, heldout)
    pass_ = OlivePass(weight_bits=8, activation_bits=8, weight_scale="sigma")
    stats = collect_statistics(model, calibration, tensors=pass_.calibration_targets(model), progress=False)
    record = pass_.with_stats(stats).with_feeds(calibration)(model).record
    assert record["quantized_layers"] == 36 and record["skipped"] == {}
    assert 0.0 < record["mean_activation_outlier_pairs"] < 0.1
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    after = run_outputs(model, heldout)
    cosines = [_cosine(b[0], a[0]) for b, a in zip(reference, after)]
    assert min(cosines) > 0.98
    assert max(abs(1 - c) for c in cosines) > 0.0  # simulated quantization did change the function
