"""simplify-shapes: the run-time shape arithmetic becomes constants, and the function stays.

Every family of the architecture matrix (synthetic tiny models, planted outliers), with
and without a KV cache, is simplified and compared with the original on inputs of several
batch sizes, sequence lengths and cache lengths (an empty cache included): the shapes the
rewritten targets produce must match the exporter's program for every size, not only the
one the test happened to use. Then the symbolic arithmetic itself, on hand-made graphs:
what it must prove, and what it must refuse to assume.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import synthetic
from helpers import max_relative_error

from outlierquant.graph.symbolic import Lin, SymbolicShapes
from outlierquant.passes.simplify_shapes import SimplifyShapesPass

DECODERS = [family for family, (decoder, _) in synthetic.ARCH_FAMILIES.items() if decoder]
MODELS = [(family, False) for family in synthetic.ARCH_FAMILIES] + [(family, True) for family in DECODERS]


def _session(model: ir.Model):
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _batched(feed: dict, batch: int, seed: int) -> dict:
    """``feed`` repeated to ``batch`` rows, the token ids of each row redrawn."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in feed.items():
        value = np.repeat(value, batch, axis=0)
        if name == "input_ids":
            value = rng.integers(0, int(feed[name].max()) + 1, value.shape).astype(value.dtype)
        elif name.startswith("past_key_values") or name == "pixel_values":
            value = rng.standard_normal(value.shape).astype(value.dtype)
        out[name] = value
    return out


def _feeds(path, with_past: bool) -> list[dict]:
    feeds = []
    for past_len in ((0, 4) if with_past else (3,)):
        for batch, seq in ((1, 1), (2, 5), (3, 9)):
            base = synthetic.random_feeds(path, 1, seq_lens=(seq,), seed=seq, past_len=past_len,
                                           vocab_size=synthetic.ARCH_VOCAB)[0]
            feeds.append(_batched(base, batch, seed=batch * 10 + seq))
    return feeds


@pytest.mark.parametrize("family, with_past", MODELS, ids=[f"{f}{'-past' if p else ''}" for f, p in MODELS])
def test_simplified_graph_computes_the_same_for_every_size(tiny_family, family, with_past):
    path = tiny_family(family, with_past)
    model = ir.load(path)
    before = _session(model)
    feeds = _feeds(path, with_past)
    reference = [before.run(None, feed) for feed in feeds]
    result = SimplifyShapesPass()(model)
    after = _session(model)
    for feed, ref in zip(feeds, reference):
        out = after.run(None, feed)
        assert [o.shape for o in out] == [r.shape for r in ref]
        assert max_relative_error([ref], [out]) <= 1e-5, (family, {k: v.shape for k, v in feed.items()})
    record = result.record
    assert record["nodes_after"] <= record["nodes_before"]
    if with_past:  # every decoder's attention computes its reshapes from Shape: most of it goes
        assert record["nodes_after"] < 0.8 * record["nodes_before"], record


def test_sizes_flow_through_weight_only_linears(tiny_family):
    """After weight-only quantization every linear is a com.microsoft MatMulNBits; its output
    shape (A[..., :-1] + [N]) must be known, or nothing after the first linear folds."""
    from outlierquant.passes.canonicalize import CanonicalizePass
    from outlierquant.passes.weight_only import QuantizeWeightOnlyPass

    path = tiny_family("llama", True)
    model = ir.load(path)
    CanonicalizePass()(model)
    QuantizeWeightOnlyPass(bits=4, group_size=16)(model)
    before = _session(model)
    feeds = _feeds(path, True)
    reference = [before.run(None, feed) for feed in feeds]
    record = SimplifyShapesPass()(model).record
    after = _session(model)
    for feed, ref in zip(feeds, reference):
        assert max_relative_error([ref], [after.run(None, feed)]) <= 1e-5
    assert record["nodes_after"] < 0.8 * record["nodes_before"], record


def _graph(nodes, inputs, outputs, initializers=()):
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": 18})
    return ir.Model(graph, ir_version=9)


def _input(name, dims):
    return ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.FLOAT))


def _const(name, array):
    value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
    value.shape = ir.Shape(np.asarray(array).shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(np.asarray(array).dtype))
    return value


def _head_split(x: ir.Value, shape_of: ir.Value):
    """Reshape(x, [Shape(shape_of)[0], Shape(shape_of)[1], -1, 4]), as exporters write it."""
    shape = ir.node("Shape", [shape_of])
    i0, i1 = _const("i0", np.array(0)), _const("i1", np.array(1))
    axis0 = _const("axis0", np.array([0]))
    g0, g1 = ir.node("Gather", [shape.outputs[0], i0]), ir.node("Gather", [shape.outputs[0], i1])
    u0, u1 = ir.node("Unsqueeze", [g0.outputs[0], axis0]), ir.node("Unsqueeze", [g1.outputs[0], axis0])
    rest = _const("rest", np.array([-1, 4]))
    cat = ir.node("Concat", [u0.outputs[0], u1.outputs[0], rest], attributes={"axis": 0})
    reshape = ir.node("Reshape", [x, cat.outputs[0]])
    return [shape, g0, g1, u0, u1, cat, reshape], [i0, i1, axis0, rest]


def test_a_head_split_target_becomes_a_constant_with_copied_axes():
    x = _input("x", ["batch", "seq", 8])
    nodes, consts = _head_split(x, x)
    out = nodes[-1].outputs[0]
    out.name = "y"
    model = _graph(nodes, [x], [out], consts)
    result = SimplifyShapesPass()(model)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value.numpy().tolist() == [0, 0, -1, 4]
    assert [n.op_type for n in model.graph] == ["Reshape"]
    assert result.record["reshape"] == 1
    data = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    np.testing.assert_array_equal(_session(model).run(None, {"x": data})[0], data.reshape(3, 5, 2, 4))


def test_sizes_of_an_unrelated_input_are_not_assumed_equal():
    # the target reads its sizes from `other`, whose axes are named differently: at run
    # time they may differ from x's, so copying x's axes (0) would change the result
    x = _input("x", ["batch", "seq", 8])
    other = _input("other", ["rows", "cols", 8])
    nodes, consts = _head_split(x, other)
    out = nodes[-1].outputs[0]
    out.name = "y"
    model = _graph(nodes, [x, other], [out], consts)
    result = SimplifyShapesPass()(model)
    assert result.record["reshape"] == 0
    assert any(n.op_type == "Concat" for n in model.graph)


def test_linear_size_arithmetic():
    past, seq = Lin.symbol("past"), Lin.symbol("seq")
    total = past + seq
    assert total - seq == past
    assert (total * 3).floordiv(3) == total
    assert (total + 1) != total and (total.floordiv(2)).terms  # opaque, not a fake simplification
    assert Lin.of(64).floordiv(2) == Lin.of(32)
    assert seq * past == past * seq  # opaque products compare structurally


def test_kv_cache_length_is_past_plus_new_tokens(tiny_family):
    model = ir.load(tiny_family("llama", True))
    symbolic = SymbolicShapes(model.graph)
    present = next(v for v in model.graph.outputs if v.name.startswith("present") and v.name.endswith("key"))
    length = symbolic.shape(present)[2]
    assert {term for term, _ in length.terms} == {"past_sequence_length", "sequence_length"}
