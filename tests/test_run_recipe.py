"""run_recipe's calibration decisions: statistics are collected on the model as it stands
before a pass that reads them, reused while nothing has changed the model, and never
invented when no calibration data was given. Synthetic tiny Llama, real onnxruntime."""

from __future__ import annotations

import numpy as np
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


# ---------------------------------------------------------------------------------------
# statistics carried through an equivalence rewrite


def _close(a, b, name):
    for attr in ("absmax", "minimum", "maximum", "mean", "mean_sq"):
        np.testing.assert_allclose(getattr(a, attr), getattr(b, attr), rtol=2e-4, atol=1e-6, err_msg=f"{name}.{attr}")
    assert a.count == b.count, name


@pytest.mark.parametrize("fixture", ["tiny_llama", "planted_llama", "tiny_bert"])
def test_statistics_derived_through_smoothquant_equal_recollected_ones(fixture, request):
    from outlierquant.calibration.collect import collect_statistics
    from outlierquant.graph.analysis import analyze_graph
    from outlierquant.passes.smooth import SmoothQuantPass

    path = request.getfixturevalue(fixture)
    model = load_canonical(path)
    feeds = synthetic.random_feeds(path, 4, seed=3)
    groups = analyze_graph(model).input_names(groups=True)
    before = collect_statistics(model, feeds, covariance_for=groups, progress=False)
    smooth = SmoothQuantPass(alpha=0.5, insert_mul=True).with_stats(before)
    assert smooth(model).modified
    carry = smooth.carried_statistics()
    carried = carry.apply(before)
    # recollected on the rewritten model: every tensor the carried statistics keep
    after = collect_statistics(model, feeds, tensors=list(carried), progress=False,
                               covariance_for=[name for name in carried if carried[name].covariance is not None])
    scaled = [name for name in carry.scaled if name in carried]
    assert scaled, "no group input was folded"
    for name in carried:
        _close(carried[name], after[name], name)
        if carried[name].covariance is not None:
            np.testing.assert_allclose(carried[name].covariance, after[name].covariance, rtol=1e-3,
                                       atol=1e-6 * float(np.abs(after[name].covariance).max()))
    for name in scaled:  # the derivation did something: x / s is not x
        assert not np.allclose(before[name].absmax, carried[name].absmax, rtol=1e-3)
    # what was dropped had changed (values inside a producer a scale folded into), and the
    # tensors an inserted Mul now feeds the linears are new: neither is in the carried set
    dropped = [name for name in carry.changed if name in before]
    recollected = collect_statistics(model, feeds, tensors=dropped, progress=False) if dropped else {}
    assert all(not np.allclose(before[n].absmax, recollected[n].absmax, rtol=1e-3) for n in dropped)
    assert all(name in before for name in carried)


def test_a_recipe_collects_only_what_the_carried_statistics_lack(tiny_llama, collections):
    model = load_canonical(tiny_llama)
    feeds = synthetic.random_feeds(tiny_llama, 3, seed=1)
    # the online rotation's gate reads statistics and rotates nothing (no group is below -100 dB)
    recipe = _recipe({"smoothquant": {"alpha": 0.5}}, {"online-hadamard": {"rotate_below_db": -100.0}}, "quantize")
    records = run_recipe(model, recipe, feeds, progress=False)
    assert records[0]["modified"] and records[0]["statistics_carried"]["scaled"] > 0
    assert not records[1]["modified"] and "calibration_seconds" not in records[1]  # carried, and looked ahead
    assert len(collections) == 2 and "calibration_seconds" in records[2]
    first = {t if isinstance(t, str) else t.tensor for t in collections[0]}
    second = {t if isinstance(t, str) else t.tensor for t in collections[1]}
    # the quantizer collects only the tensors inside the producers a scale folded into
    assert second and second < first and len(second) <= records[0]["statistics_carried"]["dropped"]
