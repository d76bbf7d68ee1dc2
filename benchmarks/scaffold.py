"""What every benchmark does, once: export, tokenizer, feeds, baselines, recipes, validate, table.

Built only on outlierquant's public API (``outlierquant.export``, ``outlierquant.export.data``,
``outlierquant.evaluate.baselines``, ``outlierquant.pipeline.quantize_model``,
``outlierquant.evaluate.validate``). A benchmark picks a :class:`Workload` (:func:`minilm`,
:func:`smollm2`), quantizes it with onnxruntime's quantizers (:func:`run_baselines`) and our
recipes (:func:`run_recipes`), compares each :class:`Candidate` with fp32 on the held-out
feeds (:func:`validate_all`) and prints a markdown table (:func:`print_table`).

The scripts beside this file import it as ``scaffold`` (they put their own folder on
``sys.path``), so ``python benchmarks/bench_x.py`` works from the repository root. Imports
of outlierquant are inside the functions: ``--help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: int4 weight-only baselines (onnxruntime's ``MatMulNBits`` quantizer, RTN, block 32):
#: name -> symmetric. Every other name is an ``ort_quantize`` preset.
INT4_BASELINES = {"ort-matmulnbits": False, "ort-int4-rtn": True}


@dataclass
class Workload:
    """An fp32 model with its tokenizer and data: calibration and disjoint held-out feeds."""

    name: str  # "MiniLM", "SmolLM2-135M"
    model: Path  # the fp32 .onnx
    tokenizer: Any
    calibration: list[dict]
    heldout: list[dict]
    data: str  # what the feeds are, e.g. "128 calibration / 164 held-out sentences"


@dataclass
class Candidate:
    """One quantized model: unpacks as ``label, path, seconds`` (quantize wall time).
    ``report`` is ``quantize_model``'s report for our recipes, empty for baselines."""

    label: str
    path: Path
    seconds: float
    report: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator:
        return iter((self.label, self.path, self.seconds))


def _fp32(out_dir: str | os.PathLike, model: str | os.PathLike | None, source: Callable[[], Path]) -> Path:
    """``model`` if given; else ``out_dir/model.onnx``, exported from ``source()`` unless an
    earlier run left it there."""
    if model is not None:
        return Path(model)
    path = Path(out_dir) / "model.onnx"
    if path.is_file():
        return path
    from outlierquant.export import export_model

    return export_model(source(), out_dir, past=False)  # the perplexity workloads read no KV cache


def minilm(out_dir: str | os.PathLike, model: str | os.PathLike | None = None) -> Workload:
    """The bundled all-MiniLM-L6-v2 (exported into ``out_dir`` once, unless ``model`` is given):
    the bundled ``calibration`` sentences to calibrate, the disjoint ``heldout`` ones to evaluate."""
    from outlierquant.export import default_model_dir
    from outlierquant.export.data import bundled_sentences, load_tokenizer, model_inputs, read_lines, text_feeds

    path = _fp32(out_dir, model, default_model_dir)
    tokenizer = load_tokenizer(path.parent)
    spec = model_inputs(path)
    calibration = text_feeds(read_lines(bundled_sentences("calibration")), tokenizer=tokenizer, input_names=spec)
    heldout = text_feeds(read_lines(bundled_sentences("heldout")), tokenizer=tokenizer, input_names=spec)
    return Workload("MiniLM", path, tokenizer, calibration, heldout,
                    f"{len(calibration)} calibration / {len(heldout)} held-out sentences")


