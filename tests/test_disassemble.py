"""QLLM channel disassembly: exact fp32 equivalence (tiny Llama, planted Llama, MiniLM),
θ selection, the assembly approximation's predicted error, options and the recipe."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from outlierquant.calibration.collect import collect_statistics
from outlierquant.errors import RecipeError
from outlierquant.passes.disassemble import (
    DisassembleChannelsPass,
    DisassembleOptions,
    choose_theta,
    plan_channels,
)
from outlierquant.recipes import load_recipe, validate_pass_options

import synthetic
from helpers import load_canonical as load, max_relative_error, run_outputs as outputs

RTOL = 1e-4


def disassemble(path, calibration, pass_):
    model = load(path)
    before = collections.Counter(node.op_type for node in model.graph)
    pass_.with_stats(collect_statistics(model, calibration, covariance_for=pass_.covariance_targets(model),
                                        progress=False))
    result = pass_(model)
    onnx.checker.check_model(ir.serde.serialize_model(model))
    after = collections.Counter(node.op_type for node in model.graph)
    return model, result.record, before, after


# -- planning ----------------------------------------------------------------------------------------


def test_theta_is_the_tightest_range_the_budget_buys():
    absmax = np.array([1.0, 0.5, 0.8, 40.0, 0.9, 10.0, 0.7, 0.6])
    theta = choose_theta(absmax, budget=5)
    added = int(np.maximum(np.ceil(absmax / theta) - 1, 0).sum())
    assert added <= 5
    assert int(np.maximum(np.ceil(absmax / (0.999 * theta)) - 1, 0).sum()) > 5  # any smaller θ overspends
    plan, error = plan_channels(absmax, theta)
    assert error == 0.0 and not plan.merged
    assert plan.channels == absmax.size + plan.added
    np.testing.assert_array_equal(np.bincount(plan.first, minlength=absmax.size), plan.copies)
    assert (absmax / plan.copies).max() <= theta * (1 + 1e-9)


def test_assembly_merges_similar_rows_and_keeps_the_width():
    rng = np.random.default_rng(0)
    k, n = 16, 8
    weight = rng.normal(size=(k, n))
    weight[5] = weight[4] + 1e-3  # a near-duplicate pair: the cheapest merge
    absmax = np.full(k, 1.0)
    absmax[0] = 10.0
    moment = np.eye(k) * 0.1
    plan, error = plan_channels(absmax, 5.0, assemble=True, moment=moment, weights=[weight])
    assert plan.added == 1 and plan.merged == [(4, 5)]
    assert plan.channels == k
    assert 0 < error < 1e-6


def test_options_are_validated_with_the_field_name():
    with pytest.raises(ValueError, match="max_added_share"):
        DisassembleOptions(max_added_share=0.0)
    with pytest.raises(ValueError, match="threshold"):
        DisassembleOptions(threshold=-1.0)
    with pytest.raises(RecipeError, match="assembel"):
        validate_pass_options("qllm_disassemble", {"assembel": True})
    recipe = load_recipe("qllm-w4a8")
    assert [spec.name for spec in recipe.passes] == ["canonicalize", "qllm-disassemble", "adadim",
                                                   "simplify-shapes"]
    assert dict(recipe.passes[2].options)["activation_bits"] == 8  # simulated activations, labelled


# -- exact equivalence -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama", "planted_llama"])
def test_disassembly_is_equivalent_on_synthetic_decoders(request, fixture):
    path = request.getfixturevalue(fixture)
    calibration = synthetic.random_feeds(path, 6, seed=1)
    evaluation = synthetic.random_feeds(path, 3, seed=2)
    reference = outputs(load(path), evaluation)
    model, record, before, after = disassemble(path, calibration, DisassembleChannelsPass(min_ratio=1.0))
    assert record["exact"] and record["rewritten_groups"] > 0 and record["added_channels"] > 0
    assert after["Gather"] - before["Gather"] == record["rewritten_groups"]
    assert all(group["max_after"] <= group["theta"] * (1 + 1e-6) for group in record["groups"] if "theta" in group)
    assert max_relative_error(reference, outputs(model, evaluation)) <= RTOL


def test_planted_channels_are_disassembled_and_folded(planted_llama):
    calibration = synthetic.random_feeds(planted_llama, 6, seed=1)
    _, record, _, _ = disassemble(planted_llama, calibration, DisassembleChannelsPass())
    qkv = record["groups"][0]
    assert len(qkv["linears"]) == 3 and qkv["folded"]  # 1/T folded into the RMSNorm γ
    assert qkv["max_before"] / qkv["max_after"] >= 2.5  # the planted ×50 channels spread over copies
    assert record["inserted_ops"] == 0  # every group of the decoder has a foldable producer


def test_assembly_is_approximate_and_says_so(tiny_llama):
    calibration = synthetic.random_feeds(tiny_llama, 6, seed=1)
    evaluation = synthetic.random_feeds(tiny_llama, 2, seed=2)
    reference = outputs(load(tiny_llama), evaluation)
    model, record, _, _ = disassemble(tiny_llama, calibration, DisassembleChannelsPass(min_ratio=1.0, assemble=True))
    assert not record["exact"] and record["merged_pairs"] == record["added_channels"] > 0
    rewritten = [group for group in record["groups"] if "theta" in group]
    assert all(group["out_channels"] == group["in_features"] for group in rewritten)
    assert 0 < record["max_predicted_merge_error"] < 0.05
    error = max_relative_error(reference, outputs(model, evaluation))
    assert RTOL < error < 0.5  # not exact; the record's prediction is what the report shows


def test_minilm_disassembly_is_equivalent(minilm_onnx):
    from outlierquant.export.data import bundled_sentences, load_tokenizer, model_inputs, read_lines, text_feeds

    tokenizer = load_tokenizer(minilm_onnx.parent)
    spec = model_inputs(minilm_onnx)
    calibration = text_feeds(read_lines(bundled_sentences("calibration"))[:16], tokenizer=tokenizer, input_names=spec)
    heldout = text_feeds(read_lines(bundled_sentences("heldout"))[:6], tokenizer=tokenizer, input_names=spec)
    random = synthetic.random_feeds(minilm_onnx, 2, seed=3)
    base = load(minilm_onnx)
    references = [outputs(base, heldout), outputs(base, random)]
    model, record, _, _ = disassemble(minilm_onnx, calibration, DisassembleChannelsPass())
    assert record["exact"] and record["rewritten_groups"] > 0
    assert 0 < record["added_share"] <= 0.05
    assert record["inserted_ops"] > 0  # post-norm BERT: the norm also feeds the residual, so a Mul
    for feeds, reference in zip((heldout, random), references):
        assert max_relative_error(reference, outputs(model, feeds)) <= RTOL
