"""Calibration text from Hugging Face ``datasets``: a ``save_to_disk`` folder (Dataset or
DatasetDict) given as ``--calibration-data``, or ``--dataset NAME`` with ``--dataset-split``
/ ``--text-column`` (a local folder of data files here: nothing may be downloaded). Run
through the real CLI on the tiny synthetic Llama with past and its tokenizer; the errors a
user meets (no such split, no such column, a name not in the local cache, both sources
given) are one line and leave no output behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from outlierquant.plugin import cli

datasets = pytest.importorskip("datasets")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("outlierquant: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    from outlierquant.export.data import bundled_sentences, read_lines

    return read_lines(bundled_sentences("calibration"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, sentences) -> dict[str, Path]:
    """A Dataset folder (column ``sentence``), a DatasetDict folder (train / validation,
    column ``text``) and a plain folder of JSON-lines data files."""
    root = tmp_path_factory.mktemp("datasets")
    single = root / "single"
    datasets.Dataset.from_dict({"sentence": sentences, "id": list(range(len(sentences)))}).save_to_disk(str(single))
    split = root / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": sentences[:100]}),
        "validation": datasets.Dataset.from_dict({"text": sentences[100:]}),
    }).save_to_disk(str(split))
    files = root / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences), encoding="utf-8")
    return {"single": single, "dict": split, "files": files}


def test_saved_dataset_folder_calibrates_like_the_same_text_file(capsys, tmp_path, tiny_llama_past, saved, sentences):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(sentences), encoding="utf-8")
    out_text, out_ds = tmp_path / "text.onnx", tmp_path / "ds.onnx"
    code, _, err = run_cli(capsys, "-q", "quantize", tiny_llama_past, "-o", out_text, "--recipe", "w8a8",
                           "--calibration-data", text)
    assert code == 0, err
    code, _, err = run_cli(capsys, "-q", "quantize", tiny_llama_past, "-o", out_ds, "--recipe", "w8a8",
                           "--calibration-data", saved["single"], "--text-column", "sentence")
    assert code == 0, err
    # the same text, the same segments, hence the same model
    assert out_ds.read_bytes() == out_text.read_bytes()


def test_dataset_dict_split_and_local_data_files(capsys, tmp_path, tiny_llama_past, saved):
    out = tmp_path / "validation.onnx"
    code, _, err = run_cli(capsys, "-q", "quantize", tiny_llama_past, "-o", out, "--recipe", "w8a8",
                           "--calibration-data", saved["dict"], "--dataset-split", "validation")
    assert code == 0, err
    out2 = tmp_path / "files.onnx"
    code, _, err = run_cli(capsys, "-q", "quantize", tiny_llama_past, "-o", out2, "--recipe", "w8a8",
                           "--dataset", saved["files"])
    assert code == 0, err
    assert out.is_file() and out2.is_file()


@pytest.mark.parametrize("case, expected", [
    ("split", "no split 'test' (splits: train, validation)"),
    ("column", "no column 'text' (columns: sentence, id)"),
    ("missing", "could not be loaded offline"),
    ("both", "not both"),
])
def test_dataset_errors_are_one_line_and_write_nothing(capsys, tmp_path, tiny_llama_past, saved, case, expected,
                                                        monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache: nothing to find there
    args = {
        "split": ["--calibration-data", saved["dict"], "--dataset-split", "test"],
        "column": ["--calibration-data", saved["single"]],
        "missing": ["--dataset", "outlierquant-tests/no-such-dataset"],
        "both": ["--calibration-data", saved["single"], "--dataset", "x/y"],
    }[case]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", "-m", tiny_llama_past, out, "--recipe", "w8a8", *args)
    assert expected in one_line_error(code, err)
    assert not out.exists()


def test_calibrate_reads_a_dataset(capsys, tmp_path, tiny_llama_past, saved):
    stats = tmp_path / "stats"
    code, out, err = run_cli(capsys, "-q", "calibrate", tiny_llama_past, "--dataset", saved["files"], "-o", stats)
    assert code == 0, err
    assert Path(out.split()[0]).is_file()
