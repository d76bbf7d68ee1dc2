"""KV-cache decode speed of model files that already exist, beside their fp32 model.

    python benchmarks/bench_decode.py FP32.onnx CANDIDATE.onnx [CANDIDATE.onnx ...]
        [--new-tokens 128] [--runs 3] [--profile]

For models that ``bench_deploy.py --out DIR`` wrote (``DIR/smollm2-past/model.onnx`` and
``DIR/smollm2/*.onnx``): greedy decoding with the KV cache after a 64-token prompt (the
first held-out Wikipedia segment, as in bench_deploy), each candidate timed interleaved
with fp32 (bench_deploy's ``_greedy`` and ``_interleaved``), printing both absolute
tokens/s and the ratio. It re-times without re-quantizing: on a shared VM the fp32
baseline's own speed moves between runs (it streams all its weights per token), so a
second timing of the same files says how much of a ratio is the baseline.

``--profile`` also prints, per model, the kernel time per op type from onnxruntime's
profiler of one decode step (past of 64 tokens, 16 steps averaged) and of a 128-token
prefill (3 calls averaged); profiling slows the wall time, the shares are what to read.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deploy import _greedy, _interleaved, _session, prefill_feed, step_feed  # noqa: E402


def _prompt(model: Path):
    import numpy as np

    from outlierquant.export.data import lm_segments, load_tokenizer, model_inputs, wikipedia_texts
    from outlierquant.export.past import is_past_input

    tokenizer = load_tokenizer(model.parent)
    inputs = {k: v for k, v in model_inputs(model).items() if not is_past_input(k)}
    segments = lm_segments(wikipedia_texts("heldout", limit=8), tokenizer=tokenizer, input_names=inputs,
                           seq_len=128, max_segments=1)
    return np.asarray(segments[0]["input_ids"])[:, :64]


def _op_times(session, steps: int) -> tuple[dict[str, float], collections.Counter]:
    """Kernel microseconds and node counts per op type, per call, from the session's profile."""
    trace = session.end_profiling()
    with open(trace, encoding="utf-8") as handle:
        events = json.load(handle)
    os.remove(trace)
    spent: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name")
            spent[op] += event["dur"] / steps
            count[op] += 1
    return spent, collections.Counter({op: n // steps for op, n in count.items()})


def _print_ops(title: str, spent: dict[str, float], count: collections.Counter) -> None:
    print(f"{title}: {sum(count.values())} nodes, {sum(spent.values()) / 1e3:.2f} ms kernel time")
    for op, micros in sorted(spent.items(), key=lambda item: -item[1])[:12]:
        print(f"  {op:30s} {micros / 1e3:6.3f} ms  {count[op]:4d} nodes")


def _profiled_session(path: Path):
    import onnxruntime as ort

    from outlierquant import custom_ops

    options = custom_ops.session_options() if custom_ops.available() else ort.SessionOptions()
    options.enable_profiling = True
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile_prefill(path: Path, length: int = 128, calls: int = 3) -> None:
    """Kernel time per op type of a ``length``-token prefill with an empty cache."""
    import numpy as np

    from outlierquant.export.past import past_inputs

    session = _profiled_session(path)
    names = {i.name for i in session.get_inputs()}
    prompt = np.random.default_rng(0).integers(100, 20000, (1, length)).astype(np.int64)
    feed = prefill_feed(names, prompt, past_inputs(path))
    for _ in range(calls):
        session.run(None, feed)
    _print_ops(f"{path.name}: prefill of {length} tokens", *_op_times(session, calls))


def profile_step(path: Path, prompt, steps: int = 16) -> None:
    """Kernel time per op type of one decode step after ``prompt`` (onnxruntime profiler)."""
    import numpy as np

    from outlierquant.export.past import past_inputs

    past = past_inputs(path)
    plain = _session(path)
    names = {i.name for i in plain.get_inputs()}
    length = prompt.shape[1]
    outputs = [o.name for o in plain.get_outputs()]
    values = dict(zip(outputs, plain.run(outputs, prefill_feed(names, prompt, past))))
    profiled = _profiled_session(path)
    token = np.array([[int(np.argmax(values["logits"][0, -1]))]], np.int64)
    for step in range(steps):
        values = dict(zip(outputs, profiled.run(outputs, step_feed(names, token, length + step, past, values))))
    _print_ops(f"{path.name}: one decode step (past of {length})", *_op_times(profiled, steps))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32", type=Path, help="the fp32 with-past model (its folder holds the tokenizer)")
    parser.add_argument("candidates", nargs="+", type=Path)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="interleaved timing runs per candidate")
    parser.add_argument("--profile", action="store_true", help="also print a per-op profile of one decode step")
    args = parser.parse_args()

    from outlierquant.export.past import past_inputs

    prompt = _prompt(args.fp32)
    past = past_inputs(args.fp32)
    fp32 = _session(args.fp32)
    new = args.new_tokens
    print(f"{new} new tokens after a 64-token prompt, median of {args.runs} interleaved runs")
    for path in args.candidates:
        session = _session(path)
        ref, cand = _interleaved(lambda: _greedy(fp32, past, prompt, new),
                                 lambda s=session: _greedy(s, past, prompt, new), args.runs)
        print(f"  {path.name}: {new / cand:.1f} tok/s, fp32 {new / ref:.1f} tok/s, ratio {ref / cand:.2f}x")
    if args.profile:
        for path in (args.fp32, *args.candidates):
            profile_step(path, prompt)
            profile_prefill(path)


if __name__ == "__main__":
    main()
