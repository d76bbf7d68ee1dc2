"""Stream per-channel activation statistics through onnxruntime.

What is computed: for every *target* tensor — by default the activation input (and
output) of each MatMul / Gemm / Conv with a constant weight, and both inputs of
activation x activation MatMuls (attention ``Q @ K^T`` and ``P @ V``) — the
:class:`~outlierquant.calibration.stats.ChannelStats` over all calibration samples:
abs-max, min, max, mean and mean-square per channel, and a covariance where a pass asks
for one (``covariance_for``). The channel axis is the reduction axis of the consumer:
the last axis of a MatMul input, axis 1 of a Gemm input (0 with ``transA``) and of a
Conv input. Outputs use the output-feature axis.

How: one onnxruntime session over a serialized copy of the model with the targets as
extra outputs, external data kept in place (:mod:`outlierquant.calibration.session`).

Batching without padding: consecutive feeds whose inputs all have identical shapes and
dtypes are concatenated along axis 0 into one run, up to about ``batch_tokens`` tokens
(positions of a ``[B, S]`` input; pixels of an image input). Ragged samples are never
padded. Only the outputs of one run are alive at a time; they are folded into the
statistics and released, so memory is O(one batch of activations + channels^2 per
covariance), not O(dataset).

Padding never reaches a range. A feed with an ``attention_mask`` that contains zeros (a
padded ``.npz`` from a user) is handled in two ways, most exact first:

1. *Unpadding*: when every input has leading dims ``[B, S]`` equal to the mask's and each
   row's unmasked positions are one contiguous run (right or left padding), the feed is
   split into unpadded batch-1 samples before it reaches the model, so the activations are
   exactly those of unpadded samples.
2. *Masking the activations*: otherwise the padded feed is run as is and, for each target,
   the masked positions are dropped before the update when the layout can be mapped to the
   mask: ``[B, S, ..., C]``; ``[B, H, S, ..., D]`` (attention heads; the channel must not be
   the S axis); ``[B*H, S, ..., D]``; ``[B*S, C]``. A tensor with no axis of length S holds
   no per-position data and is used whole. Anything else (e.g. ``K^T`` laid out
   ``[B, H, D, S]``, whose channel axis is the padded one) cannot be mapped: a warning is
   logged once for that tensor and its statistics include the padded positions.

A target whose size along its channel axis changes between samples (the last axis of
``K^T`` or of the attention probabilities, which is the sequence length) cannot have
per-channel statistics; it is reduced to per-tensor statistics (one channel), logged once,
and listed in ``ActivationStats.meta["per_tensor"]``.

Non-finite activations, empty data and feeds that do not match the model's inputs raise
:class:`~outlierquant.errors.CalibrationError` with one line naming the tensor or input
and the sample index (the position of the feed in the iterable, from 0).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.feeds import (
    batch_rows,
    check_feed,
    feed_tokens,
    input_specs,
    iterate_feeds,
    real_tokens,
    unpad,
)
from outlierquant.calibration.session import create_session
from outlierquant.calibration.stats import ActivationStats, ChannelStats
from outlierquant.calibration.targets import CalibrationTarget, resolve_targets
from outlierquant.errors import CalibrationError
from outlierquant.modelio import load_model, release_freed_memory

logger = logging.getLogger(__name__)

#: tokens in the first calibration run, before the cost of a token is known
_FIRST_RUN_TOKENS = 512


def _linear_weight_dims(node: ir.Node) -> tuple[int, int] | None:
    """``(in, out)`` features of a MatMul/Gemm with a constant 2-D weight of known shape."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    weight = node.inputs[1]
    shape = weight.shape
    if shape is None and weight.const_value is not None:
        shape = weight.const_value.shape
    if shape is None and weight.producer() is not None and weight.producer().op_type == "Constant":
        attribute = weight.producer().attributes.get("value")
        shape = attribute.as_tensor().shape if attribute is not None else None
    if shape is None or len(shape) != 2 or not all(isinstance(d, int) for d in shape):
        return None
    k, n = int(shape[0]), int(shape[1])
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        k, n = n, k
    return k, n


