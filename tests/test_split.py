"""LLM.int8() decomposition and SplitQuant: fp32 equivalence of the float splits, the
int8 forms in plain onnxruntime, outlier selection, options."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import synthetic
from helpers import load_canonical as load
from helpers import max_relative_error
from helpers import run_outputs as outputs

from outlierquant.calibration.collect import collect_statistics
from outlierquant.emit.qdq import add_probs_residual
from outlierquant.errors import CalibrationError, RecipeError
from outlierquant.graph.attention import probs_input_index, probs_step, quantized_source
from outlierquant.graph.edit import write_linear_weight
from outlierquant.graph.values import constant_array
from outlierquant.numerics.estimates import lost_mass
from outlierquant.numerics.outliers import select_outlier_channels
from outlierquant.numerics.rounding import quantease_int8_weight
from outlierquant.passes.llm_int8 import LlmInt8Options, LlmInt8SplitPass
from outlierquant.passes import splitquant as splitquant_module
from outlierquant.passes.splitquant import SplitQuantOptions, SplitQuantPass, split_weight_clusters
from outlierquant.recipes import load_recipe, validate_pass_options

RTOL = 1e-4


def cosine(before, after) -> float:
    a = np.concatenate([s[0].reshape(-1) for s in before])
    b = np.concatenate([s[0].reshape(-1) for s in after])
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def rewrite(path: Path, calibration, pass_):
    model = load(path)
    ops_before = collections.Counter(node.op_type for node in model.graph)
    if "stats" in pass_.reads():
        pass_.with_stats(collect_statistics(model, calibration, progress=False))
    result = pass_(model)
    onnx.checker.check_model(ir.serde.serialize_model(model))
    ops_after = collections.Counter(node.op_type for node in model.graph)
    return model, result, ops_before, ops_after


# -- unit math -----------------------------------------------------------------------------------


def test_outlier_selection_threshold_top_k_and_cap():
    absmax = np.array([1.0, 7.0, 2.0, 60.0, 6.0, 0.5, 3.0, 9.0])
    value_range = absmax * 2
    assert select_outlier_channels(absmax, value_range).tolist() == [1, 3, 4, 7]
    assert select_outlier_channels(absmax, value_range, threshold=8.0).tolist() == [3, 7]
    assert select_outlier_channels(absmax, value_range, criterion="top_k", top_k=2).tolist() == [3, 7]
    # at most 2 of 8 channels, the largest
    assert select_outlier_channels(absmax, value_range, max_share=0.25).tolist() == [3, 7]
    # relative: median max is 4.5, so ratio 2 keeps channels >= 9; scale-free
    assert select_outlier_channels(absmax, criterion="relative", ratio=2.0).tolist() == [3, 7]
    assert select_outlier_channels(absmax * 1e-3, criterion="relative", ratio=2.0).tolist() == [3, 7]
    with pytest.raises(ValueError, match="ratio"):
        LlmInt8Options(criterion="relative", ratio=1.0)


def test_splitquant_clusters_partition_the_weight():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 48)).astype(np.float32)
    weight[3, 5] = 40.0
    for options in (SplitQuantOptions(), SplitQuantOptions(method="quantile")):
        parts, (lower, upper) = split_weight_clusters(weight, options)
        assert lower < upper
        np.testing.assert_array_equal(parts[0] + parts[1] + parts[2], weight)
        nonzero = [p != 0 for p in parts]
        assert not np.any(nonzero[0] & nonzero[1]) and not np.any(nonzero[1] & nonzero[2])
        assert np.abs(parts[1]).max() < 0.5 * np.abs(weight).max()  # the middle cluster gets a finer grid


def _reference_kmeans_boundaries(weight: np.ndarray, iterations: int) -> tuple[float, float]:
    """The k-means on a float64 sorted copy and its whole prefix-sum array (4x the weight)."""
    values = np.sort(weight.astype(np.float64).reshape(-1))
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    centroids = np.quantile(values, [1 / 6, 1 / 2, 5 / 6])
    lower = upper = 0.0
    for _ in range(iterations):
        lower, upper = (centroids[0] + centroids[1]) / 2, (centroids[1] + centroids[2]) / 2
        cuts = [0, np.searchsorted(values, lower), np.searchsorted(values, upper), values.size]
        updated = centroids.copy()
        for c in range(3):
            if cuts[c + 1] > cuts[c]:
                updated[c] = (prefix[cuts[c + 1]] - prefix[cuts[c]]) / (cuts[c + 1] - cuts[c])
        if np.allclose(updated, centroids, rtol=0, atol=1e-12):
            break
        centroids = updated
    return float(lower), float(upper)


@pytest.mark.parametrize("block", [7, 64, 2**16])
def test_splitquant_kmeans_on_float32_blocks_is_the_float64_kmeans(monkeypatch, block):
    """The bounded k-means (float32 sort, prefix sums kept per block) finds the boundaries
    the float64 sort with its whole prefix array finds, bit for bit, with blocks cut
    anywhere; and the record's cluster sizes and middle range are the parts' own."""
    monkeypatch.setattr(splitquant_module._SortedValues, "BLOCK", block)
    rng = np.random.default_rng(block)
    for trial in range(12):
        shape = (int(rng.integers(1, 200)), int(rng.integers(1, 150)))
        weight = (rng.standard_t(3, size=shape) * 10 ** rng.uniform(-3, 1)).astype(np.float32)
        if trial % 4 == 0:
            weight[np.abs(weight) < np.median(np.abs(weight))] = 0  # many exact zeros
        for iterations in (2, 30):
            expected = _reference_kmeans_boundaries(weight, iterations)
            parts, bounds = split_weight_clusters(weight, SplitQuantOptions(iterations=iterations))
            assert bounds == expected
            record = splitquant_module._cluster_record(np.sort(weight.reshape(-1)), bounds)
            assert record["cluster_sizes"] == [int(np.count_nonzero(p)) for p in parts]
            absmax = float(np.abs(weight).max()) or 1.0
            assert record["middle_range_ratio"] == float(np.abs(parts[1]).max() / absmax)


def test_options_are_validated_with_the_field_name():
    with pytest.raises(ValueError, match="kernels"):
        LlmInt8Options(kernels="sometimes")
    with pytest.raises(ValueError, match="top_k"):
        LlmInt8Options(criterion="top_k")
    with pytest.raises(ValueError, match="max_share"):
        LlmInt8Options(max_share=1.5)
    with pytest.raises(ValueError, match="method"):
        SplitQuantOptions(method="gmm")
    with pytest.raises(RecipeError, match="threshhold"):
        validate_pass_options("llm_int8", {"threshhold": 6.0})
    assert load_recipe("llm-int8").passes[1].name == "llm-int8"
    assert load_recipe("splitquant-w8a8").passes[1].name == "splitquant"


# -- LLM.int8(): the float split is exact ----------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama", "planted_llama", "tiny_opt"])
def test_float_split_is_equivalent_on_synthetic_decoders(request, fixture):
    path = request.getfixturevalue(fixture)
    calibration = synthetic.random_feeds(path, 6, seed=1)
    evaluation = synthetic.random_feeds(path, 3, seed=2)
    reference = outputs(load(path), evaluation)
    # a low threshold so that every layer has float channels to split off
    model, result, before, after = rewrite(path, calibration, LlmInt8SplitPass(quantize=False, threshold=1.0))
    record = result.record
    assert result.modified and record["form"] == "float"
    assert max_relative_error(reference, outputs(model, evaluation)) <= RTOL
    split_layers = sum(1 for layer in record["layers"] if layer["float_channels"])
    # one Gather per split input tensor: linears sharing an input (q/k/v) share it
    assert split_layers > 0 and 0 < after["Gather"] - before["Gather"] < split_layers
    assert after.get("Gemm", 0) == 0  # Gemm layers (tiny OPT) rewritten as MatMul + bias
    # the lm_head (its output is the logits graph output) stays in float by default
    heads = [item for item in record["skipped"] if item["reason"].startswith("output layer")]
    assert len(heads) == 1 and not any(layer["linear"] == heads[0]["linear"] for layer in record["layers"])


def test_planted_channels_are_the_float_channels(planted_llama):
    calibration = synthetic.random_feeds(planted_llama, 6, seed=1)
    _, result, _, _ = rewrite(planted_llama, calibration, LlmInt8SplitPass(quantize=False, criterion="top_k", top_k=2))
    first_layer = result.record["layers"][:3]  # q, k, v of layer 0 read the planted norm output
    assert all(layer["channels"] == [3, 17] for layer in first_layer)


def test_minilm_float_split_is_equivalent(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    random = synthetic.random_feeds(minilm_onnx, 2, seed=3)
    base = load(minilm_onnx)
    references = [outputs(base, heldout), outputs(base, random)]
    model, result, _, _ = rewrite(minilm_onnx, calibration, LlmInt8SplitPass(quantize=False))
    assert 0 < result.record["float_channel_share"] <= 0.01
    for feeds, reference in zip((heldout, random), references):
        assert max_relative_error(reference, outputs(model, feeds)) <= RTOL


# -- LLM.int8(): the quantized forms ---------------------------------------------------------------


def test_minilm_integer_form_runs_in_plain_onnxruntime(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    reference = outputs(load(minilm_onnx), heldout)
    model, result, _, after = rewrite(minilm_onnx, calibration, LlmInt8SplitPass(kernels="standard"))
    assert result.record["form"] == "integer"
    assert all(node.domain in ("", "ai.onnx") for node in model.graph)
    assert after["MatMulInteger"] == len(result.record["layers"]) == 36
    quantized = outputs(model, heldout)  # plain session: nothing registered
    assert cosine(reference, quantized) > 0.999
    # without float channels the same int8 path is visibly worse
    model, _, _, _ = rewrite(minilm_onnx, calibration, LlmInt8SplitPass(kernels="standard", threshold=1e9))
    assert cosine(reference, outputs(model, heldout)) < cosine(reference, quantized)


def test_qdq_form_declares_per_token_activations(tiny_llama):
    calibration = synthetic.random_feeds(tiny_llama, 6, seed=1)
    evaluation = synthetic.random_feeds(tiny_llama, 2, seed=2)
    reference = outputs(load(tiny_llama), evaluation)
    model, result, before, after = rewrite(tiny_llama, calibration,
                                           LlmInt8SplitPass(kernels="standard", standard_form="qdq", threshold=1.0))
    assert result.record["simulated"]
    assert after["DequantizeLinear"] == len(result.record["layers"])  # one int8 weight per layer
    # one per-token activation rounding per split input, shared by the linears reading it
    assert 0 < after["Round"] < len(result.record["layers"])
    assert cosine(reference, outputs(model, evaluation)) > 0.99


def test_static_activations_quantize_only_the_inlier_channels(planted_llama):
    calibration = synthetic.random_feeds(planted_llama, 6, seed=1)
    evaluation = synthetic.random_feeds(planted_llama, 2, seed=2)
    reference = outputs(load(planted_llama), evaluation)
    model, result, before, after = rewrite(planted_llama, calibration,
                                           LlmInt8SplitPass(activations="static", criterion="top_k", top_k=2))
    record = result.record
    assert record["form"] == "qdq" and not record["simulated"] and after.get("Round", 0) == 0
    assert cosine(reference, outputs(model, evaluation)) > 0.99
    # no keep-mask: W_I's outlier rows are zero, and the QDQ on x, calibrated on the inlier
    # channels only, clips the outlier channels (which those rows ignore)
    stats = collect_statistics(load(planted_llama), calibration, progress=False)
    assert not any(n.op_type == "Mul" and constant_array(n.inputs[1]) is not None
                   and set(np.unique(constant_array(n.inputs[1]))) == {0.0, 1.0} for n in model.graph)
    split_inputs = {n.inputs[0].name for n in model.graph if n.op_type == "Gather" and "llm_int8" in n.name}
    split_layers = sum(1 for layer in record["layers"] if layer["float_channels"])
    # q/k/v (and gate/up) read one tensor with the same float channels: one QDQ, one Gather
    assert 0 < len(split_inputs) == after["Gather"] - before["Gather"] < split_layers
    for node in model.graph:
        if node.op_type == "QuantizeLinear" and node.inputs[0].name in split_inputs:
            st = stats[node.inputs[0].name]
            full_range = (max(st.tensor_max, 0.0) - min(st.tensor_min, 0.0)) / 255
            assert 0 < float(constant_array(node.inputs[1])) < full_range
    with pytest.raises(ValueError, match="static"):
        LlmInt8SplitPass(activations="static", kernels="custom")
    with pytest.raises(ValueError, match="dynamic_matmuls"):
        LlmInt8SplitPass(dynamic_matmuls=True)
    # dynamic_matmuls: both operands of QK^T and probs x V get a static QDQ as well
    full, full_result, _, full_after = rewrite(
        planted_llama, calibration,
        LlmInt8SplitPass(activations="static", criterion="top_k", top_k=2, dynamic_matmuls=True))
    attention = [n for n in full.graph if n.op_type == "MatMul"
                 and all(v.producer() is not None and v.producer().op_type == "DequantizeLinear" for v in n.inputs)
                 and not any(constant_array(v.producer().inputs[0]) is not None for v in n.inputs)]
    assert len(attention) == 2 * synthetic.TINY_LAYERS  # QK^T and probs x V per layer
    assert full_after["QuantizeLinear"] > after["QuantizeLinear"]
    assert cosine(reference, outputs(full, evaluation)) > 0.98


def _residual_sites(model: ir.Model):
    """(P, P̂, V̂, new output) of every probs·V MatMul the residual rewrite touched."""

    sites = []
    for node in model.graph:
        if node.op_type == "Add" and node.name.endswith("_residual_add"):
            main = node.inputs[0].producer()
            index = probs_input_index(main)
            sites.append((quantized_source(main.inputs[index]), main.inputs[index], main.inputs[1 - index],
                          node.outputs[0], index))
    return sites


def test_probs_residual_recovers_what_the_uint8_grid_drops(planted_llama):
    """P·V̂ ≈ P̂·V̂ + R̂·V̂: the second int8 MatMul on the rounding residual of the attention
    probabilities brings probs·V within a small fraction of its uint8-only error."""
    calibration = synthetic.random_feeds(planted_llama, 6, seed=1)
    evaluation = synthetic.random_feeds(planted_llama, 2, seed=2)
    reference = outputs(load(planted_llama), evaluation)
    options = dict(activations="static", criterion="top_k", top_k=2, dynamic_matmuls=True)
    plain, _, _, plain_ops = rewrite(planted_llama, calibration, LlmInt8SplitPass(**options))
    model, result, _, ops = rewrite(planted_llama, calibration, LlmInt8SplitPass(probs_residual="all", **options))
    record = result.record["probs_residual"]
    assert record["residual_matmuls"] == synthetic.TINY_LAYERS == len(record["matmuls"])
    assert all(entry["residual"] and "lost_mass" not in entry for entry in record["matmuls"])  # 'all': not measured
    for op, extra in (("MatMul", 1), ("Sub", 1), ("QuantizeLinear", 1), ("DequantizeLinear", 1), ("Add", 1)):
        assert ops[op] - plain_ops.get(op, 0) == extra * synthetic.TINY_LAYERS, op
    sites = _residual_sites(model)
    assert len(sites) == synthetic.TINY_LAYERS
    for probs, p_hat, v_hat, total, _ in sites:
        model.graph.outputs.extend([probs, p_hat, v_hat, total])
    got = outputs(model, evaluation)
    count = len(reference[0])
    for sample in got:
        extra = sample[count:]
        for layer in range(len(sites)):
            probs, p_hat, v_hat, total = extra[4 * layer: 4 * layer + 4]
            index = sites[layer][4]
            mm = (lambda a, b: a @ b) if index == 0 else (lambda a, b: b @ a)
            exact = mm(probs.astype(np.float64), v_hat)
            uint8_error = np.abs(mm(p_hat.astype(np.float64), v_hat) - exact).max()
            assert uint8_error > 0
            assert np.abs(total - exact).max() <= uint8_error / 20
    assert cosine(reference, got) >= cosine(reference, outputs(plain, evaluation)) - 1e-3
    with pytest.raises(ValueError, match="probs_residual: needs dynamic_matmuls"):
        LlmInt8SplitPass(activations="static", probs_residual="all")
    with pytest.raises(ValueError, match="probs_lost_mass"):
        LlmInt8SplitPass(probs_lost_mass=1.5, **options)
    with pytest.raises(ValueError, match="probs_residual="):
        LlmInt8SplitPass(probs_residual="sometimes", **options)
    # a recipe spells the options in YAML ('off' would read as False there)
    validate_pass_options("llm_int8", {"probs_residual": "none", **options})


def test_probs_residual_on_probabilities_read_by_two_matmuls():
    """One probability tensor feeding two probs·V MatMuls: each gets its own residual, the
    names stay unique, and both outputs come within a small fraction of the uint8 error."""
    from onnx import TensorProto, helper, numpy_helper


    scale = numpy_helper.from_array(np.array(1 / 255, np.float32), "p_scale")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "p_zero")
    nodes = [helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
             helper.make_node("QuantizeLinear", ["probs", "p_scale", "p_zero"], ["probs_q"]),
             helper.make_node("DequantizeLinear", ["probs_q", "p_scale", "p_zero"], ["probs_dq"]),
             helper.make_node("MatMul", ["probs_dq", "v1"], ["out1"], name="pv1"),
             helper.make_node("MatMul", ["probs_dq", "v2"], ["out2"], name="pv2"),
             helper.make_node("Relu", ["out1"], ["y1"]), helper.make_node("Relu", ["out2"], ["y2"])]
    shape = [1, 2, 64, 64]
    graph = helper.make_graph(
        nodes, "two_readers",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("scores", "v1", "v2")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("y1", "y2")], [scale, zero])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    plain = ir.from_proto(ir.serde.serialize_model(model))
    for node in [n for n in model.graph if n.op_type == "MatMul"]:
        assert probs_input_index(node) == 0
        add_probs_residual(model.graph, node, 0)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    rng = np.random.default_rng(0)
    feed = {"scores": (rng.normal(size=shape) * 4).astype(np.float32),
            "v1": rng.normal(size=shape).astype(np.float32), "v2": rng.normal(size=shape).astype(np.float32)}
    scores = feed["scores"].astype(np.float64)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    (got,), (before,) = outputs(model, [feed]), outputs(plain, [feed])
    for y, y_plain, v in zip(got, before, (feed["v1"], feed["v2"])):
        exact = np.maximum(probs @ v, 0)
        assert np.abs(y - exact).max() <= np.abs(y_plain - exact).max() / 20


def _sharpened(path: Path, folder: Path, factor: float = 60.0) -> Path:
    """``path`` with its q projections scaled by ``factor``: peaked attention rows, as in an
    LLM, where many probabilities fall below half a uint8 step (a random tiny model's rows
    are near uniform)."""
    from outlierquant.graph.analysis import analyze_graph

    model = load(path)
    scaled = 0
    for linear in analyze_graph(model).linears:
        if "q_proj" in linear.name:
            write_linear_weight(model.graph, linear, np.asarray(linear.weight_array()) * factor, "sharpened")
            scaled += 1
    assert scaled == synthetic.TINY_LAYERS
    out = folder / "sharpened.onnx"
    ir.save(model, str(out))
    return out


def test_probs_residual_gate_measures_the_mass_below_half_a_step(planted_llama, tmp_path, monkeypatch):

    below, total = lost_mass(np.array([[0.9, 0.001, 0.0015, 0.0975], [0.5, 0.5, 0.0, 0.0]]), 1 / 255)
    assert below == pytest.approx(0.0025) and total == pytest.approx(2.0)
    assert lost_mass(np.array([0.5 / 255, 0.6 / 255]), 1 / 255)[0] == pytest.approx(0.5 / 255)  # half to even
    # the rows of padded queries ([B, H, T, T], mask [B, T]) are not counted
    probs = np.full((1, 2, 3, 3), 0.001)
    below, total = lost_mass(probs, 1 / 255, np.array([[1, 1, 0]]))
    assert below == pytest.approx(0.001 * 2 * 2 * 3) == total
    planted_llama = _sharpened(planted_llama, tmp_path)
    calibration = synthetic.random_feeds(planted_llama, 4, seq_lens=(128, 100), seed=1)
    options = dict(activations="static", criterion="top_k", top_k=2, dynamic_matmuls=True, probs_residual="gated")
    assert "feeds" in LlmInt8SplitPass(**options).reads() and "feeds" not in LlmInt8SplitPass().reads()
    # without calibration data the gate cannot measure: a clear error, not a silent skip
    model = load(planted_llama)
    gated = LlmInt8SplitPass(**options).with_stats(collect_statistics(model, calibration, progress=False))
    with pytest.raises(CalibrationError, match="llm-int8 reads the calibration samples"):
        gated(model)
    shares = []
    for gate, chosen in ((0.005, synthetic.TINY_LAYERS), (0.999, 0)):
        model = load(planted_llama)
        split = LlmInt8SplitPass(probs_lost_mass=gate, **options)
        split.with_stats(collect_statistics(model, calibration, progress=False)).with_feeds(calibration)
        record = split(model).record["probs_residual"]
        assert record["residual_matmuls"] == chosen
        shares.append([entry["lost_mass"] for entry in record["matmuls"]])
        if chosen:
            continue
        # the recorded share is what the calibration data's probabilities lose at the
        # model's own uint8 step: measured again here from the probabilities themselves

        nodes = [node for node in model.graph if node.op_type == "MatMul" and probs_input_index(node) is not None]
        assert len(nodes) == synthetic.TINY_LAYERS
        values = [quantized_source(node.inputs[probs_input_index(node)]) for node in nodes]
        steps = [probs_step(node, probs_input_index(node)) for node in nodes]
        model.graph.outputs.extend(values)
        runs = outputs(model, calibration)
        for layer, step in enumerate(steps):
            sums = np.array([lost_mass(run[-len(values) + layer], step) for run in runs]).sum(axis=0)
            assert record["matmuls"][layer]["lost_mass"] == pytest.approx(sums[0] / sums[1], rel=1e-3)
    # peaked rows lose 1-2 % of their mass, as SmolLM2's do (all-MiniLM-L6-v2: under 0.4 %)
    assert shares[0] == shares[1] and all(0.005 < share < 0.05 for share in shares[0])
    # long calibration sequences (or a small model's budget): the layers' probabilities are
    # fetched a few layers per pass over the data (here one), with the same result
    import outlierquant.calibration.collect as collect_module

    monkeypatch.setattr(collect_module, "activation_budget", lambda model: 1)
    model = load(planted_llama)
    split = LlmInt8SplitPass(**options)
    split.with_stats(collect_statistics(model, calibration, progress=False)).with_feeds(calibration)
    assert [entry["lost_mass"] for entry in split(model).record["probs_residual"]["matmuls"]] == shares[0]


def test_quantease_rounding_keeps_the_float_channels_out_of_the_int8_weights(planted_llama):
    calibration = synthetic.random_feeds(planted_llama, 6, seed=1)
    evaluation = synthetic.random_feeds(planted_llama, 2, seed=2)
    reference = outputs(load(planted_llama), evaluation)
    for form in ({"kernels": "standard"}, {"activations": "static"}):
        split = LlmInt8SplitPass(criterion="top_k", top_k=2, weight_rounding="quantease", **form)
        assert split.covariance_targets(load(planted_llama))
        model = load(planted_llama)
        stats = collect_statistics(model, calibration, covariance_for=split.covariance_targets(model), progress=False)
        result = split.with_stats(stats)(model)
        assert result.modified
        assert cosine(reference, outputs(model, evaluation)) > 0.99
    # rows held at zero (the float channels) stay zero in the int8 weight; the others are rounded

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(16, 8)).astype(np.float32)
    weight[[3, 9]] = 0.0
    x = rng.normal(size=(256, 16))
    q, _ = quantease_int8_weight(weight, x.T @ x / 256, fixed_rows=np.array([3, 9]))
    assert not q[[3, 9]].any() and q.any()


@pytest.mark.parametrize("kernel_form", ["gemm", "node"])
def test_kernel_form_matches_the_standard_form(tiny_llama, kernel_form):
    from outlierquant import custom_ops

    if not custom_ops.available():
        pytest.skip(custom_ops.unavailable_reason())
    calibration = synthetic.random_feeds(tiny_llama, 6, seed=1)
    evaluation = synthetic.random_feeds(tiny_llama, 2, seed=2)
    standard, _, _, _ = rewrite(tiny_llama, calibration, LlmInt8SplitPass(kernels="standard", threshold=1.0))
    kernel, result, _, after = rewrite(tiny_llama, calibration,
                                       LlmInt8SplitPass(kernels="auto", threshold=1.0, kernel_form=kernel_form))
    layers = len(result.record["layers"])
    assert result.record["form"] == "kernel" and result.record["kernel_form"] == kernel_form
    if kernel_form == "node":
        assert after["MixedInt8MatMul"] == layers
    else:  # our quantizer into onnxruntime's integer GEMM, which prepacks the weight;
        # q/k/v (and gate/up) quantize their one input once
        assert after["MatMulIntegerToFloat"] == layers and 0 < after["DynamicQuantizePerToken"] < layers
        # the int8 codes stay an output left out, so the kernel does not compute them
        assert all(node.outputs[0].name == "" for node in kernel.graph if node.op_type == "DynamicQuantizePerToken")
        assert not after.get("MixedInt8MatMul") and not after.get("MatMulInteger")
    got = outputs(kernel, evaluation, custom_ops.session_options())
    assert max_relative_error(outputs(standard, evaluation), got) <= 1e-4


# -- SplitQuant ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_splitquant_float_split_is_equivalent(request, fixture):
    path = request.getfixturevalue(fixture)
    evaluation = synthetic.random_feeds(path, 3, seed=2)
    reference = outputs(load(path), evaluation)
    model, result, before, after = rewrite(path, None, SplitQuantPass())
    layers = len(result.record["layers"])
    assert layers > 0
    assert after["MatMul"] - before.get("MatMul", 0) - before.get("Gemm", 0) == 2 * layers
    assert max_relative_error(reference, outputs(model, evaluation)) <= RTOL


def test_minilm_splitquant_equivalent_and_quantizes(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    reference = outputs(load(minilm_onnx), heldout)
    model, result, _, _ = rewrite(minilm_onnx, None, SplitQuantPass())
    assert len(result.record["layers"]) == 36
    assert max_relative_error(reference, outputs(model, heldout)) <= RTOL


def test_minilm_kernel_form_matches_the_standard_form(minilm_onnx, minilm_feeds):
    """The same quantized MiniLM, with our kernels (both forms) and with standard ops.

    Both compute the same integer products; they differ only in the float rounding of the
    per-token scale (x / s against x * (1/s)), which flips rare int8 rounding ties. Six
    layers deep that is visible per element, so the checks are on what the model is for:
    the two forms agree closely with each other and are equally faithful to fp32.
    (Bit-exactness is tested per op in test_custom_ops.py and on a tiny model above.)
    """
    from outlierquant import custom_ops

    if not custom_ops.available() and os.environ.get("OUTLIERQUANT_REQUIRE_KERNELS") != "1":
        pytest.skip(custom_ops.unavailable_reason())
    calibration, heldout = minilm_feeds
    reference = outputs(load(minilm_onnx), heldout)
    standard, _, _, _ = rewrite(minilm_onnx, calibration, LlmInt8SplitPass(kernels="standard"))
    kernel, result, _, after = rewrite(minilm_onnx, calibration, LlmInt8SplitPass(kernels="custom", kernel_form="gemm"))
    assert result.record["kernel_form"] == "gemm" and after["MatMulIntegerToFloat"] == 36
    node, result, _, after = rewrite(minilm_onnx, calibration, LlmInt8SplitPass(kernels="custom"))
    assert result.record["kernel_form"] == "node" and after["MixedInt8MatMul"] == 36
    got = outputs(kernel, heldout, custom_ops.session_options())
    want = outputs(standard, heldout)

    def sentence_cosines(x, y):
        a = np.concatenate([sample[1] for sample in x])  # sentence_embedding
        b = np.concatenate([sample[1] for sample in y])
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    assert sentence_cosines(want, got).min() > 0.999
    assert abs(sentence_cosines(reference, got).mean() - sentence_cosines(reference, want).mean()) < 1e-4
    # the single-node kernel sums the float outlier channels in another order; the ulps
    # that moves flip rare rounding ties in later layers, as above
    assert sentence_cosines(outputs(node, heldout, custom_ops.session_options()), got).min() > 0.999
