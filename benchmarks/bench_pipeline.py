"""Pipeline cost: calibration time, quantize time and peak RSS, per model and recipe.

Cases are ``model:recipe`` pairs, each run in its own process so that peak RSS is that
case's alone. Models:

- ``minilm``: the bundled all-MiniLM-L6-v2, calibrated on the bundled calibration sentences;
- ``vocab``: a synthetic Llama (random weights, built from a config and exported offline
  through optimum-onnx) whose vocabulary is most of its parameters — vocabulary 65536,
  hidden 512, 2 layers, untied lm_head: 67M of its 75M parameters are the embedding and
  the lm_head (89%), ~300 MB fp32 — calibrated on random 128-token segments. The shape of
  the large-vocabulary decoders where calibration used to blow up (logits and the lm_head
  dominate activations and weights);
- ``large``: the synthetic > 2 GB decoder of ``tests/large_model.py`` (random weights,
  external data), calibrated on random hidden states;
- ``lm``: the causal LM given by ``--lm DIR/model.onnx`` (a real export, e.g. Gemma 3 270M:
  ``outlierquant export gemma-3-270m-q4_k_m.gguf -o DIR --no-past``), calibrated on 16
  Wikipedia segments of 128 tokens, each starting with BOS (as ``bench_causal_lm.py``).

A case runs the user's path, ``quantize_model`` (load, calibrate, every pass, write).
A sampling thread reads the process RSS every 20 ms and the pass that was running when
each sample was taken (from the pipeline's per-pass log lines), so the table says which
pass holds the peak. ``peak RSS`` is the high-water mark from the start of
``quantize_model`` (reset there, so building the model and its feeds does not count);
``RSS/model`` is that peak over the fp32 model file; ``base MiB`` is the RSS at that start
(interpreter, onnxruntime, numpy, the calibration feeds; the model not read yet — a fixed
cost that dominates for small models).

Usage: ``python benchmarks/bench_pipeline.py [--cases minilm:w8a8,vocab:default,...]``;
``--cases vocab`` runs the model with every recipe of ``--recipes``. Prints a table; asserts
nothing (timings are facts about one loaded machine, not pass/fail criteria).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scaffold  # noqa: E402

MODELS = ("minilm", "vocab", "large", "lm")
RECIPES = ("w8a8", "default", "llm-int8", "quarot-w8a8")
#: the large-vocabulary synthetic decoder (see the module doc)
VOCAB_CONFIG = dict(vocab_size=65536, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                    tie_word_embeddings=False)


def _peak_rss_mib() -> float:
    """The process's RSS high-water mark since the last :func:`_reset_peak_rss`."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak_rss() -> float:
    """Reset the high-water mark to the current RSS (Linux: ``clear_refs`` 5) and return
    the current RSS: setting up a case (building the model, its feeds) must not count as
    the pipeline's peak. Where the reset is not available the peak includes the setup."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def build_vocab_model(out_dir: Path) -> Path:
    """The large-vocabulary Llama of :data:`VOCAB_CONFIG`, exported without KV cache (synthetic)."""
    path = out_dir / "model.onnx"
    if path.is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from outlierquant.export import export_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**VOCAB_CONFIG)).eval()
    with tempfile.TemporaryDirectory(prefix="vocab-hf-") as scratch:
        model.save_pretrained(scratch)
        return export_model(scratch, out_dir, past=False)


def vocab_feeds(n: int = 16, seq_len: int = 128, seed: int = 1) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB_CONFIG["vocab_size"], (1, seq_len), dtype=np.int64),
             "attention_mask": np.ones((1, seq_len), np.int64),
             "position_ids": np.arange(seq_len, dtype=np.int64)[None]} for _ in range(n)]


def model_and_feeds(model: str, workdir: Path, lm: Path | None = None):
    if model == "lm":
        if lm is None:
            raise SystemExit("the lm case needs --lm DIR/model.onnx")
        from outlierquant.export.data import load_feeds

        return lm, load_feeds(workdir / "lm-feeds.npz", model_path=lm)
    if model == "minilm":
        work = scaffold.minilm(workdir / "minilm")
        return work.model, work.calibration
    if model == "vocab":
        return build_vocab_model(workdir / "vocab"), vocab_feeds()
    if model == "large":
        sys.path.insert(0, str(ROOT / "tests"))
        from large_model import build_large_decoder, large_decoder_feeds

        path = workdir / "large" / "model.onnx"
        return (path if path.is_file() else build_large_decoder(workdir / "large")), large_decoder_feeds(16)
    raise SystemExit(f"unknown model {model!r} (known: {', '.join(MODELS)})")


class _Sampler:
    """RSS every ``interval`` s, attributed to the pass running at the time (from the log)."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.phase = "load + calibration"
        self.peaks: dict[str, float] = {}
        self.order: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        rss = self.process.memory_info().rss / 2**20
        if self.phase not in self.peaks:
            self.order.append(self.phase)
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)

    def start(self) -> "_Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class _PassLog(logging.Handler):
    """Moves the sampler to the next pass when the pipeline logs the end of one."""

    def __init__(self, sampler: _Sampler, passes: list[str]) -> None:
        super().__init__(logging.INFO)
        self.sampler, self.passes, self.index = sampler, passes, 0
        sampler.phase = self._label()

    def _label(self) -> str:
        return f"{self.index + 1}:{self.passes[self.index]}" if self.index < len(self.passes) else "write"

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "outlierquant.pipeline" and record.getMessage().startswith("pass "):
            self.sampler.sample()
            self.index += 1
            self.sampler.phase = self._label()


