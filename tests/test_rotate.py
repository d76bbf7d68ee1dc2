"""Rotations (QuaRot R1/R2/R4, KLT, smooth-fused): fp32 equivalence, structure, negatives."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import synthetic
from helpers import load_canonical as load
from helpers import max_relative_error, run_outputs

from outlierquant.calibration.collect import collect_statistics
from outlierquant.emit.rotation import hadamard_left_form
from outlierquant.errors import CalibrationError, RecipeError
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.attention import find_score_matmuls
from outlierquant.graph.residual import find_residual_stream
from outlierquant.graph.tags import (
    KEEP_FLOAT_KEY,
    ONLINE_ROTATION_KEY,
    QK_ROTATION_KEY,
    online_rotation_nodes,
    qk_rotation_nodes,
)
from outlierquant.numerics.estimates import outlier_profile
from outlierquant.numerics.grids import dequantize_levels, fake_quantize_weight, group_grid, rtn_levels
from outlierquant.numerics.hadamard import hadamard_block, hadamard_rotation, orthogonal_matrix
from outlierquant.numerics.rounding import DEFAULT_CLIP_RATIOS, output_error, second_moment
from outlierquant.passes.llm_int8 import LlmInt8SplitPass
from outlierquant.passes.online_hadamard import OnlineHadamardPass
from outlierquant.passes.rotate_heads import RotateHeadsPass
from outlierquant.passes.rotate_qk import RotateQueryKeyPass
from outlierquant.passes.rotate_residual import RotateResidualPass
from outlierquant.passes.simulate import SimulateQuantizationPass
from outlierquant.recipes import load_recipe, validate_pass_options

RTOL = 1e-4


def outputs(model: ir.Model, feeds, *, kernels: bool = False) -> list[np.ndarray]:
    """The first output for every feed (helpers.run_outputs), our kernels registered on request."""
    options = None
    if kernels:
        from outlierquant import custom_ops

        options = custom_ops.session_options()
    return [sample[0] for sample in run_outputs(model, feeds, options)]


def relative_error(before, after) -> float:
    return max_relative_error([[a] for a in before], [[b] for b in after])


def apply(model: ir.Model, *passes):
    records = []
    for pass_ in passes:
        result = pass_(model)
        records.append(result)
    onnx.checker.check_model(ir.serde.serialize_model(model))
    return records


# -- matrices and building blocks -------------------------------------------------------------


@pytest.mark.parametrize("dim", [64, 576, 384, 1536, 96])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotations_are_orthogonal(dim, kind):
    q = orthogonal_matrix(dim, kind, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(dim), atol=1e-10)


def test_klt_rotation_decorrelates_then_spreads():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 32)) @ rng.normal(size=(32, 32))
    x[:, 5] *= 30
    q = orthogonal_matrix(32, "klt", covariance=np.cov(x, rowvar=False))
    np.testing.assert_allclose(q @ q.T, np.eye(32), atol=1e-10)
    spread = np.var(x @ q, axis=0)
    assert spread.max() / np.median(spread) < 1.5  # variances equalised by K·H
    assert np.var(x, axis=0).max() / np.median(np.var(x, axis=0)) > 50


@pytest.mark.parametrize("dim", [64, 384, 576])
def test_online_standard_form_is_the_rotation_and_its_inverse_is_identity(dim):
    """x → online H (standard ops) → @ Hᵀ gives x back; the form equals the reference."""

    block = hadamard_block(dim)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", "s", dim]))
    graph = ir.Graph([x], [], nodes=[], name="g", opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    nodes, out = hadamard_left_form(model, x, dim, block, "h")
    graph.extend(nodes)
    inverse = ir.node("MatMul", inputs=[out, ir.Value(name="hT")], name="inverse")
    r = hadamard_rotation(dim, block)
    t = ir.tensor(r.T.astype(np.float32), name="hT")
    inverse.inputs[1].const_value = t
    graph.register_initializer(inverse.inputs[1])
    graph.append(inverse)
    out.name = "rotated"
    inverse.outputs[0].name = "restored"
    graph.outputs.extend([out, inverse.outputs[0]])
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    data = np.random.default_rng(1).normal(size=(2, 5, dim)).astype(np.float32)
    rotated, restored = session.run(None, {"x": data})
    np.testing.assert_allclose(rotated, data @ r, atol=1e-4)
    np.testing.assert_allclose(restored, data, atol=1e-4)
    assert all(ONLINE_ROTATION_KEY in node.metadata_props for node in nodes)
    # constants only on the left: the quantizer never reads the rotation as a linear layer
    assert all(node.inputs[0].const_value is not None for node in nodes if node.op_type == "MatMul")


def test_fake_quantized_weights_sit_on_the_grid():
    w = np.random.default_rng(0).normal(size=(256, 8))
    q = fake_quantize_weight(w, 4, 128)
    for rows in (slice(0, 128), slice(128, 256)):
        scale = np.abs(w[rows]).max(axis=0) / 7
        levels = q[rows] / scale
        np.testing.assert_allclose(levels, np.rint(levels), atol=1e-9)
        assert np.abs(levels).max() <= 8
    searched = fake_quantize_weight(w, 4, 128, clip_ratios=tuple(np.linspace(1, 0.5, 11)))
    assert np.sum((searched - w) ** 2) <= np.sum((q - w) ** 2)


def test_options_are_validated_with_the_field_name():
    with pytest.raises(RecipeError, match="rotation"):
        validate_pass_options("rotate-residual", {"rotation": "givens"})
    with pytest.raises(RecipeError, match="kernels"):
        validate_pass_options("online-hadamard", {"kernels": "fast"})
    with pytest.raises(RecipeError, match="smooth_alpha"):
        validate_pass_options("online-hadamard", {"smooth_alpha": 2})
    with pytest.raises(RecipeError, match="activation_bits"):
        validate_pass_options("simulate-quant", {"activation_bits": 3})
    for name in ("quarot-w8a8", "quarot-w8a8-static", "quarot-w4a8", "quarot-w4a4", "mambaquant-w8a8"):
        names = [spec.name for spec in load_recipe(name).passes]
        # R3 only where the recipe quantizes the QKᵀ MatMul's operands (quarot-w8a8-static)
        assert ("rotate-qk" in names) == (name == "quarot-w8a8-static")
        names = [n for n in names if n != "rotate-qk"]
        assert names[:4] == ["canonicalize", "rotate-residual", "rotate-heads", "online-hadamard"]


# -- equivalence on exported models ---------------------------------------------------------


def _quarot(kernels: str = "standard"):
    return RotateResidualPass(), RotateHeadsPass(), OnlineHadamardPass(kernels=kernels)


@pytest.mark.parametrize("fixture", ["tiny_llama", "planted_llama"])
def test_llama_rotations_are_equivalent(request, fixture):
    path = request.getfixturevalue(fixture)
    model = load(path)
    feeds = synthetic.random_feeds(path, 3, seed=2)
    reference = outputs(model, feeds)
    ops_before = collections.Counter(node.op_type for node in model.graph)
    residual, heads, online = apply(model, *_quarot())
    assert relative_error(reference, outputs(model, feeds)) <= RTOL
    stream = residual.record["stream"]
    # embedding + 2 layers × (o_proj, down_proj) write; 5 RMSNorms feed q/k/v, gate/up, lm_head
    assert (stream["writers"], stream["embeddings"], stream["norms"], stream["readers"]) == (4, 1, 5, 11)
    assert residual.record["inserted_ops"] == 0 and not residual.record["centered"]
    assert len(heads.record["rotated"]) == 2 and heads.record["rotated"][0]["head_dim"] == 16
    # R4 only before the two down projections (SiLU(gate) ⊙ up); the norm groups were R1's
    assert [g["relation"] for g in online.record["rotated"]] == ["up_to_down", "up_to_down"]
    ops_after = collections.Counter(node.op_type for node in model.graph)
    assert ops_after["Mul"] == ops_before["Mul"] - 5  # the five γ multiplications were folded away


def test_planted_outliers_are_spread_by_r1(planted_llama):
    model = load(planted_llama)
    calibration = synthetic.random_feeds(planted_llama, 6, seed=1)
    analysis = analyze_graph(model)
    stream = find_residual_stream(analysis)
    first_group = next(iter(stream.readers.values()))[0]
    first_reader, reader_node = first_group.input.name, first_group.linears[0].node.name
    before = collect_statistics(model, calibration, tensors=[first_reader], progress=False)[first_reader]
    residual = RotateResidualPass().with_stats(
        collect_statistics(model, calibration, tensors=[first_reader], covariance_for=[first_reader], progress=False))
    record = residual(model).record
    assert record["outliers"][first_reader]["before"]["max_median"] > 20
    predicted = record["outliers"][first_reader]["after_predicted"]["rms_max_median"]
    rotated_input = next(node for node in model.graph if node.name == reader_node).inputs[0].name  # γ Mul is gone
    after = collect_statistics(model, calibration, tensors=[rotated_input], progress=False)[rotated_input]
    ratio = lambda st: float(st.absmax.max() / np.median(st.absmax))  # noqa: E731
    assert ratio(before) > 20 and ratio(after) < ratio(before) / 5
    assert predicted < 3


def test_opt_layernorm_stream_is_centred_and_rotated(tiny_opt):
    model = load(tiny_opt)
    feeds = synthetic.random_feeds(tiny_opt, 3, seed=2)
    reference = outputs(model, feeds)
    assert collections.Counter(n.op_type for n in model.graph)["LayerNormalization"] == 5
    residual, heads, online = apply(model, *_quarot())
    assert relative_error(reference, outputs(model, feeds)) <= RTOL
    assert residual.record["centered"] and residual.record["layernorms_replaced"] == 5
    assert residual.record["stream"]["embeddings"] == 2  # tokens and learned positions
    assert collections.Counter(n.op_type for n in model.graph)["LayerNormalization"] == 0
    assert len(heads.record["rotated"]) == 2
    assert [g["linears"][0].endswith("fc2/Gemm") for g in online.record["rotated"]] == [True, True]


def test_klt_rotation_is_equivalent(tiny_llama):
    model = load(tiny_llama)
    calibration = synthetic.random_feeds(tiny_llama, 6, seed=1)
    feeds = synthetic.random_feeds(tiny_llama, 3, seed=2)
    reference = outputs(model, feeds)
    residual = RotateResidualPass(rotation="klt")
    targets = residual.calibration_targets(model)
    residual.with_stats(collect_statistics(model, calibration, tensors=targets,
                                           covariance_for=residual.covariance_targets(model), progress=False))
    assert residual(model).record["rotation"] == "klt"
    online = OnlineHadamardPass(kernels="standard", smooth_alpha=0.5)
    online.with_stats(collect_statistics(model, calibration, tensors=online.calibration_targets(model),
                                         progress=False))
    assert online(model).record["smooth_alpha"] == 0.5
    assert relative_error(reference, outputs(model, feeds)) <= RTOL


def test_klt_without_covariance_says_how_to_get_it(tiny_llama):
    model = load(tiny_llama)
    residual = RotateResidualPass(rotation="klt")
    stats = collect_statistics(model, synthetic.random_feeds(tiny_llama, 2, seed=1),
                               tensors=residual.calibration_targets(model), progress=False)
    with pytest.raises(ValueError, match="covariance_for"):
        residual.with_stats(stats)(model)


def test_post_norm_bert_skips_r1_with_the_reason_and_rotates_online(tiny_bert):
    model = load(tiny_bert)
    feeds = synthetic.random_feeds(tiny_bert, 3, seed=2)
    reference = outputs(model, feeds)
    residual, heads, online = apply(model, *_quarot())
    assert not residual.modified
    assert "LayerNormalization" in residual.record["skipped"] and "post-norm" in residual.record["skipped"]
    # per layer: q/k/v and FFN1 behind a post-norm LayerNorm, FFN2 after GELU
    assert online.record["inserted_ops"] == 6
    assert relative_error(reference, outputs(model, feeds)) <= RTOL


def test_removing_the_online_rotation_breaks_equivalence(tiny_llama):
    model = load(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 2, seed=2)
    reference = outputs(model, feeds)
    OnlineHadamardPass(kernels="standard")(model)
    assert relative_error(reference, outputs(model, feeds)) <= RTOL
    # bypass every online rotation, keeping the folded inverse in the weights
    for node in online_rotation_nodes(model):
        if node.op_type == "Reshape" and node.outputs[0].uses() and all(
                ONLINE_ROTATION_KEY not in use.node.metadata_props for use in node.outputs[0].uses()):
            source = node.metadata_props[ONLINE_ROTATION_KEY]
            original = next(v for n in model.graph for v in n.outputs if v.name == source)
            node.outputs[0].replace_all_uses_with(original)
    assert relative_error(reference, outputs(model, feeds)) > 1e-2


def test_online_rotation_as_custom_kernel(tiny_llama):
    from outlierquant import custom_ops

    if not custom_ops.available():
        pytest.skip(f"custom kernels unavailable: {custom_ops.unavailable_reason()}")
    model = load(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 2, seed=2)
    reference = outputs(model, feeds)
    record = OnlineHadamardPass(kernels="auto")(model).record
    assert record["form"] == "custom_kernel"
    assert collections.Counter(n.op_type for n in model.graph)["HadamardTransform"] == 2
    assert relative_error(reference, outputs(model, feeds, kernels=True)) <= RTOL


def test_simulated_quantization_is_labelled_and_keeps_the_lm_head(tiny_llama):
    model = load(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 2, seed=2)
    reference = outputs(model, feeds)
    result = SimulateQuantizationPass(weight_bits=4, activation_bits=4)(model)
    assert result.record["simulated"] and result.record["fake_quantized_weights"] == 14  # all but lm_head
    error = relative_error(reference, outputs(model, feeds))
    assert 1e-4 < error < 1.0


@pytest.mark.slow
def test_smollm2_rotations_are_equivalent(smollm2_onnx):
    model = load(smollm2_onnx)
    feeds = synthetic.random_feeds(smollm2_onnx, 2, seq_lens=(7, 12), seed=2, vocab_size=49152)
    reference = outputs(model, feeds)
    residual, heads, online = [pass_(model) for pass_ in _quarot()]
    assert residual.record["stream"]["width"] == 576 and residual.record["stream"]["norms"] == 61
    assert len(heads.record["rotated"]) == 30 and online.record["inserted_ops"] == 30
    assert relative_error(reference, outputs(model, feeds)) <= RTOL


def test_simulated_quantization_after_quarot_spares_lm_head_embedding_and_online_rotations(tiny_llama):
    """Guards the W4A8 diagnosis (issue 5): after R1/R2/R4 the fake quantizer touches exactly
    the 14 decoder linears — not the (rotated, untied) lm_head, not the rotated embedding
    table read by Gather, and not the constant left operands of the online Hadamard."""
    model = load(tiny_llama)
    apply(model, *_quarot())
    online = {node.inputs[0].name: node.inputs[0].const_value.numpy().copy()
              for node in online_rotation_nodes(model) if node.op_type == "MatMul"}
    gathers = {node.inputs[0].name: node.inputs[0].const_value.numpy().copy()
               for node in model.graph if node.op_type == "Gather" and node.inputs[0].const_value is not None}
    lm_head = next(l for l in analyze_graph(model).linears if l.output.is_graph_output())
    head_weight = lm_head.weight_array().copy()
    record = SimulateQuantizationPass(weight_bits=4, weight_group_size=32, activation_bits=8)(model).record
    assert record["fake_quantized_weights"] == 14 and record["float_layers"] == [lm_head.name]
    values = {v.name: v for v in model.graph.initializers.values()}
    for name, array in {**online, **gathers}.items():
        np.testing.assert_array_equal(values[name].const_value.numpy(), array)
    np.testing.assert_array_equal(lm_head.weight_array(), head_weight)


def test_quantease_weight_rounding_after_quarot_beats_rtn_and_spares_the_lm_head(tiny_llama):
    """``simulate-quant`` with ``weight_rounding: quantease`` (quarot-w4a8): through the
    pipeline (which collects the covariances it asks for), every decoder linear is rounded
    with a lower output error tr(ΔᵀΣΔ) than round-to-nearest on the same grid, the lm_head
    stays in float, and the rounding error shows in the outputs."""
    from outlierquant.pipeline import run_recipe
    from outlierquant.recipes import Recipe

    model = load(tiny_llama)
    calibration = synthetic.random_feeds(tiny_llama, 6, seed=1)
    feeds = synthetic.random_feeds(tiny_llama, 2, seed=2)
    reference = outputs(model, feeds)
    apply(model, *_quarot())
    simulate = SimulateQuantizationPass(weight_bits=4, weight_group_size=16, activation_bits=8,
                                        weight_rounding="quantease", quantease_iterations=4)
    assert "stats" in simulate.reads() and simulate.covariance_targets(model) == simulate.calibration_targets(model)
    without = collect_statistics(model, calibration, tensors=simulate.calibration_targets(model), progress=False)
    with pytest.raises(CalibrationError, match="covariance_for"):
        SimulateQuantizationPass(**dataclasses.asdict(simulate.options)).with_stats(without)(model)
    stats = collect_statistics(model, calibration, tensors=simulate.calibration_targets(model),
                               covariance_for=simulate.covariance_targets(model), progress=False)
    layers = {l.name: (l.input.name, l.weight_array().copy()) for l in simulate._layers(model)}
    lm_head = next(l for l in analyze_graph(model).linears if l.output.is_graph_output())
    head_weight = lm_head.weight_array().copy()
    record = simulate.with_stats(stats)(model).record
    assert record["simulated"] and record["fake_quantized_weights"] == 14 == len(record["relative_output_error"])
    for name, (source, weight) in layers.items():
        sigma, _ = second_moment(stats[source], 0.01)
        grid = group_grid(weight, "per_oc", 16, 4, row_weight=np.diag(sigma), clip_ratios=DEFAULT_CLIP_RATIOS)
        rtn = output_error(dequantize_levels(rtn_levels(weight, grid), grid) - weight, sigma)
        signal = float(np.einsum("kn,kn->", weight, sigma @ weight))
        assert record["relative_output_error"][name] <= rtn / signal + 1e-12
    np.testing.assert_array_equal(lm_head.weight_array(), head_weight)
    error = relative_error(reference, outputs(model, feeds))
    assert 1e-4 < error < 0.5
    # the same through a recipe: run_recipe collects the covariances the pass asks for
    model = load(tiny_llama)
    recipe = Recipe.from_dict({"name": "t", "passes": ["rotate-residual", "rotate-heads",
                                                       {"online-hadamard": {"kernels": "standard"}},
                                                       {"simulate-quant": {"weight_bits": 4, "weight_group_size": 16,
                                                                           "weight_rounding": "quantease"}}]})
    records = run_recipe(model, recipe, calibration, progress=False)
    assert len(records[-1]["relative_output_error"]) == 14


def test_quarot_w4a8_recipe_rounds_with_quantease():
    spec = next(s for s in load_recipe("quarot-w4a8").passes if s.name == "simulate-quant")
    assert spec.options_dict()["weight_rounding"] == "quantease"
    with pytest.raises(RecipeError, match="weight_rounding"):
        validate_pass_options("simulate-quant", {"weight_rounding": "gptq"})


# -- R3: queries and keys ----------------------------------------------------------------------


def _bypass_qk_rotation(model: ir.Model, side: str) -> int:
    """Reconnect the readers of every ``side`` rotation to the unrotated tensor; returns how many."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    bypassed = 0
    for node in qk_rotation_nodes(model, side):
        readers = [use for use in node.outputs[0].uses() if QK_ROTATION_KEY not in use.node.metadata_props]
        if node.op_type == "Shape" or not readers:
            continue
        source = values[node.metadata_props[ONLINE_ROTATION_KEY]]
        for use in readers:
            use.node.replace_input_with(use.idx, source)
        bypassed += 1
    return bypassed


