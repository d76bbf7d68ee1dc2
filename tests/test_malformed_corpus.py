"""The malformed-input corpus (tests/malformed.py) through every command.

Each case asserts the CLI's promise: exit code 2, exactly one line on stderr (at the file
descriptor, so onnxruntime's own logging counts too) naming the file at fault, no file
left behind, and every input byte-identical (the case folder is hashed before and after).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import malformed
from malformed import ARGUMENTS, DATA, MODEL_COMMANDS, MODELS, RECIPES, digest_tree, external_model, good_feeds, good_model

from outlierquant.plugin.cli import main

COMMANDS = ("quantize", "calibrate", "analyze", "validate")


@pytest.fixture(autouse=True)
def _small_npz_cap(monkeypatch):
    monkeypatch.setenv("OUTLIERQUANT_NPZ_MAX_BYTES", str(malformed.NPZ_CAP))


def argv_for(command: str, model: Path, data: Path, out: Path, *, reference: Path | None = None,
             recipe: str = "w8a8") -> list:
    if command == "quantize":
        return ["quantize", model, "-o", out / "q.onnx", "--recipe", recipe, "--calibration-data", data]
    if command == "calibrate":
        return ["calibrate", model, "-o", out / "stats", "--calibration-data", data]
    if command == "analyze":
        return ["analyze", model, "-o", out / "report", "--calibration-data", data, "--sensitivity-layers", "0"]
    return ["validate", reference, model, "--data", data, "--json", out / "v.json", "--latency-runs", "0",
            "--kernels", "none"]


def assert_refused(capfd, folder: Path, argv: list, *needles: str) -> str:
    """Run the CLI in-process; exit 2, one stderr line holding ``needles``, ``folder`` unchanged."""
    before = digest_tree(folder)
    code = main(["-q", *map(str, argv)])
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}\n{err}"
    assert len(lines) == 1, err
    assert lines[0].startswith("outlierquant: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert digest_tree(folder) == before, "the command left, changed or removed files"
    return lines[0]


@pytest.fixture
def case(tmp_path) -> Path:
    """A folder holding a valid reference model and valid feeds beside the case's inputs."""
    folder = tmp_path / "case"
    folder.mkdir()
    good_model(folder / "ref")
    good_feeds(folder)
    return folder


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    "name, command",
    [(name, command) for name in sorted(MODELS) for command in COMMANDS if command in MODEL_COMMANDS.get(name, COMMANDS)],
)
def test_bad_model(capfd, case, command, name):
    model = MODELS[name](case / "bad")
    argv = argv_for(command, model, case / "feeds.npz", case / "out", reference=case / "ref" / "model.onnx")
    line = assert_refused(capfd, case, argv)
    assert "model.onnx" in line or "absent.onnx" in line or "export" in line, line


def test_missing_attribute_is_refused_at_load_even_with_nothing_to_calibrate(case):
    """Found by the fuzzer: a MatMul mutated into a Concat (no axis) left no linear to
    calibrate, so no onnxruntime session ever saw the node and simplify-shapes crashed on
    it. The model is now refused when it is read, naming the node and the attribute."""
    from outlierquant.errors import InputError
    from outlierquant.modelio import load_model

    with pytest.raises(InputError, match=r"'fc1' \(Concat\) lacks its required attribute 'axis'"):
        load_model(MODELS["missing-required-attribute"](case / "bad"))


def test_bad_model_as_validate_reference(capfd, case):
    for name in ("cycle", "ext-missing", "short-raw-data", "nan-weights"):
        model = MODELS[name](case / name)
        argv = ["validate", model, case / "ref" / "model.onnx", "--data", case / "feeds.npz", "--latency-runs", "0"]
        assert_refused(capfd, case, argv, str(model.parent.name))


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", sorted(DATA))
def test_bad_data(capfd, case, command, name):
    data = DATA[name](case / "data")
    argv = argv_for(command, case / "ref" / "model.onnx", data, case / "out", reference=case / "ref" / "model.onnx")
    needle = "tiny" if name == "text-without-tokenizer" else data.name
    assert_refused(capfd, case, argv, needle if name != "text-without-tokenizer" else "model.onnx")


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_bad_recipe(capfd, case, name):
    recipe = case / "recipe.yaml"
    if RECIPES[name] is not None:
        recipe.write_text(RECIPES[name], encoding="utf-8")
    argv = argv_for("quantize", case / "ref" / "model.onnx", case / "feeds.npz", case / "out", recipe=str(recipe))
    assert_refused(capfd, case, argv, "recipe.yaml")


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "command, name, extra",
    [(command, name, extra) for command, cases in ARGUMENTS.items() for name, extra in cases],
    ids=[f"{command}-{name}" for command, cases in ARGUMENTS.items() for name, _ in cases],
)
def test_bad_argument(capfd, case, command, name, extra):
    argv = argv_for(command, case / "ref" / "model.onnx", case / "feeds.npz", case / "out",
                    reference=case / "ref" / "model.onnx")
    assert_refused(capfd, case, [*argv, *extra], extra[0])


