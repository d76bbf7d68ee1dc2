"""Outlier Suppression+, scale reparameterization (float rewrites) and OutlierTune (quantizer)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import synthetic
from helpers import load_canonical as load
from helpers import run_outputs as outputs
from test_smooth import rewrite_and_compare

from outlierquant.calibration.stats import ChannelStats
from outlierquant.passes.online_hadamard import OnlineHadamardPass
from outlierquant.passes.outliertune import QuantizeOutlierTunePass
from outlierquant.passes.reparameterize import ReparameterizeScalesPass
from outlierquant.passes.shift import ShiftScaleOutliersPass, shifted_stats


def test_shifted_stats_are_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=3.0, size=(256, 8))
    shift = rng.normal(size=8)
    st = ChannelStats.empty(8, -1)
    st.update(x)
    ref = ChannelStats.empty(8, -1)
    ref.update(x - shift)
    got = shifted_stats(st, shift)
    for field in ("minimum", "maximum", "absmax", "mean", "mean_sq"):
        np.testing.assert_allclose(getattr(got, field), getattr(ref, field), rtol=1e-9, atol=1e-9)


def test_os_plus_tiny_opt_shift_into_layernorm_beta_and_biases(tiny_opt):
    calibration = synthetic.random_feeds(tiny_opt, 6, seed=1)
    evaluation = synthetic.random_feeds(tiny_opt, 3, seed=2)
    result, before, after = rewrite_and_compare(tiny_opt, calibration, [evaluation], ShiftScaleOutliersPass())
    done = [g for g in result.record["groups"] if "skipped" not in g]
    assert len(done) == 5  # 2 layers x (norm -> q/k/v, norm -> fc1) + final norm -> lm_head
    assert sum(g["shifted"] for g in done) == 4  # lm_head has no bias: scaled, not shifted
    assert done[-1]["shift_skipped"].startswith("no bias")
    assert before == after
    skipped = {g["relation"]: g["skipped"] for g in result.record["groups"] if "skipped" in g}
    assert "not selected" in skipped["none"]  # fc2 after ReLU: OS+ only rewrites norm/linear producers


def test_os_plus_llama_has_no_bias_so_scales_only(tiny_llama):
    calibration = synthetic.random_feeds(tiny_llama, 6, seed=1)
    evaluation = synthetic.random_feeds(tiny_llama, 3, seed=2)
    result, before, after = rewrite_and_compare(tiny_llama, calibration, [evaluation], ShiftScaleOutliersPass())
    for group in result.record["groups"]:
        if group["relation"] == "norm":
            assert group.get("shift_skipped", "").startswith("no bias")
    assert before == after


def test_os_plus_minilm_inserted_ops_are_counted(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    random = synthetic.random_feeds(minilm_onnx, 3, seed=3)
    result, before, after = rewrite_and_compare(minilm_onnx, calibration, [heldout, random],
                                                ShiftScaleOutliersPass(insert_ops=True))
    assert result.record["inserted_ops"] == 24  # 12 norm groups x (Sub, Mul)
    assert after["Sub"] - before["Sub"] == 12 and after["Mul"] - before["Mul"] == 12


@pytest.mark.parametrize("target", ["median", "mean"])
def test_reparameterize_tiny_opt_and_planted(tiny_opt, planted_llama, target):
    for path in (tiny_opt, planted_llama):
        calibration = synthetic.random_feeds(path, 6, seed=1)
        evaluation = synthetic.random_feeds(path, 3, seed=2)
        result, before, after = rewrite_and_compare(path, calibration, [evaluation],
                                                    ReparameterizeScalesPass(target=target))
        assert result.modified and before == after
        assert sum("skipped" not in g for g in result.record["groups"]) == 5


def test_reparameterize_skips_post_norm_minilm_without_insert(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    result, before, after = rewrite_and_compare(minilm_onnx, calibration, [heldout], ReparameterizeScalesPass())
    assert not result.modified and before == after
    reasons = [g["skipped"] for g in result.record["groups"] if g["relation"] == "norm"]
    assert len(reasons) == 12 and all("residual" in r for r in reasons)


def test_outliertune_structure_and_accuracy_on_minilm(minilm_onnx, minilm_feeds):
    from outlierquant.calibration.collect import collect_statistics
    from outlierquant.passes.quantize import QuantizeQDQPass

    calibration, heldout = minilm_feeds

    def sentence_cosine(model):
        ref, got = outputs(load(minilm_onnx), heldout), outputs(model, heldout)
        values = []
        for r, g in zip(ref, got):
            a, b = r[-1].ravel(), g[-1].ravel()
            values.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        return float(np.mean(values))

    model = load(minilm_onnx)
    stats = collect_statistics(model, calibration, progress=False)
    ops_before = collections.Counter(n.op_type for n in model.graph)
    result = QuantizeOutlierTunePass(alpha="search").with_stats(stats)(model)
    onnx.checker.check_model(ir.serde.serialize_model(model))
    ops = collections.Counter(n.op_type for n in model.graph)
    assert result.record["per_channel_linears"] == 36
    # every MiniLM linear has a bias: per-channel zero points, Mul + Add per group (24 groups)
    assert result.record["inserted_ops"] == 48
    assert ops["Mul"] - ops_before["Mul"] == 24 and ops["Add"] - ops_before["Add"] == 24
    # one Q per linear-group input (24) + one per attention MatMul input (12 x 2)
    assert ops["QuantizeLinear"] == 24 + 24
    assert all(n.inputs[1].const_value.numpy().ndim == 0 for n in model.graph if n.op_type == "QuantizeLinear")
    plain = load(minilm_onnx)
    QuantizeQDQPass().with_stats(stats)(plain)
    assert sentence_cosine(model) > sentence_cosine(plain)


def test_outliertune_unfoldable_groups_leave_the_rest_to_a_later_pass(minilm_onnx, minilm_feeds):
    """``groups: unfoldable, rest: leave``: post-norm BERT's norm-fed groups (their LayerNorm
    also feeds the residual) get the per-channel Mul; FFN2 is outside the selected relations,
    the V -> O group is foldable; those and the attention MatMuls stay float for llm_int8."""
    from outlierquant.calibration.collect import collect_statistics
    from outlierquant.graph.analysis import analyze_graph

    calibration, _ = minilm_feeds
    model = load(minilm_onnx)
    linears_before = len(analyze_graph(model).linears)
    stats = collect_statistics(model, calibration[:12], progress=False)
    result = QuantizeOutlierTunePass(groups="unfoldable", rest="leave", zero_point="shared",
                                     relations=("norm", "linear", "v_to_o")).with_stats(stats)(model)
    record = result.record
    taken = [g for g in record["groups"] if "skipped" not in g]
    assert len(taken) == 12 and {g["relation"] for g in taken} == {"norm"}  # q/k/v and FFN1, 6 layers
    reasons = [g["skipped"] for g in record["groups"] if "skipped" in g]
    assert sum("can absorb a scale" in r for r in reasons) == 6  # V -> O folds
    assert sum("'none' not selected" in r for r in reasons) == 6  # FFN2
    assert record["per_channel_linears"] == 24 and record["per_tensor_weights"] == 0
    assert record["left_float_linears"] == linears_before - 24
    # the rest is still float: 12 linears left for a later pass, attention untouched
    assert len(analyze_graph(model).linears) == linears_before - 24
    assert collections.Counter(n.op_type for n in model.graph)["QuantizeLinear"] == 12
    with pytest.raises(Exception, match="groups"):
        QuantizeOutlierTunePass(groups="foldable")
    with pytest.raises(Exception, match="rest"):
        QuantizeOutlierTunePass(rest="drop")


def test_outliertune_unfoldable_skips_pre_norm_groups_and_online_rotations(planted_llama):
    """On a pre-norm decoder every norm is foldable (SmoothQuant folds there for free), and a
    group behind an online rotation is left alone: nothing to do, nothing modified."""
    from outlierquant.calibration.collect import collect_statistics

    model = load(planted_llama)
    feeds = synthetic.random_feeds(planted_llama, 4, seed=1)
    OnlineHadamardPass(kernels="standard", groups="activation")(model)
    stats = collect_statistics(model, feeds, progress=False)
    result = QuantizeOutlierTunePass(groups="unfoldable", rest="leave").with_stats(stats)(model)
    assert not result.modified and result.record["per_channel_linears"] == 0
    reasons = [g["skipped"] for g in result.record["groups"]]
    assert sum("online rotation" in r for r in reasons) == synthetic.TINY_LAYERS
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph)
