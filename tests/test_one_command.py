"""One command from a Hugging Face folder to a folder optimum's ORTModelFor* classes load.

``outlierquant quantize -m HF_FOLDER OUTPUT_DIR`` (and the same under ``optimum-cli
outlierquant``) on tiny **synthetic** models (random weights, built from configs): a
sentence-transformers BERT folder (feature extraction) and a Llama (causal LM, exported
with its KV cache). Each output folder is loaded in its ``ORTModelFor*`` class and run;
the feature-extraction one also in sentence-transformers' ONNX backend. Then: the checks
that run before any work, the extras' one-line hints, the recipe table, the progress
display, ``--version`` and the help texts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from outlierquant.plugin import cli

pytest.importorskip("optimum.onnxruntime")

HIDDEN = 64


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("outlierquant: error: "), err
    return lines[0]


def _tokenizer(texts: list[str], input_names: tuple[str, ...]):
    """A word-level fast tokenizer over ``texts`` (synthetic; enough to feed the tiny models)."""
    import collections

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts = collections.Counter(w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower()))
    words = [word for word, _ in counts.most_common(990)]
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_input_names=list(input_names))


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> dict[str, Path]:
    from outlierquant.export.data import bundled_sentences, read_lines

    root = tmp_path_factory.mktemp("text")
    out = {}
    for split in ("calibration", "heldout"):
        out[split] = root / f"{split}.txt"
        out[split].write_text("\n".join(read_lines(bundled_sentences(split))[:40]) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, sentences) -> dict[str, Path]:
    """``feature-extraction``: a sentence-transformers folder (BERT + mean pooling);
    ``causal-lm``: a Llama folder with tokenizer and generation config. Synthetic weights."""
    import synthetic
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import BertConfig, BertModel

    from outlierquant.export.data import bundled_sentences, read_lines

    texts = read_lines(bundled_sentences("calibration")) + read_lines(bundled_sentences("heldout"))
    tokenizer = _tokenizer(texts, ("input_ids", "token_type_ids", "attention_mask"))
    root = tmp_path_factory.mktemp("hf")

    torch.manual_seed(0)
    bert_dir = root / "bert"
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=4 * HIDDEN, max_position_embeddings=128,
                                architectures=["BertModel"], pad_token_id=0), add_pooling_layer=False)
    bert.save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    transformer = st_models.Transformer(str(bert_dir), max_seq_length=64)
    pooling = st_models.Pooling(HIDDEN, pooling_mode="mean")
    st_dir = root / "minibert-st"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(st_dir))

    llama_dir = root / "llama"
    llama = synthetic.tiny_llama_model(0, vocab_size=len(tokenizer), bos_token_id=2, eos_token_id=3, pad_token_id=0)
    llama.generation_config.pad_token_id = 0
    llama.save_pretrained(llama_dir)
    _tokenizer(texts, ("input_ids", "attention_mask")).save_pretrained(llama_dir)
    return {"feature-extraction": st_dir, "causal-lm": llama_dir}


def optimum_cli(*argv) -> None:
    """Parse and run like optimum-cli's main(), with only our command registered."""
    from optimum.commands.base import RootOptimumCLICommand
    from optimum.commands.optimum_cli import register_optimum_cli_subcommand

    from outlierquant.plugin.optimum_command import OutlierQuantCommand

    root = RootOptimumCLICommand("Optimum CLI tool", usage="optimum-cli")
    register_optimum_cli_subcommand(OutlierQuantCommand, parent_command=root)
    args = root.parser.parse_args([str(a) for a in argv])
    args.func(args).run()


def _quantize(front_door: str, capsys, model: Path, out: Path, calibration: Path) -> str:
    argv = ("quantize", "-m", model, out, "--recipe", "w8a8", "--calibration-data", calibration, "-q")
    if front_door == "outlierquant":
        code, stdout, err = run_cli(capsys, *argv)
        assert code == 0, err
        return stdout
    optimum_cli("outlierquant", *argv)
    return capsys.readouterr().out