def smollm2(out_dir: str | os.PathLike, calibration_segments: int, heldout_segments: int,
            model: str | os.PathLike | None = None, *, seq_len: int = 128, bos_each: bool = False) -> Workload:
    """SmolLM2-135M-Instruct from the bundled GGUF (exported into ``out_dir`` once, unless
    ``model`` is given): fixed ``seq_len``-token segments of the ``calibration`` and the
    disjoint ``heldout`` slices of the Wikipedia summaries (4 articles read per segment wanted)."""
    from outlierquant.export import smollm2_gguf
    from outlierquant.export.data import lm_segments, load_tokenizer, model_inputs, wikipedia_texts

    path = _fp32(out_dir, model, smollm2_gguf)
    tokenizer = load_tokenizer(path.parent)
    spec = model_inputs(path)

    def segments(split: str, count: int) -> list[dict]:
        return lm_segments(wikipedia_texts(split, limit=count * 4), tokenizer=tokenizer, input_names=spec,
                           seq_len=seq_len, max_segments=count, bos_each=bos_each)

    calibration = segments("calibration", calibration_segments)
    heldout = segments("heldout", heldout_segments)
    return Workload("SmolLM2-135M", path, tokenizer, calibration, heldout,
                    f"{len(calibration)} calibration / {len(heldout)} held-out Wikipedia segments of {seq_len} tokens"
                    f"{', each starting with BOS' if bos_each else ''}")


def run_baselines(workload: Workload, names: Iterable[str], out_dir: str | os.PathLike, *,
                  prefix: str = "", label: str = "{}") -> list[Candidate]:
    """onnxruntime's quantizers, in order, into ``out_dir/{prefix}{name}.onnx``: an
    ``ort_quantize`` preset (static ones calibrated on ``workload.calibration``) or an
    :data:`INT4_BASELINES` name. ``label`` formats the name (``"onnxruntime {}"``)."""
    from outlierquant.evaluate.baselines import ort_matmul_nbits, ort_quantize

    rows = []
    for name in names:
        output = Path(out_dir) / f"{prefix}{name}.onnx"
        level = logging.getLogger().level
        started = time.perf_counter()
        if name in INT4_BASELINES:
            path = ort_matmul_nbits(workload.model, output, symmetric=INT4_BASELINES[name])
        else:
            path = ort_quantize(name, workload.model, output, workload.calibration)
        logging.getLogger().setLevel(level)  # onnxruntime's quantizers lower the root level
        rows.append(Candidate(label.format(name), path, time.perf_counter() - started))
    return rows


def recipe_stem(recipe) -> str:
    """A recipe's file stem: a ``Recipe``'s name, else the stem of the shipped name or file."""
    return Path(recipe).stem if isinstance(recipe, (str, os.PathLike)) else recipe.name


def run_recipes(workload: Workload, recipes: Iterable, out_dir: str | os.PathLike, *, prefix: str = "",
                label: Callable[[str, dict], str] | None = None, progress: bool | None = False) -> list[Candidate]:
    """Our recipes (shipped names, recipe files or ``Recipe`` objects), in order, through
    ``quantize_model`` calibrated on ``workload.calibration``, into
    ``out_dir/{prefix}{stem}.onnx``. ``label(stem, report)`` names each row (default: the stem)."""
    from outlierquant.pipeline import quantize_model

    rows = []
    for recipe in recipes:
        stem = recipe_stem(recipe)
        started = time.perf_counter()
        result = quantize_model(workload.model, Path(out_dir) / f"{prefix}{stem}.onnx", recipe, workload.calibration,
                                progress=progress)
        seconds = time.perf_counter() - started
        rows.append(Candidate(label(stem, result.report) if label else stem, result.output, seconds, result.report))
    return rows


def validate_all(workload: Workload, candidates: Iterable[Candidate], *, latency_runs: int = 10,
                 latency_batch: int = 16, candidate_session_options=None,
                 progress: bool | None = False) -> list[tuple[str, Any]]:
    """``(label, ValidationReport)`` per candidate, in order: each compared with the fp32
    model on ``workload.heldout`` (``latency_runs=0``: no latency)."""
    from outlierquant.evaluate.validate import validate

    return [(candidate.label, validate(workload.model, candidate.path, workload.heldout, latency_batch=latency_batch,
                                       latency_runs=latency_runs, candidate_session_options=candidate_session_options,
                                       progress=progress))
            for candidate in candidates]


def table(header: Sequence, rows: Iterable[Sequence]) -> str:
    """A markdown table, every column padded to its widest cell."""
    rows = [tuple(map(str, row)) for row in rows]
    header = tuple(map(str, header))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, rows)])


def print_table(header: Sequence, rows: Iterable[Sequence]) -> None:
    print(table(header, rows))
