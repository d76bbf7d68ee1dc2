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
