"""Fidelity and task metrics, numpy only.

All reductions run in float64 whatever the input dtype.

- **cosine** (:func:`cosine_rows`): ``a·b / (‖a‖‖b‖)`` per row of the last axis. 1 means the
  candidate points the same way as the reference; it ignores scale. Two zero rows count as
  identical (1), a zero row against a non-zero one as orthogonal (0).
- **SQNR** (:func:`sqnr_db`): signal-to-quantization-noise ratio,
  ``10·log10(‖ref‖² / ‖ref − cand‖²)`` in dB; +inf when the two are equal. Every 6 dB is
  roughly one bit of precision kept.
- **max abs error** (:func:`max_abs_error`): ``max |ref − cand|``, the worst single element.
- **Spearman's rho** (:func:`spearman`): Pearson correlation of the ranks (ties get their
  average rank). For embeddings we correlate the pairwise similarities the reference and the
  candidate assign to the same sentence pairs (:func:`pairwise_cosine_upper`): 1 means the
  quantized model orders every pair of sentences exactly as the original does.
- **mean pooling** (:func:`mean_pool`): attention-masked average over tokens, the
  sentence-transformers pooling.
- **perplexity** (:func:`perplexity_from_logits`): the summed next-token negative
  log-likelihood ``−Σ log softmax(logits[t])[ids[t+1]]`` and the number of predicted tokens;
  perplexity is ``exp(nll_sum / token_count)`` over a whole data set.
- **kurtosis** (:func:`outlierquant.numerics.estimates.kurtosis`): ``E[(x−μ)⁴] / σ⁴`` (3 for a Gaussian; ``excess=True``
  subtracts 3). Heavy-tailed, outlier-ridden activations and weights have large kurtosis.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def _rows(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        return x.reshape(1, 1)
    return x.reshape(-1, x.shape[-1])


def cosine_rows(a, b) -> np.ndarray:
    """Cosine similarity of each row (last axis) of ``a`` and ``b``; leading axes flattened."""
    a, b = _rows(a), _rows(b)
    if a.shape != b.shape:
        raise ValueError(f"cosine_rows: shapes differ {a.shape} vs {b.shape}")
    dot = np.einsum("ij,ij->i", a, b)
    norm_a = np.sqrt(np.einsum("ij,ij->i", a, a))
    norm_b = np.sqrt(np.einsum("ij,ij->i", b, b))
    denom = norm_a * norm_b
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)
    both_zero = (norm_a == 0) & (norm_b == 0)
    cosine[both_zero] = 1.0
    return np.clip(cosine, -1.0, 1.0)


def sqnr_db(reference, candidate) -> float:
    """``10·log10(‖ref‖² / ‖ref − cand‖²)``; +inf when equal, -inf for a zero reference."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    noise = float(np.sum(np.square(ref - cand)))
    signal = float(np.sum(np.square(ref)))
    return sqnr_from_sums(signal, noise)


def sqnr_from_sums(signal: float, noise: float) -> float:
    """SQNR in dB from accumulated ``Σref²`` and ``Σ(ref−cand)²`` (for streaming)."""
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def max_abs_error(reference, candidate) -> float:
    """Largest absolute element-wise difference (0 for empty arrays)."""
    diff = np.abs(np.asarray(reference, dtype=np.float64) - np.asarray(candidate, dtype=np.float64))
    return float(diff.max()) if diff.size else 0.0


def rankdata(x) -> np.ndarray:
    """1-based ranks of a 1-D array, ties sharing their average rank."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    starts_group = np.ones(len(x), dtype=bool)
    starts_group[1:] = ordered[1:] != ordered[:-1]
    group = np.cumsum(starts_group) - 1
    counts = np.bincount(group)
    first_position = np.flatnonzero(starts_group)
    average = first_position + (counts + 1) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman: lengths differ {x.size} vs {y.size}")
    if x.size < 2:
        return float("nan")
    rx = rankdata(x) - (x.size + 1) / 2.0
    ry = rankdata(y) - (y.size + 1) / 2.0
    denom = np.sqrt(np.dot(rx, rx) * np.dot(ry, ry))
    if denom == 0:
        return float("nan")
    return float(np.clip(np.dot(rx, ry) / denom, -1.0, 1.0))


def pairwise_cosine_upper(emb) -> np.ndarray:
    """Strict upper triangle (row-major) of the cosine-similarity matrix of ``emb`` [N, D]."""
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"pairwise_cosine_upper expects [N, D], got shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = emb / np.where(norms > 0, norms, 1.0)
    sims = unit @ unit.T
    rows, cols = np.triu_indices(len(emb), k=1)
    return sims[rows, cols]


def mean_pool(token_embeddings, attention_mask) -> np.ndarray:
    """Masked mean over tokens: ``[B, S, H]`` with ``[B, S]`` mask -> ``[B, H]`` (float64)."""
    tokens = np.asarray(token_embeddings, dtype=np.float64)
    mask = np.asarray(attention_mask, dtype=np.float64)
    if tokens.ndim == 2:
        tokens, mask = tokens[np.newaxis], mask.reshape(1, -1)
    summed = np.einsum("bsh,bs->bh", tokens, mask)
    counts = np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
    return summed / counts


def perplexity_from_logits(logits, input_ids, attention_mask=None) -> tuple[float, int]:
    """Next-token NLL sum and token count: position t predicts ``input_ids[t+1]``.

    ``logits`` is ``[B, S, V]`` (or ``[S, V]``); the first token is never predicted. With an
    ``attention_mask``, padded targets are not counted; a with-past call's mask covers the
    cached positions too (``[B, P + S]``), and its last ``S`` columns are the new tokens'.
    Log-softmax in float64, row by row so a 50k vocabulary does not blow up memory.
    """
    logits = np.asarray(logits)
    ids = np.asarray(input_ids)
    if logits.ndim == 2:
        logits, ids = logits[np.newaxis], ids.reshape(1, -1)
    mask = None
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.ndim == 2 and ids.ndim == 2 and mask.shape[0] == ids.shape[0] and mask.shape[1] > ids.shape[1]:
            mask = mask[:, mask.shape[1] - ids.shape[1]:]  # the cached positions come first
        mask = mask.reshape(ids.shape)
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"perplexity_from_logits: logits {logits.shape} do not match input_ids {ids.shape}")
    nll_sum = 0.0
    count = 0
    for row in range(ids.shape[0]):
        pred = logits[row, :-1].astype(np.float64)
        target = ids[row, 1:]
        keep = np.ones(target.shape, dtype=bool) if mask is None else mask[row, 1:] != 0
        if not keep.any():
            continue
        pred, target = pred[keep], target[keep]
        peak = pred.max(axis=-1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(pred - peak).sum(axis=-1))
        nll_sum += float(np.sum(log_norm - pred[np.arange(len(target)), target]))
        count += int(len(target))
    return nll_sum, count