@pytest.mark.parametrize("fixture", ["tiny_llama", "planted_llama", "tiny_opt", "tiny_bert"])
def test_qk_rotation_after_quarot_is_equivalent(request, fixture):
    path = request.getfixturevalue(fixture)
    model = load(path)
    feeds = synthetic.random_feeds(path, 3, seed=2)
    reference = outputs(model, feeds)
    apply(model, *_quarot())
    scores = find_score_matmuls(model)
    # one per layer: not the rotary-embedding MatMul, not probs @ V
    assert len(scores) == 2 and all(s.reason is None and s.head_dim == 16 for s in scores)
    ops_before = collections.Counter(node.op_type for node in model.graph)
    result = RotateQueryKeyPass(kernels="standard")(model)
    onnx.checker.check_model(ir.serde.serialize_model(model))
    assert relative_error(reference, outputs(model, feeds)) <= RTOL
    record = result.record
    assert result.modified and record["form"] == "standard_ops" and not record["skipped"]
    assert record["inserted_ops"] == 4 and [e["head_dim"] for e in record["rotated"]] == [16, 16]
    # d = 16 = 4 × 4: Shape, Reshape, MatMul, Transpose, MatMul, Transpose, Reshape per side
    added = collections.Counter(node.op_type for node in model.graph) - ops_before
    assert added == {"MatMul": 8, "Transpose": 8, "Reshape": 8, "Shape": 4}
    assert len(qk_rotation_nodes(model, "query")) == len(qk_rotation_nodes(model, "key")) == 14
    assert all(node.inputs[0].const_value is not None for node in qk_rotation_nodes(model) if node.op_type == "MatMul")
    # the score MatMul reads the rotated query; the key is rotated before its Transpose
    for match in scores:
        assert QK_ROTATION_KEY in match.node.inputs[0].producer().metadata_props
        assert match.key_transpose.inputs[0].producer().metadata_props[QK_ROTATION_KEY] == "key"