# --------------------------------------------------------------------------- outputs


OUTPUT_CASES = (
    "quantize-over-the-model", "quantize-over-a-symlink-to-the-model", "quantize-over-a-hard-link-to-the-model",
    "quantize-over-the-inputs-external-data", "quantize-into-an-existing-folder", "quantize-under-a-file",
    "quantize-not-onnx", "calibrate-over-the-data", "calibrate-over-a-hard-link-to-the-data",
    "calibrate-under-a-file", "validate-json-over-the-reference", "validate-json-over-the-data",
    "validate-json-over-a-symlink-to-the-data", "validate-json-into-an-existing-folder", "analyze-into-a-file",
    "analyze-into-the-model", "analyze-under-a-file",
)


def _output_cases(folder: Path) -> dict[str, tuple[list, str]]:
    """name -> (argv, needle): each output is an input, or a path no file can be written at."""
    model = good_model(folder / "m")
    feeds = good_feeds(folder)
    ext = external_model(folder / "ext", data="q.onnx.data")
    (folder / "links").mkdir()
    os.symlink(model, folder / "links" / "symlink.onnx")
    os.link(model, folder / "links" / "hardlink.onnx")
    os.symlink(feeds, folder / "links" / "feeds-link.json")
    os.link(feeds, folder / "links" / "calib.npz")
    (folder / "existing-folder.onnx").mkdir()
    (folder / "a-file").write_text("not a folder")
    q = ["--calibration-data", feeds]
    cases = [
        ("quantize-over-the-model", ["quantize", model, "-o", model, *q], "model.onnx"),
        ("quantize-over-a-symlink-to-the-model", ["quantize", model, "-o", folder / "links" / "symlink.onnx", *q],
         "symlink.onnx"),
        ("quantize-over-a-hard-link-to-the-model", ["quantize", model, "-o", folder / "links" / "hardlink.onnx", *q],
         "hardlink.onnx"),
        ("quantize-over-the-inputs-external-data", ["quantize", ext, "-o", folder / "ext" / "q.onnx", *q],
         "q.onnx.data"),
        ("quantize-into-an-existing-folder", ["quantize", model, "-o", folder / "existing-folder.onnx", *q],
         "existing-folder.onnx"),
        ("quantize-under-a-file", ["quantize", model, "-o", folder / "a-file" / "q.onnx", *q], "a-file"),
        ("quantize-not-onnx", ["quantize", model, "-o", folder / "q.txt", *q], "q.txt"),
        ("calibrate-over-the-data", ["calibrate", model, "-o", folder / "feeds", *q], "feeds.npz"),
        ("calibrate-over-a-hard-link-to-the-data", ["calibrate", model, "-o", folder / "links" / "calib", *q],
         "calib.npz"),
        ("calibrate-under-a-file", ["calibrate", model, "-o", folder / "a-file" / "stats", *q], "a-file"),
        ("validate-json-over-the-reference", ["validate", model, model, "--data", feeds, "--json", model],
         "model.onnx"),
        ("validate-json-over-the-data", ["validate", model, model, "--data", feeds, "--json", feeds], "feeds.npz"),
        ("validate-json-over-a-symlink-to-the-data",
         ["validate", model, model, "--data", feeds, "--json", folder / "links" / "feeds-link.json"], "feeds-link"),
        ("validate-json-into-an-existing-folder",
         ["validate", model, model, "--data", feeds, "--json", folder / "existing-folder.onnx"], "existing-folder"),
        ("analyze-into-a-file", ["analyze", model, "-o", folder / "a-file", *q], "a-file"),
        ("analyze-into-the-model", ["analyze", model, "-o", model, *q], "model.onnx"),
        ("analyze-under-a-file", ["analyze", model, "-o", folder / "a-file" / "report", *q], "a-file"),
    ]
    return {name: (argv, needle) for name, argv, needle in cases}


@pytest.mark.parametrize("name", OUTPUT_CASES)
def test_bad_output(capfd, tmp_path, name):
    cases = _output_cases(tmp_path)
    assert sorted(cases) == sorted(OUTPUT_CASES)
    argv, needle = cases[name]
    assert_refused(capfd, tmp_path, argv, needle)


