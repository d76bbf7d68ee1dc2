"""Per-channel activation statistics: the record calibration produces and passes consume.

For a tensor ``X`` whose channel axis is ``a`` (the last axis for MatMul/Gemm inputs, axis 1
for Conv), the statistics reduce over every other axis, over all calibration samples,
and never include padded positions:

- ``absmax[j] = max |X_j|``, ``minimum[j] = min X_j``, ``maximum[j] = max X_j``
- ``mean[j] = E[X_j]``, ``mean_sq[j] = E[X_j^2]`` (so ``var = mean_sq - mean^2``)
- ``count``: the number of reduced elements per channel (tokens, for a [B, S, C] input)
- optionally ``covariance`` (C x C, ``E[(X - mu)(X - mu)^T]``) for passes that ask for it
  (KLT rotation), and ``token_absmax_hist``: how many tokens had ``max_j |X_j|`` in each
  bin, for methods with per-token thresholds.

Accumulation is in float64 with a streaming update, so memory is O(channels) per tensor
(O(channels^2) where a covariance is requested), never O(activations).

On disk: ``NAME.npz`` holds the arrays, ``NAME.json`` the index (tensor names, channel
axes, counts, model fingerprint), so a pass run is reproducible from the saved files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from outlierquant.errors import CalibrationError, InputError
from outlierquant.numerics.slabs import slabs
from outlierquant.outputs import OutputUnit, check_outputs

FORMAT_VERSION = 1


def _column_means(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, mean of squares)`` per column of ``rows`` in float64, a slab of rows at a time.

    Why slabs: widening a whole run's rows to float64 (and squaring them) made two copies
    at twice the fetched size — for a 65k-wide logits tensor 2 GB beside the 512 MiB run.
    Each slab's first row carries the sums so far, so the additions happen in the order of
    one ``sum(axis=0)`` over all rows (numpy adds a column's rows one after another): the
    same bits as the one-shot means.
    """
    n, channels = rows.shape
    sums = squares = None
    for part in slabs(n, channels):
        block = np.array(rows[part], dtype=np.float64)
        block_sq = block * block
        if sums is not None:
            block[0] += sums
            block_sq[0] += squares
        sums, squares = block.sum(axis=0), block_sq.sum(axis=0)
    return sums / n, squares / n