def test_qk_rotation_on_minilm_is_equivalent_on_real_and_random_inputs(minilm_onnx, minilm_feeds):
    _, heldout = minilm_feeds
    feeds = heldout[:4] + synthetic.random_feeds(minilm_onnx, 2, seed=3, vocab_size=30000)
    model = load(minilm_onnx)
    reference = outputs(model, feeds)
    record = apply(model, RotateQueryKeyPass(kernels="standard"))[0].record  # (R2/R4 first: tiny_bert above)
    assert len(record["rotated"]) == 6 and not record["skipped"]  # the BERT scale 1/√√d is computed at run time
    assert {e["head_dim"] for e in record["rotated"]} == {32}
    assert relative_error(reference, outputs(model, feeds)) <= RTOL


@pytest.mark.parametrize("options", [{"rotation": "hadamard", "seed": 5}, {"rotation": "random", "seed": 1},
                                     {"kernels": "auto"}])
def test_qk_rotation_forms_are_equivalent(tiny_llama, options):
    from outlierquant import custom_ops

    model = load(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 2, seed=2)
    reference = outputs(model, feeds)
    record = RotateQueryKeyPass(**{"kernels": "standard", **options})(model).record
    if options.get("kernels") == "auto" and custom_ops.available():
        assert record["form"] == "custom_kernel"
        assert collections.Counter(n.op_type for n in model.graph)["HadamardTransform"] == 4
    if options.get("rotation") == "random":
        assert record["form"] == "dense_standard_ops"
    assert len(record["rotated"]) == 2
    assert relative_error(reference, outputs(model, feeds, kernels=record["form"] == "custom_kernel")) <= RTOL


