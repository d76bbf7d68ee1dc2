"""The quantization report says where the output's bytes are (graph/sizes.py): a tied
decoder's lm_head and embedding table, our float outlier rows and the int8 linears each
land in their own part, and the parts add up to the initializers' bytes (synthetic tiny
Llama)."""

from __future__ import annotations

import onnx_ir as ir

from outlierquant.graph.sizes import PARTS, size_breakdown
from outlierquant.pipeline import quantize_model


def test_parts_of_a_quantized_decoder(tmp_path, tiny_llama):
    import synthetic

    feeds = synthetic.random_feeds(tiny_llama, 4, seed=3)
    fp32 = size_breakdown(ir.load(tiny_llama))
    assert fp32["linears"] > 0 and fp32["total"] == sum(fp32[p] for p in PARTS)
    result = quantize_model(tiny_llama, tmp_path / "q.onnx", "default", feeds, progress=False)
    parts = result.report["size_parts"]
    model = ir.load(result.output)
    assert parts["total"] == sum(int(v.const_value.nbytes) for v in model.graph.initializers.values())
    assert parts["total"] == sum(parts[p] for p in PARTS)
    # int8 linears: about a quarter of the float ones (scales and zero points on top)
    assert 0.24 * fp32["linears"] < parts["linears"] < 0.35 * fp32["linears"]
    # default quantizes the lm_head like the other linears: its own part, int8 bytes
    assert 0 < parts["lm_head"] < 0.35 * fp32["lm_head"]
    if result.report["float_channels"] and result.report["float_channels"]["float"]:
        assert parts["side_paths"] > 0
