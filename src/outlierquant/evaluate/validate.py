"""Validation: what a quantized model costs in accuracy and buys in size and speed.

:func:`validate` runs the fp32 *reference* and the *candidate* with onnxruntime on the same
held-out feeds (never the calibration data) and reports

- per model output, tokens of all samples pooled: cosine mean/min over rows of the last
  axis, SQNR in dB, max abs error (definitions in :mod:`outlierquant.evaluate.metrics`);
- for sentence-embedding models: cosine mean/min of the sentence embeddings (the
  ``sentence_embedding`` output, else the attention-masked mean of the token output), and
  Spearman's rho between the pairwise similarities the two models give all sentence pairs;
- for causal LMs: perplexity of both models (on ``lm_feeds``, fixed-length segments from
  :func:`outlierquant.export.data.lm_segments`, or on the feeds) and the difference;
- model size on disk (``.onnx`` + external data), candidate/reference;
- median latency, candidate/reference, measured in the same process on the same batch,
  reference and candidate runs interleaved so drifting machine load hits both alike.

Feeds are run unpadded: samples of identical shapes are stacked into batches, so no pad
token is ever scored. Ratios, not absolute times, are the numbers to compare across
machines.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from outlierquant.errors import InputError
from outlierquant.evaluate import metrics
from outlierquant.modelio import model_file_bytes, resolve_model_file
from outlierquant.outputs import atomic_write_text

logger = logging.getLogger(__name__)

TASKS = ("auto", "feature-extraction", "text-generation", "generic")
TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
SENTENCE_OUTPUT = "sentence_embedding"

#: Batches for fidelity are capped at this many tokens (a 50k-vocabulary LM's logits for
#: 512 tokens are 100 MB in float32) and this many samples.
MAX_BATCH_TOKENS = 512
MAX_BATCH_SAMPLES = 16

Feed = dict[str, np.ndarray]

REPORT_VERSION = 1


# --------------------------------------------------------------------------- report


@dataclass
class OutputFidelity:
    """Candidate vs reference on one model output, all samples' rows pooled."""

    name: str
    cosine_mean: float
    cosine_min: float
    sqnr_db: float
    max_abs_error: float
    rows: int


@dataclass
class EmbeddingFidelity:
    """Sentence embeddings: per-sentence cosine and rank agreement of pairwise similarities."""

    source: str
    cosine_mean: float
    cosine_min: float
    sqnr_db: float
    spearman: float
    samples: int
    pairs: int


@dataclass
class PerplexityResult:
    """Perplexity of both models on the same token segments; ``delta = candidate - reference``."""

    reference: float
    candidate: float
    delta: float
    tokens: int
    segments: int


@dataclass
class LatencyResult:
    """Median wall time of one batch, both models measured interleaved in one process."""

    batch_size: int
    sequence_length: int
    runs: int
    reference_ms: float
    candidate_ms: float
    ratio: float


