"""LLM-FP4: the exponent-bias searches on hand-made arrays, the pre-shift as an exact float
rewrite (random inputs of tiny models, real MiniLM sentences), and the llm-fp4-w4a4 recipe
quantizing a tiny model."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import synthetic
from helpers import load_canonical, max_relative_error, run_outputs

from outlierquant.errors import RecipeError
from outlierquant.graph.analysis import analyze_graph
from outlierquant.numerics.formats import (FP4_E1M2, FP4_E2M1, FP4_E3M0, preshift_exponents, quantize_float,
                                           round_to_format, search_channel_scales, search_tensor_scale)
from outlierquant.passes.llm_fp4 import LlmFp4Pass
from outlierquant.pipeline import run_recipe
from outlierquant.recipes import Recipe, load_recipe, validate_pass_options


def test_the_other_fp4_splits_by_hand():
    assert FP4_E3M0.grid().tolist() == [0, 0.25, 0.5, 1, 2, 4, 8, 16]
    assert FP4_E1M2.grid().tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]
    # E3M0: no mantissa bit, a tie between 2^E and 2^(E+1) rounds up; below 0.25 ties to 0
    assert round_to_format([0.1, 0.125, 0.13, 0.375, 3, 5, 12, 40, -6], FP4_E3M0).tolist() == \
        [0, 0, 0.25, 0.5, 4, 4, 16, 16, -8]
    # E1M2: uniform steps of 0.5, ties to even, saturating at 3.5
    assert round_to_format([0.25, 0.75, 1.25, 3.3, 9, -1.74], FP4_E1M2).tolist() == [0, 1, 1, 3.5, 3.5, -1.5]


def test_channel_scale_search_keeps_exact_columns_and_clips_an_outlier():
    rng = np.random.default_rng(0)
    exact = np.array([6, 3, 1.5, -4, 0.5, 2], np.float32) * 0.25  # on the E2M1 grid with scale 0.25
    spread = np.concatenate([[40.0], rng.uniform(-1, 1, 5)]).astype(np.float32)
    w = np.stack([exact, spread], axis=1)
    importance = np.array([1e-4, 1, 1, 1, 1, 1])  # the outlier row meets a quiet input channel
    scales, errors = search_channel_scales(w, FP4_E2M1, importance, ratios=(1.0, 0.5, 0.05))
    assert scales[0] == np.float32(0.25) and errors[0] == 0.0
    plain = np.float32(40.0 / 6)
    plain_error = float((((quantize_float(spread, FP4_E2M1, plain) - spread) ** 2) * importance).sum())
    assert scales[1] == np.float32(40.0 * 0.05 / 6) and errors[1] < plain_error  # clipping the outlier pays
    # without importance the outlier's own error dominates: no clipping on this column
    scales, _ = search_channel_scales(w, FP4_E2M1, None, ratios=(1.0, 0.5, 0.05))
    assert scales[1] == plain
    with pytest.raises(ValueError, match="importance has 3 entries"):
        search_channel_scales(w, FP4_E2M1, np.ones(3))


def test_tensor_scale_search_clips_a_rare_spike():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((256, 16)).astype(np.float32)
    rows[0, 0] = 60.0
    scale, ratio, error = search_tensor_scale(rows, FP4_E2M1)
    assert ratio < 1.0 and scale < 60.0 / 6
    plain = float(((quantize_float(rows, FP4_E2M1, np.float32(10.0)) - rows.astype(np.float64)) ** 2).sum())
    assert error < plain
    # the calibrated range, when given, is what the ratios scale
    assert search_tensor_scale(rows, FP4_E2M1, ratios=(1.0,), absmax=120.0)[0] == pytest.approx(20.0)


def test_preshift_exponents_by_hand():
    assert preshift_exponents([8, 4, 3, 1, 0.001, 0, 5]).tolist() == [0, 1, 1, 3, 8, 0, 0]
    assert preshift_exponents([8, 0.001], max_shift=3).tolist() == [0, 3]
    a = np.random.default_rng(2).uniform(0.01, 50, 500)
    k = preshift_exponents(a, max_shift=30)
    shifted = np.ldexp(a, k)
    assert shifted.max() <= a.max() and shifted.min() > a.max() / 2  # one binade below the top
    with pytest.raises(ValueError, match="max_shift"):
        preshift_exponents(a, -1)


def _only(options: dict) -> Recipe:
    return Recipe.from_dict({"name": "only-llm-fp4", "passes": [{"llm-fp4": options}]})


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert"])
def test_preshift_keeps_the_function_on_random_inputs(request, fixture):
    """Powers of two multiply exactly: the pre-shifted model computes the same floats."""
    path = request.getfixturevalue(fixture)
    model = load_canonical(path)
    evaluation = synthetic.random_feeds(path, 3, seed=7)
    reference = run_outputs(model, evaluation)
    before = {name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()}
    record = run_recipe(model, _only({"quantize": False}), synthetic.random_feeds(path, 4, seed=1),
                        progress=False)[-1]
    assert max_relative_error(reference, run_outputs(model, evaluation)) <= 1e-6
    shifted = [entry for entry in record["preshift_groups"] if "skipped" not in entry]
    assert record["preshifted_groups"] == len(shifted) >= 3 * synthetic.TINY_LAYERS
    assert any(not np.array_equal(before[name], value.const_value.numpy())
               for name, value in model.graph.initializers.items() if name in before)
    mul = collections.Counter(node.op_type for node in model.graph)["Mul"]
    if fixture == "tiny_llama":  # pre-norm: every group folds (norms, V -> O, up -> down)
        assert record["inserted_ops"] == 0 and all(entry["folded"] for entry in shifted)
    else:  # post-norm: the LayerNorms also feed the residual, FFN2 follows GELU: Mul inserted
        assert record["inserted_ops"] > 0 and mul > 0
        reasons = [entry for entry in shifted if not entry["folded"]]
        assert {entry["relation"] for entry in reasons} >= {"norm", "none"}
    onnx.checker.check_model(ir.serde.serialize_model(model))


@pytest.mark.slow
def test_preshift_keeps_the_function_on_minilm_sentences(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    model = load_canonical(minilm_onnx)
    reference = run_outputs(model, heldout[:6])
    record = run_recipe(model, _only({"quantize": False}), calibration[:12], progress=False)[-1]
    assert record["preshifted_groups"] >= 12
    assert max_relative_error(reference, run_outputs(model, heldout[:6])) <= 1e-6


def test_llm_fp4_recipe_quantizes_a_tiny_llama(tiny_llama):
    """Synthetic weights: the rewrite is wired right and the outputs stay correlated."""
    model = load_canonical(tiny_llama)
    evaluation = synthetic.random_feeds(tiny_llama, 3, seed=7)
    reference = run_outputs(model, evaluation)
    records = run_recipe(model, load_recipe("llm-fp4-w4a4"), synthetic.random_feeds(tiny_llama, 4, seed=1),
                         progress=False)
    record = records[-1]
    assert record["pass"] == "llm-fp4" and record["simulated"]
    assert record["linear_layers"] == 7 * synthetic.TINY_LAYERS
    assert record["activation_tensors"] == 4 * synthetic.TINY_LAYERS  # q/k/v and gate/up share theirs
    assert sum(record["formats"]["weights"]["splits"].values()) == record["linear_layers"]
    ops = collections.Counter(node.op_type for node in model.graph)
    assert ops["Round"] == record["activation_tensors"] and "DequantizeLinear" not in ops
    onnx.checker.check_model(ir.serde.serialize_model(model))
    after = run_outputs(model, evaluation)
    for ref, got in zip(reference, after):
        a, b = ref[0].ravel().astype(np.float64), got[0].ravel().astype(np.float64)
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.5
    # every weight is on its chosen 4-bit grid up to its channel scale: at most 8 magnitudes a column
    w = next(linear for linear in analyze_graph(model).linears if "down_proj" in linear.name).weight_array()
    assert max(len(np.unique(np.abs(w[:, n]))) for n in range(w.shape[1])) <= 8


def test_llm_fp4_options():
    assert LlmFp4Pass().reads() == frozenset({"stats", "feeds"})
    assert LlmFp4Pass(quantize=False).reads() == frozenset({"stats"})
    with pytest.raises(RecipeError, match="weight_formats"):
        validate_pass_options("llm-fp4", {"weight_formats": ["e4m3"]})
    with pytest.raises(ValueError, match="nothing to do"):
        LlmFp4Pass(quantize=False, preshift=False)
    with pytest.raises(ValueError, match="activation_ratios"):
        LlmFp4Pass(activation_ratios=(0.5, 1.5))
