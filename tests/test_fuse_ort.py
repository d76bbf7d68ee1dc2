"""onnxruntime-fuse: attention → MultiHeadAttention, int8 linear + bias → MatMulIntegerToFloat,
residual + LayerNorm → SkipLayerNormalization. Equal to the unfused graph on fp32 (random and
padded batches), onnxruntime runs the result, and graphs it does not match are left alone
with the reason."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import synthetic
from helpers import load_canonical, max_relative_error, run_outputs

from outlierquant.errors import RecipeError
from outlierquant.passes.fuse_ort import FuseOnnxRuntimePass
from outlierquant.recipes import load_recipe, validate_pass_options

RTOL = 1e-4


def _padded(feeds: list[dict], lengths=(9, 4, 1)) -> dict:
    """One batch of ``len(lengths)`` rows, right-padded to the longest, mask 0 on the padding
    (random ids there, so a key the mask fails to hide changes the result)."""
    width = max(lengths)
    rng = np.random.default_rng(7)
    batch = {}
    for name, value in feeds[0].items():
        if name == "attention_mask":
            batch[name] = np.array([[1] * n + [0] * (width - n) for n in lengths], dtype=value.dtype)
        elif name == "input_ids":
            batch[name] = rng.integers(0, synthetic.TINY_VOCAB, size=(len(lengths), width)).astype(value.dtype)
        else:
            batch[name] = np.zeros((len(lengths), width), dtype=value.dtype)
    return batch


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def _kept_rows_error(before, after, feeds) -> float:
    """Worst relative error over the token rows the mask keeps (a padded row's output is
    not used by anyone, and the fused kernel's -10000 vs the export's finfo.min may differ
    there in principle)."""
    worst = 0.0
    for sample_before, sample_after, feed in zip(before, after, feeds):
        kept = feed["attention_mask"].astype(bool)
        a, b = sample_before[0][kept], sample_after[0][kept]
        worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    return worst


def test_tiny_bert_fused_equals_unfused_on_random_and_padded_batches(tiny_bert):
    model = load_canonical(tiny_bert)
    feeds = synthetic.random_feeds(tiny_bert, 3, seed=4)
    feeds.append(_padded(feeds))
    before = run_outputs(model, feeds)
    ops_before = _ops(model)

    result = FuseOnnxRuntimePass(skip_layernorm=True)(model)

    assert result.modified
    record = result.record
    assert len(record["attention"]) == 2 and not record["attention_skipped"]  # 2 layers
    assert all(entry["bias_folded"] and entry["mask"] == "attention_mask" for entry in record["attention"])
    assert record["attention"][0]["scale"] == pytest.approx(1 / np.sqrt(record["attention"][0]["head_size"]))
    assert len(record["skip_layernorm"]) == 2 * 2 + 1  # 2 per layer + the embeddings' norm
    ops = _ops(model)
    assert ops["MultiHeadAttention"] == 2 and ops["Softmax"] == 0 and ops["Transpose"] == 0
    assert ops["MatMul"] == ops_before["MatMul"] - 2 * 2  # Q·Kᵀ and P·V of each layer
    assert ops["LayerNormalization"] == 0 and ops["SkipLayerNormalization"] == 5
    onnx.checker.check_model(ir.serde.serialize_model(model))
    after = run_outputs(model, feeds)
    assert max_relative_error(before[:3], after[:3]) <= RTOL
    assert _kept_rows_error(before, after, feeds) <= RTOL


def test_quantized_tiny_bert_drops_the_attention_qdq_and_keeps_the_int8_linears(tiny_bert):
    from outlierquant.pipeline import run_recipe

    feeds = synthetic.random_feeds(tiny_bert, 6, seed=5)
    model = load_canonical(tiny_bert)
    recipe = load_recipe("w8a8")  # without its last pass, onnxruntime-fuse: the standard-op form
    assert recipe.passes[-1].name == "onnxruntime-fuse"
    run_recipe(model, dataclasses.replace(recipe, passes=recipe.passes[:-1]), feeds, progress=False)
    quantized = run_outputs(model, feeds[:3])
    reference = run_outputs(load_canonical(tiny_bert), feeds[:3])
    ops_before = _ops(model)

    # the epilogue alone is the same float computation: only the bias Add moves into the kernel
    bias_only = ir.from_proto(ir.serde.serialize_model(model))
    record = FuseOnnxRuntimePass(attention=False)(bias_only).record
    assert len(record["matmul_bias"]) == 2 * 6  # q, k, v, o, ffn1, ffn2 per layer
    assert _ops(bias_only)["MatMulIntegerToFloat"] == 12 and _ops(bias_only)["Add"] < ops_before["Add"] - 11
    assert max_relative_error(quantized, run_outputs(bias_only, feeds[:3])) <= 1e-5

    record = FuseOnnxRuntimePass()(model).record
    assert len(record["attention"]) == 2 and all(e["qdq_dropped"] == 4 for e in record["attention"])
    assert record["attention_in_float"] and "attention in float" in record["summary"][0]
    ops = _ops(model)
    assert ops["MultiHeadAttention"] == 2 and ops["QuantizeLinear"] == ops_before["QuantizeLinear"] - 2 * 4
    fused = run_outputs(model, feeds[:3])
    # float attention: as close to fp32 as the fully quantized graph, within noise
    assert max_relative_error(reference, fused) <= max_relative_error(reference, quantized) * 1.5 + 1e-3


def test_decoders_are_left_alone_with_the_reason(tiny_llama, tiny_opt):
    for path, reason in ((tiny_llama, "not a head-splitting Reshape"), (tiny_opt, "does not merge the heads")):
        model = load_canonical(path)
        ops_before = _ops(model)
        result = FuseOnnxRuntimePass()(model)
        assert not result.modified
        assert _ops(model) == ops_before
        assert result.record["attention_skipped"] and all(
            reason in entry["skipped"] for entry in result.record["attention_skipped"])
        assert "nothing matched" in result.record["summary"][0]


def test_options_are_checked_by_the_recipe_loader():
    with pytest.raises(RecipeError, match="atention"):
        validate_pass_options("onnxruntime-fuse", {"atention": False})
    assert dict(validate_pass_options("onnxruntime-fuse", {"skip_layernorm": True}).options) == {"skip_layernorm": True}


@pytest.mark.slow
def test_minilm_fused_equals_unfused_on_real_and_padded_sentences(minilm_onnx, minilm_feeds):
    from outlierquant.export.data import bundled_sentences, load_tokenizer, read_lines

    _, heldout = minilm_feeds
    encoded = load_tokenizer(minilm_onnx.parent)(read_lines(bundled_sentences("heldout"))[12:16], padding=True,
                                                 return_tensors="np")
    padded = {name: encoded[name].astype(np.int64) for name in heldout[0]}
    assert not padded["attention_mask"].all()
    feeds = [*heldout[:4], padded]
    model = load_canonical(minilm_onnx)
    before = run_outputs(model, feeds)
    record = FuseOnnxRuntimePass()(model).record
    assert len(record["attention"]) == 6 and record["attention"][0]["heads"] == 12
    assert len(record["matmul_bias"]) == 0  # fp32: no int8 linear to take the bias
    after = run_outputs(model, feeds)
    assert _kept_rows_error(before, after, feeds) <= RTOL
    assert max(float(np.abs(a[1] - b[1]).max()) for a, b in zip(before, after)) <= 1e-5  # sentence embedding
