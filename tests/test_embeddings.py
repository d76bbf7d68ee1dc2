"""int8 embedding tables (quantize-embeddings): the per-row grid, the lookup form in
onnxruntime, the tiny synthetic Llama, and the size and accuracy on real MiniLM."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import synthetic
from helpers import load_canonical, run_outputs

from outlierquant.emit.embeddings import quantize_rows
from outlierquant.passes.embeddings import QuantizeEmbeddingsPass


def test_rows_round_to_their_own_grid():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 16)).astype(np.float32) * rng.uniform(0.01, 100, size=(50, 1)).astype(np.float32)
    table[3] = 0.0
    levels, scale = quantize_rows(table)
    assert levels.dtype == np.int8 and np.abs(levels).max() <= 127
    error = np.abs(levels * scale[:, None] - table)
    assert np.all(error <= scale[:, None] / 2 + 1e-6)  # half a step of each row's own scale
    assert scale[3] == 1.0 and not levels[3].any()


def test_rows_in_slabs_match_the_one_pass_formula(monkeypatch):
    """A vocabulary table is rounded (and its SQNR summed) a slab of rows at a time; the
    levels and scales are those of the one-pass formula, the SQNR equal to rounding."""
    from outlierquant.emit import embeddings
    from outlierquant.numerics import slabs

    rng = np.random.default_rng(1)
    table = rng.normal(size=(37, 16)).astype(np.float32) * rng.uniform(0.01, 100, size=(37, 1)).astype(np.float32)
    table[5] = 0.0
    absmax = np.abs(table).max(axis=1)
    scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1.0)).astype(np.float32)
    expected = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    error = (expected.astype(np.float32) * scale[:, None] - table).astype(np.float64)
    sqnr = 10 * np.log10(np.sum(table.astype(np.float64) ** 2) / np.sum(error**2))
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", 16 * 3)  # 3 rows a slab, the last one short
    levels, got_scale = quantize_rows(table)
    np.testing.assert_array_equal(got_scale, scale)
    np.testing.assert_array_equal(levels, expected)
    assert embeddings.row_quantization_sqnr_db(table, levels, got_scale) == pytest.approx(sqnr, rel=1e-12)


def test_tiny_llama_table_becomes_int8_and_the_function_stays_close(tiny_llama):
    model = load_canonical(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 3, seed=3)
    before = run_outputs(model, feeds)
    result = QuantizeEmbeddingsPass(min_rows=2)(model)
    (table,) = result.record["tables"]
    assert table["int8_bytes"] < table["float_bytes"] / 3 and table["sqnr_db"] > 35
    ops = collections.Counter(node.op_type for node in model.graph)
    assert ops["Cast"] >= 1 and not any(v.const_value is not None and v.dtype == np.float32 and
                                        v.shape is not None and tuple(v.shape) == (table["rows"], table["width"])
                                        for v in model.graph.initializers.values())
    after = run_outputs(model, feeds)
    for a, b in zip(before, after):
        cos = float(np.dot(a[0].ravel(), b[0].ravel()) / (np.linalg.norm(a[0]) * np.linalg.norm(b[0])))
        assert cos > 0.9999


def test_small_tables_and_excluded_lookups_stay_float(tiny_llama):
    model = load_canonical(tiny_llama)
    result = QuantizeEmbeddingsPass(min_rows=10**6)(model)
    assert not result.modified and "min_rows" in result.record["skipped"][0]["skipped"]


@pytest.mark.slow
def test_minilm_default_is_smaller_than_a_third_of_fp32_and_as_accurate(minilm_onnx, minilm_feeds, tmp_path):
    from outlierquant.evaluate.validate import validate
    from outlierquant.pipeline import quantize_model

    calibration, heldout = minilm_feeds
    result = quantize_model(minilm_onnx, tmp_path / "q.onnx", "default", calibration, progress=False)
    record = next(r for r in result.report["passes"] if r["pass"] == "quantize-embeddings")
    assert record["tables"][0]["rows"] == 30522
    report = validate(minilm_onnx, result.output, heldout, latency_runs=0, progress=False)
    # measured on these 24 / 12 sentences: 0.26 of fp32; cosine as without the int8 table
    assert report.size_ratio < 0.30
    assert report.embedding.cosine_mean > 0.998 and report.embedding.cosine_min > 0.995