def _channels(value: ir.Value, axis: int) -> int:
    """The static size of ``value``'s channel axis: from its shape, else from the weight of
    the linear it feeds or comes out of (exporters often leave intermediate shapes out)."""
    shape = value.shape
    if shape is not None and -len(shape) <= axis < len(shape) and isinstance(shape[axis], int):
        return int(shape[axis])
    for use in value.uses():
        dims = _linear_weight_dims(use.node) if use.idx == 0 else None
        if dims:
            return dims[0]
    producer = value.producer()
    dims = _linear_weight_dims(producer) if producer is not None else None
    return dims[1] if dims else 0


def _first_run_tokens(model: ir.Model, targets: Sequence[CalibrationTarget], batch_bytes: int | None) -> int:
    """Tokens for the first run: at most :data:`_FIRST_RUN_TOKENS`, and fewer where what it
    fetches alone would fill half of ``batch_bytes``: each fetched tensor's channels are
    known from its shape (float32, and onnxruntime's output buffer beside the array handed
    back: 8 bytes per channel per token). Why: a 65k-vocabulary decoder's logits are 256
    KiB a token, so 512 tokens fetched them as 128 MiB twice over, the largest part of
    w8a8-outputs' peak on the bench model. Channel counts only: a dimension that grows with
    the sequence (attention probabilities) is what the measured first run then catches."""
    if not batch_bytes:
        return _FIRST_RUN_TOKENS
    values = {value.name: value for node in model.graph for value in node.outputs}
    values.update({value.name: value for value in model.graph.inputs})
    channels = sum(_channels(values[t.tensor], t.channel_axis) for t in targets if t.tensor in values)
    if not channels:
        return _FIRST_RUN_TOKENS
    return int(max(1, min(_FIRST_RUN_TOKENS, batch_bytes // 2 // (8 * channels))))


def resident_bytes() -> int | None:
    """This process's resident memory (Linux ``/proc``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


#: The one memory budget for activations held at once: a calibration batch, the rows a
#: pass captures to learn on, the attention probabilities a gate fetches. Bounded by this,
#: peak memory does not grow with the calibration set or the vocabulary.
MEMORY_BUDGET_BYTES = 512 * 2**20
#: the least a calibration run is allowed, however small the model
MIN_BATCH_BYTES = 64 * 2**20


def activation_budget(model: ir.Model) -> int:
    """The default bytes one calibration run may hold: half the model's weights, between
    :data:`MIN_BATCH_BYTES` and :data:`MEMORY_BUDGET_BYTES`.

    Why relative: the model is in memory once while it is calibrated, so a fixed 512 MiB
    on a 280 MiB model nearly tripled the peak, while a large model's runs would take no
    more than on a small one. Batches only set how many samples share one run; the
    statistics are the same. Lazy tensors (a tied LM head's transpose, SplitQuant's parts)
    are not counted: they are computed from weights already counted, and counting them
    raised the 65k-vocabulary bench model's budget from 140 to 204 MiB.
    """
    weights = sum(value.const_value.nbytes for value in model.graph.initializers.values()
                  if value.const_value is not None and not isinstance(value.const_value, ir.LazyTensor))
    return int(min(MEMORY_BUDGET_BYTES, max(MIN_BATCH_BYTES, weights // 2)))


# ---------------------------------------------------------------------------------------
# Targets


# ---------------------------------------------------------------------------------------
# Inputs and feeds


# ---------------------------------------------------------------------------------------
# The session


# ---------------------------------------------------------------------------------------
# Folding activations into statistics


def _masked_rows(array: np.ndarray, axis: int, mask: np.ndarray) -> np.ndarray | None:
    """Rows [n, C] of ``array`` at unmasked positions, or None when the layout is not recognised."""
    batch, seq = mask.shape
    keep = mask.astype(bool)
    shape = array.shape
    if seq not in shape[1:] and (array.ndim < 1 or shape[0] != batch * seq):
        return _rows(array, axis)  # no per-position axis: nothing padded in it
    if array.ndim >= 3 and shape[0] == batch and shape[1] == seq and axis >= 2:
        return _rows_after(np.moveaxis(array, axis, -1)[keep])
    if array.ndim >= 3 and shape[0] == batch and shape[2] == seq and axis not in (0, 2):
        moved = np.moveaxis(array, [2, axis], [1, -1])  # [B, S, ..., C]
        return _rows_after(moved[keep])
    if array.ndim >= 3 and shape[0] != batch and shape[0] % batch == 0 and shape[1] == seq and axis >= 2:
        heads = shape[0] // batch  # [B*H, S, ..., D], batch-major
        return _rows_after(np.moveaxis(array, axis, -1)[np.repeat(keep, heads, axis=0)])
    if array.ndim == 2 and shape[0] == batch * seq and axis == 1:
        return array[keep.reshape(-1)]
    return None  # e.g. K^T as [B, H, D, S]: the padded axis is the channel axis


def _rows(array: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(-1, moved.shape[-1]) if moved.ndim else moved.reshape(1, 1)


def _rows_after(selected: np.ndarray) -> np.ndarray:
    return selected.reshape(-1, selected.shape[-1])


class _Collector:
    """The statistics of all targets, folded in one run at a time."""

    def __init__(self, targets: Sequence[CalibrationTarget], covariance_for: set[str]):
        self.targets = {t.tensor: t for t in targets}
        self.covariance_for = covariance_for
        self.stats: dict[str, ChannelStats] = {}
        self.per_tensor: set[str] = set()
        self.warned_mask: set[str] = set()

    def fold(
        self,
        name: str,
        array: np.ndarray,
        mask: np.ndarray | None,
        samples: Sequence[int],
        rows_per_sample: Sequence[int],
    ) -> None:
        """Fold one run's ``array`` of target ``name`` (``samples``: feed index per batch part)."""
        target = self.targets[name]
        if array.ndim == 0:
            array = array.reshape(1)
        axis = target.channel_axis
        if not -array.ndim <= axis < array.ndim:
            raise CalibrationError(
                f"tensor {name!r}: channel axis {axis} is out of range for its shape {tuple(array.shape)}"
            )
        axis %= array.ndim
        rows = None
        if mask is not None and not mask.all():
            rows = _masked_rows(array, axis, mask)
            if rows is None and name not in self.warned_mask:
                self.warned_mask.add(name)
                logger.warning(
                    "tensor %r: cannot map the attention mask onto its shape %s; "
                    "its statistics include padded positions",
                    name,
                    tuple(array.shape),
                )
        if rows is None:
            rows = _rows(array, axis)
        if not np.issubdtype(rows.dtype, np.floating):
            rows = rows.astype(np.float64)

        stats = self.stats.get(name)
        if stats is None:
            stats = ChannelStats.empty(rows.shape[1], target.channel_axis, covariance=name in self.covariance_for)
            stats.shape = tuple(-1 if i == 0 else int(d) for i, d in enumerate(array.shape))
            self.stats[name] = stats
        elif len(stats.shape) == array.ndim:
            stats.shape = tuple(-1 if old != new else old for old, new in zip(stats.shape, array.shape))
        if name in self.per_tensor:
            rows = rows.reshape(-1, 1)
        elif rows.shape[1] != stats.channels:
            self._to_per_tensor(name, stats.channels, rows.shape[1])
            stats = self.stats[name]
            rows = rows.reshape(-1, 1)
        try:
            stats.update(rows)
        except CalibrationError:
            raise CalibrationError(
                f"{_which_sample(array, samples, rows_per_sample)}: tensor {name!r} has NaN/Inf"
            ) from None

    def _to_per_tensor(self, name: str, before: int, now: int) -> None:
        stats = self.stats[name]
        # Expected for the sequence-long axis of K^T and of attention probabilities.
        level = logging.INFO if self.targets[name].role == "dynamic_input" else logging.WARNING
        logger.log(
            level,
            "tensor %r: its size along channel axis %d changes between samples (%d, then %d); "
            "keeping per-tensor statistics for it",
            name,
            stats.channel_axis,
            before,
            now,
        )
        if stats.covariance is not None:
            logger.warning("tensor %r: no covariance for per-tensor statistics", name)
        self.per_tensor.add(name)
        self.stats[name] = ChannelStats(
            channel_axis=stats.channel_axis,
            absmax=np.array([stats.absmax.max()]),
            minimum=np.array([stats.minimum.min()]),
            maximum=np.array([stats.maximum.max()]),
            mean=np.array([stats.mean.mean()]),  # every channel has the same count
            mean_sq=np.array([stats.mean_sq.mean()]),
            count=stats.count * stats.channels,
            covariance=None,
            shape=stats.shape,
        )


def _which_sample(array: np.ndarray, samples: Sequence[int], rows_per_sample: Sequence[int]) -> str:
    """Name the calibration sample (feed index) whose batch rows hold a non-finite value."""
    if array.ndim >= 1 and array.shape[0] == sum(rows_per_sample):
        bad = np.flatnonzero(~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1))
        if bad.size:
            owner = int(np.searchsorted(np.cumsum(rows_per_sample), bad[0], side="right"))
            return f"calibration sample {samples[owner]}"
    if samples[0] == samples[-1]:
        return f"calibration sample {samples[0]}"
    if list(samples) == list(range(samples[0], samples[-1] + 1)):
        return f"calibration samples {samples[0]}-{samples[-1]}"
    # feeds grouped by shape are not consecutive in the data
    listed = sorted(set(samples))
    return "calibration samples " + ", ".join(map(str, listed[:8])) + (", ..." if len(listed) > 8 else "")


# ---------------------------------------------------------------------------------------
# The entry point


def _shape_key(feed: Any) -> tuple:
    if not isinstance(feed, Mapping):
        return ()
    return tuple(sorted((str(name), tuple(np.shape(value)), str(getattr(value, "dtype", ""))) for name, value in feed.items()))


def _shape_grouped(feeds: Any) -> Iterable[tuple[int, Any]]:
    """``(index, feed)`` with feeds of one shape next to each other, when ``feeds`` is a list.

    Only consecutive same-shape feeds can share a run, and sentences of varying length
    rarely come in order (MiniLM's 164 calibration sentences: 147 runs in data order, 20
    grouped by shape). The statistics do not depend on the order of the samples except
    for float64 rounding in the means; ranges are identical. A reader or a generator is
    run in its own order (it is not held in memory to be sorted).
    """
    if not isinstance(feeds, Sequence) or isinstance(feeds, (str, bytes)):
        return enumerate(iterate_feeds(feeds))
    keys = [_shape_key(feed) for feed in feeds]
    first_seen: dict[tuple, int] = {}
    for index, key in enumerate(keys):
        first_seen.setdefault(key, index)
    # groups in the order their first feed appears; feeds in data order inside a group
    order = sorted(range(len(feeds)), key=lambda i: (first_seen[keys[i]], i))
    return ((index, feeds[index]) for index in order)


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    return sys.stderr is not None and sys.stderr.isatty() and "CI" not in os.environ


def collect_statistics(
    model: str | os.PathLike | ir.Model,
    feeds: Any,
    *,
    tensors: Iterable[str | CalibrationTarget] | None = None,
    covariance_for: Iterable[str] = (),
    batch_tokens: int | None = 4096,
    batch_bytes: int | str | None = "auto",
    progress: bool | None = None,
    session_options: Any = None,
    providers: Sequence[Any] | None = None,
    total: int | None = None,
) -> ActivationStats:
    """Run ``model`` over ``feeds`` and return per-channel statistics of the target tensors.

    ``feeds``: an iterable of dicts input name -> array (normally one unpadded batch-1
    sample each, sequence lengths may differ), or a reader with ``get_next() -> dict | None``.
    ``tensors``: names or :class:`CalibrationTarget` s (default :func:`quantizable_targets`;
    a bare name takes the channel axis its consumer implies, else the last axis).
    ``covariance_for``: names whose statistics keep a covariance matrix.
    ``batch_tokens``: consecutive feeds of identical shapes are run together up to about
    this many tokens (``None`` or ``0``: one run per feed), and while the activations stay
    within ``batch_bytes`` (``"auto"``: :func:`activation_budget` of the model). A token's
    cost is measured on the first run, which holds at most 512 tokens: what the run made the
    process grow by (every intermediate onnxruntime held at once), or the fetched bytes
    where that cannot be read. A large model's batches shrink, a small one's do not.
    ``session_options``: default ``ORT_ENABLE_BASIC``; a given object gets the
    external-data folder option added when the model has external data.
    ``total``: the number of feeds, for the progress bar when ``feeds`` has no ``len``.
    """
    import onnxruntime as ort

    started = time.perf_counter()
    model_path = None
    if isinstance(model, (str, os.PathLike)):
        model_path = Path(model)
        model = load_model(model_path)
    targets = resolve_targets(model, tensors)
    if not targets:
        raise CalibrationError("the model has no tensors to calibrate (no MatMul/Gemm/Conv with a constant weight)")
    if batch_bytes == "auto":
        batch_bytes = activation_budget(model)
    target_names = {t.tensor for t in targets}
    covariance = set(covariance_for)
    unknown = sorted(covariance - target_names)
    if unknown:
        raise CalibrationError(f"covariance requested for {unknown[0]!r}, which is not a calibration target")

    specs = input_specs(model)
    from_feed = [t.tensor for t in targets if t.tensor in specs]
    fetched = [t.tensor for t in targets if t.tensor not in specs]
    can_batch = bool(batch_tokens) and all(
        s.shape is not None and len(s.shape) >= 2 and s.shape[0] is None for s in specs.values()
    )
    collector = _Collector(targets, covariance)
    counters = {"feeds": 0, "samples": 0, "tokens": 0, "runs": 0}
    first_run_tokens = _first_run_tokens(model, targets, batch_bytes)
    warned_padding = False

    if total is None and hasattr(feeds, "__len__") and not isinstance(feeds, Mapping):
        total = len(feeds)
    from tqdm import tqdm

    with contextlib.ExitStack() as stack:
        # the bar is up while the session is built (a large model takes a while) and
        # advances as samples are *run*, not as they are queued for a batch
        bar = stack.enter_context(
            tqdm(total=total, desc="calibrating (building the session)", unit="sample",
                 disable=not _show_progress(progress), leave=False)
        )
        session = create_session(model, fetched, session_options, providers, stack, fold_dequantize=True,
                                 only_extra=True)
        bar.set_description("calibrating", refresh=True)
        done = 0  # feeds whose every piece has been run
        reading: int | None = None  # the feed whose pieces are being queued
        pending: list[tuple[int, dict[str, np.ndarray]]] = []
        pending_key: Any = None
        pending_tokens = 0
        bytes_per_token: float | None = None

        def token_limit() -> int:
            """The tokens one run may hold: ``batch_tokens``, lowered to fit ``batch_bytes``."""
            limit = int(batch_tokens or 0)
            if bytes_per_token is None:  # the first run measures what a token costs
                return min(limit, first_run_tokens)
            if batch_bytes:
                limit = min(limit, int(batch_bytes // max(bytes_per_token, 1.0)))
            return limit

        def flush() -> None:
            nonlocal pending, pending_tokens, bytes_per_token, done
            if not pending:
                return
            # every feed queued in this run is done, except the one whose remaining pieces
            # are still being queued (it is counted by the run that takes its last piece)
            completed = done + len({index for index, _ in pending if index != reading})
            tokens_in_run = max(pending_tokens, 1)
            samples = [index for index, _ in pending]
            if len(pending) == 1:
                batch = pending[0][1]
                rows_per_sample = [batch_rows(batch)]
            else:
                batch = {name: np.concatenate([f[name] for _, f in pending], axis=0) for name in pending[0][1]}
                rows_per_sample = [batch_rows(f) for _, f in pending]
            pending, pending_tokens = [], 0
            mask = batch.get("attention_mask")
            if mask is not None and (mask.ndim != 2 or mask.all()):
                mask = None
            before = resident_bytes() if bytes_per_token is None else None
            results = session.run(fetched, batch) if fetched else []
            counters["runs"] += 1
            per_token = sum(array.nbytes for array in results) / tokens_in_run
            if before is not None:
                # What the first run made the process grow by: onnxruntime's arena keeps the
                # run's high-water mark, so this counts every intermediate the graph holds at
                # once (attention scores, MLP activations), not only the fetched tensors —
                # on a 65k-vocabulary decoder ~10x what is fetched.
                after = resident_bytes()
                if after is not None:
                    per_token = max(per_token, (after - before) / tokens_in_run)
            bytes_per_token = per_token if bytes_per_token is None else max(bytes_per_token, per_token)
            for name, array in zip(fetched, results):
                collector.fold(name, array, mask, samples, rows_per_sample)
            for name in from_feed:
                collector.fold(name, batch[name], mask, samples, rows_per_sample)
            del results, batch
            if completed > done:
                bar.update(completed - done)
                done = completed

        for index, raw in _shape_grouped(feeds) if can_batch else enumerate(iterate_feeds(feeds)):
            feed = check_feed(index, raw, specs)
            counters["feeds"] += 1
            pieces = unpad(feed)
            if pieces is None:
                if not warned_padding:
                    warned_padding = True
                    logger.info(
                        "calibration sample %d: padded inputs cannot be split into unpadded samples; "
                        "dropping padded positions from the activations instead",
                        index,
                    )
                pieces = [feed]
            reading = index
            for piece in pieces:
                counters["samples"] += batch_rows(piece)
                counters["tokens"] += real_tokens(piece)
                key = tuple((name, a.shape, a.dtype.str) for name, a in sorted(piece.items()))
                tokens = feed_tokens(piece)
                if pending and (
                    not can_batch or key != pending_key or pending_tokens + tokens > token_limit()
                ):
                    flush()
                pending.append((index, piece))
                pending_key = key
                pending_tokens += tokens
        reading = None
        flush()
    # the session and its run buffers are gone: their heap goes back before the pass runs
    release_freed_memory()

    if counters["feeds"] == 0 or not collector.stats:
        raise CalibrationError(
            "calibration data is empty: "
            + ("the feeds produced no samples" if counters["feeds"] == 0 else "every sample was padding only")
        )
    missing = [t.tensor for t in targets if t.tensor not in collector.stats]
    for name in missing:
        logger.warning("tensor %r: no unpadded position was seen; it has no statistics", name)
    ordered = {t.tensor: collector.stats[t.tensor].finish() for t in targets if t.tensor in collector.stats}
    meta = {
        "model": str(model_path) if model_path is not None else None,
        "samples": counters["samples"],
        "feeds": counters["feeds"],
        "tokens": counters["tokens"],
        "runs": counters["runs"],
        "onnxruntime": ort.__version__,
        "tensors": len(ordered),
        "per_tensor": sorted(collector.per_tensor),
    }
    logger.info(
        "calibrated %d tensors on %d samples (%d tokens, %d runs) in %.1fs",
        len(ordered),
        counters["samples"],
        counters["tokens"],
        counters["runs"],
        time.perf_counter() - started,
    )
    return ActivationStats(tensors=ordered, meta=meta)


# ---------------------------------------------------------------------------------------
# Capturing activation rows (for passes that learn on activations)


class _EvenRows:
    """At most ``2·cap`` rows of one tensor, kept at an even stride over everything seen.

    Row ``g`` (counted over all runs) is kept when ``g % stride == 0``; when more than
    ``2·cap`` rows are kept, every other one is dropped and the stride doubles, so memory
    stays bounded and the kept rows stay evenly spread over the calibration data.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.stride = 1
        self.seen = 0
        self.chunks: list[np.ndarray] = []
        self.kept = 0

    def add(self, rows: np.ndarray) -> None:
        first = (-self.seen) % self.stride
        picked = rows[first :: self.stride]
        self.seen += rows.shape[0]
        if picked.shape[0]:
            self.chunks.append(np.array(picked, dtype=np.float32))
            self.kept += picked.shape[0]
        if self.kept > 2 * self.cap:
            merged = np.concatenate(self.chunks)[::2]
            self.chunks, self.kept = [merged], merged.shape[0]
            self.stride *= 2

    def rows(self) -> np.ndarray:
        merged = np.concatenate(self.chunks)
        if merged.shape[0] > self.cap:
            merged = merged[np.linspace(0, merged.shape[0] - 1, self.cap).round().astype(np.int64)]
        return merged


def require_finite(array: np.ndarray, name: str, where: str) -> None:
    """Raise :class:`CalibrationError` naming ``where`` and the tensor when ``array`` has NaN/Inf."""
    if not np.isfinite(array).all():
        raise CalibrationError(f"{where}: tensor {name!r} has NaN/Inf")


def stream_tensors(
    model: ir.Model,
    feeds: Any,
    tensors: Sequence[str],
    visit: Callable[[str, np.ndarray, dict, int], None],
    *,
    session_options: Any = None,
    providers: Sequence[Any] | None = None,
    fetch_bytes: int | None = None,
    batch_bytes: int | None = None,
) -> int:
    """Run ``feeds`` through ``model`` and call ``visit(name, array, piece, index)`` for each
    named tensor of every sample (``index``: the feed's position); returns the number of samples.

    Padded feeds are split into unpadded batch-1 pieces first (as for
    :func:`collect_statistics`), so ``array`` holds real positions only unless the padding
    could not be undone (``piece`` is then the padded feed with its ``attention_mask``).
    The tensors are read as extra outputs of one session built from the serialized model
    (the caller's model is not modified); a graph input is handed over from the feed.

    For a visitor that only sums over samples (not for one that keeps rows in order):
    ``fetch_bytes`` bounds what one run fetches: the tensors are taken in groups that fit,
    sized by the first tensor on the largest sample, with one pass over the data per group
    (the session is built once). ``batch_bytes`` runs same-shape samples together while
    the fetched arrays stay within it; ``array`` and ``piece`` then hold several samples
    along axis 0 and ``index`` is the first one's.
    """
    specs = input_specs(model)
    names = list(dict.fromkeys(tensors))
    fetched = [name for name in names if name not in specs]
    samples = 0

    def run(session, wanted: list[str], piece: dict, index: int, inputs_too: bool = True) -> None:
        arrays = dict(zip(wanted, session.run(wanted, piece))) if wanted else {}
        for name in names:
            if name in arrays or (inputs_too and name in specs):
                visit(name, arrays[name] if name in arrays else piece[name], piece, index)

    with contextlib.ExitStack() as stack:
        session = create_session(model, fetched, session_options, providers, stack, fold_dequantize=True,
                                 only_extra=True)
        if not fetch_bytes and not batch_bytes:
            for index, raw in enumerate(iterate_feeds(feeds)):
                feed = check_feed(index, raw, specs)
                for piece in unpad(feed) or [feed]:
                    samples += 1
                    run(session, fetched, piece, index)
            if not samples:
                raise CalibrationError("calibration data is empty: the feeds produced no samples")
            return samples
        pieces: list[tuple[int, dict]] = []
        for index, raw in _shape_grouped(feeds):
            feed = check_feed(index, raw, specs)
            pieces.extend((index, piece) for piece in unpad(feed) or [feed])
        if not pieces:
            raise CalibrationError("calibration data is empty: the feeds produced no samples")
        largest = 1
        if fetched:
            _, big = max(pieces, key=lambda item: sum(int(a.size) for a in item[1].values()))
            largest = max(1, int(session.run(fetched[:1], big)[0].nbytes))
        chunk = max(1, int(fetch_bytes) // largest) if fetch_bytes else len(fetched) or 1
        can_batch = bool(batch_bytes) and all(
            s.shape is not None and len(s.shape) >= 2 and s.shape[0] is None for s in specs.values()
        )
        for start in range(0, max(len(fetched), 1), chunk):
            wanted = fetched[start:start + chunk]
            per_sample = largest * max(len(wanted), 1)
            rows = max(1, int(batch_bytes) // per_sample) if can_batch else 1
            group: list[tuple[int, dict]] = []

            def flush() -> None:
                if not group:
                    return
                batch = group[0][1] if len(group) == 1 else \
                    {name: np.concatenate([p[name] for _, p in group], axis=0) for name in group[0][1]}
                # graph inputs among the tensors are visited on the first pass only
                run(session, wanted, batch, group[0][0], inputs_too=start == 0)
                group.clear()

            for index, piece in pieces:
                if group and (len(group) >= rows or _shape_key(piece) != _shape_key(group[0][1])):
                    flush()
                group.append((index, piece))
            flush()
    return len(pieces)


def capture_activations(
    model: ir.Model,
    feeds: Any,
    tensors: Sequence[str],
    *,
    max_rows: int = 2048,
    session_options: Any = None,
    providers: Sequence[Any] | None = None,
) -> dict[str, np.ndarray]:
    """The rows ``[n, C]`` of each named tensor over ``feeds``: at most ``max_rows``, evenly sampled.

    The channel axis is the one its consuming linear reduces over (as for
    :func:`collect_statistics`); padded positions (``attention_mask`` zeros) are dropped.
    The tensors are read as extra outputs of one session built from the serialized model
    (the caller's model is not modified). Returns float32 arrays keyed by tensor name.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows!r}: must be >= 1")
    targets = resolve_targets(model, tensors)
    keepers = {t.tensor: _EvenRows(max_rows) for t in targets}
    axes = {t.tensor: t.channel_axis for t in targets}

    def keep(name: str, array: np.ndarray, piece: Mapping[str, np.ndarray], index: int) -> None:
        mask = piece.get("attention_mask")
        if mask is not None and (mask.ndim != 2 or mask.all()):
            mask = None
        axis = axes[name] % max(array.ndim, 1)
        rows = _masked_rows(array, axis, mask) if mask is not None else None
        if rows is None:
            rows = _rows(array, axis)
        require_finite(rows, name, f"calibration sample {index}")
        keepers[name].add(rows)

    stream_tensors(model, feeds, list(keepers), keep, session_options=session_options, providers=providers)
    return {name: keeper.rows() for name, keeper in keepers.items()}