@dataclass
class ValidationReport:
    """Everything :func:`validate` measured; ``to_dict``/``from_dict`` round-trip through JSON."""

    reference: str
    candidate: str
    task: str
    samples: int
    primary_output: str
    outputs: list[OutputFidelity]
    reference_bytes: int
    candidate_bytes: int
    size_ratio: float
    embedding: EmbeddingFidelity | None = None
    perplexity: PerplexityResult | None = None
    latency: LatencyResult | None = None
    version: int = REPORT_VERSION

    def output(self, name: str | None = None) -> OutputFidelity:
        """The fidelity record of output ``name`` (default: the primary output)."""
        name = name or self.primary_output
        for record in self.outputs:
            if record.name == name:
                return record
        raise KeyError(name)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict: NaN -> null, +/-inf -> "inf"/"-inf"."""
        return _json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> ValidationReport:
        data = dict(data)
        data["outputs"] = [OutputFidelity(**_json_floats(item, OutputFidelity)) for item in data.get("outputs", [])]
        for key, kind in (("embedding", EmbeddingFidelity), ("perplexity", PerplexityResult), ("latency", LatencyResult)):
            if data.get(key) is not None:
                data[key] = kind(**_json_floats(data[key], kind))
        return cls(**_json_floats(data, cls))

    def save_json(self, path: str | os.PathLike, *, protect: Sequence[str | os.PathLike] = ()) -> Path:
        """Write the report as indented JSON, atomically; never over the models or the data.

        ``protect`` adds files to the two models (and their external data), which the
        report may not replace either.
        """
        from outlierquant.modelio import model_files

        inputs = [*protect]
        for model in (self.reference, self.candidate):
            if Path(model).exists():
                inputs += model_files(model)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", protect=inputs)

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> ValidationReport:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable validation report ({exc})") from exc
        return cls.from_dict(data)

    def format_table(self) -> str:
        """A plain-text summary: one row per output, then the task metrics, size, latency."""
        lines = [
            f"validation: {self.candidate}",
            f"     vs fp32 reference {self.reference}",
            f"task {self.task}, {self.samples} held-out samples",
            "",
        ]
        header = ("output", "cosine mean", "cosine min", "SQNR dB", "max abs err", "rows")
        body = [
            (r.name, _fmt(r.cosine_mean, 6), _fmt(r.cosine_min, 6), _fmt(r.sqnr_db, 2), _fmt(r.max_abs_error, 4, "g"), str(r.rows))
            for r in self.outputs
        ]
        lines += _table(header, body, markdown=False)
        lines.append("")
        if self.embedding is not None:
            e = self.embedding
            lines.append(
                f"sentence embedding ({e.source}): cosine mean {_fmt(e.cosine_mean, 6)}, min {_fmt(e.cosine_min, 6)}, "
                f"SQNR {_fmt(e.sqnr_db, 2)} dB"
            )
            lines.append(f"pairwise similarity Spearman rho {_fmt(e.spearman, 5)} over {e.pairs} sentence pairs")
        if self.perplexity is not None:
            p = self.perplexity
            lines.append(
                f"perplexity: reference {_fmt(p.reference, 3)}, candidate {_fmt(p.candidate, 3)}, "
                f"delta {_fmt(p.delta, 3, sign=True)} ({p.tokens} tokens in {p.segments} segments)"
            )
        lines.append(
            f"size: {_megabytes(self.reference_bytes)} -> {_megabytes(self.candidate_bytes)} "
            f"(ratio {_fmt(self.size_ratio, 3)})"
        )
        if self.latency is not None:
            t = self.latency
            lines.append(
                f"latency (batch {t.batch_size} x {t.sequence_length} tokens, median of {t.runs}): "
                f"{_fmt(t.reference_ms, 2)} ms -> {_fmt(t.candidate_ms, 2)} ms (ratio {_fmt(t.ratio, 3)})"
            )
        else:
            lines.append("latency: not measured")
        return "\n".join(lines)


def comparison_table(rows: Sequence[tuple[str, ValidationReport]], *, include_reference: bool = True) -> str:
    """One markdown-style table, a row per candidate, columns chosen by the first report's task.

    sentence embeddings: emb. cosine mean/min, Spearman, SQNR (embeddings), size, latency;
    causal LMs: logits cosine mean/min, perplexity and its delta, SQNR (logits), size, latency;
    anything else: primary-output cosine mean/min, SQNR, max abs error, size, latency.
    """
    if not rows:
        raise InputError("comparison_table needs at least one report")
    task = rows[0][1].task
    body: list[tuple[str, ...]] = []
    if task == "feature-extraction" and rows[0][1].embedding is not None:
        header = ("model", "emb. cos mean", "emb. cos min", "Spearman", "SQNR dB", "size ratio", "latency ratio")
        if include_reference:
            body.append(("fp32 (reference)", _fmt(1.0, 6), _fmt(1.0, 6), _fmt(1.0, 4), "inf", _fmt(1.0, 3), _fmt(1.0, 3)))
        for label, report in rows:
            e = report.embedding
            body.append((
                label,
                _fmt(e.cosine_mean if e else None, 6),
                _fmt(e.cosine_min if e else None, 6),
                _fmt(e.spearman if e else None, 4),
                _fmt(e.sqnr_db if e else None, 2),
                _fmt(report.size_ratio, 3),
                _fmt(report.latency.ratio if report.latency else None, 3),
            ))
    elif task == "text-generation" and rows[0][1].perplexity is not None:
        header = ("model", "logits cos mean", "logits cos min", "perplexity", "ppl delta", "SQNR dB", "size ratio", "latency ratio")
        if include_reference:
            ref_ppl = rows[0][1].perplexity.reference
            body.append(("fp32 (reference)", _fmt(1.0, 6), _fmt(1.0, 6), _fmt(ref_ppl, 3), _fmt(0.0, 3, sign=True), "inf", _fmt(1.0, 3), _fmt(1.0, 3)))
        for label, report in rows:
            out = _primary(report)
            p = report.perplexity
            body.append((
                label,
                _fmt(out.cosine_mean if out else None, 6),
                _fmt(out.cosine_min if out else None, 6),
                _fmt(p.candidate if p else None, 3),
                _fmt(p.delta if p else None, 3, sign=True),
                _fmt(out.sqnr_db if out else None, 2),
                _fmt(report.size_ratio, 3),
                _fmt(report.latency.ratio if report.latency else None, 3),
            ))
    else:
        header = ("model", "cos mean", "cos min", "SQNR dB", "max abs err", "size ratio", "latency ratio")
        if include_reference:
            body.append(("fp32 (reference)", _fmt(1.0, 6), _fmt(1.0, 6), "inf", _fmt(0.0, 4, "g"), _fmt(1.0, 3), _fmt(1.0, 3)))
        for label, report in rows:
            out = _primary(report)
            body.append((
                label,
                _fmt(out.cosine_mean if out else None, 6),
                _fmt(out.cosine_min if out else None, 6),
                _fmt(out.sqnr_db if out else None, 2),
                _fmt(out.max_abs_error if out else None, 4, "g"),
                _fmt(report.size_ratio, 3),
                _fmt(report.latency.ratio if report.latency else None, 3),
            ))
    return "\n".join(_table(header, body, markdown=True))


def _primary(report: ValidationReport) -> OutputFidelity | None:
    try:
        return report.output()
    except KeyError:
        return None


# --------------------------------------------------------------------------- validate


def validate(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    feeds: Sequence[Feed],
    *,
    task: str = "auto",
    latency_batch: int = 16,
    latency_runs: int = 10,
    session_options=None,
    candidate_session_options=None,
    progress: bool | None = None,
    lm_feeds: Sequence[Feed] | None = None,
) -> ValidationReport:
    """Compare ``candidate`` with the fp32 ``reference`` on held-out ``feeds``.

    ``latency_runs=0`` skips the latency measurement. ``candidate_session_options`` (for
    custom-op libraries) defaults to ``session_options``; both default to onnxruntime's
    defaults with all graph optimizations on.
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r} (allowed: {', '.join(TASKS)})")
    if latency_batch < 1 or latency_runs < 0:
        raise InputError("latency_batch must be >= 1 and latency_runs >= 0")
    reference_path, candidate_path = resolve_model_file(reference), resolve_model_file(candidate)
    ref_header, cand_header = _read_header(reference_path), _read_header(candidate_path)
    ref_inputs, ref_outputs = ref_header.inputs, ref_header.outputs
    cand_inputs, cand_outputs = cand_header.inputs, cand_header.outputs
    if ref_inputs != cand_inputs:
        raise InputError(
            f"reference and candidate take different inputs ({', '.join(ref_inputs)} vs {', '.join(cand_inputs)})"
        )
    if ref_outputs != cand_outputs:
        raise InputError(
            f"reference and candidate have different outputs ({', '.join(ref_outputs)} vs {', '.join(cand_outputs)})"
        )
    feeds = list(feeds)
    _check_feeds(feeds, ref_inputs, "feeds")
    if lm_feeds is not None:
        lm_feeds = list(lm_feeds)
        _check_feeds(lm_feeds, ref_inputs, "lm_feeds")

    if task == "auto":
        task = detect_task(ref_inputs, ref_outputs, ref_header.output_ranks)
    primary = _primary_output(task, ref_outputs)
    logger.info("validating %s against %s (task %s, %d samples)", candidate_path, reference_path, task, len(feeds))

    ref_session = _session(reference_path, session_options, ref_header.uses_kernels)
    cand_session = _session(candidate_path, candidate_session_options or session_options, cand_header.uses_kernels)

    fidelity_batches = _shape_batches(feeds)
    lm_batches = _shape_batches(lm_feeds) if (task == "text-generation" and lm_feeds is not None) else []
    total = len(fidelity_batches) + len(lm_batches) + (latency_runs + 1 if latency_runs else 0)
    with _progress_bar(total, progress) as bar:
        outputs, embedding, ppl = _fidelity(
            ref_session, cand_session, feeds, fidelity_batches, ref_outputs, task,
            perplexity=task == "text-generation" and lm_feeds is None, tick=bar.update,
            paths=(reference_path, candidate_path),
        )
        if lm_batches:
            ppl = _perplexity(ref_session, cand_session, lm_feeds, lm_batches, tick=bar.update)
        latency = None
        if latency_runs:
            latency = _latency(ref_session, cand_session, feeds, latency_batch, latency_runs, tick=bar.update)

    reference_bytes = model_file_bytes(reference_path)
    candidate_bytes = model_file_bytes(candidate_path)
    report = ValidationReport(
        reference=str(reference_path),
        candidate=str(candidate_path),
        task=task,
        samples=len(feeds),
        primary_output=primary,
        outputs=outputs,
        reference_bytes=reference_bytes,
        candidate_bytes=candidate_bytes,
        size_ratio=candidate_bytes / reference_bytes if reference_bytes else float("nan"),
        embedding=embedding,
        perplexity=ppl,
        latency=latency,
    )
    return report


