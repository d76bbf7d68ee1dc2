"""merge-linears: sibling linears (one input: q/k/v, gate/up) become one MatMul + Split.

On every family of the architecture matrix (synthetic tiny models, planted outliers), with
and without a KV cache, the merged float graph computes what the separate linears did;
on a quantized with-past decoder (``default`` up to its last passes: int8 weights, float
outlier side paths, GroupQueryAttention) the merged graph gives the same numbers to the
last bit, since each output column is the same dot product over the same integers, and
so does GroupQueryAttention reading the merged q/k/v packed with its own rotary. What
must not merge (different inputs, a weight read twice, a side path on only one sibling)
stays as it was.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
import synthetic
from helpers import load_canonical, max_relative_error, run_outputs

from outlierquant.passes.merge_linears import MergeLinearsPass

DECODERS = [family for family, (decoder, _) in synthetic.ARCH_FAMILIES.items() if decoder]
MODELS = [(family, False) for family in synthetic.ARCH_FAMILIES] + [(family, True) for family in DECODERS]
#: families whose exporter writes q/k/v (and gate/up) as separate linears; Phi-3 (qkv_proj,
#: gate_up_proj) and GPT-2 (c_attn) already hold them in one weight
SEPARATE_QKV = {"llama", "mistral", "qwen2", "gemma2", "gemma3", "opt", "bert", "roberta", "distilbert", "vit"}


def _feeds(path, with_past: bool, n: int = 3) -> list[dict]:
    return synthetic.random_feeds(path, n, seq_lens=(1, 6, 11), seed=3, past_len=4 if with_past else 3,
                                  vocab_size=synthetic.ARCH_VOCAB)


@pytest.mark.parametrize("family, with_past", MODELS, ids=[f"{f}{'-past' if p else ''}" for f, p in MODELS])
def test_merged_graph_computes_the_same(tiny_family, family, with_past):
    path = tiny_family(family, with_past)
    model = load_canonical(path)
    feeds = _feeds(path, with_past)
    before = run_outputs(model, feeds)
    matmuls = sum(node.op_type == "MatMul" for node in model.graph)
    result = MergeLinearsPass()(model)
    assert result.modified == (family in SEPARATE_QKV), result.record
    if result.modified:
        merged = result.record["merged"]
        # q/k/v in every layer (and gate/up where the FFN has them) became one MatMul each
        assert all(len(entry["linears"]) >= 2 for entry in merged)
        assert any(len(entry["linears"]) == 3 for entry in merged)
        assert sum(node.op_type == "MatMul" for node in model.graph) \
            == matmuls - sum(len(e["linears"]) - 1 for e in merged)
        assert sum(node.op_type == "Split" for node in model.graph) >= len(merged)
    assert max_relative_error(before, run_outputs(model, feeds)) < 1e-5


def test_quantized_decoder_merges_int8_weights_and_side_paths_bit_exactly(tiny_family):
    """``default`` on a with-past Llama without its smoothing (so the planted outlier
    channels of the q/k/v input go to float side paths), then the merge: one int8 MatMul,
    one side MatMul, one Add per sibling set."""
    from outlierquant.pipeline import run_recipe
    from outlierquant.recipes import load_recipe

    path = tiny_family("llama", True)
    recipe = load_recipe("default")
    assert "merge-linears" in [p.name for p in recipe.passes]
    recipe = dataclasses.replace(recipe, passes=[p for p in recipe.passes
                                                 if p.name not in ("merge-linears", "smoothquant")])
    model = load_canonical(path)
    run_recipe(model, recipe, _feeds(path, True, n=6), progress=False)
    feeds = _feeds(path, True)
    before = run_outputs(model, feeds)
    ops_before = collections.Counter(node.op_type for node in model.graph)
    assert ops_before["GroupQueryAttention"] and ops_before["RotaryEmbedding"] == 2 * ops_before["GroupQueryAttention"]
    unpacked = model.clone()
    result = MergeLinearsPass()(model)
    merged = result.record["merged"]
    assert merged and all(entry["int8"] for entry in merged)
    assert any(entry["side_path"] for entry in merged)
    ops = collections.Counter(node.op_type for node in model.graph)
    assert ops["DequantizeLinear"] < ops_before["DequantizeLinear"] and ops["Add"] < ops_before["Add"]
    # every layer's attention reads the merged q/k/v packed and rotates it itself
    assert len(result.record["packed_attention"]) == ops["GroupQueryAttention"] == ops_before["GroupQueryAttention"]
    assert ops["RotaryEmbedding"] == 0
    assert all(node.attributes.get_int("do_rotary", 0) and node.inputs[1] is None
               for node in model.graph if node.op_type == "GroupQueryAttention")
    after = run_outputs(model, feeds)
    for sample_before, sample_after in zip(before, after):
        for a, b in zip(sample_before, sample_after):
            np.testing.assert_array_equal(a, b)
    # without packing, the Split and the RotaryEmbeddings stay, and the numbers are the same
    assert not MergeLinearsPass(pack_attention=False)(unpacked).record["packed_attention"]
    assert sum(node.op_type == "RotaryEmbedding" for node in unpacked.graph) == ops_before["RotaryEmbedding"]
    for sample_before, sample_after in zip(before, run_outputs(unpacked, feeds)):
        for a, b in zip(sample_before, sample_after):
            np.testing.assert_array_equal(a, b)
    # the merged outputs keep their names: the attention ops still read the q/k/v linears
    assert all(split.outputs[0].name for split in model.graph if split.op_type == "Split")


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero-points"])
def test_weight_only_decoder_merges_matmul_nbits_exactly(tiny_family, symmetric):
    """A 4-bit weight-only with-past Llama (onnxruntime's MatMulNBits at int8 compute, fused
    attention): q/k/v and gate/up become one MatMulNBits each (B, scales and zero points
    joined along N), attention reads them packed, and every output is what it was."""
    from outlierquant.plugin.api import make_recipe
    from outlierquant.pipeline import run_recipe

    path = tiny_family("llama", True)
    recipe = make_recipe("w4", "canonicalize",
                         ("weight-only", {"bits": 4, "group_size": 16, "symmetric": symmetric}),
                         ("onnxruntime-fuse", {"decoder_attention": True, "nbits_accuracy_level": 4}))
    model = load_canonical(path)
    run_recipe(model, recipe, _feeds(path, True, n=2), progress=False)
    feeds = _feeds(path, True)
    before = run_outputs(model, feeds)
    ops_before = collections.Counter(node.op_type for node in model.graph)
    result = MergeLinearsPass()(model)
    merged = result.record["merged"]
    ops = collections.Counter(node.op_type for node in model.graph)
    layers = ops_before["GroupQueryAttention"]
    assert layers and all(entry["nbits"] for entry in merged)
    assert sorted(len(entry["linears"]) for entry in merged) == [2] * layers + [3] * layers
    assert ops["MatMulNBits"] == ops_before["MatMulNBits"] - 3 * layers
    assert len(result.record["packed_attention"]) == layers and ops["RotaryEmbedding"] == 0
    merged_nodes = [node for node in model.graph if node.op_type == "MatMulNBits" and "merge_linears" in node.name]
    assert all(node.attributes.get_int("accuracy_level") == 4 and (len(node.inputs) == 4) != symmetric
               for node in merged_nodes)
    # each column is the same blocked dot product; allow the last bit to a kernel that
    # tiles N differently
    assert max_relative_error(before, run_outputs(model, feeds)) < 1e-6


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_llm_int8_kernel_nodes_merge_bit_exactly(tiny_family, family):
    """llm-int8 with our MixedInt8MatMul kernel: q/k/v (and gate/up) read one tensor with
    the same float channels, so one kernel node over the joined int8 weights, scales and
    float outlier rows computes each column as before, from one per-token quantization."""
    from outlierquant import custom_ops
    from outlierquant.pipeline import run_recipe
    from outlierquant.plugin.api import make_recipe

    if not custom_ops.available():
        pytest.skip(custom_ops.unavailable_reason())
    path = tiny_family(family, False)
    recipe = make_recipe("llm-int8-node", "canonicalize",
                         ("llm-int8", {"criterion": "relative", "ratio": 3.0, "kernel_form": "node"}),
                         "onnxruntime-fuse")
    model = load_canonical(path)
    run_recipe(model, recipe, _feeds(path, False, n=4), progress=False)
    feeds = _feeds(path, False)
    options = custom_ops.session_options()
    before = run_outputs(model, feeds, options)
    kernels = sum(node.op_type == "MixedInt8MatMul" for node in model.graph)
    result = MergeLinearsPass()(model)
    merged = result.record["merged"]
    assert merged and all(entry["mixed_int8"] for entry in merged)
    assert sum(node.op_type == "MixedInt8MatMul" for node in model.graph) \
        == kernels - sum(len(entry["linears"]) - 1 for entry in merged)
    for sample_before, sample_after in zip(before, run_outputs(model, feeds, options)):
        for a, b in zip(sample_before, sample_after):
            np.testing.assert_array_equal(a, b)


def _siblings(weights: list[np.ndarray], *, shared_weight: bool = False, side_on: tuple[int, ...] = ()) -> ir.Model:
    """x → MatMul(x, W_i) → outputs y_i; optionally a float side path (z @ S, z another
    input) joined to the linears ``side_on``, or the first weight also read by another MatMul."""
    def value(name, array):
        v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        v.shape, v.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.FLOAT)
        return v

    x = ir.Value(name="x", shape=ir.Shape([2, weights[0].shape[0]]), type=ir.TensorType(ir.DataType.FLOAT))
    z = ir.Value(name="z", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x, z], [], nodes=[], name="g", opset_imports={"": 18})
    values = [value(f"w{i}", w) for i, w in enumerate(weights)]
    for v in values:
        graph.register_initializer(v)
    for i, w in enumerate(values):
        node = ir.node("MatMul", [x, w], name=f"mm{i}")
        out = node.outputs[0]
        graph.append(node)
        if i in side_on:
            s = value(f"s{i}", np.full((3, weights[i].shape[1]), i + 1.0, np.float32))
            graph.register_initializer(s)
            side = ir.node("MatMul", [z, s], name=f"side{i}")
            add = ir.node("Add", [node.outputs[0], side.outputs[0]], name=f"add{i}")
            graph.extend([side, add])
            out = add.outputs[0]
        out.name, out.type = f"y{i}", ir.TensorType(ir.DataType.FLOAT)
        graph.outputs.append(out)
    if shared_weight:
        again = ir.node("MatMul", [x, values[0]], name="again")
        again.outputs[0].name, again.outputs[0].type = "again", ir.TensorType(ir.DataType.FLOAT)
        graph.append(again)
        graph.outputs.append(again.outputs[0])
    return ir.Model(graph, ir_version=9)


def test_what_must_not_merge_stays():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((8, n)).astype(np.float32) for n in (8, 4)]
    feeds = [{"x": rng.standard_normal((2, 8)).astype(np.float32), "z": rng.standard_normal((2, 3)).astype(np.float32)}]

    plain = _siblings(weights)
    before = run_outputs(plain, feeds)
    assert MergeLinearsPass()(plain).modified
    assert [n.op_type for n in plain.graph].count("MatMul") == 1
    assert max_relative_error(before, run_outputs(plain, feeds)) < 1e-6
    assert [v.name for v in plain.graph.outputs] == ["y0", "y1"]

    tied = _siblings(weights, shared_weight=True)  # w0 is read twice: not copied into a merge
    assert not MergeLinearsPass()(tied).modified

    one_side = _siblings(weights, side_on=(0,))  # a side path on one sibling only
    assert not MergeLinearsPass()(one_side).modified

    both = _siblings(weights, side_on=(0, 1))  # both: merged with their side rows, unless told not to
    assert not MergeLinearsPass(side_paths=False)(both).modified
    before = run_outputs(both, feeds)
    result = MergeLinearsPass()(both)
    assert result.modified and result.record["merged"][0]["side_path"]
    assert [n.op_type for n in both.graph].count("MatMul") == 2
    assert max_relative_error(before, run_outputs(both, feeds)) < 1e-6
