"""FlatQuant (learned Kronecker affine transforms): fp32 equivalence, objective, graph form."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import synthetic
from helpers import load_canonical as load
from helpers import max_relative_error, run_outputs

from outlierquant.calibration.collect import capture_activations, collect_statistics
from outlierquant.emit.rotation import kronecker_left_form
from outlierquant.errors import CalibrationError, RecipeError
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.tags import FLATQUANT_KEY, flatquant_nodes
from outlierquant.numerics.hadamard import kronecker_factors
from outlierquant.passes.flatquant import FlatQuantOptions, FlatQuantPass, learn_transform
from outlierquant.recipes import load_recipe, validate_pass_options

RTOL = 1e-4
#: cheap learning for the equivalence tests: a few steps on few rows
QUICK = {"steps": 4, "max_rows": 128, "batch_rows": 64, "max_columns": 64}


def _flatquant(model: ir.Model, feeds, **options):
    result = FlatQuantPass(**{**QUICK, **options}).with_feeds(feeds)(model)
    onnx.checker.check_model(ir.serde.serialize_model(model))
    return result.record


def _outlier_rows(rows=512, features=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    x[:, [3, 17]] *= 40.0  # channel outliers: what the transform should flatten
    return x, rng.normal(size=(features, 48))


# -- building blocks ---------------------------------------------------------------------------


def test_kronecker_factors_are_near_square():
    assert kronecker_factors(576) == (24, 24)
    assert kronecker_factors(1536) == (32, 48)
    assert kronecker_factors(384) == (16, 24)
    assert kronecker_factors(7) == (1, 7)
    with pytest.raises(ValueError, match="dim"):
        kronecker_factors(0)


@pytest.mark.parametrize("k1, k2", [(4, 6), (8, 8), (1, 12)])
def test_online_kronecker_form_equals_x_times_the_kronecker_product(k1, k2):
    rng = np.random.default_rng(k1 * 10 + k2)
    p1 = np.eye(k1) + 0.3 * rng.normal(size=(k1, k1))
    p2 = np.eye(k2) + 0.3 * rng.normal(size=(k2, k2))
    prescale = rng.uniform(0.5, 2.0, size=k1 * k2)
    dim = k1 * k2
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", "s", dim]))
    graph = ir.Graph([x], [], nodes=[], name="g", opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    nodes, out = kronecker_left_form(model, x, p1, p2, "fq", prescale, metadata_key=FLATQUANT_KEY)
    graph.extend(nodes)
    out.name = "transformed"
    graph.outputs.append(out)
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    data = rng.normal(size=(2, 5, dim)).astype(np.float32)
    (got,) = session.run(None, {"x": data})
    expected = (data * prescale) @ np.kron(p1, p2)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    matmuls = [node for node in nodes if node.op_type == "MatMul"]
    assert len(matmuls) == (k1 > 1) + (k2 > 1)
    # constants only on the left: no pass reads the transform as a linear layer
    assert all(node.inputs[0].const_value is not None for node in matmuls)
    assert all(FLATQUANT_KEY in node.metadata_props for node in nodes)
    assert not analyze_graph(model).linears


def test_learned_transform_lowers_the_objective_and_applies_as_kronecker():
    x, weight = _outlier_rows(rows=256)
    options = FlatQuantOptions(steps=40, batch_rows=128, learning_rate=1e-2)
    learned = learn_transform(x, weight, 8, 8, options, seed=1)
    assert learned.kept
    assert learned.loss_learned < 0.9 * learned.loss_identity
    assert not np.allclose(learned.matrix(), np.eye(64))
    np.testing.assert_allclose(learned.apply(x), (x / learned.scale) @ learned.matrix(), rtol=1e-9, atol=1e-9)


def test_objective_is_zero_without_quantization_and_identity_is_kept():
    x, weight = _outlier_rows(rows=64)
    learned = learn_transform(x, weight, 8, 8, FlatQuantOptions(weight_bits=None, activation_bits=None, steps=3))
    assert learned.loss_identity < 1e-10
    assert not learned.kept  # nothing to gain: the identity stays
    np.testing.assert_array_equal(learned.matrix(), np.eye(64))


def test_options_are_validated_with_the_field_name():
    for options, field in [({"activations": "static"}, "activations"), ({"weight_bits": 9}, "weight_bits"),
                           ({"activation_bits": 3}, "activation_bits"), ({"steps": -1}, "steps"),
                           ({"max_rows": 4}, "max_rows"), ({"learning_rate": 0}, "learning_rate"),
                           ({"activation_clip": 1.5}, "activation_clip"), ({"speed": 1}, "speed")]:
        with pytest.raises(RecipeError, match=field):
            validate_pass_options("flatquant", options)
    with pytest.raises(ValueError, match="batch_rows"):
        FlatQuantOptions(batch_rows=0)


def test_recipe_targets_the_quantization_of_its_simulate_quant():
    recipe = load_recipe("flatquant-w4a8")
    names = [spec.name for spec in recipe.passes]
    assert names.index("flatquant") < names.index("simulate-quant")
    flat = dict(recipe.passes[names.index("flatquant")].options)
    simulate = dict(recipe.passes[names.index("simulate-quant")].options)
    for key in ("weight_bits", "weight_group_size", "activation_bits", "activations"):
        assert flat[key] == simulate[key]


# -- capturing rows -------------------------------------------------------------------------------


def test_capture_activations_rows_match_the_statistics_and_are_capped(tiny_llama):
    model = load(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 4, seed=1)
    names = [group.input.name for group in analyze_graph(model).groups[:3]]
    rows = capture_activations(model, feeds, names, max_rows=10_000)
    stats = collect_statistics(model, feeds, tensors=names)
    tokens = sum(feed["input_ids"].size for feed in feeds)
    for name in names:
        assert rows[name].shape == (tokens, stats[name].channels)
        np.testing.assert_allclose(np.abs(rows[name]).max(axis=0), stats[name].absmax, rtol=1e-6)
    capped = capture_activations(model, feeds, names[:1], max_rows=7)[names[0]]
    assert capped.shape[0] == 7
    # evenly spread: the first and the last rows of the data are both represented
    full = rows[names[0]]
    np.testing.assert_array_equal(capped[0], full[0])
    assert any(np.array_equal(capped[-1], full[i]) for i in range(tokens - 4, tokens))


def test_pass_without_feeds_says_so(tiny_llama):
    with pytest.raises(CalibrationError, match="flatquant reads the calibration samples"):
        FlatQuantPass()(load(tiny_llama))


# -- equivalence on exported models ---------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama", "planted_llama"])
def test_llama_transforms_are_equivalent(request, fixture):
    path = request.getfixturevalue(fixture)
    model = load(path)
    feeds = synthetic.random_feeds(path, 3, seed=2)
    reference = run_outputs(model, feeds)
    record = _flatquant(model, synthetic.random_feeds(path, 4, seed=1), steps=12)
    assert max_relative_error(reference, run_outputs(model, feeds)) <= RTOL
    groups = record["groups"]
    # 2 layers × (q/k/v, o, gate/up, down); the lm_head stays in float
    assert len(groups) == 8 and [s["group"] for s in record["skipped"]] == ["/lm_head/MatMul"]
    assert collections.Counter(g["mode"] for g in groups) == {"online": 6, "fold_heads": 2}
    assert all(g["loss_learned"] <= g["loss_identity"] or not g["kept"] for g in groups)
    assert record["transformed_groups"] >= 4
    kept_online = [g for g in groups if g["kept"] and g["mode"] == "online"]
    ops = collections.Counter(node.op_type for node in flatquant_nodes(model))
    assert ops["MatMul"] == 2 * len(kept_online) == 2 * record["online_transforms"]
    # RMSNorm γ and the up projection absorb the channel scale: no Mul is inserted
    assert ops["Mul"] == 0 and all(g["scale"] == "folded" for g in kept_online)
    assert all("kurtosis" in g["before"] and "kurtosis" in g["after"] for g in groups if g["kept"])


def test_undoing_the_online_transform_breaks_equivalence(tiny_llama):
    model = load(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 2, seed=2)
    reference = run_outputs(model, feeds)
    _flatquant(model, synthetic.random_feeds(tiny_llama, 4, seed=1), steps=12)
    assert max_relative_error(reference, run_outputs(model, feeds)) <= RTOL
    reshape = next(node for node in flatquant_nodes(model) if node.op_type == "Reshape"
                   and node.inputs[1].const_value is None)  # the Reshape back to [.., K]
    source = next(node for node in flatquant_nodes(model) if node.op_type == "Reshape"
                  and node.inputs[1].const_value is not None)
    reshape.replace_input_with(0, source.outputs[0])  # skip the two MatMuls
    assert max_relative_error(reference, run_outputs(model, feeds)) > 1e-2


def test_minilm_transforms_are_equivalent_on_sentences_and_random_inputs(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    model = load(minilm_onnx)
    random = synthetic.random_feeds(minilm_onnx, 2, seq_lens=(7, 19), seed=3, vocab_size=30000)
    reference = run_outputs(model, heldout[:3] + random)
    record = _flatquant(model, calibration[:4], steps=2)
    assert max_relative_error(reference, run_outputs(model, heldout[:3] + random)) <= RTOL
    modes = collections.Counter(g["mode"] for g in record["groups"])
    assert modes == {"online": 18, "fold_heads": 6}  # 6 layers × (q/k/v, intermediate, output) + V → O
    # post-norm BERT: the LayerNorm output also feeds the residual, GELU precedes the output
    # dense: the channel scale cannot fold there and is one Mul per kept online transform
    ops = collections.Counter(node.op_type for node in flatquant_nodes(model))
    kept = [g for g in record["groups"] if g["kept"] and g["mode"] == "online"]
    assert ops["MatMul"] == 2 * len(kept) and ops["Mul"] == sum(g["scale"] == "mul" for g in kept)
