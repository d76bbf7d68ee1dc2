"""Model loading helpers: tensors owned after load, and the files a model references,
found without parsing its weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import external_data_helper, helper, numpy_helper

from outlierquant.modelio import _external_locations, _iter_tensors, load_model, model_file_bytes, model_files


def _model_with_tensors_everywhere() -> onnx.ModelProto:
    """Initializers, a Constant node, a subgraph's Constant and a function's Constant."""
    rng = np.random.default_rng(0)

    def array(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    branch = helper.make_graph([helper.make_node("Constant", [], ["k"], value=array("k", (40, 40)))], "branch", [],
                               [helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, None)])
    function = helper.make_function(
        "local", "Bias", ["a"], ["b"],
        [helper.make_node("Constant", [], ["f"], value=array("f", (64,))), helper.make_node("Add", ["a", "f"], ["b"])],
        opset_imports=[helper.make_opsetid("", 18)])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=array("c", (64, 64))),
        helper.make_node("MatMul", ["x", "w"], ["y0"]),
        helper.make_node("Add", ["y0", "c"], ["y1"]),
        helper.make_node("Bias", ["y1"], ["y"], domain="local"),
        helper.make_node("If", ["cond"], ["k2"], then_branch=branch, else_branch=branch),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("k2", onnx.TensorProto.FLOAT, None)],
        [array("w", (64, 64))])
    return helper.make_model(graph, functions=[function],
                             opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)])


def _locations_by_parsing(path) -> list[str]:
    proto = onnx.load(str(path), load_external_data=False)
    tensors = list(_iter_tensors(proto.graph))
    for function in proto.functions:
        for node in function.node:
            tensors += [attr.t for attr in node.attribute if attr.HasField("t")]
    return [e.value for t in tensors for e in t.external_data if e.key == "location"]


def test_external_locations_match_a_full_parse(tmp_path):
    """The wire-format walk finds every external tensor a full parse finds: initializers,
    Constant attributes, subgraphs and functions (each tensor in its own file)."""
    proto = _model_with_tensors_everywhere()
    external_data_helper.convert_model_to_external_data(
        proto, all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    for function in proto.functions:  # the helper leaves functions alone: externalize by hand
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    external_data_helper.set_external_data(attr.t, "function-f.bin")
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    (tmp_path / "function-f.bin").write_bytes(b"\0" * 256)
    expected = _locations_by_parsing(path)
    assert len(expected) == 5  # w, c, k (twice: both branches), f
    assert sorted(_external_locations(path)) == sorted(expected)
    files = model_files(path)
    assert files[0] == path and sorted(f.name for f in files[1:]) == sorted(set(expected))
    assert model_file_bytes(path) == sum(f.stat().st_size for f in files)


def test_inline_model_has_no_other_files_and_a_broken_one_is_only_itself(tmp_path):
    path = tmp_path / "inline.onnx"
    onnx.save(_model_with_tensors_everywhere(), str(path))
    assert _external_locations(path) == []
    assert model_files(path) == [path]
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[:-7])
    assert model_files(truncated) == [truncated]  # load_model says what is wrong with it
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert model_files(empty) == [empty]


def test_loaded_tensors_are_owned_and_keep_their_values(tmp_path):
    """load_model replaces proto-backed tensors with numpy-backed ones (so the parsed proto
    can be freed) without changing a value."""
    proto = _model_with_tensors_everywhere()
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    model = load_model(path, check=False)
    tensors = [value.const_value for value in model.graph.initializers.values()]
    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            tensors += [attr.value for attr in node.attributes.values() if attr.type == ir.AttributeType.TENSOR]
    assert len(tensors) == 5
    assert not any(isinstance(t, ir.serde.TensorProtoTensor) for t in tensors)
    by_name = {t.name: t.numpy() for t in tensors}
    expected = {t.name: numpy_helper.to_array(t) for t in _iter_tensors(proto.graph)}
    expected["f"] = numpy_helper.to_array(proto.functions[0].node[0].attribute[0].t)
    assert by_name.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(by_name[name], array)


def _model_with_many_initializer_kinds() -> onnx.ModelProto:
    """Large inline initializers of several types (lifted), small ones, a bfloat16 one and a
    typed-data one (kept in the parse), doc strings and metadata on tensors."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32), "w32"),
        numpy_helper.from_array(rng.standard_normal((50, 50)).astype(np.float16), "w16"),
        numpy_helper.from_array(rng.integers(-9, 9, (700,)).astype(np.int64), "idx"),
        numpy_helper.from_array(rng.integers(0, 2, (5000,)).astype(bool), "mask"),
        numpy_helper.from_array(rng.integers(-128, 127, (90, 50)).astype(np.int8), "q8"),
        numpy_helper.from_array(np.float32([1.5, -2.0]), "tiny"),
        helper.make_tensor("typed", onnx.TensorProto.FLOAT, [1200], rng.standard_normal(1200).tolist()),
        helper.make_tensor("bf", onnx.TensorProto.BFLOAT16, [4000], np.zeros(4000, np.float32).tolist()),
    ]
    inits[0].doc_string = "a weight"
    entry = inits[0].metadata_props.add()
    entry.key, entry.value = "origin", "test"
    nodes = [helper.make_node("Identity", [t.name], [f"{t.name}_out"]) for t in inits]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(f"{t.name}_out", t.data_type, None)
                                              for t in inits], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_load_reads_large_initializers_from_the_file_and_gets_the_same_model(tmp_path, monkeypatch):
    """load_model parses the model without the large raw payloads and reads them from the
    file into arrays: the model it gives serializes to exactly what its full parse gives."""
    from outlierquant import modelio
    from outlierquant.modelio import _parse_without_weights

    proto = _model_with_many_initializer_kinds()
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    lean, lifted = _parse_without_weights(path)
    assert sorted(lifted) == ["idx", "mask", "q8", "w16", "w32"]
    payloads = sum(end - start for start, end in lifted.values())
    assert lean.ByteSize() <= path.stat().st_size - payloads  # the payloads were left out of the parse
    model = load_model(path)
    monkeypatch.setattr(modelio, "_parse_without_weights", lambda path: (None, {}))
    full = load_model(path)
    assert ir.serde.serialize_model(model).SerializeToString() == ir.serde.serialize_model(full).SerializeToString()
    for init in proto.graph.initializer:
        np.testing.assert_array_equal(model.graph.initializers[init.name].const_value.numpy(),
                                      numpy_helper.to_array(init))
    w32 = model.graph.initializers["w32"].const_value
    assert w32.doc_string == "a weight" and dict(w32.metadata_props) == {"origin": "test"}
    assert w32.numpy().flags.writeable and w32.numpy().flags.aligned


def test_load_of_a_lifted_tensor_with_the_wrong_size_names_it(tmp_path):
    """A raw payload that does not fit its shape is refused on the lean path as on the full one."""
    import pytest

    from outlierquant.errors import InputError

    proto = _model_with_many_initializer_kinds()
    proto.graph.initializer[0].raw_data = proto.graph.initializer[0].raw_data[:-8]
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(InputError, match=r"tensor 'w32' holds 12280 bytes of raw data, its shape \[64, 48\] needs 12288"):
        load_model(path)
