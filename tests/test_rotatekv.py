"""kv-quantize (RotateKV / KIVI-style low-bit KV cache) on the synthetic tiny with-past Llama.

The tiny Llama has random weights (synthetic): the error bounds here check the
mechanics (exact rotation, prefill = decode, sinks, packed = simulated), not real
accuracy — benchmarks/bench_kv.py measures SmolLM2.

Every comparison runs a generation-style loop through the model's *own* cache (a
rotated model stores rotated keys, so an fp32 model's past is not its input).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from outlierquant.errors import RecipeError
from outlierquant.export.data import bundled_sentences, read_lines
from outlierquant.export.packed_cache import (cache_bytes_per_token, decode_logits, empty_cache, greedy_generate,
                                              is_packed)
from outlierquant.export.past import with_past_feeds
from outlierquant.numerics.kv_quant import cache_bytes_per_token as token_bytes
from outlierquant.numerics.kv_quant import (balanced_order, outlier_aware_rotation, pack_codes,
                                            per_token_fake_quantize, per_token_quantize, unpack_codes)
from outlierquant.passes.kv_cache import KVCacheQuantizePass
from outlierquant.recipes import validate_pass_options

RTOL = 1e-4


def _session(model: ir.Model):
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _segment(ids: np.ndarray) -> dict:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}


@pytest.fixture(scope="module")
def texts(tiny_llama_past):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_past.parent)
    real = [tokenizer(line, return_tensors="np")["input_ids"] for line in read_lines(bundled_sentences("heldout"))[:6]]
    real = [np.concatenate(real, axis=1)[:, :48]]  # a 48-token real text
    rng = np.random.default_rng(3)
    return {"real": real[0], "random": rng.integers(0, 1000, (1, 40))}


@pytest.fixture(scope="module")
def calibration(tiny_llama_past):
    """Prefill + decode-shaped feeds from 4 calibration segments of 32 tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_past.parent)
    ids = np.concatenate([tokenizer(line, return_tensors="np")["input_ids"]
                          for line in read_lines(bundled_sentences("calibration"))[:20]], axis=1)
    return with_past_feeds(tiny_llama_past, [_segment(ids[:, i * 32:(i + 1) * 32]) for i in range(4)])


def _rewritten(path, calibration, **options):
    model = ir.load(str(path))
    result = KVCacheQuantizePass(**options).with_feeds(calibration)(model)
    return model, result


def _relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


# ------------------------------------------------------------------------------ numerics


def test_pack_unpack_round_trip_and_per_token_grid():
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        q = rng.integers(0, 2**bits, (2, 3, 5, 16))
        packed = pack_codes(q, bits)
        assert packed.dtype == np.uint8 and packed.shape == (2, 3, 5, 16 * bits // 8)
        np.testing.assert_array_equal(unpack_codes(packed, bits), q)
    x = rng.standard_normal((1, 2, 7, 16)).astype(np.float32) * 3
    for bits in (2, 4):
        q, step, low = per_token_quantize(x, bits, 8)
        assert step.shape == (1, 2, 7, 2) and q.min() >= 0 and q.max() <= 2**bits - 1
        error = np.abs(per_token_fake_quantize(x, bits, 8) - x)
        # half a step, plus the float16 rounding of the minimum
        assert np.all(error <= np.repeat(step, 8, axis=-1) * 0.5 + np.abs(x).max() * 2e-3)


def test_balanced_order_spreads_outliers_over_blocks_and_rotation_is_orthogonal():
    magnitude = np.ones(16)
    magnitude[[0, 1, 2, 3]] = [50, 40, 30, 20]  # four outlier channels, all in block 0 as laid out
    order = balanced_order(magnitude, 4)
    assert sorted(order.tolist()) == list(range(16))
    blocks = [set(order[i * 4:(i + 1) * 4].tolist()) for i in range(4)]
    assert all(len(block & {0, 1, 2, 3}) == 1 for block in blocks)  # one outlier per block
    rotation = outlier_aware_rotation(16, 4, magnitude)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(16), atol=1e-12)
    with pytest.raises(ValueError, match="power of two"):
        outlier_aware_rotation(16, 3, None)


# -------------------------------------------------------------------------- exact parts


