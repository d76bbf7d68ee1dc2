"""Calibration: statistics streamed through onnxruntime match a direct numpy computation."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from outlierquant.calibration import session as session_module
from outlierquant.calibration.collect import collect_statistics
from outlierquant.calibration.stats import ActivationStats, ChannelStats
from outlierquant.calibration.targets import CalibrationTarget, quantizable_targets
from outlierquant.errors import CalibrationError

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((4, 6)).astype(np.float32)
W2 = RNG.standard_normal((6, 3)).astype(np.float32)
_W2_TEXT = ", ".join(repr(float(v)) for v in W2.ravel())

# Per-token graph: x * mask -> MatMul(initializer) -> Relu -> MatMul(Constant node).
SEQ_MODEL = f"""
<ir_version: 8, opset_import: ["" : 17]>
seq (float[N, S, 4] x, int64[N, S] attention_mask) => (float[N, S, 3] y) {{
  axes = Constant <value = int64[1] {{2}}> ()
  mf = Cast <to = 1> (attention_mask)
  mu = Unsqueeze (mf, axes)
  xm = Mul (x, mu)
  h = MatMul (xm, w1)
  r = Relu (h)
  w2 = Constant <value = float[6, 3] {{{_W2_TEXT}}}> ()
  y = MatMul (r, w2)
}}
"""


def _seq_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(SEQ_MODEL)
    model.graph.initializer.append(numpy_helper.from_array(W1, "w1"))
    onnx.checker.check_model(model)
    return model


def _seq_ir() -> ir.Model:
    return ir.serde.deserialize_model(_seq_model())


def _sample(length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, length, 4)) * [1.0, 5.0, 0.1, 2.0]).astype(np.float32)
    return {"x": x, "attention_mask": np.ones((1, length), np.int64)}


def _seq_reference(samples) -> dict[str, np.ndarray]:
    """Unpadded rows [n, C] of every target, computed with numpy."""
    rows = {"xm": [], "h": [], "r": [], "y": []}
    for s in samples:
        xm = s["x"][0]
        h = xm @ W1
        r = np.maximum(h, 0)
        for name, value in (("xm", xm), ("h", h), ("r", r), ("y", r @ W2)):
            rows[name].append(value.astype(np.float64))
    return {k: np.concatenate(v) for k, v in rows.items()}


def _assert_stats(stats, name, rows, *, rtol=1e-5, covariance=False):
    st = stats[name]
    assert st.count == rows.shape[0]
    np.testing.assert_allclose(st.absmax, np.abs(rows).max(0), rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(st.minimum, rows.min(0), rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(st.maximum, rows.max(0), rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(st.mean, rows.mean(0), rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(st.mean_sq, (rows**2).mean(0), rtol=rtol, atol=1e-6)
    if covariance:
        np.testing.assert_allclose(st.covariance, np.cov(rows.T, bias=True), rtol=rtol, atol=1e-6)


def _assert_same(a: ActivationStats, b: ActivationStats, rtol=1e-6):
    assert list(a) == list(b)
    for name in a:
        assert a[name].count == b[name].count, name
        for attr in ("absmax", "minimum", "maximum", "mean", "mean_sq"):
            np.testing.assert_allclose(getattr(a[name], attr), getattr(b[name], attr), rtol=rtol, atol=1e-7)


# ---------------------------------------------------------------------------------------
# targets


def test_targets_of_seq_graph():
    targets = quantizable_targets(_seq_ir())
    assert [(t.tensor, t.channel_axis, t.role) for t in targets] == [
        ("xm", -1, "input"),
        ("h", -1, "output"),
        ("r", -1, "input"),  # a Constant-node weight counts as a weight
        ("y", -1, "output"),
    ]
    assert [t.tensor for t in quantizable_targets(_seq_ir(), outputs=False)] == ["xm", "r"]


CONV_GEMM_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
cg (float[N, 3, 5, 5] img, float[N, 2, 7] a, float[N, 7, 2] b) => (float[N, 2] g, float[N, 2, 2] ab) {
  c = Conv (img, wc)
  f = Flatten <axis = 1> (c)
  g = Gemm (f, wg)
  ab = MatMul (a, b)
}
"""


def _conv_gemm_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(CONV_GEMM_MODEL)
    rng = np.random.default_rng(1)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "wc"),
            numpy_helper.from_array(rng.standard_normal((36, 2)).astype(np.float32), "wg"),
        ]
    )
    return model


