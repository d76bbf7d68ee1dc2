"""Metrics against independent computations; validate() on real and perturbed models."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from outlierquant.errors import InputError
from outlierquant.evaluate import metrics
from outlierquant.evaluate.validate import detect_task, validate
from outlierquant.evaluate.validation_report import ValidationReport, comparison_table
from outlierquant.export import data

RNG = np.random.default_rng(1234)


# --------------------------------------------------------------------------- metrics


def test_cosine_rows_matches_definition_and_is_zero_safe():
    a = RNG.normal(size=(2, 3, 8))
    b = a + 0.1 * RNG.normal(size=a.shape)
    expected = [np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a.reshape(-1, 8), b.reshape(-1, 8))]
    np.testing.assert_allclose(metrics.cosine_rows(a, b), expected, rtol=1e-12)
    zero = np.zeros((2, 4))
    np.testing.assert_array_equal(metrics.cosine_rows(zero, zero), [1.0, 1.0])
    np.testing.assert_array_equal(metrics.cosine_rows(zero, np.ones((2, 4))), [0.0, 0.0])
    np.testing.assert_allclose(metrics.cosine_rows(a, -a), -1.0)


def test_sqnr_and_max_abs_error():
    ref = RNG.normal(size=1000)
    noise = 0.01 * RNG.normal(size=1000)
    expected = 10 * math.log10(np.sum(ref**2) / np.sum(noise**2))
    assert metrics.sqnr_db(ref, ref + noise) == pytest.approx(expected)
    assert metrics.sqnr_db(ref, ref) == math.inf
    assert metrics.sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    assert metrics.max_abs_error(ref, ref + noise) == pytest.approx(np.abs(noise).max())
    assert metrics.max_abs_error(np.array([]), np.array([])) == 0.0
    # halving the noise gains 6.02 dB
    assert metrics.sqnr_db(ref, ref + noise / 2) - metrics.sqnr_db(ref, ref + noise) == pytest.approx(6.0206, abs=1e-3)


@pytest.mark.parametrize("with_ties", [False, True])
def test_spearman_matches_scipy(with_ties):
    from scipy.stats import spearmanr

    x = RNG.normal(size=200)
    y = x + RNG.normal(size=200)
    if with_ties:
        x, y = np.round(x), np.round(y * 2) / 2
    assert metrics.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    from scipy.stats import rankdata

    np.testing.assert_array_equal(metrics.rankdata(x), rankdata(x))
    assert metrics.spearman(x, x) == pytest.approx(1.0)
    assert metrics.spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(metrics.spearman(np.ones(5), x[:5]))


def test_pairwise_cosine_upper_and_mean_pool():
    emb = RNG.normal(size=(5, 7))
    sims = metrics.pairwise_cosine_upper(emb)
    expected = [metrics.cosine_rows(emb[i], emb[j])[0] for i in range(5) for j in range(i + 1, 5)]
    np.testing.assert_allclose(sims, expected, rtol=1e-12)
    tokens = RNG.normal(size=(2, 4, 3))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = metrics.mean_pool(tokens, mask)
    np.testing.assert_allclose(pooled[0], tokens[0, :2].mean(axis=0))
    np.testing.assert_allclose(pooled[1], tokens[1].mean(axis=0))


def test_perplexity_from_logits_matches_torch_cross_entropy():
    import torch

    logits = RNG.normal(scale=5.0, size=(2, 6, 50)).astype(np.float32)
    ids = RNG.integers(0, 50, size=(2, 6))
    nll, count = metrics.perplexity_from_logits(logits, ids)
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:, :-1].reshape(-1, 50)).double(), torch.from_numpy(ids[:, 1:].reshape(-1)), reduction="sum"
    )
    assert count == 10
    assert nll == pytest.approx(float(expected), rel=1e-10)
    # huge logits: the stable log-softmax stays finite
    nll_big, _ = metrics.perplexity_from_logits(logits * 1e4, ids)
    assert math.isfinite(nll_big)
    # masked targets are not counted
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    _, masked_count = metrics.perplexity_from_logits(logits, ids, mask)
    assert masked_count == 8


def test_kurtosis_matches_scipy():
    from scipy.stats import kurtosis

    from outlierquant.numerics import estimates

    x = RNG.standard_t(df=3, size=(4, 500))
    np.testing.assert_allclose(estimates.kurtosis(x, axis=1), kurtosis(x, axis=1, fisher=False), rtol=1e-10)
    assert estimates.kurtosis(x, excess=True) == pytest.approx(kurtosis(x, axis=None, fisher=True))
    assert math.isnan(estimates.kurtosis(np.ones(10)))


def test_detect_task():
    assert detect_task(["input_ids", "attention_mask", "position_ids"], ["logits"], {"logits": 3}) == "text-generation"
    assert detect_task(["input_ids", "attention_mask"], ["token_embeddings", "sentence_embedding"]) == "feature-extraction"
    assert detect_task(["input_ids"], ["last_hidden_state"]) == "feature-extraction"
    assert detect_task(["input_ids"], ["logits"], {"logits": 2}) == "generic"
    assert detect_task(["x"], ["y"]) == "generic"


# --------------------------------------------------------------------------- validate on MiniLM


@pytest.fixture(scope="module")
def heldout_feeds(minilm_onnx):
    tokenizer = data.load_tokenizer(data.find_tokenizer_dir(minilm_onnx))
    lines = data.read_lines(data.bundled_sentences("heldout"))[:48]
    return data.text_feeds(lines, tokenizer=tokenizer, input_names=data.model_inputs(minilm_onnx))


@pytest.fixture(scope="module")
def perturbed_minilm(minilm_onnx, tmp_path_factory):
    """MiniLM with Gaussian noise (1% of the weight's std) added to its largest MatMul weight."""
    proto = onnx.load(str(minilm_onnx))
    weights = [init for init in proto.graph.initializer if len(init.dims) == 2]
    target = max(weights, key=lambda init: int(np.prod(init.dims)) if "embeddings" not in init.name else 0)
    array = numpy_helper.to_array(target)
    noisy = array + 0.01 * array.std() * np.random.default_rng(0).normal(size=array.shape).astype(array.dtype)
    target.CopyFrom(numpy_helper.from_array(noisy, target.name))
    out = tmp_path_factory.mktemp("perturbed") / "model.onnx"
    onnx.save(proto, str(out))
    return out


def test_validate_identical_models(minilm_onnx, heldout_feeds):
    report = validate(minilm_onnx, minilm_onnx, heldout_feeds, latency_batch=4, latency_runs=2, progress=False)
    assert report.task == "feature-extraction"
    assert report.samples == len(heldout_feeds)
    for output in report.outputs:
        assert output.cosine_mean == pytest.approx(1.0) and output.cosine_min == pytest.approx(1.0)
        assert output.sqnr_db == math.inf or output.sqnr_db > 100
    assert report.output("token_embeddings").rows == sum(f["input_ids"].shape[1] for f in heldout_feeds)
    assert report.embedding.spearman == pytest.approx(1.0)
    assert report.embedding.pairs == len(heldout_feeds) * (len(heldout_feeds) - 1) // 2
    assert report.size_ratio == 1.0
    assert report.latency.batch_size == 4 and report.latency.ratio > 0
    assert report.perplexity is None


def test_validate_perturbed_model_and_reports(minilm_onnx, perturbed_minilm, heldout_feeds, tmp_path):
    report = validate(minilm_onnx, perturbed_minilm, heldout_feeds, latency_runs=0, progress=False)
    emb = report.embedding
    assert emb.source == "sentence_embedding"
    assert 0.9 < emb.cosine_min <= emb.cosine_mean < 1.0
    assert math.isfinite(emb.sqnr_db) and emb.sqnr_db > 10
    assert 0.9 < emb.spearman < 1.0
    assert math.isfinite(report.output("token_embeddings").sqnr_db)
    assert report.output("token_embeddings").max_abs_error > 0
    assert report.latency is None

    # JSON round trip (inf/NaN survive as strings/null)
    same = validate(minilm_onnx, minilm_onnx, heldout_feeds[:4], latency_runs=0, progress=False)
    for item in (report, same):
        path = item.save_json(tmp_path / "report.json")
        text = path.read_text()
        json.loads(text)
        assert "Infinity" not in text and "NaN" not in text
        assert ValidationReport.load_json(path) == item
    assert json.loads((tmp_path / "report.json").read_text())["outputs"][0]["sqnr_db"] == "inf"

    table = report.format_table()
    assert "token_embeddings" in table and "Spearman" in table and "latency: not measured" in table
    comparison = comparison_table([("noisy copy", report), ("exact copy", same)])
    lines = comparison.splitlines()
    assert len(lines) == 5
    assert lines[2].startswith("| fp32 (reference)") and "noisy copy" in lines[3] and "exact copy" in lines[4]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert f"{emb.spearman:.4f}" in lines[3]
    assert "fp32 (reference)" not in comparison_table([("noisy", report)], include_reference=False)


def test_validate_input_errors(minilm_onnx, heldout_feeds, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        validate(minilm_onnx, tmp_path / "absent.onnx", heldout_feeds)
    with pytest.raises(InputError, match="no samples"):
        validate(minilm_onnx, minilm_onnx, [])
    with pytest.raises(InputError, match="missing: attention_mask"):
        validate(minilm_onnx, minilm_onnx, [{"input_ids": heldout_feeds[0]["input_ids"]}])
    with pytest.raises(InputError, match="unknown task"):
        validate(minilm_onnx, minilm_onnx, heldout_feeds, task="chat")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["y"], to=TensorProto.FLOAT)],
        "other",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "other.onnx")
    with pytest.raises(InputError, match="different inputs"):
        validate(minilm_onnx, tmp_path / "other.onnx", heldout_feeds)


