"""Weight-only int4/int3/int8: packing, MatMulNBits and blocked DequantizeLinear vs numpy, recipes."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from outlierquant.emit.weights import emit_blocked_dequantize, emit_matmul_nbits, matmul_nbits_tensors
from outlierquant.errors import RecipeError
from outlierquant.numerics.grids import pack_levels, quantize_blockwise, unpack_levels
from outlierquant.passes.canonicalize import CanonicalizePass
from outlierquant.passes.weight_only import QuantizeWeightOnlyPass
from outlierquant.recipes import load_recipe, validate_pass_options

RTOL = 1e-5


def float_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # onnxruntime fuses blocked DQ -> MatMul into MatMulNBits with int8 compute by default
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def single_linear(quantized, emit: str, k: int, n: int) -> onnx.ModelProto:
    tape = ir.tape.Tape()
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 5, k]))
    y = emit_matmul_nbits(tape, x, quantized, "w") if emit == "nbits" else emit_blocked_dequantize(tape, x, quantized, "w")
    y.name = "y"
    y.type = ir.TensorType(ir.DataType.FLOAT)
    y.shape = ir.Shape([2, 5, n])
    graph = ir.Graph([x], [y], nodes=tape.nodes, initializers=tape.initializers,
                     opset_imports={"": 21, "com.microsoft": 1}, name="linear")
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    onnx.checker.check_model(proto)
    return proto


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_packing_round_trips(bits):
    rng = np.random.default_rng(bits)
    levels = rng.integers(0, 2**bits, size=(7, 37)).astype(np.uint8)
    packed = pack_levels(levels, bits)
    assert packed.shape == (7, 37 if bits == 8 else 19)
    np.testing.assert_array_equal(unpack_levels(packed, bits, 37), levels)
    if bits == 4:  # first element in the low nibble, as onnxruntime packs
        assert packed[0, 0] == levels[0, 0] | (levels[0, 1] << 4)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_matmul_nbits_tensors_decode_to_the_numpy_dequantization(bits, symmetric):
    rng = np.random.default_rng(0)
    k, n, block = 80, 24, 32  # K not a multiple of the block: padded rows
    weight = rng.standard_normal((k, n)).astype(np.float32)
    quantized = quantize_blockwise(weight, bits, block, symmetric=symmetric)
    tensors = matmul_nbits_tensors(quantized)
    blocks = -(-k // block)
    container = 4 if bits == 3 else bits
    assert tensors["B"].shape == (n, blocks, block * container // 8)
    levels = unpack_levels(tensors["B"], bits, block).reshape(n, blocks * block)[:, :k].T
    scales = tensors["scales"].reshape(n, blocks).T
    if tensors["zero_points"] is None:
        zeros = np.full((blocks, n), 2 ** (container - 1))
    else:
        zeros = unpack_levels(tensors["zero_points"].reshape(n, -1), bits, blocks).T
    decoded = (levels.astype(np.float64) - np.repeat(zeros, block, axis=0)[:k]) * np.repeat(scales, block, axis=0)[:k]
    np.testing.assert_array_equal(decoded, quantized.dequantize())  # exact


def test_round_to_nearest_error_is_half_a_step():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 16))
    quantized = quantize_blockwise(weight, 4, 32)
    step = np.repeat(quantized.grid.scale, 32, axis=0)
    assert np.all(np.abs(quantized.dequantize() - weight) <= step * 0.5 + 1e-6)


@pytest.mark.parametrize("emit", ["nbits", "dq"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_onnxruntime_matches_numpy_dequantized_matmul(bits, symmetric, emit):
    rng = np.random.default_rng(2)
    k, n = 96, 40
    weight = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    quantized = quantize_blockwise(weight, bits, 32, symmetric=symmetric)
    proto = single_linear(quantized, emit, k, n)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops == ({"MatMulNBits": 1} if emit == "nbits" else {"DequantizeLinear": 1, "MatMul": 1})
    y = float_session(proto).run(None, {"x": x})[0]
    expected = x.astype(np.float64) @ quantized.dequantize()
    assert np.abs(y - expected).max() <= RTOL * np.abs(expected).max()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [0, 1])
def test_column_chunks_give_the_whole_matrix_result_bit_for_bit(symmetric, axis, monkeypatch):
    """A vocabulary-sized head is quantized a chunk of columns at a time; the levels, scales
    and weighted errors must be those of one pass over the matrix."""
    from outlierquant.numerics import slabs

    rng = np.random.default_rng(4)
    weight = (rng.standard_normal((80, 45)) * rng.lognormal(0, 1, (80, 1))).astype(np.float32)
    if axis == 1:
        weight = np.ascontiguousarray(weight.T)
    row_weight = rng.lognormal(0, 1, 80)
    kwargs = dict(symmetric=symmetric, clip_ratios=(1.0, 0.9, 0.8), row_weight=row_weight, axis=axis)
    whole = quantize_blockwise(weight, 4, 16, **kwargs)
    full = weight if axis == 0 else weight.T
    error, reference = whole.weighted_error(full, row_weight)
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", 80 * 7)  # 7 columns a chunk: 7 chunks, the last short
    chunked = quantize_blockwise(weight, 4, 16, **kwargs)
    np.testing.assert_array_equal(chunked.levels, whole.levels)
    np.testing.assert_array_equal(chunked.grid.scale, whole.grid.scale)
    np.testing.assert_array_equal(chunked.grid.zero, whole.grid.zero)
    np.testing.assert_array_equal(chunked.dequantize(), whole.dequantize())
    delta = whole.dequantize() - full.astype(np.float64)
    np.testing.assert_allclose(chunked.weighted_error(full, row_weight), (error, reference), rtol=1e-12)
    np.testing.assert_allclose(error, np.sum(delta**2 * row_weight[:, None]), rtol=1e-12)


def test_rtn_matches_onnxruntimes_own_quantizer():
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((96, 40)).astype(np.float32)
    for symmetric in (False, True):
        q, scales, zeros = DefaultWeightOnlyQuantizer.quantize_ndarray(weight, 0, 32, symmetric)
        ours = quantize_blockwise(weight, 4, 32, symmetric=symmetric)
        np.testing.assert_allclose(scales, ours.grid.scale, rtol=1e-6)
        signed = ours.levels.astype(np.int16) - (8 if symmetric else 0)
        theirs = unpack_levels(q[None, :], 4, weight.size).reshape(weight.shape).astype(np.int16)
        if symmetric:
            theirs = np.where(theirs > 7, theirs - 16, theirs)
        assert np.mean(signed == theirs) > 0.999  # float32 vs float64 ties may differ


def test_options_are_validated_with_the_field_name():
    with pytest.raises(RecipeError, match="bits"):
        validate_pass_options("weight_only", {"bits": 5})
    with pytest.raises(RecipeError, match="group_size"):
        validate_pass_options("weight-only", {"group_size": 24})
    with pytest.raises(RecipeError, match="emit"):
        validate_pass_options("weight_only", {"emit": "qdq"})


def _graph_with_linears() -> ir.Model:
    """x[.,64] -> MatMul(W1 64x32) + b -> Relu -> Gemm(transB, W2 16x32) ; and a K=8 MatMul (skipped)."""
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((64, 32)).astype(np.float32)
    b1 = rng.standard_normal(32).astype(np.float32)
    w2 = rng.standard_normal((16, 32)).astype(np.float32)
    b2 = rng.standard_normal(16).astype(np.float32)
    w3 = rng.standard_normal((8, 4)).astype(np.float32)
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="act"),
        helper.make_node("Gemm", ["h2", "w2", "b2"], ["y"], name="fc2", transB=1),
        helper.make_node("MatMul", ["z", "w3"], ["y3"], name="tiny"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 64]),
         helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 16]),
         helper.make_tensor_value_info("y3", onnx.TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(a, name) for a, name in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ir.serde.deserialize_model(proto), (w1, b1, w2, b2, w3)


@pytest.mark.parametrize("emit", ["matmul_nbits", "dequantize_linear"])
def test_pass_rewrites_matmul_and_gemm_and_skips_small_k(emit):
    model, (w1, b1, w2, b2, w3) = _graph_with_linears()
    CanonicalizePass()(model)
    result = QuantizeWeightOnlyPass(bits=4, group_size=16, emit=emit)(model)
    record = result.record
    assert record["quantized_linears"] == 2
    assert [s["linear"] for s in record["skipped"]] == ["tiny"]
    assert "K=8" in record["skipped"][0]["reason"]
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    if emit == "matmul_nbits":
        assert ops["MatMulNBits"] == 2 and ops["Gemm"] == 0
        assert {o.domain: o.version for o in proto.opset_import}["com.microsoft"] == 1
    else:
        assert ops["DequantizeLinear"] == 2 and ops["MatMul"] == 3
        assert {o.domain: o.version for o in proto.opset_import}[""] == 21
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    z = rng.standard_normal((3, 8)).astype(np.float32)
    y, y3 = float_session(proto).run(None, {"x": x, "z": z})
    q1 = quantize_blockwise(w1, 4, 16).dequantize()
    q2 = quantize_blockwise(w2.T, 4, 16).dequantize()
    expected = np.maximum(x @ q1 + b1, 0) @ q2 + b2
    assert np.abs(y - expected).max() <= RTOL * np.abs(expected).max()
    np.testing.assert_allclose(y3, z @ w3, rtol=1e-5, atol=1e-6)


def test_layers_output_quantizes_only_the_linears_that_write_a_graph_output():
    """``layers: output`` is how a recipe stores an LM head as int8 weights after its other
    linears were quantized some other way: fc1 (inner) stays a float MatMul, fc2 (writes y)
    becomes an 8-bit MatMulNBits, and the K=8 MatMul writing y3 is reported as skipped."""
    model, (w1, b1, w2, b2, w3) = _graph_with_linears()
    CanonicalizePass()(model)
    record = QuantizeWeightOnlyPass(bits=8, group_size=16, symmetric=True, layers="output")(model).record
    assert [layer["linear"] for layer in record["layers"]] == ["fc2"]
    assert [s["linear"] for s in record["skipped"]] == ["tiny"]
    proto = ir.serde.serialize_model(model)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops["MatMulNBits"] == 1 and ops["MatMul"] == 2
    x = np.random.default_rng(6).standard_normal((3, 64)).astype(np.float32)
    z = np.zeros((3, 8), np.float32)
    y, _ = float_session(proto).run(None, {"x": x, "z": z})
    q2 = quantize_blockwise(w2.T, 8, 16, symmetric=True).dequantize()
    expected = np.maximum(x @ w1 + b1, 0) @ q2 + b2
    assert np.abs(y - expected).max() <= RTOL * np.abs(expected).max()
    with pytest.raises(RecipeError, match="layers"):
        validate_pass_options("weight-only", {"layers": "head"})


def test_recipes_load():
    rtn = load_recipe("rtn-w4a16")
    assert [s.name for s in rtn.passes] == ["canonicalize", "weight-only"]
    plus = load_recipe("smoothquant+-w4a16")
    assert [s.name for s in plus.passes] == ["canonicalize", "smoothquant", "quantease"]
    smooth = plus.passes[1].options_dict()
    assert (smooth["weight_bits"], smooth["weight_block"], smooth["activation_bits"]) == (4, 32, 0)
    assert smooth["full_covariance"] and plus.passes[2].options_dict()["group_size"] == 32


@pytest.mark.slow
def test_minilm_w4a16_recipes(minilm_onnx, tmp_path):
    """SmoothQuant+ beats plain RTN on held-out sentences; both are MatMulNBits-only models."""
    from outlierquant.evaluate.validate import validate
    from outlierquant.export.data import bundled_sentences, load_tokenizer, model_inputs, read_lines, text_feeds
    from outlierquant.pipeline import quantize_model

    tokenizer = load_tokenizer(minilm_onnx.parent)
    spec = model_inputs(minilm_onnx)
    calibration = text_feeds(read_lines(bundled_sentences("calibration"))[:32], tokenizer=tokenizer, input_names=spec)
    heldout = text_feeds(read_lines(bundled_sentences("heldout"))[:24], tokenizer=tokenizer, input_names=spec)
    cosines = {}
    for recipe in ("rtn-w4a16", "smoothquant+-w4a16"):
        result = quantize_model(minilm_onnx, tmp_path / f"{recipe}.onnx", recipe, calibration)
        proto = onnx.load(str(result.output))
        ops = collections.Counter(node.op_type for node in proto.graph.node)
        assert ops["MatMulNBits"] == 36 and ops["DequantizeLinear"] == 0
        report = validate(minilm_onnx, result.output, heldout, latency_runs=0, progress=False)
        cosines[recipe] = report.embedding.cosine_mean
    assert cosines["rtn-w4a16"] > 0.96
    assert cosines["smoothquant+-w4a16"] > cosines["rtn-w4a16"] + 0.003


def test_rtn_w4a16_matches_onnxruntimes_own_int4_quantizer(tiny_llama, tmp_path):
    """``rtn-w4a16`` claims onnxruntime's MatMulNBits RTN (block 32, asymmetric): the two
    models give the same outputs, and the baseline is written atomically."""
    import onnxruntime as ort
    import synthetic

    from outlierquant.evaluate.baselines import ort_matmul_nbits
    from outlierquant.pipeline import quantize_model

    baseline = ort_matmul_nbits(tiny_llama, tmp_path / "ort" / "int4.onnx")
    assert sorted(p.name for p in baseline.parent.iterdir()) == ["int4.onnx"]
    ours = quantize_model(tiny_llama, tmp_path / "ours.onnx", "rtn-w4a16", None, progress=False).output
    ops = [node.op_type for node in onnx.load(str(baseline)).graph.node]
    assert ops.count("MatMulNBits") == 7 * synthetic.TINY_LAYERS + 1  # every projection and the lm_head
    feeds = synthetic.random_feeds(tiny_llama, 2, seed=4)
    a_session, b_session = ort.InferenceSession(str(baseline)), ort.InferenceSession(str(ours))
    for feed in feeds:
        a, b = a_session.run(None, feed)[0], b_session.run(None, feed)[0]
        assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()