def test_targets_conv_gemm_dynamic_and_numbers():
    model = _conv_gemm_model()
    targets = quantizable_targets(ir.serde.deserialize_model(model))
    assert [(t.tensor, t.channel_axis, t.role) for t in targets] == [
        ("img", 1, "input"),  # a model input can be a target
        ("c", 1, "output"),
        ("f", 1, "input"),
        ("g", 1, "output"),
        ("a", -1, "dynamic_input"),
        ("b", -1, "dynamic_input"),
    ]
    rng = np.random.default_rng(2)
    feeds = [
        {
            "img": rng.standard_normal((1, 3, 5, 5)).astype(np.float32),
            "a": rng.standard_normal((1, 2, 7)).astype(np.float32),
            "b": rng.standard_normal((1, 7, 2)).astype(np.float32),
        }
        for _ in range(5)
    ]
    stats = collect_statistics(ir.serde.deserialize_model(model), feeds, progress=False)
    img = np.concatenate([f["img"] for f in feeds]).astype(np.float64)
    _assert_stats(stats, "img", np.moveaxis(img, 1, -1).reshape(-1, 3))
    wc = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(img, (3, 3), axis=(2, 3))  # [N, 3, 3, 3, kh, kw]
    conv = np.einsum("nchwij,ocij->nohw", windows, wc)
    _assert_stats(stats, "c", np.moveaxis(conv, 1, -1).reshape(-1, 4))
    _assert_stats(stats, "f", conv.reshape(5, 36))
    _assert_stats(stats, "b", np.concatenate([f["b"][0] for f in feeds]).astype(np.float64))
    assert stats.meta["runs"] == 1  # five same-shape samples, one run


# ---------------------------------------------------------------------------------------
# numbers, batching, padding


def test_ragged_feeds_batched_match_numpy_and_per_sample():
    samples = [_sample(n, i) for i, n in enumerate([3, 3, 5, 5, 5, 2, 3])]
    batched = collect_statistics(_seq_ir(), samples, progress=False, covariance_for=["xm", "h"])
    reference = _seq_reference(samples)
    for name in ("xm", "h", "r", "y"):
        _assert_stats(batched, name, reference[name], covariance=name in ("xm", "h"))
    assert batched["xm"].covariance is not None and batched["r"].covariance is None
    assert batched.meta["runs"] == 3  # a list is grouped by shape: (3,3,3) (5,5,5) (2)
    streamed = collect_statistics(_seq_ir(), iter(samples), progress=False, covariance_for=["xm", "h"])
    assert streamed.meta["runs"] == 4  # a generator keeps its order: (3,3) (5,5,5) (2) (3)
    for name in ("xm", "h", "r", "y"):
        _assert_stats(streamed, name, reference[name], covariance=name in ("xm", "h"))
    assert batched.meta["samples"] == 7 and batched.meta["tokens"] == 26
    assert batched["xm"].shape == (-1, -1, 4)
    one_by_one = collect_statistics(_seq_ir(), samples, progress=False, batch_tokens=0)
    assert one_by_one.meta["runs"] == 7
    _assert_same(batched, one_by_one)
    small_batches = collect_statistics(_seq_ir(), samples, progress=False, batch_tokens=10)
    assert small_batches.meta["runs"] == 4  # (3,3,3) (5,5) (5) (2)
    _assert_same(batched, small_batches)