def _check_folder(out: Path, kind: str) -> dict:
    from optimum.onnxruntime.configuration import ORTConfig

    for name in ("model.onnx", "model.report.json", "ort_config.json", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging or temporary export left
    record = json.loads((out / "ort_config.json").read_text())["outlierquant"]
    assert record["recipe"] == "w8a8" and record["bits"] == "W8A8" and record["execution"] == "real"
    expected = {"feature-extraction": "ORTModelForFeatureExtraction", "causal-lm": "ORTModelForCausalLM"}[kind]
    assert record["ort_model_class"] == expected
    assert ORTConfig.from_pretrained(out).to_dict()["use_external_data_format"] is False
    report = json.loads((out / "model.report.json").read_text())
    assert report["deployment"]["ort_model_class"] == expected and report["calibration_samples"] > 0
    return record


@pytest.mark.parametrize("front_door", ["outlierquant", "optimum-cli"])
def test_feature_extraction_folder_loads_in_ortmodel_and_sentence_transformers(
        front_door, capsys, tmp_path, hf_folders, sentences):
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    source, out = hf_folders["feature-extraction"], tmp_path / "minibert-int8"
    stdout = _quantize(front_door, capsys, source, out, sentences["calibration"])
    assert str(out) in stdout
    record = _check_folder(out, "feature-extraction")
    assert record["outputs"] == ["last_hidden_state"]  # exported through transformers, not sentence_transformers
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()

    texts = ["The river froze early this winter.", "Quantization keeps the outliers in float."]
    model = ORTModelForFeatureExtraction.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    hidden = model(**tokenizer(texts, return_tensors="pt", padding=True)).last_hidden_state
    assert tuple(hidden.shape[::2]) == (2, HIDDEN) and np.isfinite(hidden.numpy()).all()

    quantized = SentenceTransformer(str(out), backend="onnx", device="cpu").encode(texts)
    reference = SentenceTransformer(str(source), device="cpu").encode(texts)  # the torch fp32 model
    cosine = (quantized * reference).sum(1) / np.linalg.norm(quantized, axis=1) / np.linalg.norm(reference, axis=1)
    assert quantized.shape == (2, HIDDEN) and cosine.min() > 0.9, cosine  # synthetic weights: a sanity bound


@pytest.mark.parametrize("front_door", ["outlierquant", "optimum-cli"])
def test_causal_lm_folder_loads_in_ortmodel_for_causal_lm_and_generates(
        front_door, capsys, tmp_path, hf_folders, sentences):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    out = tmp_path / "llama-int8"
    stdout = _quantize(front_door, capsys, hf_folders["causal-lm"], out, sentences["calibration"])
    assert str(out) in stdout
    record = _check_folder(out, "causal-lm")
    assert any(name.startswith("past_key_values") for name in record["inputs"])  # exported with its KV cache
    assert (out / "generation_config.json").is_file()

    model = ORTModelForCausalLM.from_pretrained(out)
    assert model.can_use_cache
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer(["the river froze"], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 6)


def test_file_form_and_optimum_quantize_spelling_still_work(capsys, tmp_path, tiny_bert):
    """``MODEL.onnx -o OUT.onnx`` writes the file and its report; ``--onnx_model DIR -o DIR`` a folder."""
    import synthetic

    feeds = synthetic.random_feeds(tiny_bert, 4, seq_lens=(8,))
    data = tmp_path / "feeds.npz"
    np.savez(data, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
    code, _, err = run_cli(capsys, "-q", "quantize", tiny_bert, "-o", tmp_path / "q.onnx", "--recipe", "w8a8",
                             "--calibration-data", data)
    assert code == 0, err
    assert (tmp_path / "q.onnx").is_file() and (tmp_path / "q.report.json").is_file()
    assert not (tmp_path / "ort_config.json").exists()
    code, out, err = run_cli(capsys, "-q", "quantize", "--onnx_model", tiny_bert.parent, "-o", tmp_path / "qdir",
                             "--recipe", "w8a8", "--calibration-data", data)
    assert code == 0, err
    assert out.splitlines()[0] == str(tmp_path / "qdir")
    assert (tmp_path / "qdir" / "model.onnx").is_file() and (tmp_path / "qdir" / "ort_config.json").is_file()


# -- checked before any work ---------------------------------------------------------------


def test_inputs_are_checked_before_any_work(capsys, tmp_path, tiny_bert, sentences, monkeypatch):
    import outlierquant.export.data as data_mod

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized before the inputs were checked")

    monkeypatch.setattr(data_mod, "load_tokenizer", no_tokenizing)
    monkeypatch.setattr(cli, "feeds_for_model", no_tokenizing)
    cal = sentences["calibration"]
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not gguf at all")
    text = tmp_path / "model.bin"
    text.write_bytes(b"\x00" * 16)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    cases = [
        (("quantize", "-m", empty, tmp_path / "o", "--calibration-data", cal), "a folder without model.onnx or config.json"),
        (("quantize", "-m", gguf, tmp_path / "o", "--calibration-data", cal), "not a GGUF file"),
        (("quantize", "-m", text, tmp_path / "o", "--calibration-data", cal), "not an .onnx or .gguf file"),
        (("quantize", "-m", tiny_bert, tmp_path / "o"), "needs --calibration-data"),
        (("quantize", "-m", tiny_bert, tmp_path / "o", "--calibration-data", tmp_path / "none.txt"), "none.txt: no such file"),
        (("quantize", "-m", tiny_bert, a_file, "--calibration-data", cal), "is not a folder"),
        (("quantize", "-m", tiny_bert, tiny_bert.parent, "--calibration-data", cal), "refusing to overwrite"),
        (("quantize", "-m", tiny_bert, tmp_path / "o", "--calibration-data", cal, "--task", "fill-mask"), "already ONNX"),
        (("quantize", "-m", tiny_bert, tmp_path / "o", "-o", tmp_path / "p", "--calibration-data", cal), "given twice"),
        (("quantize", "--calibration-data", cal), "needs a model"),
        (("quantize", "-m", tiny_bert, "--calibration-data", cal), "needs an output"),
        (("export", "-m", tiny_bert, tmp_path / "e"), "is already ONNX"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(capsys, *argv)
        assert needle in one_line_error(code, err), (argv, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_missing_extras_are_one_line_with_the_install_command(capsys, tmp_path, tiny_bert, sentences, monkeypatch):
    from outlierquant import errors

    real = errors._module_missing
    monkeypatch.setattr(errors, "_module_missing", lambda name: name in ("matplotlib", "torch") or real(name))
    code, _, err = run_cli(capsys, "analyze", tiny_bert, "--calibration-data", sentences["calibration"],
                           "-o", tmp_path / "report")
    assert one_line_error(code, err).endswith('pip install "outlierquant[report]"')
    code, _, err = run_cli(capsys, "quantize", "-m", tmp_path, tmp_path / "out", "--calibration-data",
                           sentences["calibration"])  # a folder without a model: says so first
    assert "without model.onnx" in one_line_error(code, err)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "quantize", "-m", hf, tmp_path / "out", "--calibration-data", sentences["calibration"])
    assert one_line_error(code, err).endswith('pip install "outlierquant[export]"')
    assert not (tmp_path / "out").exists() and not (tmp_path / "report").exists()

    def handler(args):
        raise ModuleNotFoundError("No module named 'gguf'", name="gguf")

    assert cli.run_handler(handler, cli.build_parser().parse_args(["recipes"])) == 2
    assert 'pip install "outlierquant[export]"' in capsys.readouterr().err


# -- recipes, progress, help ---------------------------------------------------------------


def test_recipes_table_and_full_description(capsys):
    code, out, err = run_cli(capsys, "recipes")
    assert code == 0, err
    header, _rule, *rows = out.splitlines()
    assert header.split() == ["name", "method", "(passes)", "bits", "runs", "as", "our", "kernels"]
    table = {row.split()[0]: row for row in rows if row.strip()}
    assert "W8A8" in table["w8a8"] and "real" in table["w8a8"]
    assert "simulated" in table["quarot-w4a4"] and "W4A4" in table["quarot-w4a4"]
    assert "if built" in table["llm-int8"] and "W4A16" in table["rtn-w4a16"]
    assert "W8A8 + float outliers" in table["default"] and "head" not in table["default"]
    # a head-only weight pass adds to the body's bits instead of replacing them
    from pathlib import Path

    from outlierquant.recipes import load_recipe as load
    from outlierquant.recipes.summary import summarize

    decode = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes" / "quantease-w4a16-head8-decode.yaml"
    assert summarize(load(str(decode))).bits == "W4A16 + W8 head"
    assert max(len(line) for line in out.splitlines()) < 200

    from outlierquant.recipes import load_recipe

    code, out, err = run_cli(capsys, "recipes", "default")
    assert code == 0 and out.startswith("name: default")
    assert out.startswith(load_recipe("default").to_yaml())  # the YAML as before, then its row
    assert "# bits: W8A8 + float outliers" in out and "# runs as: real" in out
    flat = " ".join(out.split())
    assert "0.998326; see the README." in flat  # the full description, not cut at 100 characters


def test_pass_display_and_calibration_bar(capsys, tiny_llama):
    import synthetic

    from outlierquant.modelio import load_model
    from outlierquant.pipeline import run_recipe
    from outlierquant.recipes import load_recipe

    feeds = synthetic.random_feeds(tiny_llama, 6, seq_lens=(8,))
    run_recipe(load_model(tiny_llama), load_recipe("smoothquant-w8a8"), feeds, progress=True)
    err = capsys.readouterr().err.replace("\r", "\n")  # the bar redraws its line with \r
    assert re.search(r"^\[1/4\] canonicalize\s+elapsed 0:00$", err, re.MULTILINE), err
    assert re.search(r"^\[2/4\] smoothquant\s+elapsed \d+:\d\d", err, re.MULTILINE)
    assert re.search(r"^\[3/4\] quantize\s+elapsed", err, re.MULTILINE)
    assert re.search(r"^\[4/4\] simplify-shapes\s+elapsed", err, re.MULTILINE)
    assert "calibrating" in err and "done: 4 passes in" in err
    run_recipe(load_model(tiny_llama), load_recipe("smoothquant-w8a8"), feeds, progress=False)
    assert capsys.readouterr().err == ""  # -q


def test_version_help_texts_and_examples(capsys):
    from outlierquant import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"outlierquant {__version__}"
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
        text = sub.format_help()
        assert "examples:" in text and text.rstrip().splitlines()[-1].strip().startswith(("outlierquant", "optimum-cli", "needs")), name
    code, out, _ = run_cli(capsys, "quantize", "--help")
    assert code == 0 and "-m MODEL OUTPUT_DIR" in out and "required unless --dataset or --stats" in out
