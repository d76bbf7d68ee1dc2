"""QDQ quantization: the plan, the inserted nodes, the numbers, and parity with onnxruntime."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from outlierquant.calibration.stats import ActivationStats, ChannelStats
from outlierquant.emit.qdq import QuantConfig, plan_quantization
from outlierquant.graph.values import is_constant
from outlierquant.numerics.grids import activation_scale_zero_point, quantize_weight
from outlierquant.numerics.rounding import output_error, quantease_int8_weight
from outlierquant.outputs import save_model
from outlierquant.passes.quantize import QuantizeQDQPass

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(16, 32)).astype(np.float32)
B1 = RNG.normal(size=(32,)).astype(np.float32)
W2 = RNG.normal(size=(32, 8)).astype(np.float32)
WG = RNG.normal(size=(8, 16)).astype(np.float32)  # Gemm weight, transB=1: [N, K]


def tiny_model() -> ir.Model:
    """x -> MatMul(W1) + B1 -> Relu -> MatMul(W2) -> (y); Softmax(x @ x^T) (attention-like); Gemm."""
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "B1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="act"),
        helper.make_node("MatMul", ["h2", "W2"], ["y"], name="fc2"),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0], name="t"),
        helper.make_node("MatMul", ["x", "xt"], ["gram"], name="gram"),
        helper.make_node("Softmax", ["gram"], ["probs"], axis=-1, name="softmax"),  # gram is attention-like
        helper.make_node("Gemm", ["x", "WG"], ["g"], transB=1, name="gemm"),
        helper.make_node("Add", ["x", "x"], ["x2"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
        [
            helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
            for name, shape in (("y", ["n", 8]), ("gram", ["n", "n"]), ("probs", ["n", "n"]), ("g", ["n", 8]),
                                ("x2", ["n", 16]))
        ],
        [numpy_helper.from_array(a, n) for a, n in ((W1, "W1"), (B1, "B1"), (W2, "W2"), (WG, "WG"))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def stats_for(model: ir.Model, x: np.ndarray, tensors) -> ActivationStats:
    """Reference statistics by running onnxruntime with the tensors as outputs."""
    proto = ir.serde.serialize_model(model)
    for name in tensors:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = {}
    for name, value in zip(tensors, session.run(list(tensors), {"x": x})):
        st = ChannelStats.empty(1, -1)
        st.update(value.reshape(-1, 1))
        out[name] = st
    return ActivationStats(out)


def run(model: ir.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"x": x})))


def test_plan_declares_weights_activations_and_dynamic_matmuls():
    plan = plan_quantization(tiny_model(), QuantConfig())
    by_role = collections.Counter(d.role for d in plan)
    assert by_role == {"weight": 3, "activation": 5}  # fc1, fc2, gemm weights; x(fc1,gemm), h2, x & xt (gram)
    gemm_weight = next(d for d in plan if d.consumer == "gemm" and d.role == "weight")
    assert gemm_weight.axis == 0  # transB=1: output channels are the rows
    fc1_weight = next(d for d in plan if d.consumer == "fc1" and d.role == "weight")
    assert fc1_weight.axis == 1
    assert not plan_quantization(tiny_model(), QuantConfig(dynamic_matmuls=False, activations="none")) == plan


def test_activation_matmuls_outside_attention_stay_float(tiny_llama):
    from helpers import load_canonical

    model = load_canonical(tiny_llama)
    dynamic = {d.consumer for d in plan_quantization(model, QuantConfig()) if d.role == "activation"
               and not any(n.name == d.consumer and is_constant(n.inputs[1]) for n in model.graph)}
    # QK^T and probs x V of both layers; the rotary embedding's inv_freq @ positions is not attention
    assert len(dynamic) == 4 and not any("rotary" in name for name in dynamic)


def test_weight_quantization_matches_numpy_reference():
    q, scale = quantize_weight(W1, axis=1)
    np.testing.assert_allclose(scale, np.abs(W1).max(axis=0) / 127, rtol=1e-6)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    np.testing.assert_array_equal(q, np.clip(np.rint(W1 / scale), -127, 127).astype(np.int8))
    # the largest weight of each output channel lands exactly on +-127
    assert (np.abs(q).max(axis=0) == 127).all()


def test_activation_parameters_follow_onnxruntime_conventions():
    scale, zp = activation_scale_zero_point(-1.0, 3.0, "uint8")
    assert scale.dtype == np.float32 and zp.dtype == np.uint8
    assert scale == np.float32(4.0 / 255) and zp == 64
    scale, zp = activation_scale_zero_point(0.5, 2.0, "uint8")  # zero is always representable
    assert zp == 0 and scale == np.float32(2.0 / 255)
    scale, zp = activation_scale_zero_point(0.0, 0.0, "uint8")  # a constant-zero tensor
    assert scale == 1.0 and zp == 0


def test_qdq_insertion_counts_checker_and_accuracy():
    model = tiny_model()
    x = RNG.normal(size=(12, 16)).astype(np.float32)
    reference = run(model, x)
    tensors = ["x", "h2", "xt"]
    pass_ = QuantizeQDQPass(QuantConfig()).with_stats(stats_for(model, x, tensors))
    result = pass_(model)
    assert result.modified
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["QuantizeLinear"] == 3  # x shared by fc1, gram and gemm; h2; xt
    assert ops["DequantizeLinear"] == 6  # 3 activations + 3 weights
    assert result.record["quantized_weights"] == 3
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    quantized = run(model, x)
    for name in ("y", "gram", "g"):
        ref, got = reference[name], quantized[name]
        rel = np.linalg.norm(ref - got) / np.linalg.norm(ref)
        assert 0 < rel < 0.02, (name, rel)
    # the residual Add is not a quantized consumer: it still reads the float x
    np.testing.assert_array_equal(quantized["x2"], reference["x2"])


def test_qdq_all_consumers_rounds_the_residual_too():
    model = tiny_model()
    x = RNG.normal(size=(12, 16)).astype(np.float32)
    reference = run(model, x)
    QuantizeQDQPass(QuantConfig(qdq_all_consumers=True)).with_stats(stats_for(model, x, ["x", "h2", "xt"]))(model)
    quantized = run(model, x)
    assert not np.array_equal(quantized["x2"], reference["x2"])
    np.testing.assert_allclose(quantized["x2"], reference["x2"], atol=0.05)


def test_missing_statistics_is_a_clear_error():
    from outlierquant.errors import CalibrationError

    model = tiny_model()
    with pytest.raises(CalibrationError, match="no calibration statistics for tensor 'x'"):
        QuantizeQDQPass(QuantConfig()).with_stats(ActivationStats())(model)


def test_per_token_activations_use_standard_ops_and_round_per_row():
    model = tiny_model()
    x = RNG.normal(size=(6, 16)).astype(np.float32)
    x[2] *= 100.0  # one loud token must not cost the others their resolution
    reference = run(model, x)
    QuantizeQDQPass(QuantConfig(activations="per_token", dynamic_matmuls=False))(model)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["QuantizeLinear"] == 0 and ops["ReduceMax"] == 2
    got = run(model, x)
    # numpy reference of the fake-quantized fc1 input
    scale = np.abs(x).max(axis=1, keepdims=True) / 127
    xq = np.clip(np.rint(x / scale), -127, 127) * scale
    wq, ws = quantize_weight(W1, 1)
    expected_h0 = xq @ (wq.astype(np.float32) * ws)
    h = np.maximum(expected_h0 + B1, 0)
    s2 = np.maximum(np.abs(h).max(axis=1, keepdims=True), 1e-12) / 127
    hq = np.clip(np.rint(h / s2), -127, 127) * s2
    w2q, w2s = quantize_weight(W2, 1)
    np.testing.assert_allclose(got["y"], hq @ (w2q.astype(np.float32) * w2s), rtol=1e-4, atol=1e-4)
    quiet_rows = [0, 1, 3, 4, 5]
    rel = np.linalg.norm(got["y"][quiet_rows] - reference["y"][quiet_rows]) / np.linalg.norm(reference["y"][quiet_rows])
    assert rel < 0.02


def test_integer_per_token_form_is_real_int8_and_matches_the_simulation():
    x = RNG.normal(size=(6, 16)).astype(np.float32)
    x[2] *= 100.0
    simulated = tiny_model()
    QuantizeQDQPass(QuantConfig(activations="per_token", dynamic_matmuls=False))(simulated)
    integer = tiny_model()
    result = QuantizeQDQPass(QuantConfig(activations="per_token", dynamic_matmuls=False, per_token_form="integer"))(integer)
    ops = collections.Counter(n.op_type for n in integer.graph)
    # fc1, fc2 and the Gemm run as u8 x s8 MatMulInteger; only the activation x activation MatMul stays float
    assert ops["MatMulInteger"] == 3 and ops["MatMul"] == 1 and ops["Gemm"] == 0
    assert result.record["integer_per_token_layers"] == 3 and result.record["simulated"] is False
    onnx.checker.check_model(ir.serde.serialize_model(integer), full_check=True)
    want, got = run(simulated, x), run(integer, x)
    for name in ("y", "g", "gram"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * float(np.abs(want[name]).max()))


def test_auto_per_token_form_uses_our_quantizer_once_per_input_and_matches_integer():
    """``per_token_form: auto`` with the kernel library: one DynamicQuantizePerToken per input
    tensor (fc1 and the Gemm both read x) feeding onnxruntime's MatMulIntegerToFloat; the
    same integers and scales as the standard-op integer form."""
    from outlierquant import custom_ops

    if not custom_ops.available():
        pytest.skip(custom_ops.unavailable_reason())
    x = RNG.normal(size=(6, 16)).astype(np.float32)
    x[2] *= 100.0
    integer = tiny_model()
    QuantizeQDQPass(QuantConfig(activations="per_token", dynamic_matmuls=False, per_token_form="integer"))(integer)
    auto = tiny_model()
    result = QuantizeQDQPass(QuantConfig(activations="per_token", dynamic_matmuls=False, per_token_form="auto"))(auto)
    ops = collections.Counter(n.op_type for n in auto.graph)
    assert result.record["per_token_kernel"] is True and result.record["integer_per_token_layers"] == 3
    assert ops["MatMulIntegerToFloat"] == 3 and ops["DynamicQuantizePerToken"] == 2 and not ops["MatMulInteger"]

    def outputs(model):
        session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                       custom_ops.session_options(), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {"x": x})))

    want, got = outputs(integer), outputs(auto)
    for name in ("y", "g"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6 * float(np.abs(want[name]).max()))


def test_skip_output_layers_leaves_the_head_in_float():
    model = tiny_model()
    QuantizeQDQPass(QuantConfig(activations="none", skip_output_layers=True))(model)
    quantized = {n.name for n in model.graph if n.op_type in ("MatMul", "Gemm")
                 and n.inputs[1].producer() is not None and n.inputs[1].producer().op_type == "DequantizeLinear"}
    # fc2 and the Gemm write graph outputs y and g: float; fc1 feeds Relu: quantized
    assert quantized == {"fc1"}


def test_quantease_int8_rounding_beats_round_to_nearest_on_the_output_error():

    rng = np.random.default_rng(3)
    factors = rng.normal(size=(6, 64)) * rng.uniform(0.2, 3.0, size=(1, 64))
    sigma = factors.T @ factors + 0.01 * np.eye(64)  # strongly correlated channels, as activations are
    weight = rng.normal(size=(64, 24)).astype(np.float32)
    q_rtn, s_rtn = quantize_weight(weight, 1)
    q, s = quantease_int8_weight(weight, sigma, iterations=4)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    np.testing.assert_array_equal(s, s_rtn)  # same grid, other levels
    rtn_error = output_error(q_rtn * s_rtn - weight, sigma)
    ours = output_error(q * s - weight, sigma)
    assert ours < 0.8 * rtn_error


def test_quantease_rounding_through_the_pipeline(tiny_llama):
    import synthetic
    from helpers import load_canonical, max_relative_error, run_outputs

    from outlierquant import make_recipe
    from outlierquant.pipeline import run_recipe

    calibration = synthetic.random_feeds(tiny_llama, 6, seed=1)
    evaluation = synthetic.random_feeds(tiny_llama, 2, seed=2)
    reference = run_outputs(load_canonical(tiny_llama), evaluation)
    model = load_canonical(tiny_llama)
    recipe = make_recipe("t", ("quantize", {"activations": "per_token", "per_token_form": "integer",
                                            "dynamic_matmuls": False, "skip_output_layers": True,
                                            "weight_rounding": "quantease"}))
    record = run_recipe(model, recipe, calibration, progress=False)[-1]
    assert record["quantease_rounded_weights"] == record["integer_per_token_layers"] > 0
    assert max_relative_error(reference, run_outputs(model, evaluation)) < 0.05
    with pytest.raises(ValueError, match="weight_rounding"):
        QuantConfig(weight_rounding="gptq")


def test_integer_per_token_form_needs_per_token_activations():
    with pytest.raises(ValueError, match="per_token_form"):
        QuantConfig(per_token_form="integer")
    with pytest.raises(ValueError, match="per_token_form"):
        QuantConfig(activations="per_token", per_token_form="int4")


@pytest.mark.slow
def test_w8a8_with_onnxruntime_layout_reproduces_onnxruntime_static_qdq(minilm_onnx, tmp_path, monkeypatch):
    """Same choices -> same model: our inserter against onnxruntime's quantize_static (which
    stores signed weights, whatever the CPU)."""
    monkeypatch.setenv("OUTLIERQUANT_INT8_WEIGHTS", "signed")
    from transformers import AutoTokenizer

    from outlierquant.calibration.collect import collect_statistics
    from outlierquant.evaluate.baselines import ort_quantize
    from outlierquant.export.data import bundled_sentences, model_inputs, text_feeds
    from outlierquant.modelio import load_model

    tokenizer = AutoTokenizer.from_pretrained(minilm_onnx.parent)
    lines = bundled_sentences("calibration").read_text(encoding="utf-8").splitlines()[:24]
    feeds = text_feeds(lines, tokenizer=tokenizer, input_names=list(model_inputs(minilm_onnx)))

    ort_path = ort_quantize("ort-static-matmul", minilm_onnx, tmp_path / "ort.onnx", feeds)
    model = load_model(minilm_onnx)
    stats = collect_statistics(model, feeds, progress=False)
    QuantizeQDQPass(QuantConfig(qdq_all_consumers=True)).with_stats(stats)(model)
    ours_path = save_model(model, tmp_path / "ours.onnx")

    def qdq_parameters(path):
        proto = onnx.load(str(path))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
        acts = {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]])) for n in proto.graph.node if n.op_type == "QuantizeLinear"}
        weights = {}
        for n in proto.graph.node:
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 2:
                consumer = next(m for m in proto.graph.node if n.output[0] in m.input)
                weights[consumer.name] = (inits[n.input[0]], inits[n.input[1]])
        return acts, weights

    ort_acts, ort_weights = qdq_parameters(ort_path)
    our_acts, our_weights = qdq_parameters(ours_path)
    assert set(our_acts) == set(ort_acts) and len(our_acts) == 48
    for name, (scale, zp) in ort_acts.items():
        assert our_acts[name][1] == zp
        assert our_acts[name][0] == pytest.approx(scale, rel=1e-6)
    assert set(our_weights) == set(ort_weights) and len(our_weights) == 36
    for name, (q, scale) in ort_weights.items():
        np.testing.assert_array_equal(our_weights[name][0], q)
        np.testing.assert_allclose(our_weights[name][1], scale, rtol=1e-6)

    ids = feeds[0]
    a = ort.InferenceSession(str(ort_path)).run(["sentence_embedding"], ids)[0]
    b = ort.InferenceSession(str(ours_path)).run(["sentence_embedding"], ids)[0]
    cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    assert cosine > 0.999


def test_quantize_outputs_calibrates_every_planned_output():
    """w8a8-outputs quantizes attention MatMul outputs too: the pass must ask for their ranges."""
    from outlierquant.pipeline import run_recipe
    from outlierquant.recipes import load_recipe

    model = tiny_model()
    targets = {t.tensor for t in QuantizeQDQPass(QuantConfig(quantize_outputs=True)).calibration_targets(model)}
    assert {"h0", "gram", "g"} <= targets  # gram comes from the activation x activation MatMul
    assert "gram" not in {t.tensor for t in QuantizeQDQPass(QuantConfig()).calibration_targets(model)}
    x = RNG.normal(size=(12, 16)).astype(np.float32)
    reference = run(model, x)
    records = run_recipe(model, load_recipe("w8a8-outputs"), [{"x": x}], progress=False)
    assert next(r for r in records if r["pass"] == "quantize")["quantized_outputs"] == 1  # h0; the other outputs are graph outputs, left in float
    got = run(model, x)
    for name in ("y", "gram", "g"):
        assert np.linalg.norm(reference[name] - got[name]) / np.linalg.norm(reference[name]) < 0.03


@pytest.mark.parametrize("shape, axis", [((96, 40), 1), ((96, 40), 0), ((12, 5, 3, 3), 0), ((7,), 0)])
def test_weight_rounding_in_slabs_matches_the_plain_formula(shape, axis, monkeypatch):
    """quantize_weight rounds a large weight a slab at a time (an LM head must not need
    several weight-sized float temporaries); the levels and scales are those of the formula."""
    from outlierquant.numerics import slabs

    rng = np.random.default_rng(7)
    weight = (rng.standard_normal(shape) * rng.lognormal(0, 2, shape)).astype(np.float32)
    weight.flat[0] = -np.abs(weight).max() * 1.5  # a negative extreme decides a channel's scale
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    scale = np.abs(weight).max(axis=reduce_axes).astype(np.float32) / np.float32(127)
    broadcast = [1] * weight.ndim
    broadcast[axis] = -1
    expected = np.clip(np.rint(weight / scale.reshape(broadcast)), -127, 127).astype(np.int8)
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", 50)  # several slabs, the last one short
    q, got_scale = quantize_weight(weight, axis)
    np.testing.assert_array_equal(got_scale, scale)
    np.testing.assert_array_equal(q, expected)
    assert q.dtype == np.int8


def test_int8_weight_codes_shift_exactly_and_the_setting_is_checked(monkeypatch):
    from outlierquant.numerics import int8

    levels = np.array([[-127, -1, 0], [1, 64, 127]], np.int8)
    codes, zero = int8.weight_codes(levels, (3,), "unsigned")
    assert codes.dtype == np.uint8 and zero.dtype == np.uint8 and zero.shape == (3,)
    np.testing.assert_array_equal(codes.astype(np.int16) - zero.astype(np.int16), levels)
    codes, zero = int8.weight_codes(levels, (), "signed")
    assert codes is levels and zero.dtype == np.int8 and zero == 0
    given = levels.copy()  # reuse: the codes take the levels' buffer, same values
    reused, _ = int8.weight_codes(given, (3,), "unsigned", reuse=True)
    assert np.shares_memory(reused, given) and reused.dtype == np.uint8
    np.testing.assert_array_equal(reused.astype(np.int16) - 128, levels)
    monkeypatch.setenv("OUTLIERQUANT_INT8_WEIGHTS", "unsigned")
    assert int8.weight_encoding() == "unsigned" and "asked for" in int8.describe_encoding()["reason"]
    monkeypatch.setenv("OUTLIERQUANT_INT8_WEIGHTS", "u8")
    with pytest.raises(ValueError, match="OUTLIERQUANT_INT8_WEIGHTS='u8'"):
        int8.weight_encoding()


@pytest.mark.parametrize("encoding", ["auto", "unsigned", "signed"])
def test_qdq_matmul_with_extreme_codes_is_exact_through_onnxruntimes_fusions(encoding, monkeypatch):
    """Activation codes 255 against weight levels 127: the pair sums that saturate u8 x s8 on
    x86 without VNNI. With the encoding chosen for this CPU, onnxruntime's fused integer
    MatMul gives the exact product, as the unfused DequantizeLinear path does."""
    from onnx import helper, numpy_helper

    from outlierquant.numerics import int8

    if encoding == "signed" and int8.host_saturates_u8s8():
        pytest.skip("this CPU saturates u8 x s8 pair sums: signed weights are not exact here")
    monkeypatch.setenv("OUTLIERQUANT_INT8_WEIGHTS", encoding)
    k, n = 64, 8
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(np.full((k, n), 0.25, np.float32), "w")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.full((4, k), 0.5, np.float32)
    QuantizeQDQPass(QuantConfig()).with_stats(stats_for(model, x, ["x"]))(model)
    weight_codes = next(v.const_value.numpy() for v in model.graph.initializers.values() if v.name.endswith("_quantized"))
    assert weight_codes.dtype == (np.uint8 if int8.weight_encoding() == "unsigned" else np.int8)
    y = run(model, x)["y"]  # onnxruntime's default level: QDQ fused into its integer kernels
    np.testing.assert_allclose(y, x @ np.full((k, n), 0.25, np.float32), rtol=1e-2)


def test_quantease_int8_weight_in_column_slabs_is_the_one_pass_result(monkeypatch):
    """quantease_int8_weight rounds a slab of output columns at a time (every column has its
    own scale and descent): the levels and scales are those of one pass, fixed rows too."""
    from outlierquant.numerics import slabs

    rng = np.random.default_rng(12)
    weight = rng.standard_t(3, size=(40, 29)).astype(np.float32)
    x = rng.standard_normal((300, 40)) * rng.lognormal(0, 1, 40)
    sigma = x.T @ x / 300
    whole = quantease_int8_weight(weight, sigma, iterations=3, fixed_rows=np.array([2, 7]))
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", 40 * 6)  # 6 columns a slab, the last one short
    cut = quantease_int8_weight(weight, sigma, iterations=3, fixed_rows=np.array([2, 7]))
    np.testing.assert_array_equal(cut[0], whole[0])
    np.testing.assert_array_equal(cut[1], whole[1])
    assert not whole[0][[2, 7]].any()  # the fixed rows are held at zero