def detect_task(inputs: Sequence[str], outputs: Sequence[str], output_ranks: dict[str, int | None] | None = None) -> str:
    """``text-generation`` for ``logits`` [B, S, V] with ``input_ids``; ``feature-extraction``
    for a ``sentence_embedding`` or token-embedding output; ``generic`` otherwise."""
    ranks = output_ranks or {}
    if "logits" in outputs and "input_ids" in inputs and ranks.get("logits") in (3, None):
        return "text-generation"
    if SENTENCE_OUTPUT in outputs or any(name in outputs for name in TOKEN_OUTPUTS):
        return "feature-extraction"
    return "generic"


def _primary_output(task: str, outputs: Sequence[str]) -> str:
    if task == "text-generation" and "logits" in outputs:
        return "logits"
    if task == "feature-extraction":
        for name in (SENTENCE_OUTPUT, *TOKEN_OUTPUTS):
            if name in outputs:
                return name
    return outputs[0]


@dataclass(frozen=True)
class _Header:
    """What validate needs from a model file, read in one parse (weights stay on disk)."""

    inputs: list[str]
    outputs: list[str]
    output_ranks: dict[str, int | None]
    uses_kernels: bool


def _read_header(path: Path) -> _Header:
    import onnx

    from outlierquant.custom_ops import DOMAIN

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable ONNX model ({first})") from exc
    initializers = {init.name for init in proto.graph.initializer}
    return _Header(
        inputs=[value.name for value in proto.graph.input if value.name not in initializers],
        outputs=[value.name for value in proto.graph.output],
        output_ranks={
            value.name: (len(value.type.tensor_type.shape.dim) if value.type.tensor_type.HasField("shape") else None)
            for value in proto.graph.output
        },
        uses_kernels=any(opset.domain == DOMAIN for opset in proto.opset_import),
    )