def test_covariance_in_deferred_blocks_matches_numpy_and_merges():
    # 40 updates of 3 rows on 50 channels: the covariance is folded in blocks of >= 50 rows,
    # the rest by finish(); every statistic must still be the whole data's
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((120, 50)).astype(np.float32) * np.linspace(0.1, 20, 50, dtype=np.float32) + 3.0
    st = ChannelStats.empty(50, -1, covariance=True)
    for start in range(0, 120, 3):
        st.update(rows[start:start + 3])
    assert st._pending_rows == 120 - 102  # two blocks (51 rows each) folded, 18 rows waiting
    st.finish()
    reference = rows.astype(np.float64)
    np.testing.assert_allclose(st.covariance, np.cov(reference, rowvar=False, bias=True), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(st.absmax, np.abs(reference).max(axis=0))
    np.testing.assert_allclose(st.mean_sq, (reference**2).mean(axis=0), rtol=1e-12)
    first, second = ChannelStats.empty(50, -1, covariance=True), ChannelStats.empty(50, -1, covariance=True)
    first.update(rows[:7])
    second.update(rows[7:])
    merged = first.merge(second)  # merge folds the buffered rows of both first
    np.testing.assert_allclose(merged.covariance, np.cov(reference, rowvar=False, bias=True), rtol=1e-9, atol=1e-9)
    before = st.absmax.copy()
    bad = rows[:2].copy()
    bad[1, 4] = np.nan
    with pytest.raises(CalibrationError, match="non-finite"):
        st.update(bad)
    np.testing.assert_array_equal(st.absmax, before)  # a rejected block changes nothing
    assert st.count == 120 and st._pending_rows == 0


def test_a_byte_budget_bounds_the_batches_and_keeps_the_numbers():
    samples = [_sample(64, i) for i in range(24)]  # one shape: 1536 tokens
    free = collect_statistics(_seq_ir(), samples, progress=False)
    assert free.meta["runs"] == 2  # 512 tokens first (it measures a token), then the other 1024
    # a budget below one sample's activations: one sample per run, the first run included
    # (what it would fetch alone is known from the targets' channels before it runs)
    budgeted = collect_statistics(_seq_ir(), samples, progress=False, batch_bytes=1)
    assert budgeted.meta["runs"] == 24
    _assert_same(free, budgeted)


def test_the_first_run_fetches_within_half_the_budget():
    """A wide fetched tensor (a decoder's logits) shortens the first run, which runs before a
    token's cost is measured: its fetched channels at 8 bytes (the array and onnxruntime's
    buffer) per token stay within half the run budget."""
    from outlierquant.calibration.collect import _FIRST_RUN_TOKENS, _first_run_tokens
    from outlierquant.calibration.targets import resolve_targets

    model = _seq_ir()
    targets = resolve_targets(model, None)
    channels = {"xm": 4, "h": 6, "r": 6, "y": 3}
    width = sum(channels[t.tensor] for t in targets)
    assert width > 0
    assert _first_run_tokens(model, targets, 2 * 8 * width * 100) == 100
    assert _first_run_tokens(model, targets, 2 * 8 * width * 10**6) == _FIRST_RUN_TOKENS
    assert _first_run_tokens(model, targets, None) == _FIRST_RUN_TOKENS
    assert _first_run_tokens(model, targets, 1) == 1


def _padded(samples, *, left=False):
    length = max(s["x"].shape[1] for s in samples)
    x = np.full((len(samples), length, 4), 1e4, np.float32)  # padding that would dominate a range
    mask = np.zeros((len(samples), length), np.int64)
    for i, s in enumerate(samples):
        n = s["x"].shape[1]
        where = slice(length - n, length) if left else slice(0, n)
        x[i, where] = s["x"][0]
        mask[i, where] = 1
    return {"x": x, "attention_mask": mask}


@pytest.mark.parametrize("left", [False, True])
def test_padded_feed_equals_unpadded_samples(left):
    samples = [_sample(n, 10 + i) for i, n in enumerate([4, 2, 6])]
    unpadded = collect_statistics(_seq_ir(), samples, progress=False)
    padded = collect_statistics(_seq_ir(), [_padded(samples, left=left)], progress=False)
    _assert_same(unpadded, padded)
    assert padded.meta["samples"] == 3 and padded.meta["tokens"] == 12


def test_padded_feed_masked_in_activations_when_inputs_cannot_be_unpadded(caplog):
    # An extra input that is not [B, S] prevents unpadding: padded positions are then
    # dropped from each [B, S, C] activation instead.
    model = _seq_model()
    model.graph.input.append(onnx.helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, [1]))
    mul = onnx.helper.make_node("Mul", ["x", "scale"], ["xs"])
    model.graph.node.insert(0, mul)
    for node in model.graph.node:
        if node.op_type == "Mul" and list(node.input) == ["x", "mu"]:
            node.input[0] = "xs"
    onnx.checker.check_model(model)
    samples = [_sample(n, 20 + i) for i, n in enumerate([4, 2, 6])]
    one = np.ones(1, np.float32)
    unpadded_feeds = [dict(s, scale=one) for s in samples]
    unpadded = collect_statistics(ir.serde.deserialize_model(model), unpadded_feeds, progress=False)
    with caplog.at_level(logging.INFO, logger="outlierquant.calibration.collect"):
        padded = collect_statistics(
            ir.serde.deserialize_model(model), [dict(_padded(samples), scale=one)], progress=False
        )
    assert "dropping padded positions" in caplog.text
    _assert_same(unpadded, padded)


