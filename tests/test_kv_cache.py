"""The KV cache end to end: with-past export by default, with-past calibration feeds from
text, recipes on the with-past graph, and generation through optimum's
``ORTModelForCausalLM(use_cache=True)``.

The tiny Llama here is **synthetic** (random weights, a tokenizer trained on the bundled
sentences): its agreement numbers exercise the decoding path and bound regressions, they
say nothing about real accuracy. The SmolLM2 test (slow) is the real-weights check.

Teacher-forced agreement: fp32 decodes each prompt greedily with its cache; the quantized
model then reads the prompt and fp32's continuation through *its own* cache (one token
per step, as generation runs it) and must pick fp32's next token at each step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from outlierquant.export.data import bundled_sentences, feeds_for_model, fill_past, model_inputs, read_lines
from outlierquant.export.past import DECODE_TOKENS, empty_past, has_past, past_inputs, with_past_feeds
from outlierquant.plugin.api import OutlierQuantizer

PROMPTS = ("The capital of France is", "Water boils at a temperature of", "In the morning, the old fisherman")
NEW_TOKENS = 32

#: recipe -> floor on the teacher-forced agreement of the synthetic tiny Llama (8 calibration
#: segments -> 8 prefill + 8 decode samples; 3 prompts x 32 tokens). Measured 2026-12-04:
#: w8a8 0.948, default 0.969, llm-int8 0.979, quarot-w8a8 0.990; one flip is 0.010.
TINY_FLOORS = {"w8a8": 0.90, "default": 0.92, "llm-int8": 0.93, "quarot-w8a8": 0.94}


def _session(path: Path):
    import onnxruntime as ort

    from outlierquant import custom_ops

    options = custom_ops.session_options() if custom_ops.available() else None
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _step(session, past, ids: np.ndarray, cache: dict, position: int):
    """One call of a with-past graph: ``ids`` after ``position`` cached tokens."""
    feed = {"input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((1, position + ids.shape[1]), np.int64),
            "position_ids": np.arange(position, position + ids.shape[1], dtype=np.int64)[None]}
    feed.update(cache)
    out = session.run(["logits"] + [item.present for item in past], feed)
    return out[0], {item.name: value for item, value in zip(past, out[1:])}


def greedy_with_cache(session, past, prompt: np.ndarray, tokens: int) -> list[int]:
    """Greedy tokens: the prompt once (empty past), then one token per step."""
    logits, cache = _step(session, past, prompt, empty_past(past), 0)
    out: list[int] = []
    position = prompt.shape[1]
    while True:
        out.append(int(np.argmax(logits[0, -1])))
        if len(out) == tokens:
            return out
        logits, cache = _step(session, past, np.array([[out[-1]]]), cache, position)
        position += 1


def teacher_forced_choices(session, past, prompt: np.ndarray, continuation: list[int]) -> list[int]:
    """The model's next-token choice at each step while it reads ``continuation`` through its cache."""
    logits, cache = _step(session, past, prompt, empty_past(past), 0)
    choices: list[int] = []
    position = prompt.shape[1]
    for index, token in enumerate(continuation):
        choices.append(int(np.argmax(logits[0, -1])))
        if index + 1 == len(continuation):
            break
        logits, cache = _step(session, past, np.array([[token]]), cache, position)
        position += 1
    return choices


def teacher_forced_agreement(fp32: Path, quantized: Path, prompts=PROMPTS, tokens: int = NEW_TOKENS) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fp32.parent)
    past = past_inputs(fp32)
    reference, candidate = _session(fp32), _session(quantized)
    agree = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="np")["input_ids"]
        continuation = greedy_with_cache(reference, past, ids, tokens)
        choices = teacher_forced_choices(candidate, past, ids, continuation)
        agree += [a == b for a, b in zip(choices, continuation)]
    return float(np.mean(agree))


# ---------------------------------------------------------------------------------- export


