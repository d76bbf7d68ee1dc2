"""Export hygiene (issue 17, item 4): tied embeddings stay stored once through export,
canonicalization and a recipe that leaves the lm_head in float; a broken tokenizer is
reported after a GGUF export. Tiny synthetic models only (random weights)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import synthetic
from onnx import numpy_helper

from outlierquant.export.hf import check_tokenizer, tie_duplicate_weights
from outlierquant.pipeline import run_recipe
from outlierquant.recipes import Recipe

TABLE = synthetic.TINY_VOCAB * synthetic.TINY_HIDDEN


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A tiny Llama whose lm_head shares the embedding table, and its torch model."""
    model = synthetic.tiny_llama_model(seed=3, tie_word_embeddings=True)
    path = synthetic._save_and_export(model, tmp_path_factory.mktemp("tied-llama"))
    return path, model


def _tables(path) -> list[str]:
    """Initializers as large as the embedding table (in either layout)."""
    return [init.name for init in onnx.load(str(path)).graph.initializer if int(np.prod(init.dims)) == TABLE]


def _outputs(path_or_bytes, feeds):
    session = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def test_tied_export_stores_the_table_once_and_matches_torch(tied_llama):
    import torch

    path, model = tied_llama
    assert len(_tables(path)) == 1
    feeds = synthetic.random_feeds(path, 2)
    with torch.no_grad():
        for feed, (logits, *_rest) in zip(feeds, _outputs(str(path), feeds)):
            expected = model(input_ids=torch.from_numpy(feed["input_ids"]),
                             attention_mask=torch.from_numpy(feed["attention_mask"])).logits.numpy()
            np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def _untie(path, out):
    """The export as optimum writes it when it skips tying (Gemma 3): lm_head's MatMul reads
    a second initializer holding the table's transpose."""
    model = onnx.load(str(path))
    graph = model.graph
    transpose = next(n for n in graph.node if n.op_type == "Transpose" and n.input[0] in _tables(path))
    table = next(i for i in graph.initializer if i.name == transpose.input[0])
    copy = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(table).T), "onnx::MatMul_copy")
    graph.initializer.append(copy)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == transpose.output[0]:
                node.input[i] = copy.name
    graph.node.remove(transpose)
    onnx.save(model, str(out))
    return out


def test_duplicate_table_is_tied_again_bit_for_bit(tied_llama, tmp_path):
    path, _ = tied_llama
    untied = _untie(path, tmp_path / "model.onnx")
    assert len(_tables(untied)) == 2
    feeds = synthetic.random_feeds(path, 3)
    before = _outputs(str(untied), feeds)
    size = untied.stat().st_size
    assert tie_duplicate_weights(untied) == 1
    assert len(_tables(untied)) == 1
    assert untied.stat().st_size < size - TABLE * 4 * 0.9
    for a, b in zip(before, _outputs(str(untied), feeds)):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert tie_duplicate_weights(untied) == 0  # idempotent


def test_different_weight_is_not_tied(tied_llama, tmp_path):
    path, _ = tied_llama
    untied = _untie(path, tmp_path / "model.onnx")
    model = onnx.load(str(untied))
    copy = next(i for i in model.graph.initializer if i.name == "onnx::MatMul_copy")
    array = numpy_helper.to_array(copy).copy()
    array[0, 0] += 1e-3  # one element differs: not a tied weight
    copy.CopyFrom(numpy_helper.from_array(array, copy.name))
    onnx.save(model, str(untied))
    assert tie_duplicate_weights(untied) == 0
    assert len(_tables(untied)) == 2


def _run(path, passes, tmp_path):
    from outlierquant.modelio import load_model

    model = load_model(path)
    records = run_recipe(model, Recipe.from_dict({"name": "t", "passes": passes}), None, progress=False)
    out = tmp_path / "out.onnx"
    onnx.save(__import__("onnx_ir").serde.serialize_model(model), str(out))
    return out, records


