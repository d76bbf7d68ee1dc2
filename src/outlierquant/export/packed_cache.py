"""Running a with-past decoder whose KV cache may be packed (``kv-quantize`` with ``form: packed``).

A packed model takes, instead of ``past_key_values.i.key`` ``[B, H, T, D]`` float32, the
tensors ``past_key_values.i.key.codes`` (uint8, ``8 / bits`` codes per byte),
``.step`` / ``.min`` (float16, per token and group; absent for static per-channel keys),
``.sink`` (float32, the first sink positions) and ``.recent`` (float32, the window of
recent tokens not yet quantized, with ``recent_tokens``), and returns the grown ones as
``present.i.key.codes`` … . The loop here is the same for a float and a packed cache: it
reads the cache inputs from the session, starts from empty ones and feeds every
``present.X`` back as ``past_key_values.X`` — the model does the packing.

:func:`cache_bytes_per_token` is the memory the cache really takes: the bytes of every
cache tensor after ``T`` tokens, divided by ``T`` (the float sinks and window are a fixed
cost, amortized over ``T``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

PAST = "past_key_values."
PRESENT = "present."

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


def session(model_path: str | os.PathLike, session_options=None):
    import onnxruntime as ort

    from outlierquant.errors import translated
    from outlierquant.modelio import resolve_model_file

    path = resolve_model_file(model_path)
    with translated(path):
        return ort.InferenceSession(str(path), sess_options=session_options, providers=["CPUExecutionProvider"])


def empty_cache(sess, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length cache inputs of the session (float or packed): static dims kept, the
    token axis 0."""
    cache = {}
    for item in sess.get_inputs():
        if not item.name.startswith(PAST):
            continue
        if item.type not in _DTYPES or len(item.shape) != 4:
            raise ValueError(f"cache input {item.name!r}: expected a rank-4 float32/float16/uint8 tensor, got "
                             f"{item.type} {item.shape}")
        dims = [batch, item.shape[1], 0, item.shape[3]]
        if not all(isinstance(d, int) for d in dims):
            raise ValueError(f"cache input {item.name!r} has no static heads / width: {item.shape}")
        cache[item.name] = np.zeros(dims, dtype=_DTYPES[item.type])
    if not cache:
        raise ValueError("the model has no past_key_values.* inputs (export it with its KV cache)")
    return cache


def step(sess, ids: np.ndarray, cache: dict[str, np.ndarray], position: int):
    """One call: ``ids`` ``[1, S]`` after ``position`` cached tokens; returns logits and the new cache."""
    names = [item.name for item in sess.get_inputs()]
    feed = {"input_ids": np.asarray(ids, dtype=np.int64)}
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones((ids.shape[0], position + ids.shape[1]), np.int64)
    if "position_ids" in names:
        feed["position_ids"] = np.arange(position, position + ids.shape[1], dtype=np.int64)[None].repeat(
            ids.shape[0], axis=0)
    feed.update(cache)
    outputs = [item.name for item in sess.get_outputs()]
    values = dict(zip(outputs, sess.run(outputs, feed)))
    new_cache = {PAST + name[len(PRESENT):]: value for name, value in values.items() if name.startswith(PRESENT)}
    missing = set(cache) - set(new_cache)
    if missing:
        raise ValueError(f"the model returns no present output for {sorted(missing)[0]!r}")
    return values["logits"], new_cache


def greedy_generate(sess, prompt: np.ndarray, tokens: int) -> tuple[list[int], dict[str, np.ndarray]]:
    """Greedy tokens: the prompt once (prefill, empty cache), then one token per step,
    each step's cache fed back. Returns the tokens and the final cache."""
    logits, cache = step(sess, prompt, empty_cache(sess, prompt.shape[0]), 0)
    position = prompt.shape[1]
    out: list[int] = []
    while True:
        out.append(int(np.argmax(logits[0, -1])))
        if len(out) == tokens:
            return out, cache
        logits, cache = step(sess, np.array([[out[-1]]]), cache, position)
        position += 1


def decode_logits(sess, ids: np.ndarray, prefill: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Teacher-forced logits ``[S, vocab]`` of ``ids`` ``[1, S]``: the first ``prefill`` tokens in
    one call, then one token per call through the cache (each token's attention reads the
    cache as stored)."""
    if not 1 <= prefill <= ids.shape[1]:
        raise ValueError(f"prefill={prefill}: between 1 and the {ids.shape[1]} tokens")
    logits, cache = step(sess, ids[:, :prefill], empty_cache(sess), 0)
    rows = [logits[0]]
    for t in range(prefill, ids.shape[1]):
        logits, cache = step(sess, ids[:, t:t + 1], cache, t)
        rows.append(logits[0])
    return np.concatenate(rows, axis=0), cache


def cache_bytes(cache: dict[str, np.ndarray]) -> int:
    return int(sum(value.nbytes for value in cache.values()))


def cache_bytes_per_token(cache: dict[str, np.ndarray], tokens: int) -> float:
    """Bytes of every cache tensor after ``tokens`` tokens, per token (all layers, K and V)."""
    return cache_bytes(cache) / float(tokens)


def is_packed(names: Sequence[str]) -> bool:
    return any(name.startswith(PAST) and name.endswith(".codes") for name in names)
