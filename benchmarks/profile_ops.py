"""Per-op-type profile of MiniLM models with onnxruntime's profiler, at batch 1 and 16.

    python benchmarks/profile_ops.py fp32=/tmp/oqcache/minilm/model.onnx default=out/default.onnx ...

For each model and batch: mean latency over the timed runs, then each op type's share of
the summed kernel time and its node count per run. Inputs are held-out sentences of the
bundled set (batch 1: the first one; batch 16: sentences of one length). The models run
one after another, not interleaved: compare shares within a row, and take speed ratios
from bench_deploy.py, which interleaves.

``--cpu-time N`` instead runs N interleaved rounds of every model on one intra-op thread
and prints the median *thread CPU time* per call and its ratio to the first model. On a
shared, loaded machine wall-clock ratios swing by tens of percent between runs; the CPU
time a single-threaded call consumes does not include waiting for other processes, so it
ranks graph rewrites reliably (it says nothing about multi-thread scaling).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _feeds(model: Path, tokenizer: Path) -> dict[int, dict[str, np.ndarray]]:
    from outlierquant.export.data import bundled_sentences, load_tokenizer, model_inputs, read_lines, text_feeds

    spec = model_inputs(model)
    held = text_feeds(read_lines(bundled_sentences("heldout")), tokenizer=load_tokenizer(tokenizer),
                      input_names=spec)
    same = [f for f in held if f["input_ids"].shape == held[0]["input_ids"].shape][:16]
    b16 = {k: np.concatenate([f[k] for f in same] * 16)[:16] for k in same[0]}
    return {1: held[0], 16: b16}


def profile(path: Path, feed: dict, runs: int) -> tuple[float, list[tuple[str, float, int]]]:
    import onnxruntime as ort

    from outlierquant.custom_ops import library_path

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "p")
        if _uses_our_ops(path):
            options.register_custom_ops_library(str(library_path()))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, feed)
        start = time.perf_counter()
        for _ in range(runs):
            session.run(None, feed)
        latency = (time.perf_counter() - start) / runs
        events = json.loads(Path(session.end_profiling()).read_text())
    time_by_op: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            time_by_op[op] += event["dur"]
            count[op] += 1
    total = sum(time_by_op.values()) or 1
    return latency, [(op, t / total, count[op] // (runs + 3)) for op, t in time_by_op.most_common()]


def cpu_time(models: dict[str, str], feeds: dict, rounds: int) -> None:
    import onnxruntime as ort

    from outlierquant.custom_ops import library_path

    sessions = {}
    for name, path in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        if _uses_our_ops(Path(path)):
            options.register_custom_ops_library(str(library_path()))
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for batch, feed in feeds.items():
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, feed)
        for _ in range(rounds if batch == 1 else max(rounds // 3, 3)):
            for name, session in sessions.items():
                start = time.thread_time()
                session.run(None, feed)
                times[name].append(time.thread_time() - start)
        medians = {name: float(np.median(t)) for name, t in times.items()}
        first = next(iter(medians.values()))
        print(f"b{batch:<2d} " + "  ".join(f"{name} {m * 1e3:.2f} ms ({first / m:.2f}x)" for name, m in medians.items()),
              flush=True)


def _uses_our_ops(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(opset.domain == "ai.outlierquant" for opset in model.opset_import)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="name=path.onnx")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the first model's folder)")
    parser.add_argument("--cpu-time", type=int, default=0, metavar="ROUNDS",
                        help="interleaved single-thread CPU time per call instead of the profile")
    parser.add_argument("--top", type=int, default=9)
    parser.add_argument("--runs", type=int, default=30, help="timed runs at batch 1 (a third of them at 16)")
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    first = Path(next(iter(models.values())))
    feeds = _feeds(first, args.tokenizer or first.parent)
    print(f"batch 1: {feeds[1]['input_ids'].shape[1]} tokens; batch 16: {feeds[16]['input_ids'].shape}; "
          f"load {os.getloadavg()[0]:.2f}")
    if args.cpu_time:
        cpu_time(models, feeds, args.cpu_time)
        return
    for name, path in models.items():
        for batch, feed in feeds.items():
            latency, ops = profile(Path(path), feed, args.runs if batch == 1 else max(args.runs // 3, 3))
            top = ", ".join(f"{op} {share * 100:.0f}%({n})" for op, share, n in ops[:args.top])
            print(f"{name:14s} b{batch:<2d} {latency * 1e3:7.2f} ms | {top}", flush=True)


if __name__ == "__main__":
    main()
