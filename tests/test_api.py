"""The Python API: recipes built in code, OutlierQuantizer on the real MiniLM export."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from outlierquant.emit.qdq import QuantConfig
from outlierquant.errors import InputError, RecipeError
from outlierquant.plugin.api import OutlierQuantizer, make_recipe
from outlierquant.recipes import PassSpec, Recipe, load_recipe


def test_recipe_from_typed_configs_round_trips_through_yaml():

    recipe = make_recipe(
        "per-token",
        "canonicalize",
        ("quantize", QuantConfig(activations="per_token", dynamic_matmuls=False, exclude_nodes=("lm_head",))),
        description="built in code",
    )
    # only the fields that differ from the defaults are recorded
    assert recipe.passes[1].options_dict() == {
        "activations": "per_token",
        "dynamic_matmuls": False,
        "exclude_nodes": ("lm_head",),
    }
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_recipe_from_typed_configs_matches_the_builtin_yaml(tmp_path):

    builtin = load_recipe("w8a8")
    built = make_recipe(
        "w8a8",
        "canonicalize",
        ("quantize", QuantConfig(activations="static", activation_type="uint8", dynamic_matmuls=True)),
        "onnxruntime-fuse",
        description=builtin.description,
    )
    # the YAML spells out defaults, make_recipe records only changes: the configs are equal
    from outlierquant.recipes import instantiate

    def configs(recipe):
        return [(spec.name, getattr(instantiate(spec), "config", None)) for spec in recipe.passes]

    assert configs(built) == configs(builtin)
    path = tmp_path / "mine.yaml"
    path.write_text(built.to_yaml(), encoding="utf-8")
    assert load_recipe(path) == built


def test_make_recipe_accepts_dicts_and_pass_specs():
    recipe = make_recipe("x", PassSpec("canonicalize"), ("quantize", {"activations": "none"}))
    assert [p.name for p in recipe.passes] == ["canonicalize", "quantize"]


@pytest.mark.parametrize(
    "steps, needles",
    [
        ((("quantize", {"bits": 4}),), ["'bits'", "allowed:", "activations"]),
        ((("quantize", {"activations": "dynamic"}),), ["'activations'", "'static'"]),
        (("nope",), ["unknown pass 'nope'", "allowed:", "quantize"]),
        ((), ["at least one pass"]),
        ((("quantize", 3),), ["options dataclass or a dict"]),
    ],
)
def test_make_recipe_rejects_bad_steps_naming_the_field(steps, needles):
    with pytest.raises(RecipeError) as info:
        make_recipe("bad", *steps)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_from_pretrained_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        OutlierQuantizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(InputError, match="no such file"):
        OutlierQuantizer.from_pretrained(tmp_path / "missing.onnx")


@pytest.fixture(scope="module")
def texts():
    from outlierquant.export.data import bundled_sentences, read_lines

    return {split: read_lines(bundled_sentences(split))[:16] for split in ("calibration", "heldout")}


@pytest.mark.slow
def test_quantize_validate_with_texts_on_minilm(tmp_path, minilm_onnx, texts):
    quantizer = OutlierQuantizer.from_pretrained(minilm_onnx.parent)  # a folder with model.onnx
    assert quantizer.model_path == minilm_onnx
    out = quantizer.quantize("w8a8", texts["calibration"], tmp_path / "q", progress=False)
    assert out.path == tmp_path / "q" / "model.onnx" and out.path.is_file()
    assert out.report_path.is_file()
    assert out.report["recipe"]["name"] == "w8a8"
    assert out.report["calibration_samples"] == 16
    # the folder loads like the export: tokenizer and config beside the model
    assert (tmp_path / "q" / "tokenizer.json").is_file() and (tmp_path / "q" / "config.json").is_file()

    report = quantizer.validate(out.path, texts["heldout"], latency_runs=1, latency_batch=4, progress=False)
    primary = report.to_dict()
    assert primary["samples"] == 16
    cosine = max(o["cosine_mean"] for o in primary["outputs"])
    assert 0.95 < cosine < 1.0


@pytest.mark.slow
def test_feeds_accept_paths_texts_and_feed_dicts(tmp_path, minilm_onnx, texts):
    quantizer = OutlierQuantizer(minilm_onnx)
    from_texts = quantizer.feeds(texts["calibration"], limit=5)
    assert len(from_texts) == 5 and set(from_texts[0]) >= {"input_ids", "attention_mask"}
    path = tmp_path / "cal.txt"
    path.write_text("\n".join(texts["calibration"]) + "\n", encoding="utf-8")
    from_file = quantizer.feeds(path, limit=5)
    for a, b in zip(from_texts, from_file):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert quantizer.feeds(from_texts, limit=2) == from_texts[:2]
    with pytest.raises(InputError, match="empty"):
        quantizer.feeds([])
    with pytest.raises(InputError, match="expected a path"):
        quantizer.feeds([1, 2])
    with pytest.raises(InputError, match="needs calibration_data"):
        quantizer.quantize("w8a8", None, tmp_path / "q")


def test_feeds_from_a_calibration_data_reader_and_a_dataset_like_object(minilm_onnx):
    from outlierquant import OutlierQuantizer
    from outlierquant.errors import InputError

    quantizer = OutlierQuantizer.from_pretrained(minilm_onnx)
    texts = ["The cat sat on the mat.", "Quantization keeps the outliers in float."]
    expected = quantizer.feeds(texts)

    class Reader:  # onnxruntime's CalibrationDataReader protocol
        def __init__(self, items):
            self.items = iter(items)

        def get_next(self):
            return next(self.items, None)

    from_reader = quantizer.feeds(Reader(expected))
    assert len(from_reader) == 2 and all((a[k] == b[k]).all() for a, b in zip(expected, from_reader) for k in a)

    class Columns:  # what a datasets.Dataset offers: column names, a column by name
        column_names = ["sentence", "label"]

        def __getitem__(self, name):
            return {"sentence": texts, "label": [0, 1]}[name]

    from_columns = quantizer.feeds(Columns(), text_column="sentence")
    assert all((a[k] == b[k]).all() for a, b in zip(expected, from_columns) for k in a)
    with pytest.raises(InputError, match="no column 'text'"):
        quantizer.feeds(Columns())
