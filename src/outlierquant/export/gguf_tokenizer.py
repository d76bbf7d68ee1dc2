"""A GGUF file's SentencePiece tokenizer as llama.cpp runs it, where transformers reads it wrong.

A GGUF file whose ``tokenizer.ggml.model`` is ``llama`` holds a SentencePiece vocabulary:
pieces with scores and no merge list. llama.cpp tokenizes it with SentencePiece's BPE
rule: repeatedly merge the adjacent pair whose concatenation is a piece with the highest
score. transformers (4.57) converts some of these vocabularies (Gemma 3's, for one) to a
*Unigram* model instead, which treats the scores as log-probabilities; since the scores of
a BPE vocabulary are minus the merge rank, long pieces look improbable and words come out
in fragments ("capital" as "c ap it al"; 2.5 tokens per English word where the model was
trained on ~1.3), so calibration and perplexity feed the model text it never saw.

:func:`spm_bpe_tokenizer` rebuilds the tokenizer as a BPE model with merges derived from
the vocabulary — every split of a piece into two pieces, ranked by the merged piece's
score — the same derivation transformers uses for SentencePiece BPE ``.model`` files.
Normalizer, decoder, post-processor and special tokens stay as transformers built them.

:func:`gguf_tokenizer_kind` reads ``tokenizer.ggml.model`` from the file's header without
parsing the rest of the metadata (``gguf.GGUFReader`` parses every array: ~30 s for a
262k-piece vocabulary).
"""

from __future__ import annotations

import json
import os
import re
import struct

#: GGUF metadata value types (``gguf.GGUFValueType``): fixed sizes, and the two variable ones
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def gguf_tokenizer_kind(path: str | os.PathLike) -> str | None:
    """``tokenizer.ggml.model`` of a GGUF file (``llama``, ``gpt2``, …), or ``None``."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            return None
        version, = struct.unpack("<I", handle.read(4))
        if version < 2:
            return None
        _tensors, count = struct.unpack("<QQ", handle.read(16))

        def string() -> bytes:
            size, = struct.unpack("<Q", handle.read(8))
            return handle.read(size)

        def skip(kind: int) -> None:
            if kind in _FIXED:
                handle.seek(_FIXED[kind], os.SEEK_CUR)
            elif kind == _STRING:
                string()
            elif kind == _ARRAY:
                item, length = struct.unpack("<IQ", handle.read(12))
                if item in _FIXED:
                    handle.seek(_FIXED[item] * length, os.SEEK_CUR)
                else:
                    for _ in range(length):
                        skip(item)
            else:
                raise ValueError(f"unknown GGUF value type {kind}")

        for _ in range(count):
            key = string()
            kind, = struct.unpack("<I", handle.read(4))
            if key == b"tokenizer.ggml.model" and kind == _STRING:
                return string().decode("utf-8", "replace")
            skip(kind)
    return None


def spm_bpe_tokenizer(tokenizer):
    """The ``tokenizers.Tokenizer`` of ``tokenizer`` (a transformers fast tokenizer whose model
    is Unigram over a SentencePiece BPE vocabulary) rebuilt as BPE: merges from the
    vocabulary, ranked by the merged piece's score; special and byte pieces merge nothing."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "Unigram":
        raise ValueError(f"expected a Unigram model to rebuild, got {model.get('type')}")
    pieces = [piece for piece, _ in model["vocab"]]
    scores = [score for _, score in model["vocab"]]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    special = {token["content"] for token in spec.get("added_tokens", [])}
    merges = []
    for index, piece in enumerate(pieces):
        if piece in special or _BYTE_PIECE.match(piece) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[index], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda merge: merge[:3])
    unk = model.get("unk_id")
    spec["model"] = {"type": "BPE", "dropout": None, "unk_token": pieces[unk] if unk is not None else None,
                     "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                     "byte_fallback": bool(model.get("byte_fallback", False)), "ignore_merges": False,
                     "vocab": vocab, "merges": [[left, right] for *_, left, right in merges]}
    return Tokenizer.from_str(json.dumps(spec))
