"""A synthetic decoder past protobuf's 2 GB limit goes through calibrate + w8a8.

Synthetic (random weights). Checks that external data is read lazily and written back
correctly, that the input folder is left untouched, and that the quantized model runs and
tracks the fp32 one. Peak memory is reported by ``benchmarks/bench_pipeline.py``.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from large_model import build_large_decoder, large_decoder_feeds


@pytest.mark.large
@pytest.mark.slow
def test_large_decoder_calibrate_and_w8a8(tmp_path_factory):
    from outlierquant.modelio import model_file_bytes
    from outlierquant.pipeline import quantize_model

    src = tmp_path_factory.mktemp("large-src")
    model_path = build_large_decoder(src)
    assert model_file_bytes(model_path) > 2**31
    listing = {p.name: p.stat().st_size for p in src.iterdir()}

    out = tmp_path_factory.mktemp("large-out") / "w8a8.onnx"
    feeds = large_decoder_feeds(6)
    result = quantize_model(model_path, out, "w8a8", feeds, progress=False)
    assert {p.name: p.stat().st_size for p in src.iterdir()} == listing  # input untouched
    assert next(r for r in result.report["passes"] if r["pass"] == "quantize")["quantized_weights"] == 16
    assert result.report["size_bytes"]["output"] < result.report["size_bytes"]["input"] / 3

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    test = large_decoder_feeds(2, seed=7)
    quantized = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    got = [quantized.run(None, f)[0] for f in test]
    del quantized
    reference = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    want = [reference.run(None, f)[0] for f in test]
    for a, b in zip(want, got):
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cosine.min() > 0.99
