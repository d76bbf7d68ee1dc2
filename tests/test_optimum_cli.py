"""``optimum-cli outlierquant ...``: registration, in-process runs, one real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("optimum.commands.base")

from optimum.commands.base import RootOptimumCLICommand  # noqa: E402
from optimum.commands.optimum_cli import (  # noqa: E402
    load_optimum_namespace_cli_commands,
    register_optimum_cli_subcommand,
)

from outlierquant.plugin import cli  # noqa: E402
from outlierquant.plugin.optimum_command import OutlierQuantCommand  # noqa: E402


def optimum_cli(*argv) -> None:
    """Parse and run like optimum-cli's main(), with only our command registered."""
    root = RootOptimumCLICommand("Optimum CLI tool", usage="optimum-cli")
    register_optimum_cli_subcommand(OutlierQuantCommand, parent_command=root)
    args = root.parser.parse_args([str(a) for a in argv])
    args.func(args).run()


def test_register_file_is_found_on_the_namespace_path():
    import importlib.util

    spec = importlib.util.find_spec("optimum.commands.register")
    for location in spec.submodule_search_locations:
        assert not (Path(location) / "__init__.py").exists(), location  # PEP 420
    commands = [command for command, _ in load_optimum_namespace_cli_commands()]
    assert OutlierQuantCommand in commands


def test_subcommands_mirror_the_outlierquant_cli():
    names = [info.name for info in OutlierQuantCommand.SUBCOMMANDS]
    assert names == list(cli.SUBCOMMANDS)
    assert {"export", "analyze", "quantize", "validate"} <= set(names)


def test_register_module_import_is_light():
    code = (
        "import sys, optimum.commands.register.register_outlierquant as m; "
        "heavy = [x for x in ('torch', 'transformers', 'onnxruntime', 'onnx_ir', 'matplotlib') if x in sys.modules]; "
        "print(heavy); assert not heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_bare_command_prints_help(capsys):
    optimum_cli("outlierquant")
    out = capsys.readouterr().out
    assert "analyze" in out and "quantize" in out


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        optimum_cli("outlierquant", "quantize", tmp_path / "missing.onnx", "-o", tmp_path / "q.onnx",
                    "--calibration-data", tmp_path / "cal.txt", "--recipe", "w8a8")
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("outlierquant: error: ") and "missing.onnx" in lines[0]
    with pytest.raises(SystemExit) as info:
        optimum_cli("outlierquant", "quantize", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--recipe", "nope")
    assert info.value.code == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def calibration_txt(tmp_path_factory) -> Path:
    from outlierquant.export.data import bundled_sentences, read_lines

    path = tmp_path_factory.mktemp("data") / "cal.txt"
    path.write_text("\n".join(read_lines(bundled_sentences("calibration"))[:12]) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_quantize_in_process_on_minilm(capsys, tmp_path, minilm_onnx, calibration_txt):
    out = tmp_path / "q.onnx"
    optimum_cli("outlierquant", "quantize", minilm_onnx, "-o", out, "--recipe", "w8a8",
                "--calibration-data", calibration_txt, "-q")
    assert out.is_file() and (tmp_path / "q.report.json").is_file()
    assert str(out) in capsys.readouterr().out


def _optimum_cli_executable() -> str | None:
    beside = Path(sys.executable).parent / "optimum-cli"
    return str(beside) if beside.is_file() else shutil.which("optimum-cli")


@pytest.mark.slow
def test_real_optimum_cli_subprocess(tmp_path, minilm_onnx, calibration_txt):
    executable = _optimum_cli_executable()
    if executable is None:
        pytest.skip("optimum-cli is not installed in this environment")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CI": "1"}
    shown = subprocess.run([executable, "outlierquant", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "analyze" in shown.stdout and "export" in shown.stdout

    stats = tmp_path / "stats"
    done = subprocess.run(
        [executable, "outlierquant", "calibrate", str(minilm_onnx), "--calibration-data", str(calibration_txt),
         "-o", str(stats), "--limit", "6"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "stats.npz").is_file() and (tmp_path / "stats.json").is_file()
    assert "stats.npz" in done.stdout
