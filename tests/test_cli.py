"""The ``outlierquant`` CLI on the real MiniLM export, and every bad-input case.

Each error case asserts: exit code 2, exactly one line on stderr naming the problem,
no output file left behind, and the input model unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from outlierquant.plugin.cli import main


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("outlierquant: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> dict[str, Path]:
    from outlierquant.export.data import bundled_sentences

    root = tmp_path_factory.mktemp("sentences")
    out = {}
    for split, count in (("calibration", 32), ("heldout", 24)):
        lines = bundled_sentences(split).read_text(encoding="utf-8").splitlines()[:count]
        out[split] = root / f"{split}.txt"
        out[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.mark.slow
def test_export_quantize_validate_on_minilm(capsys, tmp_path, minilm_onnx, sentences):
    from outlierquant.export import default_model_dir

    code, out, err = run_cli(capsys, "export", default_model_dir(), "-o", tmp_path / "fp32")
    assert code == 0, err
    exported = tmp_path / "fp32" / "model.onnx"
    assert exported.is_file() and (tmp_path / "fp32" / "tokenizer.json").is_file()
    assert not [p for p in (tmp_path / "fp32").iterdir() if p.name.startswith(".")]  # no staging left

    before = digest(exported)
    q = tmp_path / "q" / "w8a8.onnx"
    code, out, err = run_cli(
        capsys, "-q", "quantize", exported, "-o", q, "--recipe", "w8a8", "--calibration-data", sentences["calibration"]
    )
    assert code == 0, err
    assert digest(exported) == before
    report = json.loads(q.with_name("w8a8.report.json").read_text())
    assert report["recipe"]["name"] == "w8a8" and report["calibration_samples"] == 32
    quantize_record = next(r for r in report["passes"] if r["pass"] == "quantize")
    assert quantize_record["quantized_weights"] == 36 and quantize_record["static_activation_qdq"] == 48

    js = tmp_path / "validate.json"
    code, out, err = run_cli(
        capsys, "-q", "validate", exported, q, "--data", sentences["heldout"], "--json", js, "--latency-runs", "2"
    )
    assert code == 0, err
    assert "cosine" in out.lower()
    data = json.loads(js.read_text())
    assert 0.95 < data["embedding"]["cosine_mean"] <= 1.0


@pytest.mark.slow
def test_calibrate_then_quantize_from_saved_stats(capsys, tmp_path, minilm_onnx, sentences):
    stats = tmp_path / "stats"
    code, out, err = run_cli(capsys, "-q", "calibrate", minilm_onnx, "--calibration-data", sentences["calibration"], "-o", stats)
    assert code == 0, err
    assert (tmp_path / "stats.npz").is_file() and (tmp_path / "stats.json").is_file()
    q = tmp_path / "from-stats.onnx"
    code, out, err = run_cli(capsys, "-q", "quantize", minilm_onnx, "-o", q, "--recipe", "w8a8", "--stats", stats)
    assert code == 0, err
    onnx.checker.check_model(str(q))


# -- bad input ---------------------------------------------------------------------------


def test_missing_model_file(capsys, tmp_path, sentences):
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "quantize", tmp_path / "nope.onnx", "-o", out, "--calibration-data", sentences["calibration"])
    assert_one_line_error(code, err, "nope.onnx", "no such file")
    assert not out.exists()


def test_corrupt_and_truncated_models(capsys, tmp_path, sentences, minilm_onnx):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(minilm_onnx.read_bytes()[:100_000])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path, needle in ((garbage, "not a readable ONNX model"), (truncated, "not a readable ONNX model"), (empty, "file is empty")):
        out = tmp_path / f"{path.stem}-q.onnx"
        code, _, err = run_cli(capsys, "quantize", path, "-o", out, "--calibration-data", sentences["calibration"])
        assert_one_line_error(code, err, path.name, needle)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _tiny_model(path: Path, opset: int, *, nan: bool = False) -> Path:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("Log", ["x"], ["lx"]), helper.make_node("MatMul", ["lx" if nan else "x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_unsupported_opset(capsys, tmp_path):
    model = _tiny_model(tmp_path / "old.onnx", 9)
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.ones((3, 4), np.float32))
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "quantize", model, "-o", out, "--recipe", "w8a8", "--calibration-data", feeds)
    assert_one_line_error(code, err, "opset 9 is not supported")
    assert not out.exists()


def test_nan_in_activations(capsys, tmp_path):
    model = _tiny_model(tmp_path / "nan.onnx", 17, nan=True)
    before = digest(model)
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=-np.ones((3, 4), np.float32))  # Log(-1) = NaN reaches the MatMul input
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "quantize", model, "-o", out, "--recipe", "w8a8", "--calibration-data", feeds)
    assert_one_line_error(code, err, "NaN")
    assert not out.exists()
    assert digest(model) == before


def test_empty_calibration_data(capsys, tmp_path, minilm_onnx):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "quantize", minilm_onnx, "-o", out, "--calibration-data", empty)
    assert_one_line_error(code, err, "empty.txt")
    assert not out.exists()


def test_missing_calibration_file_and_bad_recipe(capsys, tmp_path, minilm_onnx):
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "quantize", minilm_onnx, "-o", out, "--calibration-data", tmp_path / "none.txt")
    assert_one_line_error(code, err, "none.txt")
    code, _, err = run_cli(capsys, "quantize", minilm_onnx, "-o", out, "--recipe", "nonsense", "--calibration-data", tmp_path / "none.txt")
    assert_one_line_error(code, err, "unknown recipe 'nonsense'")
    assert not out.exists()


def test_refuses_to_overwrite_the_input(capsys, tmp_path, minilm_onnx, sentences):
    copy = tmp_path / "model.onnx"
    shutil.copy(minilm_onnx, copy)
    before = digest(copy)
    code, _, err = run_cli(capsys, "quantize", copy, "-o", copy, "--calibration-data", sentences["calibration"])
    assert_one_line_error(code, err, "refusing to overwrite the input model")
    assert digest(copy) == before


def test_console_script_reports_errors_in_a_real_process(tmp_path):
    exe = Path(sys.executable).with_name("outlierquant")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "outlierquant.plugin.cli"]
    done = subprocess.run(command + ["validate", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--data", "x.txt"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "a.onnx: no such file" in done.stderr
    done = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "quantize" in done.stdout


@pytest.mark.slow
def test_demo_prints_the_comparison_table(capsys, tmp_path, minilm_onnx):
    # reuse the session's export (the demo re-exports only when its folder is empty)
    shutil.copytree(minilm_onnx.parent, tmp_path / "fp32")
    code, out, err = run_cli(capsys, "-q", "demo", "--workdir", tmp_path)
    assert code == 0, err
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("|")}
    for label in ("fp32 (reference)", "onnxruntime static (its defaults)", "outlierquant w8a8", "outlierquant default"):
        assert label in rows, (label, out)
    mean_cosine = {label: float(line.split("|")[2]) for label, line in rows.items() if label != "model" and "---" not in label}
    # the known baseline: onnxruntime's defaults collapse, plain w8a8 does not, the default recipe is best
    assert mean_cosine["onnxruntime static (its defaults)"] < 0.9
    assert 0.98 < mean_cosine["outlierquant w8a8"] < mean_cosine["outlierquant default"]
    assert (tmp_path / "outlierquant-default.report.json").is_file()


def test_recipes_lists_and_prints(capsys):
    code, out, err = run_cli(capsys, "recipes")
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines() if line.strip()]  # a table, then a legend
    assert {"default", "w8a8", "llm-int8", "quarot-w8a8"} <= set(names)
    code, out, err = run_cli(capsys, "recipes", "w8a8")
    assert code == 0 and out.startswith("name: w8a8")
    code, _, err = run_cli(capsys, "recipes", "nope")
    assert_one_line_error(code, err, "unknown recipe 'nope'")


def test_saved_stats_survive_canonicalize_on_a_tied_decoder(capsys, tmp_path, tiny_opt):
    """OPT ties lm_head to the embedding (MatMul(x, Transpose(E))); canonicalize folds that,
    which must not make statistics saved by `calibrate` unusable for `quantize`."""
    import synthetic

    feeds = synthetic.random_feeds(tiny_opt, 6, seq_lens=(8,))
    data = tmp_path / "feeds.npz"
    np.savez(data, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
    stats = tmp_path / "stats"
    code, _, err = run_cli(capsys, "-q", "calibrate", tiny_opt, "--calibration-data", data, "-o", stats)
    assert code == 0, err
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "-q", "quantize", tiny_opt, "-o", out, "--recipe", "w8a8", "--stats", stats)
    assert code == 0, err
    report = json.loads(out.with_name("q.report.json").read_text())
    assert report["passes"][0]["pass"] == "canonicalize" and report["passes"][0]["modified"]
    quantize = next(r for r in report["passes"] if r["pass"] == "quantize")  # onnxruntime-fuse comes last
    assert quantize["quantized_weights"] == 13  # the folded lm_head included


def test_quantize_reports_the_float_channel_share(capsys, tmp_path, planted_llama):
    """A splitting recipe says how much stays in float, on stderr and in the report."""
    import synthetic

    feeds = synthetic.random_feeds(planted_llama, 6, seq_lens=(8,))
    data = tmp_path / "feeds.npz"
    np.savez(data, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
    out = tmp_path / "q.onnx"
    # the default's split rotation and split, without its gate (the planted decoder's down
    # projections are not noisy enough to be rotated) or its smoothing (which absorbs the
    # planted channels)
    recipe = tmp_path / "split.yaml"
    recipe.write_text("name: split\npasses:\n  - canonicalize\n"
                      "  - online-hadamard: {groups: activation, outlier_ratio: 3.0, kernels: standard}\n"
                      "  - llm_int8: {criterion: relative, ratio: 3.0, activations: static,\n"
                      "               dynamic_matmuls: true, probs_residual: all}\n")
    code, _, err = run_cli(capsys, "-q", "quantize", planted_llama, "-o", out, "--recipe", recipe,
                           "--calibration-data", data)
    assert code == 0, err
    report = json.loads((tmp_path / "q.report.json").read_text())
    summary = report["float_channels"]
    rotation = next(record for record in report["passes"] if record["pass"] == "online-hadamard")
    assert 0 < summary["share"] < 0.5 and summary["float"] <= summary["of_inputs"]
    assert summary["in_rotation_side_paths"] == sum(g["float_channels"] for g in rotation["rotated"]) > 0
    assert f"{summary['share']:.2%} of the rewritten linears' input channels stay in float" in err
    assert f"online Hadamard rotation on {len(rotation['rotated'])} linear groups\n" in err
    layers = synthetic.TINY_LAYERS
    assert f"residual int8 attention probabilities in {layers} of {layers} probs x V MatMuls" in err