@pytest.mark.parametrize("side", ["query", "key"])
def test_removing_one_side_of_the_qk_rotation_breaks_equivalence(tiny_llama, side):
    model = load(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 2, seed=2)
    reference = outputs(model, feeds)
    RotateQueryKeyPass(kernels="standard", seed=1)(model)
    assert relative_error(reference, outputs(model, feeds)) <= RTOL
    again = RotateQueryKeyPass(kernels="standard")(model)
    assert not again.modified and {e["skipped"] for e in again.record["skipped"]} == {"already rotated by rotate-qk"}
    assert _bypass_qk_rotation(model, side) == 2
    assert relative_error(reference, outputs(model, feeds)) > 1e-2


def test_qk_rotation_records_the_outlier_profile(planted_llama):
    model = load(planted_llama)
    calibration = synthetic.random_feeds(planted_llama, 6, seed=1)
    rotate = RotateQueryKeyPass(kernels="standard", profile=True)
    assert "stats" in rotate.reads() and not RotateQueryKeyPass().reads()
    targets = rotate.calibration_targets(model)
    assert len(targets) == 4 and rotate.covariance_targets(model) == targets
    stats = collect_statistics(model, calibration, tensors=targets, covariance_for=targets, progress=False)
    record = rotate.with_stats(stats)(model).record
    first = record["rotated"][0]
    assert first["query_outliers"]["before"] == outlier_profile(stats[first["query"]].absmax,
                                                               stats[first["query"]].mean_sq)
    # the prediction from the covariance is what the rotated tensors measure on the same data
    for side in ("query", "key"):
        match = find_score_matmuls(model)[0]
        rotated = match.query if side == "query" else match.key
        after = collect_statistics(model, calibration, tensors=[rotated.name], progress=False)[rotated.name]
        predicted = first[f"{side}_outliers"]["after_predicted"]["rms_max_median"]
        assert abs(outlier_profile(None, after.mean_sq)["rms_max_median"] - predicted) < 1e-2


