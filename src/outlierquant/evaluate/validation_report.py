"""What validation measured, and how it is shown: per-output fidelity, sentence-embedding
similarity, perplexity and latency of a candidate against the fp32 reference, as a record
with a JSON form (``--json``) and the comparison table the CLI and benchmarks print."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from outlierquant.errors import InputError
from outlierquant.outputs import atomic_write_text

REPORT_VERSION = 1


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
    #: what may make the numbers unrepresentative (one line each), e.g. int8 kernels that
    #: saturate on this CPU
    warnings: list[str] = dataclasses.field(default_factory=list)
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
        lines += [f"warning: {warning}" for warning in self.warnings]
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