def write_lm_feeds(lm: Path, workdir: Path) -> None:
    """16 Wikipedia segments of 128 tokens, each after a BOS, as an ``.npz`` — written by the
    parent so the measured process does not hold transformers and the tokenizer."""
    import numpy as np

    from outlierquant.export.data import lm_segments, load_tokenizer, model_inputs, wikipedia_texts

    feeds = lm_segments(wikipedia_texts("calibration", limit=64), tokenizer=load_tokenizer(lm.parent),
                        input_names=model_inputs(lm), seq_len=128, max_segments=16, bos_each=True)
    np.savez(workdir / "lm-feeds.npz", **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})


def run_case(model: str, recipe: str, workdir: Path, offload_mib: float | None = None,
             lm: Path | None = None) -> dict:
    from outlierquant.modelio import model_file_bytes
    from outlierquant.pipeline import quantize_model
    from outlierquant.recipes import load_recipe

    model_path, feeds = model_and_feeds(model, workdir, lm)
    loaded = load_recipe(recipe)
    if offload_mib is not None:
        # experiment: stage the calibration session's weights as external data above this
        # size (the library does it only above protobuf's 2 GB limit), so neither the proto
        # nor its serialized bytes hold a copy of them
        from outlierquant.calibration import session as calibration_session

        calibration_session.EXTERNAL_DATA_THRESHOLD = int(offload_mib * 2**20)
    import onnxruntime  # noqa: F401  (a fixed cost of every run: count it in the base)

    base = _reset_peak_rss()
    sampler = _Sampler().start()
    pipeline_log = logging.getLogger("outlierquant.pipeline")
    handler = _PassLog(sampler, [spec.name for spec in loaded.passes])
    pipeline_log.addHandler(handler)
    pipeline_log.setLevel(logging.INFO)
    started = time.perf_counter()
    try:
        result = quantize_model(model_path, workdir / f"{model}-{recipe}.onnx", loaded, feeds, progress=False)
    finally:
        sampler.stop()
        pipeline_log.removeHandler(handler)
    seconds = time.perf_counter() - started
    calibration_s = sum(r.get("calibration_seconds", 0.0) for r in result.report["passes"])
    peak_phase = max(sampler.peaks, key=sampler.peaks.get)
    return {
        "case": f"{model}:{recipe}" + ("" if offload_mib is None else f" (offload {offload_mib:g} MiB)"),
        "model_mib": model_file_bytes(model_path) / 2**20,
        "output_mib": result.report["size_bytes"]["output"] / 2**20,
        "samples": len(feeds),
        "calibration_s": calibration_s,
        "quantize_s": seconds,
        "base_rss_mib": base,
        "peak_rss_mib": _peak_rss_mib(),
        "peak_phase": peak_phase,
        "phase_peaks_mib": {phase: round(sampler.peaks[phase]) for phase in sampler.order},
    }


def expand(cases: str, recipes: list[str]) -> list[tuple[str, str]]:
    out = []
    for case in cases.split(","):
        model, _, recipe = case.partition(":")
        out += [(model, recipe)] if recipe else [(model, r) for r in recipes]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="minilm:w8a8,vocab",
                        help="comma-separated model[:recipe]; a bare model runs every --recipes")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--workdir", default=None, help="keep built models here between runs")
    parser.add_argument("--json", default=None, help="append each case's result to this file")
    parser.add_argument("--session-offload-mib", type=float, default=None,
                        help="experiment: calibration sessions read weights from external data above this model size")
    parser.add_argument("--lm", type=Path, default=None, help="the causal LM .onnx of the lm case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.case:
        model, recipe = args.case.split(":", 1)
        print(json.dumps(run_case(model, recipe, Path(args.workdir), args.session_offload_mib, args.lm)))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    lm_feeds_written = False
    for model, recipe in expand(args.cases, args.recipes):
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r} (known: {', '.join(MODELS)})")
        if model == "vocab":
            build_vocab_model(workdir / "vocab")  # outside the measured process
        if model == "lm" and args.lm is not None and not lm_feeds_written:
            write_lm_feeds(args.lm.resolve(), workdir)  # once per run: --lm may differ between runs
            lm_feeds_written = True
        extra = [] if args.session_offload_mib is None else ["--session-offload-mib", str(args.session_offload_mib)]
        extra += [] if args.lm is None else ["--lm", str(args.lm.resolve())]
        done = subprocess.run([sys.executable, __file__, "--case", f"{model}:{recipe}", "--workdir", str(workdir), *extra],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"case {model}:{recipe} failed")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        rows.append(row)
    scaffold.print_table(
        ("case", "model MiB", "out MiB", "samples", "calib s", "total s", "base MiB", "peak RSS MiB", "RSS/model",
         "peak during"),
        [(r["case"], f"{r['model_mib']:.0f}", f"{r['output_mib']:.0f}", f"{r['samples']:d}",
          f"{r['calibration_s']:.1f}", f"{r['quantize_s']:.1f}", f"{r['base_rss_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
          f"{r['peak_rss_mib'] / r['model_mib']:.2f}", r["peak_phase"]) for r in rows],
    )


if __name__ == "__main__":
    main()