def _check_feeds(feeds: list[Feed], inputs: Sequence[str], what: str) -> None:
    if not feeds:
        raise InputError(f"{what}: no samples to validate on")
    expected = set(inputs)
    for index, feed in enumerate(feeds):
        if set(feed) != expected:
            missing = sorted(expected - set(feed))
            extra = sorted(set(feed) - expected)
            raise InputError(
                f"{what}[{index}] does not match the model's inputs"
                + (f" (missing: {', '.join(missing)})" if missing else "")
                + (f" (extra: {', '.join(extra)})" if extra else "")
            )


def _session(path: Path, options, uses_kernels: bool):
    import onnxruntime as ort

    if options is None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
    if uses_kernels:
        from outlierquant import custom_ops

        options = custom_ops.session_options(options)
    from outlierquant.errors import dependency_message

    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"{path}: onnxruntime cannot load this model ({dependency_message(exc)})") from exc


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress_bar(total: int, progress: bool | None):
    if progress is None:
        progress = sys.stderr.isatty() and not os.environ.get("CI")
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="validate", unit="batch", file=sys.stderr)


def _shape_key(feed: Feed) -> tuple:
    return tuple(sorted((name, value.shape, value.dtype.str) for name, value in feed.items()))


def _shape_batches(feeds: Sequence[Feed]) -> list[list[int]]:
    """Indices of feeds grouped by identical shapes (so stacking needs no padding)."""
    groups: dict[tuple, list[int]] = {}
    for index, feed in enumerate(feeds):
        groups.setdefault(_shape_key(feed), []).append(index)
    batches = []
    for indices in groups.values():
        first = feeds[indices[0]]
        tokens = max(1, first["input_ids"].shape[-1]) if "input_ids" in first else 1
        size = max(1, min(MAX_BATCH_SAMPLES, MAX_BATCH_TOKENS // tokens))
        batches += [indices[i:i + size] for i in range(0, len(indices), size)]
    return batches


def _stack(feeds: Sequence[Feed], indices: Sequence[int]) -> Feed:
    return {name: np.concatenate([feeds[i][name] for i in indices]) for name in feeds[indices[0]]}


def _run_pair(ref_session, cand_session, batch: Feed, paths: Sequence[Path] = ()) -> tuple[list, list]:
    from outlierquant.errors import translated

    ref_path, cand_path = paths or (None, None)
    with translated(ref_path):
        ref = ref_session.run(None, batch)
    with translated(cand_path):
        cand = cand_session.run(None, batch)
    return ref, cand


@dataclass
class _Accumulator:
    cosines: list = field(default_factory=list)
    signal: float = 0.0
    noise: float = 0.0
    max_abs: float = 0.0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape:
            raise InputError(f"reference and candidate outputs differ in shape ({ref.shape} vs {cand.shape})")
        ref64 = ref.astype(np.float64)
        diff = ref64 - cand.astype(np.float64)
        self.cosines.append(metrics.cosine_rows(ref, cand))
        self.signal += float(np.sum(ref64 * ref64))
        self.noise += float(np.sum(diff * diff))
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))

    def result(self, name: str) -> OutputFidelity:
        cosines = np.concatenate(self.cosines) if self.cosines else np.array([np.nan])
        return OutputFidelity(
            name=name,
            cosine_mean=float(np.mean(cosines)),
            cosine_min=float(np.min(cosines)),
            sqnr_db=metrics.sqnr_from_sums(self.signal, self.noise),
            max_abs_error=self.max_abs,
            rows=int(sum(len(c) for c in self.cosines)),
        )