def _attention_graph(transposed_key_is_output: bool) -> ir.Model:
    if transposed_key_is_output:
        text = """<ir_version: 10, opset_import: ["" : 18]>
        g (float[1,2,4,8] q, float[1,2,4,8] k) => (float[1,2,4,4] probs, float[1,2,8,4] kt) {
            kt = Transpose <perm = [0, 1, 3, 2]> (k)
            scores = MatMul (q, kt)
            probs = Softmax <axis = -1> (scores)
        }"""
    else:
        text = """<ir_version: 10, opset_import: ["" : 18]>
        g (float[1,2,4,8] q, float[1,2,8,4] kt) => (float[1,2,4,4] probs) {
            scores = MatMul (q, kt)
            probs = Softmax <axis = -1> (scores)
        }"""
    return ir.from_onnx_text(text)


@pytest.mark.parametrize("shared, reason", [(False, "not produced by a Transpose"), (True, "also read elsewhere")])
def test_qk_rotation_skips_with_the_reason(shared, reason):
    model = _attention_graph(shared)
    nodes = len(list(model.graph))
    result = RotateQueryKeyPass(kernels="standard")(model)
    assert not result.modified and not result.record["rotated"]
    assert len(result.record["skipped"]) == 1 and reason in result.record["skipped"][0]["skipped"]
    assert len(list(model.graph)) == nodes


