"""run_recipe's calibration decisions: statistics are collected on the model as it stands
before a pass that reads them, reused while nothing has changed the model, and never
invented when no calibration data was given. Synthetic tiny Llama, real onnxruntime."""

from __future__ import annotations

import pytest
import synthetic
from helpers import load_canonical

import outlierquant.calibration.collect as collect_module
from outlierquant.errors import CalibrationError
from outlierquant.pipeline import run_recipe
from outlierquant.recipes import Recipe


@pytest.fixture
def collections(monkeypatch):
    """Counts the real collect_statistics calls run_recipe makes."""
    calls = []
    real = collect_module.collect_statistics

    def counting(model, feeds, **kwargs):
        calls.append(kwargs.get("tensors"))
        return real(model, feeds, **kwargs)

    monkeypatch.setattr(collect_module, "collect_statistics", counting)
    return calls


def _recipe(*passes) -> Recipe:
    return Recipe.from_dict({"name": "t", "passes": list(passes)})


def test_a_modifying_pass_makes_the_next_collect_again(tiny_llama, collections):
    model = load_canonical(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 3, seed=1)
    records = run_recipe(model, _recipe({"smoothquant": {"alpha": 0.5}}, "quantize"), feeds, progress=False)
    assert records[0]["modified"] and len(collections) == 2
    assert all("calibration_seconds" in record for record in records)


def test_statistics_are_reused_across_passes_that_change_nothing(tiny_llama, collections):
    model = load_canonical(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 3, seed=1)
    stats = collect_module.collect_statistics(model, feeds, progress=False)
    collections.clear()
    # canonicalize preserves statistics; the quantizer's tensors are all in them
    records = run_recipe(model, _recipe("canonicalize", "quantize"), feeds, stats=stats, progress=False)
    assert not collections and "calibration_seconds" not in records[1]


def test_a_pass_that_reads_nothing_does_not_calibrate(tiny_llama, collections):
    model = load_canonical(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 3, seed=1)
    records = run_recipe(model, _recipe("rotate-residual", {"quantize": {"activations": "per_token"}}), feeds,
                         progress=False)
    assert records[0]["modified"] and not collections


def test_no_calibration_data_is_a_clear_error(tiny_llama, collections):
    model = load_canonical(tiny_llama)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        run_recipe(model, _recipe("quantize"), None, progress=False)
    assert not collections