def _check_finite(outputs, names: Sequence[str], path: Path, indices: Sequence[int]) -> None:
    """A model whose outputs hold NaN/Inf has no fidelity to score: say so instead of scoring 0."""
    for name, value in zip(names, outputs):
        value = np.asarray(value)
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            samples = ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")
            raise InputError(f"{path}: output {name!r} holds NaN or Inf ({bad} of {np.size(value)} values, "
                             f"held-out samples {samples})")


def _fidelity(ref_session, cand_session, feeds, batches, output_names, task, *, perplexity: bool, tick: Callable,
              paths: tuple[Path, Path] = (Path("reference"), Path("candidate"))):
    accumulators = {name: _Accumulator() for name in output_names}
    want_embedding = task == "feature-extraction"
    source = next((name for name in (SENTENCE_OUTPUT, *TOKEN_OUTPUTS) if name in output_names), None)
    ref_emb: dict[int, np.ndarray] = {}
    cand_emb: dict[int, np.ndarray] = {}
    nll = [0.0, 0.0]
    tokens = 0
    for indices in batches:
        batch = _stack(feeds, indices)
        ref_out, cand_out = _run_pair(ref_session, cand_session, batch, paths)
        _check_finite(ref_out, output_names, paths[0], indices)
        _check_finite(cand_out, output_names, paths[1], indices)
        for name, ref, cand in zip(output_names, ref_out, cand_out):
            accumulators[name].add(np.asarray(ref), np.asarray(cand))
        if want_embedding and source is not None:
            ref_vec, cand_vec = (_sentence_vectors(dict(zip(output_names, out)), source, batch) for out in (ref_out, cand_out))
            for row, index in enumerate(indices):
                ref_emb[index], cand_emb[index] = ref_vec[row], cand_vec[row]
        if perplexity:
            ref_logits = ref_out[output_names.index("logits")]
            cand_logits = cand_out[output_names.index("logits")]
            mask = batch.get("attention_mask")
            ref_nll, count = metrics.perplexity_from_logits(ref_logits, batch["input_ids"], mask)
            cand_nll, _ = metrics.perplexity_from_logits(cand_logits, batch["input_ids"], mask)
            nll[0] += ref_nll
            nll[1] += cand_nll
            tokens += count
        tick(1)
    outputs = [accumulators[name].result(name) for name in output_names]
    embedding = None
    if want_embedding and source is not None:
        order = sorted(ref_emb)
        ref_matrix = np.stack([ref_emb[i] for i in order])
        cand_matrix = np.stack([cand_emb[i] for i in order])
        cosines = metrics.cosine_rows(ref_matrix, cand_matrix)
        ref_sims = metrics.pairwise_cosine_upper(ref_matrix)
        cand_sims = metrics.pairwise_cosine_upper(cand_matrix)
        embedding = EmbeddingFidelity(
            source=source if source == SENTENCE_OUTPUT else f"mean_pool({source})",
            cosine_mean=float(cosines.mean()),
            cosine_min=float(cosines.min()),
            sqnr_db=metrics.sqnr_db(ref_matrix, cand_matrix),
            spearman=metrics.spearman(ref_sims, cand_sims) if len(ref_sims) >= 2 else float("nan"),
            samples=len(order),
            pairs=int(len(ref_sims)),
        )
    ppl = _perplexity_result(nll, tokens, len(feeds)) if perplexity else None
    return outputs, embedding, ppl


