"""Recipes: built-ins load, YAML round-trips, bad fields are named with the allowed values."""

from __future__ import annotations

import pytest

from outlierquant.errors import RecipeError
from outlierquant.recipes import Recipe, builtin_recipes, instantiate, load_recipe


def test_builtin_recipes_load_and_instantiate():
    names = builtin_recipes()
    assert {"default", "w8a8", "w8a8-outputs", "w8a8-per-token"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.passes, name
        for spec in recipe.passes:
            instantiate(spec)


def test_yaml_round_trip(tmp_path):
    recipe = load_recipe("w8a8")
    path = tmp_path / "mine.yaml"
    path.write_text(recipe.to_yaml())
    again = load_recipe(path)
    assert again == recipe
    assert again.to_dict() == recipe.to_dict()


def test_unknown_option_names_field_and_allowed_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\npasses:\n  - quantize: {activation: static}\n")
    with pytest.raises(RecipeError, match=r"no option 'activation' \(allowed: .*activations"):
        load_recipe(path)


def test_bad_literal_value_lists_allowed_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\npasses:\n  - quantize: {activations: dynamic}\n")
    with pytest.raises(RecipeError, match=r"'dynamic' is not one of 'static', 'per_token', 'none'"):
        load_recipe(path)


def test_unknown_pass_and_unknown_recipe_and_top_level_field(tmp_path):
    with pytest.raises(RecipeError, match="unknown pass 'smoothe'"):
        Recipe.from_dict({"name": "x", "passes": ["smoothe"]})
    with pytest.raises(RecipeError, match="unknown recipe 'nope' \\(built-in: .*w8a8"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="unknown field 'pases'"):
        Recipe.from_dict({"name": "x", "pases": []})
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(tmp_path / "broken.yaml")


def test_default_on_minilm_scales_norm_groups_splits_the_rest_and_rotates_nothing(minilm_onnx, minilm_feeds, tmp_path):
    """The shipped default on post-norm BERT: FFN2's estimated SQNR is above the rotation
    gate, the LayerNorm-fed groups get per-channel scales, FFN2 and the attention output the
    float split; every linear is quantized and the embeddings track fp32."""
    import numpy as np
    import onnx_ir as ir

    from helpers import run_outputs
    from outlierquant.graph.analysis import analyze_graph
    from outlierquant.pipeline import quantize_model

    calibration, heldout = minilm_feeds
    threshold = next(spec.options_dict() for spec in load_recipe("default").passes
                     if spec.name == "online-hadamard")["rotate_below_db"]
    result = quantize_model(minilm_onnx, tmp_path / "default.onnx", "default", calibration, progress=False)
    records = {record["pass"]: record for record in result.report["passes"]}
    gate = records["online-hadamard"]
    assert not gate["rotated"] and len(gate["skipped"]) == 6
    assert all(g["static_sqnr_db"] >= threshold for g in gate["skipped"])
    assert records["outliertune"]["per_channel_linears"] == 24  # q/k/v and FFN1 of 6 layers
    assert len(records["llm-int8"]["layers"]) == 12  # attention output and FFN2
    assert not records["llm-int8"]["skipped"]
    # MiniLM's attention rows are not peaked enough for the residual probabilities
    probs = records["llm-int8"]["probs_residual"]
    assert probs["residual_matmuls"] == 0 and len(probs["matmuls"]) == 6
    assert all(0 < entry["lost_mass"] < probs["lost_mass_gate"] for entry in probs["matmuls"])
    model = ir.load(tmp_path / "default.onnx")
    # what analysis still calls a float linear is a thin outlier side path, no full layer
    side_paths = analyze_graph(model).linears
    assert all("_llm_int8/" in linear.name and linear.weight_array().shape[0] < 100 for linear in side_paths)
    reference = run_outputs(ir.load(minilm_onnx), heldout)
    quantized = run_outputs(model, heldout)
    cosines = []
    for ref, got in zip(reference, quantized):
        a, b = ref[-1].ravel(), got[-1].ravel()
        cosines.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert min(cosines) > 0.995
