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
from outlierquant.evaluate.validation_report import (
    EmbeddingFidelity,
    LatencyResult,
    OutputFidelity,
    PerplexityResult,
    ValidationReport,
)
from outlierquant.modelio import model_file_bytes, resolve_model_file

logger = logging.getLogger(__name__)

TASKS = ("auto", "feature-extraction", "text-generation", "generic")
TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
SENTENCE_OUTPUT = "sentence_embedding"

#: Batches for fidelity are capped at this many tokens (a 50k-vocabulary LM's logits for
#: 512 tokens are 100 MB in float32) and this many samples.
MAX_BATCH_TOKENS = 512
MAX_BATCH_SAMPLES = 16

Feed = dict[str, np.ndarray]


# --------------------------------------------------------------------------- report


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
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ValidationReport:
    """Compare ``candidate`` with the fp32 ``reference`` on held-out ``feeds``.

    ``latency_runs=0`` skips the latency measurement. ``candidate_session_options`` (for
    custom-op libraries) defaults to ``session_options``; both default to onnxruntime's
    defaults with all graph optimizations on. ``providers``: onnxruntime's execution
    providers for both sessions (``("CUDAExecutionProvider", "CPUExecutionProvider")``
    with onnxruntime-gpu, the ``[gpu]`` extra).
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

    warnings = [line for line in [int8_saturation_warning(candidate_path, cand_header)] if line]
    for line in warnings:
        logger.warning("%s", line)
    ref_session = _session(reference_path, session_options, ref_header.uses_kernels, providers)
    cand_session = _session(candidate_path, candidate_session_options or session_options, cand_header.uses_kernels,
                            providers)

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
        warnings=warnings,
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
    #: int8 (signed) weights that onnxruntime multiplies with uint8 activations
    signed_int8_weights: int = 0


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
        signed_int8_weights=_signed_int8_weights(proto.graph),
    )


#: integer MatMul forms and the input index of their weight (onnxruntime runs them, and the
#: QDQ MatMuls it fuses into them, with uint8 activations)
_INTEGER_MATMUL_WEIGHT = {"MatMulInteger": 1, "QLinearMatMul": 3, "MatMulIntegerToFloat": 1,
                          "DynamicQuantizeMatMul": 1, "QGemm": 3}


def _signed_int8_weights(graph) -> int:
    """int8 initializers that reach an integer MatMul as its weight: directly, or through a
    DequantizeLinear whose output a MatMul/Gemm reads (the QDQ pair onnxruntime fuses)."""
    import onnx

    signed = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.INT8}
    if not signed:
        return 0
    readers: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
    found = set()
    for node in graph.node:
        index = _INTEGER_MATMUL_WEIGHT.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] in signed:
            found.add(node.input[index])
        elif node.op_type == "DequantizeLinear" and node.input and node.input[0] in signed:
            if any(reader.op_type in ("MatMul", "Gemm") and slot == 1 for reader, slot in readers.get(node.output[0], [])):
                found.add(node.input[0])
    return len(found)


def int8_saturation_warning(path: Path, header: _Header) -> str | None:
    """A line for a model whose signed int8 weights this CPU's onnxruntime kernels may
    saturate on (see :mod:`outlierquant.numerics.int8`), else None."""
    from outlierquant.numerics.int8 import host_saturates_u8s8

    if not header.signed_int8_weights or not host_saturates_u8s8():
        return None
    return (f"{path.name}: {header.signed_int8_weights} signed int8 weights, and this x86 CPU has no VNNI: "
            "onnxruntime's u8s8 kernels saturate int16 pair sums here, so its errors are larger than on a VNNI "
            "CPU (quantize with --int8-weights unsigned for this machine)")


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


def _session(path: Path, options, uses_kernels: bool, providers: Sequence[str] = ("CPUExecutionProvider",)):
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
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
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