# --------------------------------------------------------------------------- causal LMs


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    synthetic = pytest.importorskip("synthetic")
    return synthetic.build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def test_validate_tiny_causal_lm(tiny_llama):
    """Synthetic tiny Llama (random weights): perplexity found, identical models agree."""
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(4):
        ids = rng.integers(0, 1000, size=(1, 32)).astype(np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(32)[None]})
    feeds = [{name: feed[name] for name in data.model_inputs(tiny_llama)} for feed in feeds]
    report = validate(tiny_llama, tiny_llama, feeds, latency_batch=2, latency_runs=1, progress=False)
    assert report.task == "text-generation" and report.primary_output == "logits"
    assert report.perplexity.tokens == 4 * 31
    assert math.isfinite(report.perplexity.reference)
    assert report.perplexity.delta == 0.0
    assert "perplexity" in comparison_table([("copy", report)])


@pytest.mark.slow
def test_smollm2_perplexity_on_wikipedia(smollm2_onnx):
    tokenizer = data.load_tokenizer(data.find_tokenizer_dir(smollm2_onnx))
    segments = data.lm_segments(
        data.wikipedia_texts("heldout", limit=200),
        tokenizer=tokenizer,
        input_names=data.model_inputs(smollm2_onnx),
        seq_len=128,
        max_segments=8,
    )
    assert len(segments) == 8
    report = validate(smollm2_onnx, smollm2_onnx, segments[:2], lm_feeds=segments, latency_runs=0, progress=False)
    assert report.task == "text-generation"
    assert report.perplexity.segments == 8 and report.perplexity.tokens == 8 * 127
    assert 5 < report.perplexity.reference < 60
    assert report.perplexity.delta == 0.0
    assert report.output("logits").cosine_min == pytest.approx(1.0)