def test_canonicalize_then_tie_weights_keeps_one_copy(tied_llama, tmp_path):
    path, _ = tied_llama
    out, records = _run(path, ["canonicalize"], tmp_path)
    assert len(_tables(out)) == 2  # untied for the passes, and the record says so
    assert records[0]["tied_weights_untied"]
    out, records = _run(path, ["canonicalize", "tie-weights"], tmp_path)
    assert len(_tables(out)) == 1
    assert records[1]["retied"] and records[1]["modified"]
    feeds = synthetic.random_feeds(path, 3)
    for a, b in zip(_outputs(str(path), feeds), _outputs(str(out), feeds)):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_tie_weights_leaves_a_rewritten_lm_head_untied(tied_llama, tmp_path):
    from outlierquant.graph.tied import retie_transposed_weights
    from outlierquant.modelio import load_model

    path, _ = tied_llama
    model = load_model(path)
    run_recipe(model, Recipe.from_dict({"name": "t", "passes": ["canonicalize"]}), None, progress=False)
    graph = model.graph
    head = next(v for v in graph.initializers.values() if "outlierquant.tied_transpose_of" in v.metadata_props)
    import onnx_ir as ir

    head.const_value = ir.tensor(head.const_value.numpy() * 2.0)  # as a smoothing pass would
    result = retie_transposed_weights(graph)
    assert not result["retied"] and "differs" in result["untied"][0]


def test_gguf_style_tokenizer_check(caplog):
    """A character-level tokenizer (a vocabulary of single bytes, no merges) is flagged with
    the measured ratio; a trained BPE is not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    chars = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    chars.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    chars.decoder = decoders.ByteLevel()
    broken = PreTrainedTokenizerFast(tokenizer_object=chars)
    with caplog.at_level(logging.WARNING, logger="outlierquant.export.hf"):
        result = check_tokenizer(broken, "chars.gguf")
    assert result["round_trip"] and result["broken"] and result["tokens_per_word"] > 4
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "chars.gguf" in lines[0] and f"{result['tokens_per_word']:.2f} tokens per word" in lines[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="outlierquant.export.hf"):
        good = check_tokenizer(synthetic.tiny_tokenizer(4000), "bpe.gguf")
    assert not good["broken"] and good["tokens_per_word"] < 3 and not caplog.records


def test_tokenizer_check_flags_a_lossy_round_trip(caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    lossy = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    with caplog.at_level(logging.WARNING, logger="outlierquant.export.hf"):
        result = check_tokenizer(lossy, "lossy.gguf")
    assert result["broken"] and not result["round_trip"]
    assert "decode(encode(text)) differs" in caplog.records[-1].getMessage()


def test_sentencepiece_vocabulary_read_as_unigram_is_rebuilt_as_bpe():
    """A BPE vocabulary's scores are minus merge ranks, so a Unigram model over them prefers
    short pieces ("capital" in four fragments); the rebuilt BPE merges them as llama.cpp does."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from outlierquant.export.gguf_tokenizer import spm_bpe_tokenizer

    pieces = [("<unk>", 0.0), ("<0x41>", 0.0)] + [(c, -100.0 - i) for i, c in enumerate("▁capitl")]
    pieces += [("▁c", -20.0), ("ap", -21.0), ("it", -22.0), ("al", -23.0), ("▁cap", -60.0), ("ital", -61.0),
               ("▁capital", -1000.0)]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    unigram.normalizer = normalizers.Replace(" ", "▁")
    fast = PreTrainedTokenizerFast(tokenizer_object=unigram, unk_token="<unk>")
    assert fast.tokenize(" capital") == ["▁c", "ap", "it", "al"]
    fast._tokenizer = spm_bpe_tokenizer(fast)
    assert fast.tokenize(" capital") == ["▁capital"]
    assert fast.tokenize(" cat") == ["▁c", "a", "t"]


def test_gguf_tokenizer_kind_reads_the_header_only(tmp_path):
    import gguf

    from outlierquant.export.gguf_tokenizer import gguf_tokenizer_kind

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("test.words", ["a", "bb", "ccc"])  # variable-size values before the key
    writer.add_array("test.numbers", [1, 2, 3])
    writer.add_uint32("test.count", 7)
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_tokenizer_kind(path) == "llama"
    assert gguf_tokenizer_kind(path) == gguf.GGUFReader(str(path)).fields["tokenizer.ggml.model"].contents()
    (tmp_path / "other.bin").write_bytes(b"not a gguf file")
    assert gguf_tokenizer_kind(tmp_path / "other.bin") is None