def test_causal_lm_exports_with_past_by_default_and_no_past_opts_out(tmp_path, capsys):
    import synthetic

    from outlierquant.plugin.cli import main

    source = tmp_path / "hf"
    synthetic.tiny_llama_model(0).save_pretrained(source)
    assert main(["export", str(source), "-o", str(tmp_path / "past")]) == 0
    assert main(["export", str(source), "-o", str(tmp_path / "nopast"), "--no-past"]) == 0
    capsys.readouterr()
    with_cache = model_inputs(tmp_path / "past" / "model.onnx")
    assert {f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")} <= set(with_cache)
    outputs = {value.name for value in onnx.load(str(tmp_path / "past" / "model.onnx"), load_external_data=False)
               .graph.output}
    assert {"logits", "present.0.key", "present.1.value"} <= outputs
    assert not has_past(model_inputs(tmp_path / "nopast" / "model.onnx"))

    code = main(["export", str(source), "-o", str(tmp_path / "bad"), "--no-past",
                 "--task", "text-generation-with-past"])
    assert code == 2 and "--no-past contradicts" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_with_past_applies_to_inferred_text_generation_only():
    from outlierquant.export.hf import with_past

    assert with_past("text-generation", "llama", True) == "text-generation-with-past"
    assert with_past("text-generation", "llama", False) == "text-generation"
    assert with_past("feature-extraction", "bert", True) == "feature-extraction"


# ----------------------------------------------------------------------------------- feeds


def test_text_feeds_for_a_with_past_model_are_prefill_then_decode_shaped(tiny_llama_past):
    feeds = feeds_for_model(tiny_llama_past, bundled_sentences("calibration"), tokenizer=None, limit=4,
                            purpose="calibration")
    past = past_inputs(tiny_llama_past)
    assert [(item.heads, item.head_size) for item in past] == [(2, 16)] * 4
    assert len(feeds) == 8
    prefill, decode = feeds[:4], feeds[4:]
    for feed in prefill:
        assert feed["input_ids"].shape == (1, 128) and feed["attention_mask"].shape == (1, 128)
        assert all(feed[item.name].shape == (1, 2, 0, 16) and feed[item.name].dtype == np.float32 for item in past)
    for index, feed in enumerate(decode):
        k = DECODE_TOKENS[index % len(DECODE_TOKENS)]
        assert feed["input_ids"].shape == (1, k)
        assert feed["attention_mask"].shape == (1, 128)
        assert feed["position_ids"].tolist() == [list(range(128 - k, 128))]
        assert all(feed[item.name].shape == (1, 2, 128 - k, 16) for item in past)
        np.testing.assert_array_equal(feed["input_ids"], prefill[index]["input_ids"][:, 128 - k:])

    # a decode-shaped sample computes what the whole segment computes at its positions
    session = _session(tiny_llama_past)
    for index in range(4):
        k = decode[index]["input_ids"].shape[1]
        whole = session.run(["logits"], prefill[index])[0][:, -k:]
        stepped = session.run(["logits"], decode[index])[0]
        np.testing.assert_allclose(stepped, whole, rtol=0, atol=1e-4)


def test_line_mode_and_prefill_only(tiny_llama_past):
    from transformers import AutoTokenizer

    from outlierquant.export.data import text_feeds, text_inputs

    spec = model_inputs(tiny_llama_past)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_past.parent)
    lines = read_lines(bundled_sentences("heldout"))[:3]
    plain = text_feeds(lines, tokenizer=tokenizer, input_names=text_inputs(spec))
    feeds = fill_past(tiny_llama_past, spec, plain)
    assert len(feeds) == 6 and all(set(feed) == set(spec) for feed in feeds)
    assert len(with_past_feeds(tiny_llama_past, plain, decode=False)) == 3
    assert fill_past(tiny_llama_past, {"input_ids": None}, plain) is plain  # no cache: unchanged


# ------------------------------------------------------------------------------ generation