def test_quantize_leaves_an_old_data_file_alone(capfd, tmp_path):
    """A q.onnx.data beside the output that the new, inline q.onnx does not need is kept."""
    model, feeds = good_model(tmp_path), good_feeds(tmp_path)
    stale = tmp_path / "q.onnx.data"
    stale.write_bytes(b"someone's bytes")
    assert main(["-q", "quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration-data", str(feeds)]) == 0
    assert stale.read_bytes() == b"someone's bytes"


# --------------------------------------------------------------------------- the file system


def _mount_tmpfs(folder: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def _umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 kB tmpfs: room for the inputs of no model, so every write fails with ENOSPC."""
    folder = tmp_path / "small"
    if not _mount_tmpfs(folder, "size=64k"):
        pytest.skip("a full disk needs a small tmpfs, which needs root and mount(8)")
    yield folder
    _umount(folder)


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    if _mount_tmpfs(folder, "ro,size=64k"):
        yield folder
        _umount(folder)
        return
    if os.geteuid() == 0:
        pytest.skip("as root a chmod'ed folder is writable, and mount(8) failed")
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("command", COMMANDS)
def test_full_disk(capfd, case, small_disk, command):
    big = good_model(case / "big", hidden=256)
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:  # leave a few kB: the outputs start, then run out
        try:
            handle.write(bytes(60 * 1024))
        except OSError:
            pass
    argv = argv_for(command, big, case / "feeds.npz", small_disk / "out", reference=big)
    before = digest_tree(small_disk)
    assert_refused(capfd, case, argv, str(small_disk))
    assert digest_tree(small_disk) == before, "a partial output was left on the full disk"


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_folder(capfd, case, read_only_folder, command):
    argv = argv_for(command, case / "ref" / "model.onnx", case / "feeds.npz", read_only_folder / "out",
                    reference=case / "ref" / "model.onnx")
    assert_refused(capfd, case, argv, str(read_only_folder))
    assert not list(read_only_folder.iterdir())


# --------------------------------------------------------------------------- a real process


def test_one_line_in_a_real_process(tmp_path):
    """onnxruntime logs at the file descriptor and onnx_ir through logging: neither may show."""
    folder = tmp_path / "p"
    model = MODELS["unknown-custom-op"](folder)
    feeds = good_feeds(folder)
    exe = Path(sys.executable).with_name("outlierquant")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "outlierquant.plugin.cli"]
    before = digest_tree(folder)
    done = subprocess.run(command + ["quantize", str(model), "-o", str(folder / "q.onnx"), "--calibration-data",
                                     str(feeds)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "model.onnx" in done.stderr
    assert digest_tree(folder) == before
    debug = subprocess.run(command + ["--debug", "quantize", str(model), "-o", str(folder / "q.onnx"),
                                      "--calibration-data", str(feeds)], capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_corpus_counts():
    """The corpus this file runs, per command (printed with -s; the issue asks for them)."""
    per_command = {command: len(DATA) + len(ARGUMENTS[command]) for command in COMMANDS}
    for name in MODELS:
        for command in MODEL_COMMANDS.get(name, COMMANDS):
            per_command[command] += 1
    per_command["quantize"] += len(RECIPES)
    per_command["validate"] += 4
    for name in OUTPUT_CASES:
        per_command[name.split("-")[0]] += 1
    for command in COMMANDS:
        per_command[command] += 2  # a full disk, a read-only folder
    per_command["export"] = len(EXPORTS)
    print(per_command)
    assert all(count > 40 for command, count in per_command.items() if command != "export")


# --------------------------------------------------------------------------- export


def _not_gguf(folder: Path) -> str:
    (folder / "model.gguf").write_bytes(b"not a gguf file at all")
    return str(folder / "model.gguf")


def _config_without_model_type(folder: Path) -> str:
    (folder / "hf").mkdir()
    (folder / "hf" / "config.json").write_text("{}")
    return str(folder / "hf")


def _folder_without_config(folder: Path) -> str:
    (folder / "empty-hf").mkdir()
    return str(folder / "empty-hf")


def _text_file(folder: Path) -> str:
    (folder / "weights.bin").write_bytes(b"\x00" * 64)
    return str(folder / "weights.bin")


#: name -> builder(folder) -> the export source; none may leave the output folder behind
EXPORTS = {
    "not-a-gguf": _not_gguf,
    "config-without-model-type": _config_without_model_type,
    "folder-without-config": _folder_without_config,
    "neither-folder-nor-gguf": _text_file,
    "missing-gguf": lambda folder: str(folder / "absent.gguf"),
    "offline-hub-id": lambda folder: "no-such-org/no-such-model",
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_bad_export(capfd, tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = EXPORTS[name](tmp_path)
    assert_refused(capfd, tmp_path, ["export", source, "-o", tmp_path / "out" / "deeper"])
