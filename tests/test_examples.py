"""Every example runs, with its --fast settings, as a user would run it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args, timeout: int = 900) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CI": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--fast", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_minilm_end_to_end(tmp_path, minilm_onnx):
    out = run_example("minilm_end_to_end.py", "--onnx", minilm_onnx, "--recipe", "w8a8", "--workdir", tmp_path)
    assert (tmp_path / "quantized" / "model.onnx").is_file()
    assert "sentence_embedding" in out and "Spearman" in out
    # the semantic search finds the paraphrase with the quantized model too
    assert "[quantized] 'a small cat resting in sunlight' -> 'A kitten naps in the sun by the window.'" in out


@pytest.mark.slow
def test_deploy_onnxruntime(minilm_onnx):
    out = run_example("deploy_onnxruntime.py", "--onnx", minilm_onnx)
    assert "mean-pooled embeddings (3, 384)" in out
    assert "optimum ORTModelForFeatureExtraction: embeddings (3, 384)" in out


@pytest.mark.slow
def test_smollm2_generate(tmp_path, smollm2_past_onnx):
    out = run_example("smollm2_generate.py", "--onnx", smollm2_past_onnx, "--workdir", tmp_path, timeout=1500)
    assert "with KV cache" in out
    lines = {line.split("]", 1)[0] + "]": line for line in out.splitlines() if line.startswith("[")}
    assert "Paris" in lines["[fp32]"]
    generated = lines["[default]"]
    assert generated.startswith("[default] 'The capital of France is")
    assert len(generated) > len("[default] 'The capital of France is'")
    assert "tokens/s, default" in out
