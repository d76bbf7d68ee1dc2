"""Calibration feeds: checking them against the model's inputs, unpadding, batching.

A feed is a ``{input name: array}`` dict. Feeds are checked one by one (names, ranks,
dtypes) with errors that name the sample; a padded feed whose rows are contiguous runs of
its ``attention_mask`` is split into unpadded batch-1 samples, so padding never reaches a
calibrated range. Token counts bound how many same-shape feeds run as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from outlierquant.errors import CalibrationError


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype | None
    #: one entry per dim: an int for a fixed dim, None for a symbolic one; None if unknown rank
    shape: tuple[int | None, ...] | None
    required: bool


def input_specs(model: ir.Model) -> dict[str, InputSpec]:
    specs = {}
    for value in model.graph.inputs:
        dtype = None
        if value.dtype is not None:
            try:
                dtype = np.dtype(value.dtype.numpy())
            except Exception:  # a dtype numpy has no name for (bfloat16, float8): not checked
                dtype = None
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else None for d in value.shape)
        specs[value.name] = InputSpec(value.name, dtype, shape, value.name not in model.graph.initializers)
    return specs


def check_feed(index: int, feed: Any, specs: Mapping[str, InputSpec]) -> dict[str, np.ndarray]:
    """Validate one feed against the model's inputs; return it as numpy arrays."""
    where = f"calibration sample {index}"
    if not isinstance(feed, Mapping):
        raise CalibrationError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
    expected = ", ".join(specs) or "(none)"
    arrays: dict[str, np.ndarray] = {}
    for name, value in feed.items():
        spec = specs.get(name)
        if spec is None:
            raise CalibrationError(f"{where}: the model has no input {name!r} (model inputs: {expected})")
        array = np.asarray(value)
        if spec.dtype is not None and array.dtype != spec.dtype:
            raise CalibrationError(f"{where}: input {name!r} has dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise CalibrationError(
                    f"{where}: input {name!r} has rank {array.ndim} (shape {tuple(array.shape)}), "
                    f"the model expects rank {len(spec.shape)} ({_format_shape(spec.shape)})"
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                if want is not None and got != want:
                    raise CalibrationError(
                        f"{where}: input {name!r} has shape {tuple(array.shape)}, the model expects "
                        f"{_format_shape(spec.shape)} (dim {axis} must be {want})"
                    )
        arrays[name] = array
    for spec in specs.values():
        if spec.required and spec.name not in arrays:
            raise CalibrationError(f"{where}: input {spec.name!r} is missing (model inputs: {expected})")
    return arrays


def _format_shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def iterate_feeds(feeds: Any) -> Iterator[Any]:
    if hasattr(feeds, "get_next") and callable(feeds.get_next):
        return iter(feeds.get_next, None)  # onnxruntime's CalibrationDataReader protocol
    if isinstance(feeds, Mapping):
        return iter([feeds])  # a single feed
    try:
        return iter(feeds)
    except TypeError:
        raise CalibrationError(
            f"calibration data must be an iterable of feeds or a reader with get_next(), "
            f"got {type(feeds).__name__}"
        ) from None


def unpad(feed: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]] | None:
    """Split a padded feed into unpadded batch-1 feeds, or None when that is not possible.

    Returns ``[feed]`` when there is no padding.
    """
    mask = feed.get("attention_mask")
    if mask is None or mask.ndim != 2 or mask.all():
        return [feed]
    if any(a.ndim < 2 or a.shape[:2] != mask.shape for a in feed.values()):
        return None
    pieces = []
    for row in range(mask.shape[0]):
        positions = np.flatnonzero(mask[row])
        if positions.size == 0:
            continue  # a row of padding only
        lo, hi = int(positions[0]), int(positions[-1]) + 1
        if hi - lo != positions.size:
            return None  # holes inside the row: not plain left/right padding
        pieces.append({name: a[row : row + 1, lo:hi] for name, a in feed.items()})
    return pieces


def feed_tokens(feed: Mapping[str, np.ndarray]) -> int:
    """Size of a feed in tokens (positions of [B, S] inputs; pixels of [N, C, H, W] inputs)."""
    tokens = 1
    for array in feed.values():
        if array.ndim <= 2:
            n = array.size
        elif array.ndim == 3:
            n = array.size // max(array.shape[-1], 1)
        else:
            n = array.size // max(array.shape[1], 1)
        tokens = max(tokens, int(n))
    return tokens


def real_tokens(feed: Mapping[str, np.ndarray]) -> int:
    mask = feed.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        return int(np.count_nonzero(mask))
    return feed_tokens(feed)


def batch_rows(feed: Mapping[str, np.ndarray]) -> int:
    for array in feed.values():
        if array.ndim >= 1:
            return int(array.shape[0])
    return 1
