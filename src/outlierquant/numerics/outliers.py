"""Outlier input channels of one linear, chosen from calibrated per-channel statistics.

LLM.int8() keeps the input channels whose activations reach a magnitude threshold in
float; a scale-free variant compares each channel with the layer's median channel. The
arguments are plain arrays and numbers, so every pass that splits channels off (the
mixed-precision split, a split rotation's side path) chooses them the same way.
"""

from __future__ import annotations

from typing import Literal

import numpy as np


def select_outlier_channels(absmax: np.ndarray, value_range: np.ndarray | None = None, *,
                            criterion: Literal["threshold", "top_k", "relative"] = "threshold",
                            threshold: float = 6.0, top_k: int = 0, ratio: float = 4.0,
                            max_share: float = 0.0) -> np.ndarray:
    """Sorted int64 indices of the outlier input channels of one layer.

    ``threshold``: channels with ``absmax >= threshold``; ``relative``: ``absmax >= ratio ×
    median(absmax)``; ``top_k``: the ``top_k`` widest ``value_range`` channels. ``max_share``
    (> 0) keeps at most that share of the channels, the largest first.
    """
    absmax = np.asarray(absmax, dtype=np.float64)
    k = absmax.shape[0]
    if criterion == "top_k":
        order = np.argsort(-np.asarray(value_range, dtype=np.float64), kind="stable")
        chosen = order[: min(top_k, k)]
    else:
        limit = threshold if criterion == "threshold" else ratio * float(np.median(absmax))
        chosen = np.flatnonzero(absmax >= limit)
        chosen = chosen[np.argsort(-absmax[chosen], kind="stable")]
    if max_share > 0:
        chosen = chosen[: int(np.floor(max_share * k))]
    return np.sort(chosen).astype(np.int64)