# ---------------------------------------------------------------------------------------
# errors


NAN_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
nan (float[N, S, 2] x) => (float[N, S, 2] y) {
  root = Sqrt (x)
  y = MatMul (root, w)
}
"""


def test_nan_inside_graph_names_tensor_and_sample():
    model = onnx.parser.parse_model(NAN_MODEL)
    model.graph.initializer.append(numpy_helper.from_array(np.eye(2, dtype=np.float32), "w"))
    feeds = [{"x": np.ones((1, 3, 2), np.float32)} for _ in range(4)]
    feeds[2] = {"x": -np.ones((1, 3, 2), np.float32)}  # batched with its neighbours
    with pytest.raises(CalibrationError, match=r"^calibration sample 2: tensor 'root' has NaN/Inf$"):
        collect_statistics(ir.serde.deserialize_model(model), feeds, progress=False)


def test_empty_and_mismatched_feeds():
    with pytest.raises(CalibrationError, match="calibration data is empty"):
        collect_statistics(_seq_ir(), [], progress=False)
    good = _sample(3, 0)
    expected = r"^calibration sample 1: the model has no input 'mask' \(model inputs: x, attention_mask\)$"
    with pytest.raises(CalibrationError, match=expected):
        collect_statistics(_seq_ir(), [good, {"x": good["x"], "mask": good["attention_mask"]}], progress=False)
    with pytest.raises(CalibrationError, match="input 'attention_mask' is missing"):
        collect_statistics(_seq_ir(), [{"x": good["x"]}], progress=False)
    with pytest.raises(CalibrationError, match="input 'x' has dtype float64, the model expects float32"):
        collect_statistics(_seq_ir(), [dict(good, x=good["x"].astype(np.float64))], progress=False)
    with pytest.raises(CalibrationError, match=r"input 'x' has rank 2 .*expects rank 3 \(\[\?, \?, 4\]\)"):
        collect_statistics(_seq_ir(), [dict(good, x=good["x"][0])], progress=False)
    with pytest.raises(CalibrationError, match="dim 2 must be 4"):
        collect_statistics(_seq_ir(), [dict(good, x=np.zeros((1, 3, 5), np.float32))], progress=False)
    with pytest.raises(CalibrationError, match="'nope' is not a value"):
        collect_statistics(_seq_ir(), [good], tensors=["nope"], progress=False)
    with pytest.raises(CalibrationError, match="'w1' is a constant"):
        collect_statistics(_seq_ir(), [good], tensors=["w1"], progress=False)


# ---------------------------------------------------------------------------------------
# protocols, round trip, external data


class _Reader:
    def __init__(self, feeds):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def test_reader_protocol_named_targets_and_save_load(tmp_path):
    samples = [_sample(n, 30 + i) for i, n in enumerate([2, 4, 4])]
    stats = collect_statistics(
        _seq_ir(),
        _Reader(samples),
        tensors=["h", CalibrationTarget("x", 1, "", "input")],
        covariance_for=["h"],
        progress=True,
    )
    assert list(stats) == ["h", "x"]
    reference = _seq_reference(samples)
    _assert_stats(stats, "h", reference["h"], covariance=True)
    # x along axis 1 (the sequence): lengths differ, so it falls back to per-tensor stats.
    assert stats["x"].channels == 1 and stats.meta["per_tensor"] == ["x"]
    _assert_stats(stats, "x", reference["xm"].reshape(-1, 1))
    saved = stats.save(tmp_path / "stats")
    assert saved.name == "stats.npz"
    loaded = ActivationStats.load(tmp_path / "stats.json")
    _assert_same(stats, loaded, rtol=0)
    np.testing.assert_array_equal(loaded["h"].covariance, stats["h"].covariance)
    assert loaded.meta == stats.meta and loaded["h"].shape == stats["h"].shape


@pytest.mark.parametrize("location", ["m.onnx.data", "weights/m.data"])
def test_external_data_model_read_in_place(tmp_path, location):
    folder = tmp_path / "model"
    (folder / "weights").mkdir(parents=True)
    model = _seq_model()
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, size_threshold=0, location=location)
    assert (folder / location).is_file()
    before = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))
    samples = [_sample(n, 40 + i) for i, n in enumerate([3, 5, 5])]
    external = collect_statistics(folder / "m.onnx", samples, progress=False)
    in_memory = collect_statistics(_seq_ir(), samples, progress=False)
    _assert_same(external, in_memory, rtol=0)
    assert external.meta["model"] == str(folder / "m.onnx")
    after = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))
    assert before == after
    # The loaded weights stay lazy (never materialized in Python memory).
    loaded = ir.load(folder / "m.onnx")
    collect_statistics(loaded, samples[:1], progress=False)
    weight = loaded.graph.initializers["w1"].const_value
    assert isinstance(weight, ir.ExternalTensor) and weight._array is None  # noqa: SLF001


def test_oversized_in_memory_model_staged_as_external_data(monkeypatch, caplog, tmp_path):
    # Pretend the in-memory weights pass protobuf's limit: they are staged in a temporary
    # folder, while the weight already on disk (w1, external) is read where it is.
    model = _seq_model()
    node = next(n for n in model.graph.node if n.output[0] == "w2")
    model.graph.node.remove(node)
    model.graph.initializer.append(numpy_helper.from_array(W2, "w2"))
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0, location="d")
    loaded = ir.load(tmp_path / "m.onnx")
    assert isinstance(loaded.graph.initializers["w1"].const_value, ir.ExternalTensor)
    in_memory = ir.Tensor(W2.copy(), name="w2")  # as a pass would leave it
    loaded.graph.initializers["w2"].const_value = in_memory
    monkeypatch.setattr(session_module, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(session_module, "_OFFLOAD_MIN_BYTES", 0)
    samples = [_sample(n, 50 + i) for i, n in enumerate([3, 4])]
    with caplog.at_level(logging.INFO, logger="outlierquant.calibration.session"):
        staged = collect_statistics(loaded, samples, progress=False)
    assert "staging its weights" in caplog.text
    assert loaded.graph.initializers["w2"].const_value is in_memory  # the caller's model is restored
    monkeypatch.undo()
    _assert_same(staged, collect_statistics(_seq_ir(), samples, progress=False), rtol=0)


# ---------------------------------------------------------------------------------------
# a real model


@pytest.mark.slow
def test_minilm_targets_and_one_tensor_against_onnxruntime(minilm_onnx):
    import onnxruntime as ort
    import transformers

    from outlierquant.modelio import load_model

    model = load_model(minilm_onnx)
    targets = {t.tensor: t for t in quantizable_targets(model)}
    weight_matmuls = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    dynamic_matmuls = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is None]
    assert len(weight_matmuls) == 36 and len(dynamic_matmuls) == 12
    for node in weight_matmuls:
        assert targets[node.inputs[0].name].role == "input"
        assert targets[node.outputs[0].name].role == "output"
    for node in dynamic_matmuls:
        assert {targets[v.name].role for v in node.inputs} == {"dynamic_input"}

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_onnx.parent)
    texts = ["Outliers ruin low-bit quantization.", "Hello world", "Hello there", "A longer sentence about smoothing."]
    names = ("input_ids", "attention_mask")
    feeds = [{k: v.astype(np.int64) for k, v in tokenizer(t, return_tensors="np").items() if k in names} for t in texts]
    probe = next(n for n in weight_matmuls if "layer.3" in n.name and "intermediate" in n.name)
    name = probe.inputs[0].name
    stats = collect_statistics(minilm_onnx, feeds, progress=False)
    assert stats.meta["samples"] == 4 and stats.meta["tensors"] == len(targets)

    proto = onnx.load(str(minilm_onnx))
    proto.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rows = np.concatenate([session.run([name], f)[0].reshape(-1, 384) for f in feeds]).astype(np.float64)
    _assert_stats(stats, name, rows, rtol=1e-4)

    # The same sentences as one right-padded batch give the same statistics.
    padded = tokenizer(texts, return_tensors="np", padding=True)
    padded = {k: padded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    again = collect_statistics(minilm_onnx, [padded], tensors=[name], progress=False)
    _assert_stats(again, name, rows, rtol=1e-4)


def test_mask_mapping_onto_activation_layouts():
    from outlierquant.calibration.collect import _masked_rows

    mask = np.array([[1, 1, 0], [1, 0, 0]])  # B=2, S=3: 3 real positions
    rng = np.random.default_rng(3)
    heads = rng.standard_normal((2, 4, 3, 5))  # [B, H, S, D]
    rows = _masked_rows(heads, 3, mask)
    expected = np.concatenate([heads[0, :, 0], heads[0, :, 1], heads[1, :, 0]])
    np.testing.assert_array_equal(np.sort(rows, axis=0), np.sort(expected, axis=0))
    assert _masked_rows(heads.transpose(0, 1, 3, 2), 3, mask) is None  # K^T: the channels are padded
    merged = heads.reshape(8, 3, 5)  # [B*H, S, D]
    np.testing.assert_array_equal(np.sort(_masked_rows(merged, 2, mask), axis=0), np.sort(expected, axis=0))
    tokens = rng.standard_normal((2, 3, 6))
    flat = tokens.reshape(6, 6)  # [B*S, C]
    np.testing.assert_array_equal(_masked_rows(flat, 1, mask), tokens[mask.astype(bool)])
    pooled = rng.standard_normal((2, 7))  # no per-position axis: used whole
    np.testing.assert_array_equal(_masked_rows(pooled, 1, mask), pooled)


# ---------------------------------------------------------------------------------------
# sessions over graphs a quantizing pass rewrote


def _dequantized_seq_ir() -> ir.Model:
    """The sequence model with ``w1`` stored as int8 + per-column scale behind a DequantizeLinear."""
    model = _seq_model()
    scale = (np.abs(W1).max(axis=0) / 127).astype(np.float32)
    levels = np.clip(np.round(W1 / scale), -127, 127).astype(np.int8)
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w1"))
    model.graph.initializer.extend([numpy_helper.from_array(levels, "w1_q"), numpy_helper.from_array(scale, "w1_s")])
    dq = onnx.helper.make_node("DequantizeLinear", ["w1_q", "w1_s"], ["w1"], axis=1, name="w1_dq")
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([dq, *nodes])
    onnx.checker.check_model(model)
    return ir.serde.deserialize_model(model)


def test_constant_dequantize_handed_in_as_inputs_gives_identical_activations(monkeypatch):
    import contextlib

    import onnxruntime as ort

    samples = [_sample(n, i) for i, n in enumerate([3, 5, 3, 2])]
    wanted = ["xm", "h", "r", "w1"]  # the dequantized weight itself is also asked for
    with contextlib.ExitStack() as stack:
        plain = session_module.create_session(_dequantized_seq_ir(), wanted, None, None, stack)
        fed = session_module.create_session(_dequantized_seq_ir(), wanted, None, None, stack, fold_dequantize=True)
        assert isinstance(plain, ort.InferenceSession) and not isinstance(fed, ort.InferenceSession)
        assert "w1" in fed.constants and "w1" in [i.name for i in fed.get_inputs()]
        for sample in samples:
            for a, b in zip(plain.run(wanted, sample), fed.run(wanted, sample)):
                np.testing.assert_array_equal(a, b)  # bit-identical, the weight included
    # the statistics too, with the weight (a dynamic MatMul input here) among the targets
    a = collect_statistics(_dequantized_seq_ir(), samples, progress=False)
    assert "w1" in a
    monkeypatch.setattr(session_module, "FOLD_DEQUANTIZE_BYTES", 0)  # nothing folded: the node runs
    b = collect_statistics(_dequantized_seq_ir(), samples, progress=False)
    _assert_same(a, b, rtol=0)


def test_stream_tensors_batched_and_chunked_sums_equal_per_sample():
    from outlierquant.calibration.collect import stream_tensors

    samples = [_sample(n, i) for i, n in enumerate([3, 5, 3, 2, 5, 5])]

    def sums(**options):
        totals = {"h": [0.0, 0], "r": [0.0, 0], "x": [0.0, 0]}
        runs = []

        def visit(name, array, piece, index):
            totals[name][0] += float(np.asarray(array, np.float64).sum())
            totals[name][1] += int(array.shape[0])
            runs.append((name, index, array.shape[0]))
        count = stream_tensors(_dequantized_seq_ir(), samples, ["h", "r", "x"], visit, **options)
        return count, totals, runs

    count, one_by_one, runs = sums()
    assert count == 6 and len(runs) == 18
    # one tensor's bytes per group, all samples of a shape in one run
    count, grouped, runs = sums(fetch_bytes=1, batch_bytes=2**20)
    assert count == 6
    assert [(n, i, b) for n, i, b in runs if n == "h"] == [("h", 0, 2), ("h", 1, 3), ("h", 3, 1)]
    assert sum(1 for n, *_ in runs if n == "x") == 3  # a graph input is visited on the first pass only
    for name in one_by_one:
        assert grouped[name][1] == one_by_one[name][1]
        assert grouped[name][0] == pytest.approx(one_by_one[name][0], rel=1e-12)


def _binding_model() -> ir.Model:
    """A graph with each way onnxruntime's basic optimizers read an initializer (a Conv
    folded with its BatchNormalization, a Transpose of a weight folded, a Gather whose
    indices come from constants and Shape), beside the run-time-only reads that may be
    bound (MatMul and Gemm B, a Gather table indexed by a feed)."""
    rng = np.random.default_rng(3)
    big = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731  (each >= 64 KiB)
    h = onnx.helper
    inits = {
        "conv_w": big(64, 16, 5, 5), "bn_s": big(64) + 2, "bn_b": big(64), "bn_m": big(64), "bn_v": np.abs(big(64)) + 1,
        "t_w": big(128, 256), "mm_w": big(128, 256), "gemm_w": big(256, 128), "table": big(512, 64),
        "shape_table": big(300, 64), "ids_c": np.array([1, 5, 7], np.int64),
    }
    nodes = [
        h.make_node("Conv", ["img", "conv_w"], ["c"], pads=[2, 2, 2, 2]),
        h.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        h.make_node("Transpose", ["t_w"], ["t_wt"]),
        h.make_node("MatMul", ["x", "t_wt"], ["y_t"], name="via_transpose"),  # x: [N, 256]
        h.make_node("MatMul", ["x2", "mm_w"], ["y_mm"]),  # x2: [N, 128]
        h.make_node("Gemm", ["x", "gemm_w"], ["y_gemm"]),
        h.make_node("Gather", ["table", "ids"], ["emb"]),
        h.make_node("Gather", ["table", "ids_c"], ["emb_c"]),  # the same table, constant indices
        h.make_node("Shape", ["x"], ["x_shape"]),  # static: folded by onnxruntime
        h.make_node("Gather", ["shape_table", "x_shape"], ["emb_s"]),
    ]
    f = onnx.TensorProto.FLOAT
    graph = h.make_graph(
        nodes, "binding",
        [h.make_tensor_value_info("img", f, [1, 16, 8, 8]), h.make_tensor_value_info("x", f, [4, 256]),
         h.make_tensor_value_info("x2", f, [4, 128]), h.make_tensor_value_info("ids", onnx.TensorProto.INT64, [3])],
        [h.make_tensor_value_info(name, f, None) for name in ("bn", "y_t", "y_mm", "y_gemm", "emb", "emb_c", "emb_s")],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return ir.serde.deserialize_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def test_bound_weights_give_the_serialized_sessions_outputs_bit_for_bit():
    import contextlib

    model = _binding_model()
    bound = set(session_module._bindable(model, []))  # noqa: SLF001
    # only the run-time reads: not the Conv/BN (fused), the transposed weight, or the table
    # that a constant-index Gather also reads
    assert bound == {"mm_w", "gemm_w"}
    rng = np.random.default_rng(4)
    feeds = [{"img": rng.standard_normal((1, 16, 8, 8)).astype(np.float32),
              "x": rng.standard_normal((4, 256)).astype(np.float32),
              "x2": rng.standard_normal((4, 128)).astype(np.float32),
              "ids": rng.integers(0, 300, 3).astype(np.int64)} for _ in range(3)]
    def assert_bound_is_serialized():
        with contextlib.ExitStack() as stack:
            serialized = session_module.create_session(model, [], None, None, stack, bind_weights=False)
            by_reference = session_module.create_session(model, [], None, None, stack)
            for feed in feeds:
                for a, b in zip(serialized.run(None, feed), by_reference.run(None, feed)):
                    np.testing.assert_array_equal(a, b)

    assert_bound_is_serialized()
    # why the rule: bound anyway, the folded Conv and Transpose would read the stub's zeros
    everything = {name: model.graph.initializers[name] for name in ("conv_w", "t_w", "mm_w")}
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(session_module, "_bindable", lambda *_: everything)
            wrong = session_module.create_session(model, [], None, None, stack)
        right = session_module.create_session(model, [], None, None, stack, bind_weights=False)
        got, want = wrong.run(["bn", "y_t", "y_mm"], feeds[0]), right.run(["bn", "y_t", "y_mm"], feeds[0])
        assert not np.array_equal(got[0], want[0]) and not np.array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])
    # a table indexed only by a feed is bound too, and still exact
    constant_gather = next(n for n in model.graph if n.outputs[0].name == "emb_c")
    model.graph.outputs.remove(constant_gather.outputs[0])
    model.graph.remove(constant_gather, safe=True)
    assert set(session_module._bindable(model, [])) == {"mm_w", "gemm_w", "table"}  # noqa: SLF001
    assert set(session_module._bindable(model, ["table"])) == {"mm_w", "gemm_w"}  # noqa: SLF001  (asked for itself)
    assert_bound_is_serialized()
    assert not isinstance(model.graph.initializers["table"].const_value, ir.ExternalTensor)  # the caller's model restored


def test_column_means_in_row_slabs_are_the_one_shot_means(monkeypatch):
    """ChannelStats folds a run's rows a slab at a time (a wide logits run widened to float64
    and squared was four times its own size); each slab carries the sums so far into its
    first row, so the means are bit for bit those of one float64 pass."""
    from outlierquant.calibration import stats as stats_module
    from outlierquant.numerics import slabs

    rng = np.random.default_rng(2)
    rows = (rng.standard_normal((301, 17)) * rng.lognormal(0, 3, 17) + 5).astype(np.float32)
    wide = rows.astype(np.float64)
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", 17 * 20)  # 20 rows a slab, the last one short
    mean, mean_sq = stats_module._column_means(rows)
    assert np.array_equal(mean, wide.mean(axis=0)) and np.array_equal(mean_sq, (wide * wide).mean(axis=0))
    folded = ChannelStats.empty(17, -1)
    folded.update(rows)
    assert np.array_equal(folded.mean, wide.mean(axis=0))


def test_the_default_calibration_budget_follows_the_model_size():
    """Half the model's weights per run, between 64 and 512 MiB: a fixed 512 MiB nearly
    tripled the peak on a 280 MiB model (the model is in memory once besides the run)."""
    from outlierquant.calibration.collect import MEMORY_BUDGET_BYTES, MIN_BATCH_BYTES, activation_budget

    def model_of(elements: int) -> ir.Model:  # weights described, never allocated
        weight = ir.ExternalTensor("absent.bin", 0, 4 * elements, ir.DataType.FLOAT, shape=ir.Shape([elements]),
                                   name="w")
        graph = ir.Graph([], [], nodes=[], initializers=[ir.Value(name="w", const_value=weight)])
        return ir.Model(graph, ir_version=8)

    assert activation_budget(model_of(1000)) == MIN_BATCH_BYTES
    assert activation_budget(model_of(70 * 2**20)) == 140 * 2**20  # a 280 MiB model
    assert activation_budget(model_of(2**30)) == MEMORY_BUDGET_BYTES
    assert activation_budget(_seq_ir()) == MIN_BATCH_BYTES


def test_weights_only_unfetched_nodes_read_are_never_evaluated():
    """A weight that only nodes after every fetched tensor read (an LM head, when its input
    is the target) is stubbed without being computed, even where it could be bound: a lazy
    tensor (a SplitQuant part, a transposed tied head) evaluated there is a whole float copy
    made only to be dropped."""
    model = _seq_ir()
    h = next(node.outputs[0] for node in model.graph if node.outputs[0].name == "h")
    head = ir.Value(name="head_w", shape=ir.Shape([6, 8192]), type=ir.TensorType(ir.DataType.FLOAT))

    def never() -> ir.Tensor:
        raise AssertionError("the unread head weight was evaluated")

    head.const_value = ir.LazyTensor(never, dtype=ir.DataType.FLOAT, shape=ir.Shape([6, 8192]))
    model.graph.register_initializer(head)
    logits = ir.node("MatMul", [h, head], name="head")
    logits.outputs[0].name = "logits"
    logits.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    model.graph.append(logits)
    model.graph.outputs.append(logits.outputs[0])
    assert head.const_value.nbytes >= session_module.BIND_MIN_BYTES
    samples = [_sample(5, seed) for seed in range(3)]
    stats = collect_statistics(model, samples, tensors=["xm", "h"])
    rows = _seq_reference(samples)
    _assert_stats(stats, "h", rows["h"])
    assert isinstance(model.graph.initializers["head_w"].const_value, ir.LazyTensor)  # put back, still lazy
