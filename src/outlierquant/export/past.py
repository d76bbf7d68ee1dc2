"""Calibration feeds for a decoder exported with its KV cache (``text-generation-with-past``).

A with-past decoder takes, besides ``input_ids`` / ``attention_mask`` / ``position_ids``,
one ``past_key_values.{i}.key`` / ``.value`` pair per layer, ``[batch, kv heads,
past length, head size]``, and returns the grown cache as ``present.{i}.key`` /
``.value``. A generation loop calls the same graph in two shapes:

- **prefill**: the prompt, ``S`` tokens, with an empty past (``past length`` 0);
- **decode**: one (or, speculatively, a few) new tokens with a past of everything before.

The two see different activations: decode attention has one query row over a long past,
and the K/V the attention MatMuls read are ``Concat(past, new)``. Statistics taken only
from prefill samples would calibrate ranges decoding never checked, so
:func:`with_past_feeds` turns each fixed-length text segment (``lm_segments``) of ``L``
tokens into

1. a **prefill** feed: the whole segment, empty past arrays of the right dtype, head count
   and head size;
2. a **decode** feed: the fp32 model runs the first ``L - k`` tokens with an empty past;
   its ``present.*`` outputs become the past of the last ``k`` tokens (``k`` cycling
   through ``decode_tokens``, default 1, 2, 4), with ``attention_mask`` ones over
   ``past + k`` positions and ``position_ids`` ``L - k .. L - 1``.

Prefill feeds come first, then the decode feeds, so a consumer that takes the first few
feeds as a latency batch gets samples of one shape. Head count and head size are read
from the ONNX input shapes; where those are symbolic, from the ``config.json`` beside the
model (``num_key_value_heads`` / ``num_attention_heads``, ``head_dim`` / ``hidden_size``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from outlierquant.errors import InputError

logger = logging.getLogger(__name__)

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
#: new tokens of the decode-shaped samples, cycled over the segments
DECODE_TOKENS = (1, 2, 4)

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class PastInput:
    """One cache input: its name, dtype, kv head count and head size, and the output that
    carries its next value."""

    name: str
    dtype: np.dtype
    heads: int
    head_size: int
    present: str


def is_past_input(name: str) -> bool:
    return name.startswith(PAST_PREFIX)


def has_past(input_names: Sequence[str] | Mapping[str, object]) -> bool:
    """True when the model takes ``past_key_values.*`` inputs."""
    return any(is_past_input(name) for name in input_names)


def past_inputs(model_path: str | os.PathLike) -> list[PastInput]:
    """The model's cache inputs with their static geometry (ONNX shapes, else config.json)."""
    import onnx

    from outlierquant.modelio import resolve_model_file

    path = resolve_model_file(model_path)
    proto = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in proto.graph.initializer}
    outputs = {value.name for value in proto.graph.output}
    config: dict | None = None
    found = []
    for value in proto.graph.input:
        if value.name in initializers or not is_past_input(value.name):
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims = list(tensor_type.shape.dim) if tensor_type.HasField("shape") else []
        if dims and len(dims) != 4:
            raise InputError(f"{path}: cache input {value.name!r} has rank {len(dims)}, expected 4 "
                             "[batch, heads, past length, head size]")
        heads = dims[1].dim_value if dims and dims[1].HasField("dim_value") else None
        head_size = dims[3].dim_value if dims and dims[3].HasField("dim_value") else None
        if heads is None or head_size is None:
            if config is None:
                config = _read_config(path.parent)
            heads = heads or _config_heads(config, path)
            head_size = head_size or _config_head_size(config, path)
        present = PRESENT_PREFIX + value.name[len(PAST_PREFIX):]
        if present not in outputs:
            raise InputError(f"{path}: cache input {value.name!r} has no {present!r} output to fill it from")
        found.append(PastInput(value.name, dtype, int(heads), int(head_size), present))
    return found


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from exc
    return config if isinstance(config, dict) else {}


def _config_heads(config: dict, path: Path) -> int:
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    if not isinstance(heads, int) or heads < 1:
        raise InputError(f"{path}: the cache inputs have no static head count and no config.json beside the "
                         "model gives num_key_value_heads / num_attention_heads")
    return heads


