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


# -- decoders with a KV cache: GroupQueryAttention ---------------------------------------


def _generate(model: ir.Model, past, *, steps: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A left-padded batch of two prompts (row 1 padded by 4, position ids counting its real
    tokens only), then ``steps`` teacher-forced decode steps, each feeding back the model's
    own present cache: the way ORTModelForCausalLM.generate runs a padded batch (ids below
    256, the smallest synthetic vocabulary)."""
    import onnxruntime as ort

    from outlierquant.export.past import empty_past

    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (2, 10)).astype(np.int64)
    mask = np.ones((2, 10), np.int64)
    mask[1, :4] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(np.cumsum(mask, 1) - 1, 0, None),
            **empty_past(past, batch=2)}
    results = []
    for _ in range(steps + 1):
        out = dict(zip(names, session.run(names, {k: v for k, v in feed.items() if k in wanted})))
        results.append({**out, "mask": mask})
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        feed = {"input_ids": rng.integers(0, 256, (2, 1)).astype(np.int64), "attention_mask": mask,
                "position_ids": (np.cumsum(mask, 1) - 1)[:, -1:], **{p.name: out[p.present] for p in past}}
    return results


def _generation_error(before, after, past) -> float:
    """Worst relative error of the logits on real (unpadded) tokens and of the present cache
    at real positions, over prefill and decode steps."""
    worst = 0.0
    for a, b in zip(before, after):
        kept = a["mask"][:, -a["logits"].shape[1]:].astype(bool)
        worst = max(worst, float(np.abs(a["logits"] - b["logits"])[kept].max() / np.abs(a["logits"]).max()))
        real = a["mask"].astype(bool)  # [B, T] over the whole cache
        for item in past:
            x, y = a[item.present].transpose(0, 2, 1, 3)[real], b[item.present].transpose(0, 2, 1, 3)[real]
            worst = max(worst, float(np.abs(x - y).max() / np.abs(x).max()))
    return worst


def test_tiny_llama_with_past_fuses_into_group_query_attention_exactly(tiny_llama_past):
    from outlierquant.export.past import past_inputs

    past = past_inputs(tiny_llama_past)
    model = load_canonical(tiny_llama_past)
    before = _generate(model, past)
    result = FuseOnnxRuntimePass(decoder_attention=True)(model)
    ops = _ops(model)
    assert result.modified and ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 4
    assert ops["Softmax"] == 0 and not result.record["decoder_attention_skipped"]
    entry = result.record["decoder_attention"][0]
    assert (entry["heads"], entry["kv_heads"], entry["head_size"]) == (4, 2, 16)
    after = _generate(model, past)
    # left padding, position ids that skip the padding, and decode steps on the model's own cache
    assert _generation_error(before, after, past) < RTOL


def test_quantized_tiny_llama_with_past_runs_the_attention_in_float(tiny_llama_past):
    """After static W8A8 (Q/DQ around Q·Kᵀ and P·V) the fused graph drops that quantization:
    closer to fp32 than the quantized graph, within noise."""
    from outlierquant.export.past import past_inputs
    from outlierquant.pipeline import run_recipe

    past = past_inputs(tiny_llama_past)
    reference = _generate(load_canonical(tiny_llama_past), past)
    recipe = load_recipe("w8a8")  # without its last pass, onnxruntime-fuse: the standard-op form
    assert recipe.passes[-1].name == "onnxruntime-fuse"
    quantized = load_canonical(tiny_llama_past)
    run_recipe(quantized, dataclasses.replace(recipe, passes=recipe.passes[:-1]),
               synthetic.random_feeds(tiny_llama_past, 6, seed=3), progress=False)
    quantized_out = _generate(quantized, past)
    result = FuseOnnxRuntimePass(decoder_attention=True)(quantized)
    assert result.modified and _ops(quantized)["GroupQueryAttention"] == 2
    assert all(entry["quantization_dropped"] > 0 for entry in result.record["decoder_attention"])
    fused_out = _generate(quantized, past)
    assert _generation_error(reference, fused_out, past) <= _generation_error(reference, quantized_out, past) * 1.5 + 1e-3


#: the families whose with-past attention is the rotary + grouped-head core the fusion knows;
#: the others (Gemma: positions computed in the graph, Gemma 3: q/k norms, Phi-3: partial
#: rotary, OPT/GPT-2: no rotary) are left alone with the reason
_GQA_FAMILIES = {"llama", "mistral", "qwen2"}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "opt", "gpt2"])
def test_decoder_families_fuse_exactly_or_say_why(tiny_family, family):
    from outlierquant.export.past import past_inputs

    path = tiny_family(family, with_past=True)
    past = past_inputs(path)
    model = load_canonical(path)
    before = _generate(model, past, steps=2)
    result = FuseOnnxRuntimePass(decoder_attention=True)(model)
    fused, skipped = result.record["decoder_attention"], result.record["decoder_attention_skipped"]
    assert bool(fused) == (family in _GQA_FAMILIES) and bool(skipped) != (family in _GQA_FAMILIES)
    assert all(entry["skipped"] for entry in skipped)
    if fused:
        assert _generation_error(before, _generate(model, past, steps=2), past) < RTOL


def test_simplify_shapes_after_the_decoder_fusion_stays_exact_and_folds(tiny_llama_past):
    """Symbolic shapes pass through RotaryEmbedding and GroupQueryAttention (their outputs'
    shapes are known), and simplify-shapes after the fusion stays exact."""
    from outlierquant.export.past import past_inputs
    from outlierquant.passes.simplify_shapes import SimplifyShapesPass

    past = past_inputs(tiny_llama_past)
    model = load_canonical(tiny_llama_past)
    before = _generate(model, past)
    from outlierquant.graph.symbolic import SymbolicShapes

    assert FuseOnnxRuntimePass(decoder_attention=True)(model).modified
    shapes = SymbolicShapes(model.graph)
    for node in model.graph:
        if node.op_type in ("GroupQueryAttention", "RotaryEmbedding"):
            assert all(shapes.shape(v) is not None for v in node.outputs), node.name
    nodes = len(list(model.graph))
    assert SimplifyShapesPass()(model).modified and len(list(model.graph)) < nodes
    assert _generation_error(before, _generate(model, past), past) < RTOL