@pytest.mark.parametrize("block", [0, 4])
@pytest.mark.parametrize("kind", ["real", "random"])
def test_rotation_and_reordering_alone_keep_the_fp32_function(tiny_llama_past, calibration, texts, kind, block):
    """Quantization off (0 bits): the key rotation (reordered, Hadamard in blocks) and the
    matching query rotation leave every logit of prefill + 1-token decode steps unchanged."""
    ids = texts[kind]
    reference, _ = decode_logits(_session(ir.load(str(tiny_llama_past))), ids, 8)
    model, result = _rewritten(tiny_llama_past, calibration, key_bits=0, value_bits=0, rotation_block=block)
    layers = result.record["layers"]
    assert result.record["query_rotations"] == 2 and all(layer["rotation"]["reordered"] for layer in layers)
    assert sum(node.op_type == "MatMul" for node in model.graph) == \
        sum(node.op_type == "MatMul" for node in ir.load(str(tiny_llama_past)).graph) + 4  # q and k, 2 layers
    logits, cache = decode_logits(_session(model), ids, 8)
    assert _relative(reference, logits) <= RTOL
    # the cache really holds rotated keys (what a quantizer then sees)
    _, fp32_cache = decode_logits(_session(ir.load(str(tiny_llama_past))), ids, 8)
    assert _relative(fp32_cache["past_key_values.0.key"], cache["past_key_values.0.key"]) > 0.1
    np.testing.assert_array_equal(fp32_cache["past_key_values.0.value"], cache["past_key_values.0.value"])


def test_reordering_changes_the_rotation(tiny_llama_past, calibration, texts):
    """With Hadamard blocks smaller than the head, the calibrated order moves channels
    between blocks: the stored keys differ from the unreordered rotation's."""
    ids = texts["real"]
    caches = []
    for reorder in (True, False):
        model, _ = _rewritten(tiny_llama_past, calibration, key_bits=0, value_bits=0, rotation_block=4,
                              reorder=reorder)
        caches.append(decode_logits(_session(model), ids, 8)[1]["past_key_values.1.key"])
    assert _relative(caches[0], caches[1]) > 0.05


# ------------------------------------------------------------------------- quantization


def test_simulated_grid_matches_the_numpy_reference(tiny_llama_past, calibration, texts):
    """No rotation, no sinks: the stored values are the per-token grid of the fp32 values."""
    ids = texts["real"]
    _, fp32_cache = decode_logits(_session(ir.load(str(tiny_llama_past))), ids, ids.shape[1])
    model, _ = _rewritten(tiny_llama_past, calibration, key_bits=4, value_bits=2, group_size=8, rotate=False,
                          sink_tokens=0)
    _, cache = decode_logits(_session(model), ids, ids.shape[1])  # prefill only: layer 0's input is fp32's
    for kind, bits in (("key", 4), ("value", 2)):
        expected = per_token_fake_quantize(fp32_cache[f"past_key_values.0.{kind}"], bits, 8)
        np.testing.assert_allclose(cache[f"past_key_values.0.{kind}"], expected, rtol=0, atol=1e-5)


def test_error_grows_as_bits_shrink(tiny_llama_past, calibration, texts):
    ids = texts["real"]
    reference, _ = decode_logits(_session(ir.load(str(tiny_llama_past))), ids, 8)
    errors = {}
    for bits in (8, 4, 2):
        model, _ = _rewritten(tiny_llama_past, calibration, key_bits=bits, value_bits=bits)
        errors[bits] = _relative(reference, decode_logits(_session(model), ids, 8)[0])
    assert errors[8] < 0.01, errors
    assert errors[8] < errors[4] < errors[2], errors


def test_prefill_and_decode_store_the_same_cache(tiny_llama_past, calibration, texts):
    """Per-token grids do not depend on how many tokens a call brings: the whole text as
    one prefill and 8 + 1-token steps give the same logits and cache."""
    ids = texts["real"]
    model, _ = _rewritten(tiny_llama_past, calibration, key_bits=4, value_bits=4)
    session = _session(model)
    whole, whole_cache = decode_logits(session, ids, ids.shape[1])
    stepped, stepped_cache = decode_logits(session, ids, 8)
    assert _relative(whole, stepped) < 1e-3
    for name in whole_cache:
        assert _relative(whole_cache[name], stepped_cache[name]) < 0.05  # a rare code flips by one step


def test_sink_positions_stay_float(tiny_llama_past, calibration, texts):
    ids = texts["random"]
    reference = _session(ir.load(str(tiny_llama_past)))
    fp32_cache = decode_logits(reference, ids, 2)[1]
    model, _ = _rewritten(tiny_llama_past, calibration, key_bits=2, value_bits=2, rotate=False, sink_tokens=3)
    cache = decode_logits(_session(model), ids, 2)[1]  # sinks span the prefill and a decode step
    value, expected = cache["past_key_values.0.value"], fp32_cache["past_key_values.0.value"]
    np.testing.assert_array_equal(value[:, :, :3], expected[:, :, :3])
    assert np.abs(value[:, :, 3:] - expected[:, :, 3:]).max() > 1e-3