def _config_head_size(config: dict, path: Path) -> int:
    size = config.get("head_dim")
    if not size and isinstance(config.get("hidden_size"), int) and isinstance(config.get("num_attention_heads"), int):
        size = config["hidden_size"] // config["num_attention_heads"]
    if not isinstance(size, int) or size < 1:
        raise InputError(f"{path}: the cache inputs have no static head size and no config.json beside the "
                         "model gives head_dim / hidden_size")
    return size


def empty_past(past: Sequence[PastInput], batch: int = 1) -> Feed:
    """Past arrays of length 0 (the prefill call of a generation loop)."""
    return {item.name: np.zeros((batch, item.heads, 0, item.head_size), dtype=item.dtype) for item in past}


def with_past_feeds(
    model_path: str | os.PathLike,
    segments: Sequence[Mapping[str, np.ndarray]],
    *,
    decode_tokens: Sequence[int] = DECODE_TOKENS,
    decode: bool = True,
    session_options=None,
) -> list[Feed]:
    """Prefill feeds (empty past) for ``segments``, then one decode-shaped feed per segment.

    ``segments`` are batch-1 text feeds (``input_ids`` and whichever of ``attention_mask``
    / ``position_ids`` the model takes, all ones / ``arange``: no padding, no past). The
    decode feeds' past comes from running the fp32 model at ``model_path`` on each
    segment's first ``L - k`` tokens; ``decode=False`` gives the prefill feeds only.
    """
    past = past_inputs(model_path)
    if not past:
        raise InputError(f"{model_path}: the model has no past_key_values inputs")
    if not decode_tokens or any(int(k) < 1 for k in decode_tokens):
        raise InputError(f"decode_tokens must be positive token counts, got {tuple(decode_tokens)!r}")
    prefill: list[Feed] = []
    for segment in segments:
        feed = {name: np.asarray(value) for name, value in segment.items()}
        feed.update(empty_past(past))
        prefill.append(feed)
    if not decode:
        return prefill
    session = None
    decoded: list[Feed] = []
    for index, segment in enumerate(segments):
        ids = np.asarray(segment["input_ids"])
        length = int(ids.shape[1])
        k = min(int(decode_tokens[index % len(decode_tokens)]), length - 1)
        if k < 1:
            continue  # a one-token segment has nothing to put in a past
        if session is None:
            session = _session(model_path, session_options)
        cut = length - k
        head = _window(segment, 0, cut, past_len=0)
        head.update(empty_past(past))
        presents = session.run([item.present for item in past], head)
        feed = _window(segment, cut, length, past_len=cut)
        for item, value in zip(past, presents):
            feed[item.name] = np.ascontiguousarray(value, dtype=item.dtype)
        decoded.append(feed)
    logger.info("with-past feeds: %d prefill + %d decode-shaped samples", len(prefill), len(decoded))
    return prefill + decoded


def _window(segment: Mapping[str, np.ndarray], start: int, stop: int, *, past_len: int) -> Feed:
    """Tokens ``start:stop`` of an unpadded segment, with a mask and positions covering
    ``past_len`` cached positions before them."""
    feed: Feed = {}
    for name, value in segment.items():
        value = np.asarray(value)
        if name == "attention_mask":
            feed[name] = np.ones((value.shape[0], past_len + stop - start), dtype=value.dtype)
        elif name == "position_ids":
            feed[name] = np.arange(past_len, past_len + stop - start, dtype=value.dtype)[np.newaxis, :]
        elif value.ndim >= 2:
            feed[name] = np.ascontiguousarray(value[:, start:stop])
        else:
            feed[name] = value
    return feed


def _session(model_path: str | os.PathLike, session_options=None):
    import onnxruntime as ort

    from outlierquant.errors import translated
    from outlierquant.modelio import resolve_model_file

    path = resolve_model_file(model_path)
    with translated(path):
        return ort.InferenceSession(str(path), sess_options=session_options, providers=["CPUExecutionProvider"])
