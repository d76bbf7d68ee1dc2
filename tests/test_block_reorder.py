"""Channel reordering for block formats (Trukhanov & Soloveychik 2024): the order and the
block-exponent gap by hand, the permutation as an exact rewrite (random inputs of tiny
models, real MiniLM sentences), why the other groups are left, and the mxfp4-reorder-w4a4
recipe on a tiny model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import synthetic
from helpers import load_canonical, max_relative_error, run_outputs

from outlierquant.calibration.collect import collect_statistics
from outlierquant.graph.analysis import analyze_graph
from outlierquant.numerics.formats import block_exponent_gap, block_order
from outlierquant.passes.formats import QuantizeFormatPass, permute_residual_stream, reorder_for_blocks
from outlierquant.pipeline import run_recipe
from outlierquant.recipes import load_recipe


def test_block_order_and_gap_by_hand():
    m = np.array([1.0, 64.0, 2.0, 64.0, 1.0, 2.0])
    order = block_order(m)
    assert order.tolist() == [1, 3, 2, 5, 0, 4]  # descending, ties in their first order
    # blocks of 2: (1, 64) (2, 64) (1, 2) -> 6 + 0 + 5 + 0 + 1 + 0 binades below the block max
    assert block_exponent_gap(m, 2) == pytest.approx((6 + 5 + 1) / 6)
    assert block_exponent_gap(m[order], 2) == 0.0  # (64, 64) (2, 2) (1, 1)
    assert block_exponent_gap([0.0, 4.0, 1.0], 4) == pytest.approx(1.0)  # zeros left out, padded last block
    with pytest.raises(ValueError, match="block"):
        block_exponent_gap(m, 0)


def _reordered(path, feeds):
    model = load_canonical(path)
    stats = collect_statistics(model, feeds, tensors=QuantizeFormatPass(weights="mxfp4", activations="mxfp4",
                                                                         reorder=True).calibration_targets(model),
                               progress=False)
    return model, stats


@pytest.mark.parametrize("fixture, down", [("tiny_llama", "down_proj"), ("tiny_bert", "output/dense")])
def test_reorder_is_exact_on_random_inputs(request, fixture, down):
    path = request.getfixturevalue(fixture)
    model, stats = _reordered(path, synthetic.random_feeds(path, 4, seed=1))
    evaluation = synthetic.random_feeds(path, 3, seed=7)
    reference = run_outputs(model, evaluation)
    weights = {linear.name: linear.weight_array().copy() for linear in analyze_graph(model).linears}
    record = reorder_for_blocks(model, stats, 32)
    assert max_relative_error(reference, run_outputs(model, evaluation)) <= 1e-5
    onnx.checker.check_model(ir.serde.serialize_model(model))
    done = [entry for entry in record["groups"] if "skipped" not in entry]
    # the FFN down projections are reordered (through SiLU(gate) * up, or GELU) ...
    assert record["reordered_groups"] == len(done) == synthetic.TINY_LAYERS
    assert all(down in entry["linears"][0] for entry in done)
    assert all(entry["block_exponent_gap_after"] < entry["block_exponent_gap_before"] for entry in done)
    if fixture == "tiny_llama":
        assert all(len(entry["producers"]) == 2 for entry in done)  # gate and up together
    changed = [linear.name for linear in analyze_graph(model).linears
               if not np.array_equal(weights[linear.name], linear.weight_array())]
    assert len(changed) == sum(1 + len(entry["producers"]) for entry in done)
    # ... and the others are left, saying why
    reasons = [entry["skipped"] for entry in record["groups"] if "skipped" in entry]
    assert sum("residual stream" in reason for reason in reasons) == 2 * synthetic.TINY_LAYERS
    assert sum("crosses attention heads" in reason for reason in reasons) == synthetic.TINY_LAYERS


def test_reorder_leaves_a_path_that_is_also_read_elsewhere(tiny_llama):
    """A value on the way out of the graph (or read by another node) would be permuted for
    that reader too: the group is skipped, naming the value."""
    feeds = synthetic.random_feeds(tiny_llama, 2, seed=1)
    model, stats = _reordered(tiny_llama, feeds)
    down = next(group for group in analyze_graph(model).groups if "down_proj" in group.linears[0].name)
    model.graph.outputs.append(down.input)
    record = reorder_for_blocks(model, stats, 32)
    first = next(entry for entry in record["groups"] if entry["linears"] == [down.linears[0].name])
    assert "is a graph output" in first["skipped"]
    assert record["reordered_groups"] == synthetic.TINY_LAYERS - 1


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt", "planted_llama"])
def test_residual_stream_permutation_is_exact_on_random_inputs(request, fixture):
    """RMSNorm and LayerNorm commute with a permutation: embeddings, writers, γ/β and readers
    permuted together leave every output unchanged, and each norm output arrives sorted."""
    path = request.getfixturevalue(fixture)
    model, stats = _reordered(path, synthetic.random_feeds(path, 4, seed=1))
    evaluation = synthetic.random_feeds(path, 3, seed=7)
    reference = run_outputs(model, evaluation)
    record = permute_residual_stream(model, stats, 32)
    assert max_relative_error(reference, run_outputs(model, evaluation)) <= 1e-5
    assert record["block_exponent_gap_after"] < record["block_exponent_gap_before"]
    assert record["norms"] == 2 * synthetic.TINY_LAYERS + 1 and record["embeddings"] >= 1
    onnx.checker.check_model(ir.serde.serialize_model(model))


def test_post_norm_residual_stream_is_left_with_its_reason(tiny_bert):
    model, stats = _reordered(tiny_bert, synthetic.random_feeds(tiny_bert, 2, seed=1))
    record = permute_residual_stream(model, stats, 32)
    assert "post-norm" in record["skipped"]


@pytest.mark.slow
def test_reorder_is_exact_on_minilm_sentences(minilm_onnx, minilm_feeds):
    calibration, heldout = minilm_feeds
    model, stats = _reordered(minilm_onnx, calibration[:12])
    reference = run_outputs(model, heldout[:6])
    record = reorder_for_blocks(model, stats, 32)
    assert record["reordered_groups"] == 6  # FFN2 of each layer
    assert record["block_exponent_gap_after_mean"] < record["block_exponent_gap_before_mean"]
    assert max_relative_error(reference, run_outputs(model, heldout[:6])) <= 1e-5


def test_mxfp4_reorder_recipe_quantizes_a_tiny_llama(tiny_llama):
    model = load_canonical(tiny_llama)
    evaluation = synthetic.random_feeds(tiny_llama, 3, seed=7)
    reference = run_outputs(model, evaluation)
    record = run_recipe(model, load_recipe("mxfp4-reorder-w4a4"), synthetic.random_feeds(tiny_llama, 4, seed=1),
                        progress=False)[-1]
    assert record["simulated"] and record["linear_layers"] == 7 * synthetic.TINY_LAYERS
    assert record["reorder"]["reordered_groups"] == synthetic.TINY_LAYERS
    assert record["reorder"]["residual_stream"]["readers"] == 5 * synthetic.TINY_LAYERS + 1  # + the lm_head
    onnx.checker.check_model(ir.serde.serialize_model(model))
    for ref, got in zip(reference, run_outputs(model, evaluation)):
        a, b = ref[0].ravel().astype(np.float64), got[0].ravel().astype(np.float64)
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.5