def test_per_channel_keys_use_static_calibrated_ranges(tiny_llama_past, calibration, texts):
    model, result = _rewritten(tiny_llama_past, calibration, key_bits=4, value_bits=4, key_mode="per-channel",
                               rotate=False, sink_tokens=0)
    assert result.record["layers"][0]["key"]["grid"] == "per-channel static"
    reference, _ = decode_logits(_session(ir.load(str(tiny_llama_past))), texts["real"], 8)
    assert _relative(reference, decode_logits(_session(model), texts["real"], 8)[0]) < 0.2


def test_recent_window_stays_float_and_settles_on_the_grid(tiny_llama_past, calibration, texts):
    """KIVI's window: the last ``recent_tokens`` and the sinks stay float; a token is stored
    on the per-token grid once it leaves the window; a prefill attends in float."""
    ids = texts["real"]  # 48 tokens
    reference = _session(ir.load(str(tiny_llama_past)))
    fp32_logits, fp32_cache = decode_logits(reference, ids, ids.shape[1])
    model, result = _rewritten(tiny_llama_past, calibration, key_bits=4, value_bits=2, group_size=8, rotate=False,
                               sink_tokens=3, recent_tokens=10)
    assert "the last 10 in float" in result.record["summary"][0]
    session = _session(model)
    logits, cache = decode_logits(session, ids, ids.shape[1])
    np.testing.assert_array_equal(logits, fp32_logits)  # one prefill: attention reads its own tokens in float
    for kind, bits in (("key", 4), ("value", 2)):
        stored, expected = cache[f"past_key_values.0.{kind}"], fp32_cache[f"past_key_values.0.{kind}"]
        np.testing.assert_array_equal(stored[:, :, :3], expected[:, :, :3])
        np.testing.assert_array_equal(stored[:, :, 38:], expected[:, :, 38:])
        np.testing.assert_allclose(stored[:, :, 3:38], per_token_fake_quantize(expected, bits, 8)[:, :, 3:38],
                                   rtol=0, atol=1e-5)
    # token by token the same positions settle (layer 0's keys and values do not depend on the cache)
    stepped_logits, stepped = decode_logits(session, ids, 4)
    value, expected = stepped["past_key_values.0.value"], fp32_cache["past_key_values.0.value"]
    np.testing.assert_allclose(value[:, :, 38:], expected[:, :, 38:], rtol=0, atol=1e-5)
    assert np.abs(value[:, :, 3:38] - expected[:, :, 3:38]).max() > 1e-3
    # decode steps read quantized old tokens: further from fp32 than a window of everything
    wide, _ = _rewritten(tiny_llama_past, calibration, key_bits=4, value_bits=2, group_size=8, rotate=False,
                         sink_tokens=3, recent_tokens=64)
    fp32_stepped, _ = decode_logits(reference, ids, 4)
    np.testing.assert_allclose(decode_logits(_session(wide), ids, 4)[0], fp32_stepped, rtol=0, atol=1e-4)
    assert _relative(fp32_stepped, stepped_logits) > 1e-3


# --------------------------------------------------------------------------- packed form


@pytest.mark.parametrize("options", [dict(key_bits=4, value_bits=4),
                                     dict(key_bits=2, value_bits=2, group_size=8),
                                     dict(key_bits=4, value_bits=2, key_mode="per-channel", rotate=False)],
                         ids=["rotatekv-kv4", "rotatekv-kv2-g8", "kivi-k4v2"])
def test_packed_cache_generates_what_the_simulated_form_does(tiny_llama_past, calibration, texts, options):
    prompt = texts["real"][:, :12]
    simulated, _ = _rewritten(tiny_llama_past, calibration, **options)
    packed, result = _rewritten(tiny_llama_past, calibration, form="packed", **options)
    assert not result.record["simulated"]
    packed_session = _session(packed)
    names = [item.name for item in packed_session.get_inputs()]
    assert is_packed(names) and "past_key_values.0.key" not in names
    assert empty_cache(packed_session)["past_key_values.0.value.codes"].dtype == np.uint8
    tokens, cache = greedy_generate(_session(simulated), prompt, 20)
    packed_tokens, packed_cache = greedy_generate(packed_session, prompt, 20)
    assert packed_tokens == tokens
    # identical arithmetic: the logits agree bit for bit
    np.testing.assert_array_equal(decode_logits(packed_session, texts["real"], 8)[0],
                                  decode_logits(_session(simulated), texts["real"], 8)[0])
    # memory: 31 tokens in the cache; codes at `bits`, float16 step/min per group, 4 float sinks
    tokens_in_cache = prompt.shape[1] + 19
    width = 16 * options["value_bits"] // 8
    assert packed_cache["past_key_values.1.value.codes"].shape == (1, 2, tokens_in_cache, width)
    ratio = cache_bytes_per_token(packed_cache, tokens_in_cache) / cache_bytes_per_token(cache, tokens_in_cache)
    group = options.get("group_size") or 16
    per_head = sum(token_bytes(16, options[f"{kind}_bits"], group,
                               per_token_scales=not (kind == "key" and options.get("key_mode") == "per-channel"))
                   for kind in ("key", "value"))
    sinks = 2 * 4 * 16 * 4 / tokens_in_cache  # K and V, 4 float32 positions, amortized
    assert ratio == pytest.approx((per_head + sinks) / (2 * 16 * 4))
    assert ratio < 0.4, ratio  # 16-channel heads and 4 sinks over 31 tokens; SmolLM2 (64) in bench_kv


