"""Graph analysis and canonicalization, on hand-written graphs and exported models.

The core check (``assert_folds_exactly``): for every group the analysis calls foldable,
scale the producer's output channels by random ``s > 0`` (γ/β of a norm, weight columns
and bias of a linear) and the consumers' weight rows by ``1 / s[channel_map]``; the
onnxruntime outputs must not change. That is the identity every smoothing pass uses, so
it proves the analysis (incl. the GQA channel map) is right.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from outlierquant.graph.analysis import analyze_graph
from outlierquant.passes.canonicalize import CanonicalizePass

sys.path.insert(0, str(Path(__file__).parent))
import synthetic  # noqa: E402

from outlierquant.graph.records import GraphAnalysis, Linear
from outlierquant.graph.values import first_in_graph

# -- helpers -----------------------------------------------------------------------------


def run_model(model_or_path, feeds: list[dict[str, np.ndarray]], tmp_path: Path) -> list[list[np.ndarray]]:
    if isinstance(model_or_path, ir.Model):
        path = tmp_path / f"model-{id(model_or_path)}.onnx"
        ir.save(model_or_path, path)
    else:
        path = model_or_path
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def assert_outputs_close(expected, actual, rtol: float = 1e-4) -> None:
    for run_expected, run_actual in zip(expected, actual):
        for a, b in zip(run_expected, run_actual):
            scale = max(float(np.abs(a).max()), 1e-6)
            error = float(np.abs(a.astype(np.float64) - b).max()) / scale
            assert error <= rtol, f"relative error {error:.2e} > {rtol}"


def _set_const(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)


def _set_weight_kn(linear: Linear, kn: np.ndarray) -> None:
    dtype = linear.weight.const_value.dtype.numpy()
    if linear.weight_layout == "in_out":
        _set_const(linear.weight, kn.astype(dtype))
    elif linear.weight_layout == "out_in":
        _set_const(linear.weight, kn.T.astype(dtype))
    else:
        raise NotImplementedError("conv weights")


def fold_random_scales(analysis: GraphAnalysis, seed: int = 0) -> int:
    """Apply ``s`` to every foldable producer and ``1/s[channel_map]`` to its consumers."""
    rng = np.random.default_rng(seed)
    folded = 0
    for group in analysis.groups:
        producer = group.producer
        if not producer.foldable:
            continue
        if producer.kind == "norm":
            channels = producer.norm.gamma.const_value.shape[-1]
        else:
            channels = producer.linear.out_features
        scales = np.exp(rng.uniform(-1.5, 1.5, size=channels)).astype(np.float32)
        if producer.kind == "norm":
            norm = producer.norm
            _set_const(norm.gamma, norm.gamma.const_value.numpy() * scales)
            if norm.beta is not None:
                _set_const(norm.beta, norm.beta.const_value.numpy() * scales)
        else:
            linear = producer.linear
            _set_weight_kn(linear, linear.weight_array() * scales[None, :])
            if linear.bias is not None:
                bias = linear.bias.const_value.numpy()
                _set_const(linear.bias, bias * scales.reshape(bias.shape))
        for consumer in group.linears:
            inverse = 1.0 / scales[producer.channel_map]
            _set_weight_kn(consumer, consumer.weight_array() * inverse[:, None])
        folded += 1
    return folded


def assert_folds_exactly(path: Path, tmp_path: Path, feeds, *, canonicalize: bool = False, rtol=1e-4) -> GraphAnalysis:
    expected = run_model(path, feeds, tmp_path)
    model = ir.load(path)
    if canonicalize:
        CanonicalizePass()(model)
    analysis = analyze_graph(model)
    assert fold_random_scales(analysis) == analysis.summary()["foldable_groups"] > 0
    assert_outputs_close(expected, run_model(model, feeds, tmp_path), rtol)
    return analysis


def groups_by_relation(analysis: GraphAnalysis, relation: str):
    return [group for group in analysis.groups if group.producer.relation == relation]


# -- fixtures ----------------------------------------------------------------------------


# -- hand-written graphs -----------------------------------------------------------------

_SPELLINGS = """
<ir_version: 9, opset_import: ["" : 18]>
spellings (float[2, 5, 8] x) => (float[2, 5, 4] y, float[2, 5, 8] n2_out)
<{initializers}>
{
    x_id = Identity(x)
    axes_m = Constant<value: tensor = int64[1] {-1}>()
    two = Constant<value: tensor = float {2.0}>()
    eps = Constant<value: tensor = float {1e-5}>()
    shape_2d = Constant<value: tensor = int64[2] {-1, 6}>()
    shape_3d = Constant<value: tensor = int64[3] {2, 5, 4}>()
    w2_const = Constant<value: tensor = float[8, 4] {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32}>()
    mean = ReduceMean<keepdims: int = 1>(x_id, axes_m)
    centered = Sub(x_id, mean)
    sq = Pow(centered, two)
    var = ReduceMean<keepdims: int = 1>(sq, axes_m)
    var_eps = Add(var, eps)
    std = Sqrt(var_eps)
    normed = Div(centered, std)
    scaled = Mul(normed, ln_g)
    n1 = Add(scaled, ln_b)
    h1 = MatMul(n1, w1)
    h1b = Add(h1, b1)
    h2 = MatMul(n1, w2_const)
    h1b_2d = Reshape(h1b, shape_2d)
    h3 = Gemm(h1b_2d, w3)
    h3_3d = Reshape(h3, shape_3d)
    y = Add(h2, h3_3d)
    xc = Cast<to: int = 1>(x)
    sq2 = Mul(xc, xc)
    ms = ReduceMean<keepdims: int = 1>(sq2, axes_m)
    ms_eps = Add(ms, eps)
    rms = Sqrt(ms_eps)
    inv = Reciprocal(rms)
    n2 = Mul(xc, inv)
    n2c = Cast<to: int = 1>(n2)
    n2_out = Mul(rms_g, n2c)
    wt = Transpose<perm: ints = [1, 0]>(w_t)
    h4 = MatMul(n2_out, wt)
}
"""


def _spellings_model() -> ir.Model:
    rng = np.random.default_rng(1)
    shapes = {"ln_g": [8], "ln_b": [8], "w1": [8, 6], "b1": [6], "w3": [6, 4], "rms_g": [8], "w_t": [4, 8]}
    declarations = []
    for name, shape in shapes.items():
        values = rng.standard_normal(shape) + (1.5 if name.endswith("_g") else 0.0)
        numbers = ", ".join(f"{v:.6f}" for v in values.reshape(-1))
        dims = ", ".join(str(d) for d in shape)
        declarations.append(f"float[{dims}] {name} = {{{numbers}}}")
    text = _SPELLINGS.replace("{initializers}", ", ".join(declarations))
    return ir.from_onnx_text(text)


def test_canonicalize_is_an_exact_no_op(tmp_path):
    model = _spellings_model()
    feeds = [{"x": np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)}]
    expected = run_model(model, feeds, tmp_path)
    before = analyze_graph(model)
    result = CanonicalizePass()(model)
    assert result.modified
    ops = [node.op_type for node in model.graph]
    assert "Identity" not in ops and "Transpose" not in ops
    float_constants = [n for n in model.graph if n.op_type == "Constant"
                       and n.attributes["value"].as_tensor().dtype == ir.DataType.FLOAT
                       and n.attributes["value"].as_tensor().size > 1]
    assert not float_constants
    assert any(n.op_type == "Constant" for n in model.graph), "int64 shape constants stay nodes"
    onnx.checker.check_model(ir.serde.serialize_model(model))
    after = analyze_graph(model)
    assert len(before.linears) == 3 and len(after.linears) == 4  # Transpose(W) became a weight
    np.testing.assert_array_equal(run_model(model, feeds, tmp_path)[0][0], expected[0][0])


def test_spellings_are_recognised():
    model = _spellings_model()
    CanonicalizePass()(model)
    analysis = analyze_graph(model)
    kinds = sorted(norm.kind for norm in analysis.norms)
    assert kinds == ["layernorm", "rmsnorm"]
    layernorm = next(norm for norm in analysis.norms if norm.kind == "layernorm")
    rmsnorm = next(norm for norm in analysis.norms if norm.kind == "rmsnorm")
    assert layernorm.gamma.name == "ln_g" and layernorm.beta.name == "ln_b" and layernorm.axis == -1
    assert rmsnorm.gamma.name == "rms_g" and rmsnorm.beta is None
    assert {n.op_type for n in rmsnorm.nodes} >= {"Mul", "ReduceMean", "Sqrt", "Reciprocal", "Cast"}

    by_weight = {linear.weight.name: linear for linear in analysis.linears}
    assert by_weight["w1"].bias.name == "b1" and by_weight["w1"].bias_node is not None
    assert by_weight["w3"].op_type == "Gemm" and by_weight["w3"].weight_layout == "in_out"
    assert by_weight["w2_const"].bias is None  # the Add after it is not a constant bias

    ln_group = analysis.group_of(by_weight["w1"])
    assert {lin.weight.name for lin in ln_group.linears} == {"w1", "w2_const"}
    assert ln_group.producer.kind == "norm" and ln_group.producer.foldable

    # negative cases, with their reasons
    gemm_producer = analysis.producer_of(by_weight["w3"])
    assert gemm_producer.kind == "linear" and gemm_producer.relation == "linear" and gemm_producer.foldable
    assert [n.op_type for n in gemm_producer.path] == ["Reshape"]
    rms_producer = analysis.producer_of(by_weight["w_t_transposed"])
    assert not rms_producer.foldable and "graph output" in rms_producer.reason


def test_spellings_fold_exactly(tmp_path):
    model = _spellings_model()
    CanonicalizePass()(model)
    path = tmp_path / "spellings.onnx"
    ir.save(model, path)
    feeds = [{"x": np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)}]
    analysis = assert_folds_exactly(path, tmp_path, feeds)
    assert analysis.summary()["foldable_groups"] == 2


# -- synthetic exported models -----------------------------------------------------------


def test_random_feeds_follow_the_model(tiny_bert, tiny_llama):
    feeds = synthetic.random_feeds(tiny_bert, 3, seq_lens=(4, 7))
    assert [feed["input_ids"].shape for feed in feeds] == [(1, 4), (1, 7), (1, 4)]
    assert set(feeds[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(array.dtype == np.int64 for feed in feeds for array in feed.values())
    llama_feed = synthetic.random_feeds(tiny_llama, 1, seq_lens=(6,))[0]
    np.testing.assert_array_equal(llama_feed["position_ids"], np.arange(6)[None])


def test_tiny_llama_structure_and_gqa_channel_map(tiny_llama, tmp_path):
    feeds = synthetic.random_feeds(tiny_llama, 3)
    analysis = assert_folds_exactly(tiny_llama, tmp_path, feeds)
    summary = analysis.summary()
    assert summary["linears"] == 2 * 7 + 1
    assert summary["norms"] == {"rmsnorm": 5} and summary["decomposed_norms"] == 5
    assert summary["relations"] == {"norm": 5, "v_to_o": 2, "up_to_down": 2}
    assert summary["foldable_groups"] == summary["groups"] == 9
    assert [len(g.linears) for g in groups_by_relation(analysis, "norm")] == [3, 2, 3, 2, 1]
    head_dim, heads, kv_heads = 16, 4, 2
    expected = np.array([(j // head_dim) // (heads // kv_heads) * head_dim + j % head_dim for j in range(64)])
    for group in groups_by_relation(analysis, "v_to_o"):
        producer = group.producer
        assert producer.linear.out_features == kv_heads * head_dim
        np.testing.assert_array_equal(producer.channel_map, expected)
        assert "MatMul" in [n.op_type for n in producer.path] and "Expand" in [n.op_type for n in producer.path]
    for group in groups_by_relation(analysis, "up_to_down"):
        assert group.producer.linear in analysis.group_of(group.producer.linear).linears
        np.testing.assert_array_equal(group.producer.channel_map, np.arange(256))
    assert "foldable" in str(analysis)


def test_tiny_opt_layernorm_decoder(tiny_opt, tmp_path):
    feeds = synthetic.random_feeds(tiny_opt, 2)
    raw = analyze_graph(ir.load(tiny_opt))
    assert len(raw.linears) == 12  # lm_head reads Transpose(embedding) until canonicalized
    analysis = assert_folds_exactly(tiny_opt, tmp_path, feeds, canonicalize=True)
    summary = analysis.summary()
    assert summary["linears"] == 13 and summary["linear_ops"] == {"MatMul": 9, "Gemm": 4}
    assert summary["norms"] == {"layernorm": 5}
    fc = [linear for linear in analysis.linears if linear.op_type == "Gemm"]
    assert all(linear.weight_layout == "out_in" and linear.bias is not None for linear in fc)
    fc1, fc2 = fc[0], fc[1]
    assert fc1.out_features == 256 and fc2.in_features == 256
    assert analysis.producer_of(fc1).kind == "norm" and analysis.producer_of(fc1).norm.beta is not None
    assert analysis.producer_of(fc1).foldable
    fc2_producer = analysis.producer_of(fc2)
    assert fc2_producer.relation == "none" and not fc2_producer.foldable and "Relu" in fc2_producer.reason
    assert summary["relations"] == {"norm": 5, "v_to_o": 2, "none": 2}
    assert summary["foldable_groups"] == 7


def test_tiny_bert_post_norm(tiny_bert, tmp_path):
    feeds = synthetic.random_feeds(tiny_bert, 2)
    analysis = assert_folds_exactly(tiny_bert, tmp_path, feeds)
    summary = analysis.summary()
    assert summary["linears"] == 12 and summary["relations"] == {"norm": 4, "v_to_o": 2, "none": 2}
    for group in groups_by_relation(analysis, "norm"):
        assert not group.producer.foldable and "residual" in group.producer.reason
    for group in groups_by_relation(analysis, "none"):
        assert "Erf" in group.producer.reason


def test_planted_outliers_keep_the_function(tiny_llama, planted_llama, tmp_path):
    feeds = synthetic.random_feeds(tiny_llama, 2)
    assert_outputs_close(run_model(tiny_llama, feeds, tmp_path), run_model(planted_llama, feeds, tmp_path))
    model = ir.load(planted_llama)
    analysis = analyze_graph(model)
    first = analysis.groups[0]
    assert first.producer.kind == "norm"
    if first.input.type is None:
        first.input.type = ir.TensorType(ir.DataType.FLOAT)
    model.graph.outputs.append(first.input)  # expose the q/k/v input
    activations = run_model(model, feeds, tmp_path)[0][-1].reshape(-1, 64)
    channel_max = np.abs(activations).max(axis=0)
    others = np.delete(channel_max, [3, 17])
    assert channel_max[[3, 17]].min() > 10 * np.median(others)


# -- real models ---------------------------------------------------------------------------


def test_minilm_structure(minilm_onnx, tmp_path):
    feeds = synthetic.random_feeds(minilm_onnx, 2, vocab_size=30000)
    analysis = assert_folds_exactly(minilm_onnx, tmp_path, feeds)
    summary = analysis.summary()
    assert summary["linears"] == 36 and summary["linears_with_bias"] == 36
    assert summary["groups"] == 24 and summary["norms"] == {"layernorm": 13}
    assert summary["dynamic_matmuls"] == 12
    assert summary["relations"] == {"norm": 12, "v_to_o": 6, "none": 6}
    qkv = [g for g in groups_by_relation(analysis, "norm") if len(g.linears) == 3]
    assert len(qkv) == 6
    for group in groups_by_relation(analysis, "norm"):
        assert not group.producer.foldable
        assert "Add" in group.producer.reason and "residual" in group.producer.reason
    for group in groups_by_relation(analysis, "v_to_o"):
        assert group.producer.foldable
        np.testing.assert_array_equal(group.producer.channel_map, np.arange(384))
    for group in groups_by_relation(analysis, "none"):
        assert "Erf" in group.producer.reason and group.linears[0].in_features == 1536


@pytest.mark.slow
def test_smollm2_structure_and_fold(smollm2_onnx, tmp_path):
    feeds = synthetic.random_feeds(smollm2_onnx, 1, seq_lens=(7,), vocab_size=49152)
    analysis = assert_folds_exactly(smollm2_onnx, tmp_path, feeds, canonicalize=True, rtol=2e-4)
    summary = analysis.summary()
    assert summary["linears"] == 30 * 7 + 1
    assert summary["groups"] == summary["foldable_groups"] == 30 * 4 + 1
    assert summary["relations"] == {"norm": 61, "v_to_o": 30, "up_to_down": 30}
    assert summary["norms"] == {"rmsnorm": 61}
    lm_head = analysis.linears[-1]
    assert lm_head.out_features == 49152 and analysis.producer_of(lm_head).kind == "norm"
    assert lm_head.weight.name != "model.embed_tokens.weight"  # untied by canonicalize
    expected = np.array([(j // 64) // 3 * 64 + j % 64 for j in range(576)])
    for group in groups_by_relation(analysis, "v_to_o"):
        np.testing.assert_array_equal(group.producer.channel_map, expected)


def test_first_in_graph_is_the_earliest_and_rejects_strangers(tiny_llama):

    model = ir.load(tiny_llama)
    nodes = list(model.graph)
    assert first_in_graph(model.graph, [nodes[7], nodes[3], nodes[5]]) is nodes[3]
    stranger = ir.node("Relu", inputs=[nodes[0].outputs[0]], name="stranger")
    with pytest.raises(ValueError, match="stranger"):
        first_in_graph(model.graph, [nodes[3], stranger])