def _int8_linear_model(path, form: str, dtype=np.int8):
    """x [2, 8] @ an 8-bit weight [8, 4]: a QDQ pair (DequantizeLinear -> MatMul) or a
    MatMulInteger, the forms onnxruntime runs with u8s8 kernels when the codes are int8."""
    from onnx import TensorProto, helper

    codes = np.arange(-16, 16, dtype=np.int64).reshape(8, 4).astype(dtype)
    zero = np.array(0 if dtype == np.int8 else 128, dtype)
    inits = [numpy_helper.from_array(codes, "w_q"), numpy_helper.from_array(np.float32(0.05), "w_scale"),
             numpy_helper.from_array(zero, "w_zero")]
    if form == "qdq":
        nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"]),
                 helper.make_node("MatMul", ["x", "w"], ["y"])]
        x_type = TensorProto.FLOAT
    else:
        nodes = [helper.make_node("MatMulInteger", ["x", "w_q", "x_zero", "w_zero"], ["y32"]),
                 helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.FLOAT)]
        inits.append(numpy_helper.from_array(np.array(128, np.uint8), "x_zero"))
        x_type = TensorProto.UINT8
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


@pytest.mark.parametrize("form", ["qdq", "matmul_integer"])
def test_signed_int8_weights_are_flagged_on_a_cpu_whose_kernels_saturate(form, tmp_path, monkeypatch):
    """A model with signed int8 weights validated on an x86 CPU without VNNI gets a warning
    (onnxruntime's u8s8 kernels saturate there: our baselines' and our signed models'
    errors are then the CPU's, not the format's); unsigned codes, or a VNNI CPU, get none.
    The warning is part of the report and survives its JSON round trip."""
    from outlierquant.evaluate import validate as validate_module
    from outlierquant.numerics import int8

    signed = validate_module._read_header(_int8_linear_model(tmp_path / "s.onnx", form))
    unsigned = validate_module._read_header(_int8_linear_model(tmp_path / "u.onnx", form, np.uint8))
    assert signed.signed_int8_weights == 1 and unsigned.signed_int8_weights == 0
    lines = {}
    for saturates in (True, False):
        monkeypatch.setattr(int8, "host_saturates_u8s8", lambda: saturates)
        lines[saturates] = validate_module.int8_saturation_warning(tmp_path / "s.onnx", signed)
        assert validate_module.int8_saturation_warning(tmp_path / "u.onnx", unsigned) is None
    assert lines[False] is None and "s.onnx: 1 signed int8 weights" in lines[True]
    monkeypatch.setattr(int8, "host_saturates_u8s8", lambda: True)
    if form == "qdq":  # a float model in and out: validate it against itself
        feeds = [{"x": np.ones((2, 8), np.float32)}]
        report = validate(tmp_path / "s.onnx", tmp_path / "s.onnx", feeds, latency_runs=0, progress=False)
        assert len(report.warnings) == 1 and "no VNNI" in report.warnings[0]
        assert "warning: " in report.format_table()
        assert ValidationReport.from_dict(json.loads(json.dumps(report.to_dict()))).warnings == report.warnings
