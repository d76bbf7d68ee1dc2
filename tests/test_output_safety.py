"""Outputs appear whole or not at all, never over an input, and the same inputs give the same bytes.

Kills are placed exactly: a small driver patches :class:`OutputUnit` in a child process to
signal itself before the commit (everything written, nothing renamed) or between two
renames of the commit (the journal written, one file in place).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from malformed import digest_tree, external_model, good_feeds, good_model

from outlierquant.errors import InputError, OutlierQuantError
from outlierquant.outputs import OutputUnit, recover_stale_outputs, save_model
from outlierquant.plugin.cli import main

DRIVER = r"""
import os, signal, sys
from outlierquant import outputs
from outlierquant.plugin.cli import main

point, signum = sys.argv[1], int(sys.argv[2])
commit = outputs.OutputUnit.commit

def patched(self):
    if point == "before-commit":
        os.kill(os.getpid(), signum)
        return commit(self)
    replace, calls = os.replace, []
    def counting(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return replace(src, dst)
    os.replace = counting
    try:
        return commit(self)
    finally:
        os.replace = replace

outputs.OutputUnit.commit = patched
sys.exit(main(sys.argv[3:]))
"""


def _driver(point: str, signum: int, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, point, str(int(signum)), "-q", *map(str, argv)],
                          capture_output=True, text=True, timeout=300)


def _quantize_argv(folder: Path) -> list:
    model, feeds = good_model(folder), good_feeds(folder)
    return ["quantize", model, "-o", folder / "out" / "q.onnx", "--recipe", "w8a8", "--calibration-data", feeds]


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []


def _consistent(out: Path) -> None:
    """The model loads and is the one its report describes."""
    model, report = out / "q.onnx", out / "q.report.json"
    onnx.checker.check_model(str(model))
    data = json.loads(report.read_text())
    assert data["size_bytes"]["output"] == model.stat().st_size


def test_sigkill_before_the_commit_leaves_no_output_and_the_next_run_cleans_up(capfd, tmp_path):
    argv = _quantize_argv(tmp_path)
    done = _driver("before-commit", signal.SIGKILL, *argv)
    assert done.returncode == -signal.SIGKILL
    out = tmp_path / "out"
    assert not (out / "q.onnx").exists() and not (out / "q.report.json").exists()
    assert len(_temps(out)) == 1  # a private folder nobody can remove for a killed process
    assert main(["-q", *map(str, argv)]) == 0
    capfd.readouterr()
    assert _temps(out) == []
    _consistent(out)


def test_sigkill_inside_the_commit_is_completed_by_the_next_unit(tmp_path):
    argv = _quantize_argv(tmp_path)
    out = tmp_path / "out"
    done = _driver("mid-commit", signal.SIGKILL, *argv)
    assert done.returncode == -signal.SIGKILL
    assert (out / "q.report.json").exists() and not (out / "q.onnx").exists()
    recover_stale_outputs(out)
    assert _temps(out) == []
    _consistent(out)


@pytest.mark.parametrize("point", ["before-commit", "mid-commit"])
def test_sigterm_removes_the_temporaries(tmp_path, point):
    argv = _quantize_argv(tmp_path)
    out = tmp_path / "out"
    done = _driver(point, signal.SIGTERM, *argv)
    assert done.returncode == 128 + signal.SIGTERM
    assert done.stderr.strip() == "outlierquant: terminated"
    assert _temps(out) == []
    if point == "before-commit":  # nothing was renamed: nothing is there, not even the folder
        assert not out.exists()
    else:  # the signal waited for the renames
        assert sorted(p.name for p in out.iterdir()) == ["q.onnx", "q.report.json"], done.stderr
        _consistent(out)


@pytest.mark.parametrize("command", ["quantize", "calibrate"])
def test_two_concurrent_writers_to_one_path(tmp_path, command):
    model, feeds = good_model(tmp_path), good_feeds(tmp_path)
    target = tmp_path / "out" / ("q.onnx" if command == "quantize" else "stats")
    argv = [sys.executable, "-m", "outlierquant.plugin.cli", "-q", command, str(model), "-o", str(target),
            "--calibration-data", str(feeds)]
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    assert _temps(tmp_path / "out") == []
    if command == "quantize":
        _consistent(tmp_path / "out")
    else:
        from outlierquant.calibration.stats import ActivationStats

        assert len(ActivationStats.load(target)) > 0


def test_a_live_processes_temporaries_are_left_alone(capfd, tmp_path):
    argv = _quantize_argv(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    live = out / f".q.onnx.tmp-{os.getpid()}-0123abcd"
    live.mkdir()
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = out / f".q.onnx.tmp-{dead_pid}-0123abcd"
    dead.mkdir()
    (dead / "q.onnx").write_bytes(b"half a model")
    assert main(["-q", *map(str, argv)]) == 0
    capfd.readouterr()
    assert live.is_dir() and not dead.exists()


def test_outputs_take_the_umask(capfd, tmp_path):
    argv = _quantize_argv(tmp_path)
    old = os.umask(0o007)
    try:
        assert main(["-q", *map(str, argv)]) == 0
    finally:
        os.umask(old)
    capfd.readouterr()
    for name in ("q.onnx", "q.report.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o660, name


def test_same_inputs_give_byte_identical_models(capfd, tmp_path):
    model, feeds = good_model(tmp_path), good_feeds(tmp_path)
    for recipe in ("w8a8", "default"):
        outputs = []
        for run in ("a", "b"):
            out = tmp_path / run / f"{recipe}.onnx"
            code = main(["-q", "quantize", str(model), "-o", str(out), "--recipe", recipe, "--calibration-data", str(feeds)])
            assert code == 0, capfd.readouterr().err
            outputs.append(out.read_bytes())
        assert outputs[0] == outputs[1], recipe
    capfd.readouterr()


def test_external_data_output_is_one_unit(tmp_path):
    """Model and data file renamed together; an old data file of another name is not touched."""
    import onnx_ir as ir


    model = ir.load(external_model(tmp_path / "in"))
    out = tmp_path / "out" / "m.onnx"
    save_model(model, out, external_data=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert ir.load(out).graph.initializers["w1"].const_value.numpy().shape == (16, 16)


def test_failed_unit_removes_what_it_created(tmp_path):
    target = tmp_path / "new" / "deeper"
    with pytest.raises(RuntimeError):
        with OutputUnit(target, primary="x.json") as unit:
            unit.path("x.json").write_text("{}")
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()


def test_api_raises_outlierquant_errors(tmp_path):
    import malformed

    from outlierquant.plugin.api import OutlierQuantizer

    with pytest.raises(InputError, match="model.onnx"):
        OutlierQuantizer(malformed.MODELS["cycle"](tmp_path / "cycle"))
    model = malformed.MODELS["wrong-weight-shape"](tmp_path / "shape")
    quantizer = OutlierQuantizer(model)
    feeds = good_feeds(tmp_path)
    before = digest_tree(tmp_path)
    with pytest.raises(OutlierQuantError, match="model.onnx"):
        quantizer.quantize("w8a8", feeds, tmp_path / "q")
    with pytest.raises(InputError, match="limit"):
        quantizer.feeds(feeds, limit=-1)
    assert digest_tree(tmp_path) == before


def test_streamed_inline_save_parses_to_the_same_model(tmp_path, monkeypatch):
    """save_inline writes large initializers one at a time as merged graph fields; every
    parser must read the model ir.save would have written, initializer order included."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from outlierquant import outputs

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w_big", (64, 32)), ("b_small", (32,)), ("w_big2", (32, 16)))]
    # integer and half tensors take the same raw-bytes path, a string tensor onnx-ir's serializer
    inits += [numpy_helper.from_array(rng.integers(-127, 128, (64, 32)).astype(np.int8), "codes"),
              numpy_helper.from_array(rng.standard_normal((40, 16)).astype(np.float16), "half"),
              numpy_helper.from_array(np.array(["a" * 700, "b" * 700], dtype=object), "words")]
    inits[0].doc_string = "kept with the streamed bytes"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_big"], ["h"]), helper.make_node("Add", ["h", "b_small"], ["h2"]),
         helper.make_node("MatMul", ["h2", "w_big2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 16])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    # a tensor may carry a name other than its value's (a pass renamed the value): the file has the value's
    renamed = model.graph.initializers["w_big2"]
    renamed.const_value = ir.tensor(renamed.const_value.numpy(), name="stale_name")
    original = model.graph.initializers["w_big"].const_value
    monkeypatch.setattr(outputs, "STREAM_MIN_BYTES", 1024)  # the two weights streamed, the bias not
    path = tmp_path / "m.onnx"
    outputs.save_inline(model, path)
    expected = ir.to_proto(model).SerializeToString()  # after: to_proto renames a tensor to its value
    assert path.read_bytes() != expected  # really written in pieces
    assert onnx.load(str(path)).SerializeToString() == expected
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, (x @ numpy_helper.to_array(inits[0]) + numpy_helper.to_array(inits[1]))
                               @ numpy_helper.to_array(inits[2]), rtol=1e-5, atol=1e-5)
    assert model.graph.initializers["w_big"].const_value is original  # the model is left as it was