@pytest.mark.parametrize("options", [dict(key_bits=2, value_bits=2, group_size=8, recent_tokens=6),
                                     dict(key_bits=4, value_bits=2, key_mode="per-channel", rotate=False,
                                          recent_tokens=5)],
                         ids=["rotatekv-kv2-g8-r6", "kivi-k4v2-r5"])
def test_packed_cache_with_a_float_window_generates_what_the_simulated_form_does(tiny_llama_past, calibration,
                                                                                  texts, options):
    simulated, _ = _rewritten(tiny_llama_past, calibration, **options)
    packed, _ = _rewritten(tiny_llama_past, calibration, form="packed", **options)
    packed_session = _session(packed)
    np.testing.assert_array_equal(decode_logits(packed_session, texts["real"], 8)[0],
                                  decode_logits(_session(simulated), texts["real"], 8)[0])
    prompt = texts["real"][:, :3]  # shorter than the window: the first calls settle nothing
    tokens, cache = greedy_generate(_session(simulated), prompt, 20)
    packed_tokens, packed_cache = greedy_generate(packed_session, prompt, 20)
    assert packed_tokens == tokens
    recent, total = options["recent_tokens"], prompt.shape[1] + 19
    assert packed_cache["past_key_values.1.value.recent"].shape == (1, 2, recent, 16)
    assert packed_cache["past_key_values.1.value.codes"].shape == (1, 2, total - recent, 16 * 2 // 8)
    # bytes: settled tokens at `bits` (+ float16 step/min per group), the window and 4 sinks in float32
    settled = sum(token_bytes(16, options[f"{kind}_bits"], options.get("group_size") or 16,
                              per_token_scales=not (kind == "key" and options.get("key_mode") == "per-channel"))
                  for kind in ("key", "value"))
    per_head = (total - recent) * settled + 2 * (recent + 4) * 16 * 4
    ratio = cache_bytes_per_token(packed_cache, total) / cache_bytes_per_token(cache, total)
    assert ratio == pytest.approx(per_head / (2 * 16 * 4 * total))


def test_packed_form_needs_bits():
    with pytest.raises(ValueError, match="form='packed' needs key_bits"):
        KVCacheQuantizePass(key_bits=0, form="packed")


# ------------------------------------------------------------------ recipes and optimum


def test_recipe_through_the_api_generates_with_optimum(tiny_llama_past, tmp_path):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from outlierquant.plugin.api import OutlierQuantizer

    quantizer = OutlierQuantizer(tiny_llama_past)
    feeds = quantizer.feeds(read_lines(bundled_sentences("calibration")), limit=4)
    result = quantizer.quantize("rotatekv-kv4", feeds, tmp_path / "kv4")
    report = json.loads(result.path.with_suffix(".report.json").read_text()) \
        if result.path.with_suffix(".report.json").is_file() else None
    folder = result.path.parent
    if not (folder / "config.json").is_file():  # a bare .onnx output: give optimum the folder it reads
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"):
            shutil.copy(tiny_llama_past.parent / name, folder / name)
    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, provider="CPUExecutionProvider")
    prompt = torch.tensor([[1, 17, 250, 3, 999, 42]])
    output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                            min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert output.shape == (1, 16)
    ours, _ = greedy_generate(ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]),
                              prompt.numpy(), 10)
    assert output[0, 6:].tolist() == ours
    if report is not None:
        assert any(record.get("pass") == "kv-quantize" for record in report.get("passes", []))


def test_options_are_checked_and_models_without_a_cache_are_skipped(tiny_llama):
    with pytest.raises(RecipeError, match="key_bits"):
        validate_pass_options("kv-quantize", {"key_bits": 3})
    with pytest.raises(RecipeError, match="key_mode"):
        validate_pass_options("kv-quantize", {"key_mode": "per-head"})
    with pytest.raises(RecipeError, match="recent_tokens"):
        validate_pass_options("kv-quantize", {"recent_tokens": -1})
    result = KVCacheQuantizePass(rotate=False)(ir.load(str(tiny_llama)))
    assert not result.modified and "no KV cache" in result.record["skipped"]