def test_qk_rotation_options_are_validated():
    with pytest.raises(RecipeError, match="rotation"):
        validate_pass_options("rotate-qk", {"rotation": "klt"})
    with pytest.raises(RecipeError, match="kernels"):
        validate_pass_options("rotate-qk", {"kernels": "fast"})
    with pytest.raises(RecipeError, match="kernels"):
        validate_pass_options("rotate-qk", {"rotation": "random", "kernels": "custom"})
    with pytest.raises(RecipeError, match="seed"):
        validate_pass_options("rotate-qk", {"seed": 1.5})


@pytest.mark.slow
def test_smollm2_qk_rotation_is_equivalent(smollm2_onnx):
    model = load(smollm2_onnx)
    feeds = synthetic.random_feeds(smollm2_onnx, 2, seq_lens=(7, 12), seed=2, vocab_size=49152)
    reference = outputs(model, feeds)
    record = RotateQueryKeyPass(kernels="standard")(model).record
    assert len(record["rotated"]) == 30 and {e["head_dim"] for e in record["rotated"]} == {64}
    assert not record["skipped"]
    assert relative_error(reference, outputs(model, feeds)) <= RTOL


# -- outlier split before the online rotation -------------------------------------------------


def _split_rotation(model_path, model, ratio, groups="activation", kernels="standard", calibration=None):
    online = OnlineHadamardPass(kernels=kernels, groups=groups, outlier_ratio=ratio)
    calibration = calibration or synthetic.random_feeds(model_path, 6, seed=1)
    online.with_stats(collect_statistics(model, calibration, tensors=online.calibration_targets(model),
                                         progress=False))
    return online(model)


def _side_path_nodes(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if KEEP_FLOAT_KEY in node.metadata_props]


@pytest.mark.parametrize("fixture", ["planted_llama", "tiny_bert"])
def test_split_rotation_is_equivalent_and_its_side_path_is_not_a_linear(request, fixture):
    path = request.getfixturevalue(fixture)
    model = load(path)
    feeds = synthetic.random_feeds(path, 3, seed=2)
    reference = outputs(model, feeds)
    linears_before = len(analyze_graph(model).linears)
    result = _split_rotation(path, model, ratio=1.5)
    onnx.checker.check_model(ir.serde.serialize_model(model))
    rotated = result.record["rotated"]
    # only the groups behind a nonlinearity: the down projections / BERT's FFN2
    assert len(rotated) == 2 and all(g["relation"] in ("up_to_down", "none") for g in rotated)
    assert all(g["float_channels"] > 0 for g in rotated)
    side = _side_path_nodes(model)
    assert collections.Counter(n.op_type for n in side) == {"Gather": 2, "MatMul": 2, "Add": 2}
    assert len(analyze_graph(model).linears) == linears_before  # the side MatMuls are not layers
    assert relative_error(reference, outputs(model, feeds)) <= RTOL


def test_split_rotation_as_custom_kernel_is_equivalent(planted_llama):
    """The kernel form: the keep-mask is the HadamardTransform's prescale Mul."""
    from outlierquant import custom_ops

    if not custom_ops.available():
        pytest.skip(f"custom kernels unavailable: {custom_ops.unavailable_reason()}")
    model = load(planted_llama)
    feeds = synthetic.random_feeds(planted_llama, 3, seed=2)
    reference = outputs(model, feeds)
    record = _split_rotation(planted_llama, model, ratio=1.5, kernels="custom").record
    assert record["form"] == "custom_kernel" and all(g["float_channels"] > 0 for g in record["rotated"])
    assert collections.Counter(n.op_type for n in model.graph)["HadamardTransform"] == 2
    assert relative_error(reference, outputs(model, feeds, kernels=True)) <= RTOL