def _sentence_vectors(outputs: dict[str, np.ndarray], source: str, batch: Feed) -> np.ndarray:
    value = np.asarray(outputs[source], dtype=np.float64)
    if source == SENTENCE_OUTPUT:
        return value.reshape(value.shape[0], -1)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = np.ones(value.shape[:2])
    return metrics.mean_pool(value, mask)


def _perplexity(ref_session, cand_session, feeds, batches, *, tick: Callable) -> PerplexityResult:
    names = [output.name for output in ref_session.get_outputs()]
    if "logits" not in names:
        raise InputError("perplexity needs a 'logits' output")
    position = names.index("logits")
    nll = [0.0, 0.0]
    tokens = 0
    for indices in batches:
        batch = _stack(feeds, indices)
        mask = batch.get("attention_mask")
        for slot, session in enumerate((ref_session, cand_session)):
            logits = session.run([names[position]], batch)[0]
            value, count = metrics.perplexity_from_logits(logits, batch["input_ids"], mask)
            nll[slot] += value
        tokens += count
        tick(1)
    return _perplexity_result(nll, tokens, len(feeds))


def _perplexity_result(nll: list[float], tokens: int, segments: int) -> PerplexityResult:
    if tokens == 0:
        nan = float("nan")
        return PerplexityResult(nan, nan, nan, 0, segments)
    ref_ppl = math.exp(nll[0] / tokens)
    cand_ppl = math.exp(nll[1] / tokens)
    return PerplexityResult(ref_ppl, cand_ppl, cand_ppl - ref_ppl, tokens, segments)


def _latency(ref_session, cand_session, feeds, batch_size: int, runs: int, *, tick: Callable) -> LatencyResult:
    from outlierquant.export.data import batch_feeds

    sample = [feeds[i % len(feeds)] for i in range(batch_size)]
    batch = batch_feeds(sample, batch_size)[0]
    seq = int(batch["input_ids"].shape[-1]) if "input_ids" in batch else 0
    for session in (ref_session, cand_session):  # warm-up: allocations, kernel selection
        session.run(None, batch)
    tick(1)
    times: dict[int, list[float]] = {0: [], 1: []}
    sessions = (ref_session, cand_session)
    for run in range(runs):
        order = (0, 1) if run % 2 == 0 else (1, 0)
        for slot in order:
            start = time.perf_counter()
            sessions[slot].run(None, batch)
            times[slot].append(time.perf_counter() - start)
        tick(1)
    ref_ms = 1000.0 * float(np.median(times[0]))
    cand_ms = 1000.0 * float(np.median(times[1]))
    return LatencyResult(
        batch_size=batch_size,
        sequence_length=seq,
        runs=runs,
        reference_ms=ref_ms,
        candidate_ms=cand_ms,
        ratio=cand_ms / ref_ms if ref_ms > 0 else float("nan"),
    )


# --------------------------------------------------------------------------- formatting


def _fmt(value, digits: int, style: str = "f", *, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    spec = f"{'+' if sign else ''}.{digits}{style}"
    return format(value, spec)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _table(header: Sequence[str], body: Sequence[Sequence[str]], *, markdown: bool) -> list[str]:
    widths = [max(len(str(row[i])) for row in (header, *body)) for i in range(len(header))]

    def line(cells):
        parts = [str(cell).ljust(widths[0]) if i == 0 else str(cell).rjust(widths[i]) for i, cell in enumerate(cells)]
        return "| " + " | ".join(parts) + " |" if markdown else "  ".join(parts)

    out = [line(header)]
    if markdown:
        out.append("|" + "|".join(("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(row) for row in body]
    return out


def _json_safe(value):
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def _json_floats(data: dict, kind: type) -> dict:
    """Undo :func:`_json_safe` for the float fields of the dataclass ``kind``."""
    floats = {f.name for f in dataclasses.fields(kind) if f.type in ("float", float)}
    out = dict(data)
    for key in floats & set(data):
        value = data[key]
        if value is None:
            out[key] = float("nan")
        elif isinstance(value, str):
            out[key] = float(value)
    return out