def test_fp32_greedy_tokens_are_the_same_with_and_without_the_cache(tiny_llama, tiny_llama_past):
    """The same synthetic weights exported twice: ORTModelForCausalLM with its cache and
    without give identical greedy tokens (and so does our own cache loop)."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    with_cache = ORTModelForCausalLM.from_pretrained(tiny_llama_past.parent, use_cache=True,
                                                     provider="CPUExecutionProvider")
    without = ORTModelForCausalLM.from_pretrained(tiny_llama.parent, use_cache=False,
                                                  provider="CPUExecutionProvider")
    prompt = torch.tensor([[1, 17, 250, 3, 999, 42]])
    settings = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    cached = with_cache.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **settings)
    plain = without.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **settings)
    assert cached.shape == (1, 30)
    assert cached.tolist() == plain.tolist()
    ours = greedy_with_cache(_session(tiny_llama_past), past_inputs(tiny_llama_past), prompt.numpy(), 24)
    assert ours == cached[0, 6:].tolist()


@pytest.fixture(scope="module")
def tiny_quantized(tiny_llama_past, tmp_path_factory):
    """The tiny with-past Llama quantized by each checked recipe (8 calibration segments)."""
    quantizer = OutlierQuantizer(tiny_llama_past)
    feeds = quantizer.feeds(read_lines(bundled_sentences("calibration")), limit=8)
    assert len(feeds) == 16  # 8 prefill + 8 decode-shaped samples
    root = tmp_path_factory.mktemp("tiny-kv-quantized")
    return {recipe: quantizer.quantize(recipe, feeds, root / recipe) for recipe in TINY_FLOORS}


@pytest.mark.parametrize("recipe", sorted(TINY_FLOORS))
def test_recipes_on_the_with_past_graph_agree_with_fp32_teacher_forced(tiny_llama_past, tiny_quantized, recipe):
    result = tiny_quantized[recipe]
    outputs = {value.name for value in onnx.load(str(result.path), load_external_data=False).graph.output}
    assert {"logits", "present.0.key", "present.1.value"} <= outputs  # the cache survives every rewrite
    agreement = teacher_forced_agreement(tiny_llama_past, result.path)
    assert agreement >= TINY_FLOORS[recipe], f"{recipe}: teacher-forced agreement {agreement:.3f}"


def test_quantized_folder_generates_with_optimum(tiny_quantized):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    from outlierquant import custom_ops

    folder = tiny_quantized["default"].path.parent
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    options = custom_ops.session_options() if custom_ops.available() else None
    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, session_options=options,
                                                provider="CPUExecutionProvider")
    assert model.use_cache
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(PROMPTS[0], return_tensors="pt")
    output = model.generate(**encoded, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    assert output.shape[1] == encoded["input_ids"].shape[1] + 12
    assert torch.equal(output[0, :encoded["input_ids"].shape[1]], encoded["input_ids"][0])


# ------------------------------------------------------------------------------- SmolLM2

#: SmolLM2 `default`, 32 Wikipedia calibration segments (32 prefill + 32 decode samples),
#: 3 prompts x 32 tokens. See the floor's measurement in the report of issue 19.
SMOLLM2_FLOOR = 0.90


@pytest.mark.slow
def test_smollm2_default_agrees_with_fp32_teacher_forced(smollm2_past_onnx, tmp_path):
    from outlierquant.export.data import wikipedia_texts

    quantizer = OutlierQuantizer(smollm2_past_onnx)
    try:
        texts = wikipedia_texts("calibration", limit=200)
    except Exception:  # the Wikipedia package is optional
        texts = read_lines(bundled_sentences("calibration"))
    result = quantizer.quantize("default", texts, tmp_path / "default", limit=32)
    agreement = teacher_forced_agreement(smollm2_past_onnx, result.path)
    assert agreement >= SMOLLM2_FLOOR, f"teacher-forced agreement {agreement:.3f}"