def test_split_rotation_on_minilm_real_and_random_inputs(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    feeds = heldout[:4] + synthetic.random_feeds(minilm_onnx, 2, seed=3, vocab_size=30000)
    model = load(minilm_onnx)
    reference = outputs(model, feeds)
    record = _split_rotation(minilm_onnx, model, ratio=4.0, calibration=calibration[:16]).record
    assert len(record["rotated"]) == 6  # one FFN2 per layer, behind GELU
    assert sum(g["float_channels"] for g in record["rotated"]) > 0
    assert relative_error(reference, outputs(model, feeds)) <= RTOL


def test_split_rotation_without_its_side_path_is_not_equivalent(planted_llama):
    model = load(planted_llama)
    feeds = synthetic.random_feeds(planted_llama, 2, seed=2)
    reference = outputs(model, feeds)
    _split_rotation(planted_llama, model, ratio=1.5)
    for node in _side_path_nodes(model):
        if node.op_type == "Add":  # drop the side path's contribution
            node.outputs[0].replace_all_uses_with(node.inputs[0])
    assert relative_error(reference, outputs(model, feeds)) > 1e-2


def test_quantizer_leaves_the_split_rotation_side_path_in_float(planted_llama):

    model = load(planted_llama)
    calibration = synthetic.random_feeds(planted_llama, 6, seed=1)
    _split_rotation(planted_llama, model, ratio=1.5, calibration=calibration)
    side_weights = {node.inputs[1].name for node in _side_path_nodes(model) if node.op_type == "MatMul"}
    split = LlmInt8SplitPass(criterion="relative", ratio=4.0, activations="static")
    split.with_stats(collect_statistics(model, calibration, tensors=split.calibration_targets(model), progress=False))
    assert split(model).modified
    for node in _side_path_nodes(model):
        if node.op_type == "MatMul":
            assert node.inputs[1].name in side_weights and node.inputs[1].const_value is not None
            assert node.inputs[0].producer().op_type == "Gather"  # no QDQ in front of it
    assert any(node.op_type == "DequantizeLinear" for node in model.graph)


def test_split_rotation_options_are_validated():
    with pytest.raises(RecipeError, match="outlier_ratio"):
        validate_pass_options("online-hadamard", {"outlier_ratio": 1.0})
    with pytest.raises(RecipeError, match="groups"):
        validate_pass_options("online-hadamard", {"groups": "ffn"})
    assert "stats" in OnlineHadamardPass(outlier_ratio=4.0).reads()


def _gated_rotation(path, threshold):
    model = load(path)
    online = OnlineHadamardPass(kernels="standard", groups="activation", outlier_ratio=3.0,
                                rotate_below_db=threshold)
    assert "stats" in online.reads()
    online.with_stats(collect_statistics(model, synthetic.random_feeds(path, 6, seed=1),
                                         tensors=online.calibration_targets(model), progress=False))
    return model, online(model).record


def test_split_rotation_gate_rotates_only_groups_below_the_sqnr_threshold(planted_llama):
    """``rotate_below_db``: a group is rotated exactly when its estimated static SQNR is lower."""
    _, everything = _gated_rotation(planted_llama, 1000.0)
    sqnr = [g["static_sqnr_db"] for g in everything["rotated"]]
    assert len(sqnr) == synthetic.TINY_LAYERS and not everything["skipped"]
    model, nothing = _gated_rotation(planted_llama, min(sqnr) - 0.01)
    assert not nothing["rotated"] and not online_rotation_nodes(model) and not _side_path_nodes(model)
    assert [g["static_sqnr_db"] for g in nothing["skipped"]] == sqnr
    assert all(g["skipped"].endswith("not rotated") for g in nothing["skipped"])
    threshold = (min(sqnr) + max(sqnr)) / 2
    assert min(sqnr) < threshold < max(sqnr), sqnr
    model, some = _gated_rotation(planted_llama, threshold)
    assert [g["static_sqnr_db"] for g in some["rotated"]] == [v for v in sqnr if v < threshold]
    with pytest.raises(RecipeError, match="rotate_below_db"):
        validate_pass_options("online-hadamard", {"rotate_below_db": "high"})


def test_a_gated_rotation_that_changes_nothing_leaves_the_quantizer_full_statistics(planted_llama):
    """The rotation calibrates only its own groups; when its gate rotates nothing the model is
    unchanged, and the next pass must still get statistics for every linear (regression: it
    got the rotation's subset and left the other linears in float)."""
    from outlierquant import make_recipe
    from outlierquant.pipeline import run_recipe

    model = load(planted_llama)
    recipe = make_recipe("gated", ("online-hadamard", {"groups": "activation", "outlier_ratio": 3.0,
                                                       "kernels": "standard", "rotate_below_db": -1000.0}),
                         ("llm_int8", {"criterion": "relative", "ratio": 3.0, "activations": "static"}))
    rotation, split = run_recipe(model, recipe, synthetic.random_feeds(planted_llama, 6, seed=1), progress=False)
    assert not rotation["modified"] and not rotation["rotated"]
    assert not [s for s in split["skipped"] if "statistics" in s["reason"]]
    projections = [node for node in load(planted_llama).graph if node.op_type == "MatMul" and "proj" in (node.name or "")]
    assert len(split["layers"]) >= len(projections) == 7 * synthetic.TINY_LAYERS


@pytest.mark.parametrize("gate", ["shipped", "raised"])
def test_default_recipe_rotates_only_the_noisy_down_projections_and_quantizes_every_linear(planted_llama, tmp_path,
                                                                                           gate):
    """The shipped default on a decoder: a down projection is rotated exactly when its estimated
    static SQNR is below the recipe's threshold. The planted decoder's fixed outlier channels
    are not token spikes (about 37 dB; SmolLM2's down projections: 23-30 dB), so the shipped
    gate rotates none; with the gate raised the same recipe takes the rotation path SmolLM2
    takes. Either way every projection is statically quantized, the rotation side paths stay
    float, the model runs on plain onnxruntime (the LM head int8 too) and tracks fp32."""
    from outlierquant.pipeline import quantize_model
    from outlierquant.recipes import PassSpec, Recipe

    recipe = load_recipe("default")
    threshold = next(spec.options_dict() for spec in recipe.passes if spec.name == "online-hadamard")["rotate_below_db"]
    if gate == "raised":
        threshold = 1000.0
        passes = tuple(PassSpec(spec.name, tuple({**spec.options_dict(), "rotate_below_db": threshold}.items()))
                       if spec.name == "online-hadamard" else spec for spec in recipe.passes)
        recipe = Recipe(name="default-raised", passes=passes)
    calibration = synthetic.random_feeds(planted_llama, 8, seed=1)
    evaluation = synthetic.random_feeds(planted_llama, 2, seed=2)
    reference = outputs(load(planted_llama), evaluation)
    result = quantize_model(planted_llama, tmp_path / "default.onnx", recipe, calibration, progress=False)
    records = {record["pass"]: record for record in result.report["passes"]}
    rotation = records["online-hadamard"]
    assert all(g["static_sqnr_db"] < threshold for g in rotation["rotated"])
    assert all(g["static_sqnr_db"] >= threshold for g in rotation["skipped"])
    assert len(rotation["rotated"]) + len(rotation["skipped"]) == synthetic.TINY_LAYERS
    assert len(rotation["rotated"]) == (synthetic.TINY_LAYERS if gate == "raised" else 0)
    assert records["outliertune"]["per_channel_linears"] == 0  # RMSNorm groups are foldable
    assert records["llm-int8"]["form"] == "qdq" and not result.report["simulated"]
    assert not [s for s in records["llm-int8"]["skipped"] if "statistics" in s["reason"]]
    probs = records["llm-int8"]["probs_residual"]
    assert len(probs["matmuls"]) == synthetic.TINY_LAYERS
    assert probs["residual_matmuls"] == sum(e["lost_mass"] >= probs["lost_mass_gate"] for e in probs["matmuls"])
    model = ir.load(tmp_path / "default.onnx")
    assert probs["residual_matmuls"] == sum(n.op_type == "Add" and n.name.endswith("_residual_add") for n in model.graph)
    side = _side_path_nodes(model)
    assert bool(side) == any(g.get("float_channels") for g in rotation["rotated"])
    assert bool(online_rotation_nodes(model)) == (gate == "raised")
    assert all(node.inputs[0].producer().op_type == "Gather" for node in side if node.op_type == "MatMul")
    downs = [n for n in model.graph if n.op_type == "MatMul" and "down_proj" in (n.name or "")
             and KEEP_FLOAT_KEY not in n.metadata_props and n.inputs[1].producer() is not None]
    assert len(downs) == synthetic.TINY_LAYERS
    assert all(n.inputs[0].producer().op_type == "DequantizeLinear" for n in downs)
    # standard ops only: the LM head is an int8 linear like the others (its weight behind a
    # DequantizeLinear), nothing of onnxruntime's contrib domain or ours
    assert not [node for node in model.graph if node.domain not in ("", "ai.onnx")]
    head = [n for n in model.graph if n.op_type == "MatMul" and "lm_head" in (n.name or "")
            and n.inputs[1].producer() is not None and n.inputs[1].producer().op_type == "DequantizeLinear"]
    assert len(head) == 1
    quantized = outputs(model, evaluation)
    a = np.concatenate([r.reshape(-1) for r in reference])
    b = np.concatenate([q.reshape(-1) for q in quantized])
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


@pytest.mark.parametrize("trans_b", [0, 1])
def test_column_slab_rotation_of_a_weight_is_the_whole_product(trans_b, monkeypatch):
    """map_linear_weight_columns rotates an LM-head-sized weight a slab of output columns at
    a time; stored in either layout, the result is ``Qᵀ diag(γ) W`` of the whole matrix."""
    from outlierquant.graph import edit
    from outlierquant.graph.analysis import analyze_graph
    from outlierquant.numerics import slabs
    from outlierquant.numerics.hadamard import orthogonal_matrix

    rng = np.random.default_rng(6)
    k, n = 16, 45
    weight = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "w"], ["y"], transB=trans_b)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5, n])],
        [onnx.numpy_helper.from_array(weight, "w")])
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph))
    (linear,) = analyze_graph(model).linears
    q = orthogonal_matrix(k, "random", seed=0)
    gamma = rng.lognormal(0, 1, k)
    w_kn = np.asarray(linear.weight_array(), dtype=np.float64)
    expected = (q.T @ (gamma[:, None] * w_kn)).astype(np.float32)
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", k * 7)  # 7 columns a slab, the last one short
    edit.map_linear_weight_columns(model.graph, linear, "w_rotated", lambda block: q.T @ (gamma[:, None] * block))
    stored = model.graph.node(0).inputs[1].const_value.numpy()
    assert stored.flags.c_contiguous and stored.dtype == np.float32
    np.testing.assert_allclose(stored.T if trans_b else stored, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rounding", ["rtn", "quantease"])
def test_simulated_weight_rounding_in_column_slabs_is_the_one_pass_result(rounding, monkeypatch):
    """simulate-quant rounds a slab of output columns at a time (an LM head's float64 copies
    were the largest part of flatquant-w4a8's peak): per_oc groups and the coordinate
    descent are per column, so the fake-quantized weight and the reported error are those
    of one pass over the matrix."""
    from outlierquant.calibration.stats import ActivationStats, ChannelStats
    from outlierquant.numerics import slabs

    rng = np.random.default_rng(4)
    k, n = 48, 40
    weight = rng.standard_t(3, size=(k, n)).astype(np.float32)
    x = (rng.standard_normal((300, k)) * rng.lognormal(0, 1, k)).astype(np.float32)
    st = ChannelStats.empty(k, -1, covariance=True)
    st.update(x)
    results = []
    for slab in (None, k * 7):  # one slab; 7 columns a slab, the last one short
        if slab is not None:
            monkeypatch.setattr(slabs, "SLAB_ELEMENTS", slab)
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]), onnx.helper.make_node("Relu", ["h"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, k])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5, n])],
            [onnx.numpy_helper.from_array(weight, "w")])
        model = ir.serde.deserialize_model(onnx.helper.make_model(graph))
        simulate = SimulateQuantizationPass(weight_bits=4, weight_group_size=16, activation_bits=None,
                                            weight_rounding=rounding, quantease_iterations=3)
        record = simulate.with_stats(ActivationStats({"x": st}))(model).record
        results.append((model.graph.node(0).inputs[1].const_value.numpy().copy(), record))
    (whole, whole_record), (slabbed, slab_record) = results
    assert not np.array_equal(whole, weight)  # it did round
    np.testing.assert_array_equal(slabbed, whole)
    for name, error in whole_record.get("relative_output_error", {}).items():
        assert slab_record["relative_output_error"][name] == pytest.approx(error, rel=1e-12)