@dataclass
class ChannelStats:
    """Streaming per-channel statistics of one tensor."""

    channel_axis: int
    absmax: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    mean: np.ndarray
    mean_sq: np.ndarray
    count: int
    covariance: np.ndarray | None = None
    #: shape of the tensor the first time it was seen, with the batch-like axes as -1
    shape: tuple[int, ...] = ()
    # rows waiting to be folded into the covariance, and the rows folded so far (update())
    _pending: list = field(default_factory=list, repr=False, compare=False)
    _pending_rows: int = field(default=0, repr=False, compare=False)
    _covariance_count: int = field(default=0, repr=False, compare=False)
    _covariance_mean: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, channels: int, channel_axis: int, *, covariance: bool = False) -> "ChannelStats":
        return cls(
            channel_axis=channel_axis,
            absmax=np.zeros(channels),
            minimum=np.full(channels, np.inf),
            maximum=np.full(channels, -np.inf),
            mean=np.zeros(channels),
            mean_sq=np.zeros(channels),
            count=0,
            covariance=np.zeros((channels, channels)) if covariance else None,
        )

    @property
    def channels(self) -> int:
        return int(self.absmax.shape[0])

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.mean_sq - self.mean**2, 0.0)

    @property
    def tensor_min(self) -> float:
        return float(self.minimum.min())

    @property
    def tensor_max(self) -> float:
        return float(self.maximum.max())

    @property
    def tensor_absmax(self) -> float:
        return float(self.absmax.max())

    def update(self, rows: np.ndarray) -> None:
        """Fold a 2-D block ``rows`` of shape [n, channels] (float) into the statistics.

        Raises :class:`CalibrationError` on NaN/Inf, naming nothing: the caller adds
        the tensor name; the statistics are then left as they were.

        The covariance is updated in blocks of at least ``channels`` rows (the rows wait in
        a buffer no larger than the matrix itself): its cost per update is a few passes over
        the ``channels x channels`` matrix besides the product, which with one sentence per
        update dominated calibration (MiniLM, 1536-channel FFN inputs). Call :meth:`finish`
        before reading ``covariance``; :func:`collect_statistics` does.
        """
        if rows.ndim != 2 or rows.shape[1] != self.channels:
            raise ValueError(f"expected [n, {self.channels}] rows, got {rows.shape}")
        n = rows.shape[0]
        if n == 0:
            return
        low, high = rows.min(axis=0), rows.max(axis=0)
        # min and max are NaN/Inf exactly when some value is: no separate pass over the rows
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise CalibrationError("non-finite value (NaN or Inf)")
        low, high = low.astype(np.float64), high.astype(np.float64)
        self.absmax = np.maximum(self.absmax, np.maximum(np.abs(low), np.abs(high)))  # = max |x|, exactly
        self.minimum = np.minimum(self.minimum, low)
        self.maximum = np.maximum(self.maximum, high)
        total = self.count + n
        batch_mean, batch_mean_sq = _column_means(rows)
        if self.covariance is not None:
            self._pending.append(np.array(rows, copy=True))
            self._pending_rows += n
            if self._pending_rows >= self.channels:
                self._fold_covariance()
        self.mean = self.mean + (batch_mean - self.mean) * (n / total)
        self.mean_sq = self.mean_sq + (batch_mean_sq - self.mean_sq) * (n / total)
        self.count = total

    def _fold_covariance(self) -> None:
        """Chan et al.'s pairwise update of the co-moment matrix M2 (stored normalized) with
        the buffered rows, against the mean and count of the rows folded before them."""
        if not self._pending:
            return
        block = np.concatenate(self._pending).astype(np.float64, copy=False)
        self._pending, self._pending_rows = [], 0
        n = block.shape[0]
        done = self._covariance_count
        total = done + n
        block_mean = block.mean(axis=0)
        centered = block - block_mean
        m2 = centered.T @ centered
        if done:
            delta = block_mean - self._covariance_mean
            m2 += self.covariance * done
            m2 += np.outer(delta, delta) * (done * n / total)
            self._covariance_mean = self._covariance_mean + delta * (n / total)
        else:
            self._covariance_mean = block_mean
        m2 /= total
        self.covariance = m2
        self._covariance_count = total

    def finish(self) -> "ChannelStats":
        """Fold the rows still buffered for the covariance; returns ``self``."""
        if self.covariance is not None:
            self._fold_covariance()
        return self

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Combine statistics of two disjoint sets of samples (same tensor)."""
        self.finish()
        other.finish()
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        total = self.count + other.count
        wa, wb = self.count / total, other.count / total
        cov = None
        if self.covariance is not None and other.covariance is not None:
            delta = other.mean - self.mean
            cov = self.covariance * wa + other.covariance * wb + np.outer(delta, delta) * wa * wb
        return ChannelStats(
            channel_axis=self.channel_axis,
            absmax=np.maximum(self.absmax, other.absmax),
            minimum=np.minimum(self.minimum, other.minimum),
            maximum=np.maximum(self.maximum, other.maximum),
            mean=self.mean * wa + other.mean * wb,
            mean_sq=self.mean_sq * wa + other.mean_sq * wb,
            count=total,
            covariance=cov,
            shape=self.shape,
        )


    def scaled(self, s: np.ndarray) -> "ChannelStats":
        """The statistics of ``x / s`` (``s > 0`` per channel), derived exactly: max, min,
        abs-max and mean divide by ``s``, the mean square by ``s²``, the covariance by
        ``s sᵀ``; the count and shape stay."""
        self.finish()
        s = np.asarray(s, dtype=np.float64)
        if s.shape != (self.channels,) or not (s > 0).all():
            raise ValueError(f"scale of shape {s.shape} for {self.channels} channels: must be positive per channel")
        return ChannelStats(
            channel_axis=self.channel_axis,
            absmax=self.absmax / s,
            minimum=self.minimum / s,
            maximum=self.maximum / s,
            mean=self.mean / s,
            mean_sq=self.mean_sq / (s * s),
            count=self.count,
            covariance=None if self.covariance is None else self.covariance / np.outer(s, s),
            shape=self.shape,
        )


@dataclass
class StatisticsCarry:
    """How a rewrite that leaves the fp32 function unchanged moved the tensors statistics
    describe, so the statistics of the model before it carry over instead of being
    collected again.

    ``scaled[name] = s``: the tensor is now ``x / s`` along its channel axis (a SmoothQuant
    scale folded into its producer): its statistics are derived exactly
    (:meth:`ChannelStats.scaled`). ``changed``: tensors whose values changed in a way the
    statistics cannot follow (inside the producer a scale folded into): dropped, so a later
    pass that reads one collects it. Every other tensor computes the same function as
    before, so its statistics hold up to float32 rounding of the rewritten weights.
    """

    scaled: dict[str, np.ndarray] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)

    def apply(self, stats: "ActivationStats") -> "ActivationStats":
        carried: dict[str, ChannelStats] = {}
        for name, st in stats.items():
            if name in self.changed:
                continue
            s = self.scaled.get(name)
            if s is not None:
                if st.channels != len(s):  # per-tensor statistics cannot follow a per-channel scale
                    continue
                st = st.scaled(s)
            carried[name] = st
        meta = dict(stats.meta)
        meta["carried"] = {"scaled": len(self.scaled), "dropped": sum(1 for n in stats if n not in carried)}
        return ActivationStats(tensors=carried, meta=meta)


@dataclass
class ActivationStats(Mapping[str, ChannelStats]):
    """Statistics for a set of tensors of one model, keyed by tensor (value) name."""

    tensors: dict[str, ChannelStats] = field(default_factory=dict)
    #: free-form provenance: model path, sample count, data file, ...
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> ChannelStats:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def save(self, path: str | os.PathLike, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
        """Write ``path.npz`` and ``path.json`` together (``path`` may carry either suffix or none).

        Both appear at once or neither does (an :class:`~outlierquant.outputs.OutputUnit`);
        neither may be one of the files in ``protect`` (the model, the calibration data).
        """

        npz_path, json_path = stats_files(path)
        check_outputs([npz_path, json_path], protect)
        arrays: dict[str, np.ndarray] = {}
        index = {"format_version": FORMAT_VERSION, "meta": self.meta, "tensors": []}
        for i, (name, st) in enumerate(self.tensors.items()):
            st.finish()
            key = f"t{i}"
            for attr in ("absmax", "minimum", "maximum", "mean", "mean_sq"):
                arrays[f"{key}.{attr}"] = getattr(st, attr)
            if st.covariance is not None:
                arrays[f"{key}.covariance"] = st.covariance
            index["tensors"].append(
                {
                    "name": name,
                    "key": key,
                    "channel_axis": st.channel_axis,
                    "count": st.count,
                    "shape": list(st.shape),
                    "covariance": st.covariance is not None,
                }
            )
        with OutputUnit(npz_path.parent, primary=json_path.name, protect=protect) as unit:
            with open(unit.path(npz_path), "wb") as handle:
                np.savez_compressed(handle, **arrays)
            unit.path(json_path).write_text(json.dumps(index, indent=1), encoding="utf-8")
        return npz_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ActivationStats":
        from outlierquant.export.data import read_npz

        npz_path, json_path = stats_files(path)
        for p in (json_path, npz_path):
            if not p.is_file():
                raise InputError(f"{p}: no such statistics file")
        try:
            index = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{json_path}: unreadable statistics index ({exc})") from exc
        data = read_npz(npz_path)
        if not isinstance(index, dict) or index.get("format_version") != FORMAT_VERSION:
            version = index.get("format_version") if isinstance(index, dict) else None
            raise InputError(f"{json_path}: statistics format {version} is not {FORMAT_VERSION}")
        tensors = {}
        try:
            for entry in index["tensors"]:
                key = entry["key"]
                covariance = data[f"{key}.covariance"] if entry.get("covariance") else None
                st = ChannelStats(
                    channel_axis=int(entry["channel_axis"]),
                    absmax=data[f"{key}.absmax"],
                    minimum=data[f"{key}.minimum"],
                    maximum=data[f"{key}.maximum"],
                    mean=data[f"{key}.mean"],
                    mean_sq=data[f"{key}.mean_sq"],
                    count=int(entry["count"]),
                    covariance=covariance,
                    shape=tuple(int(d) for d in entry.get("shape", ())),
                )
                _check_loaded(st, str(entry["name"]), json_path)
                tensors[str(entry["name"])] = st
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{json_path}: statistics index and arrays do not match ({type(exc).__name__}: {exc})") from exc
        return cls(tensors=tensors, meta=index.get("meta", {}) if isinstance(index.get("meta"), dict) else {})


def _check_loaded(st: ChannelStats, name: str, source: Path) -> None:
    channels = st.absmax.shape[0] if st.absmax.ndim == 1 else -1
    for attr in ("absmax", "minimum", "maximum", "mean", "mean_sq"):
        value = getattr(st, attr)
        if value.ndim != 1 or value.shape[0] != channels or value.dtype.kind != "f":
            raise InputError(f"{source}: statistics of {name!r}: {attr} is not a float vector of {channels} channels")
    if st.covariance is not None and st.covariance.shape != (channels, channels):
        raise InputError(f"{source}: statistics of {name!r}: covariance is not {channels} x {channels}")
    if st.count < 1 or channels < 1:
        raise InputError(f"{source}: statistics of {name!r} are empty (count {st.count}, {channels} channels)")
    if not all(np.isfinite(getattr(st, attr)).all() for attr in ("absmax", "mean", "mean_sq")):
        raise InputError(f"{source}: statistics of {name!r} contain NaN or Inf")


def stats_files(path: str | os.PathLike) -> list[Path]:
    """The two files of saved statistics: ``[PATH.npz, PATH.json]``."""
    base = _base(path)
    return [base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")]


def _base(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix in (".npz", ".json"):
        path = path.with_suffix("")
    return path
