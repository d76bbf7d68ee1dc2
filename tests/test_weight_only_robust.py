"""Weight-only sequential rounding on small calibration sets (issue 17, item 5): the damping
(and AdaDim's layout) chosen on a held-out split of the captured calibration rows."""

from __future__ import annotations

import numpy as np
import pytest
from test_weight_rounding import K, N, activations, one_linear_model, run

from outlierquant.numerics.rounding import heldout_output_error, holdout_split
from outlierquant.passes.weight_rounding import AdaDimOptions, AdaDimQuantizePass, QuantEaseOptions, QuantEaseRoundPass


def test_holdout_split_holds_out_contiguous_blocks():
    fit, held = holdout_split(800, 0.25)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == 800
    assert len(held) == 200
    runs = np.split(held, np.flatnonzero(np.diff(held) != 1) + 1)
    assert len(runs) == 2 and all(len(r) == 100 for r in runs)  # two blocks of whole samples, not every 4th row
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(10, 1.5)


def test_heldout_output_error_is_the_mean_squared_output_error():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    w = rng.normal(size=(8, 3))
    q = w + 0.01 * rng.normal(size=w.shape)
    bias = rng.normal(size=3)
    expected = float((((x @ q + bias) - x @ w) ** 2).sum() / 50)
    assert heldout_output_error(x, None, w, q, bias) == pytest.approx(expected)
    assert heldout_output_error(x, x, w, w) == 0.0


def _few_rows_case(seed: int = 3):
    """Fewer calibration rows than input channels (Σ rank-deficient), scored on fresh rows."""
    rng = np.random.default_rng(seed)
    x = activations(rng, rows=2048 + 80, outlier=5, scale=8.0)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    calibration, fresh = x[:80], x[80:]
    feeds = [{"x": calibration[i:i + 10]} for i in range(0, 80, 10)]
    return weight, feeds, fresh


def _fresh_error(model, weight, fresh) -> float:
    return float(((run(model, fresh) - fresh @ weight) ** 2).mean())


@pytest.mark.parametrize("pass_type", [QuantEaseRoundPass, AdaDimQuantizePass])
def test_damping_chosen_on_held_out_rows(pass_type):
    weight, feeds, fresh = _few_rows_case()
    extra = {"rounding": "quantease", "dimension": "adaptive"} if pass_type is AdaDimQuantizePass else {}
    errors = {}
    for candidates in ((), (0.01, 1.0, 8.0)):
        model = one_linear_model(weight)
        pass_ = pass_type(iterations=4, group_size=32, bias_correction=True, sequential=True, damp=0.01,
                          damp_candidates=candidates, **extra).with_feeds(feeds)
        record = pass_(model).record
        errors[candidates] = _fresh_error(model, weight, fresh)
        if candidates:
            layer = record["layers"][0]
            scores = layer["holdout"]["errors"]
            assert set(scores) == {"0.01", "1.0", "8.0"}
            assert layer["holdout"]["damp"] == float(min(scores, key=scores.get))  # the held-out argmin
            assert record["sequential"]["damp_chosen"] == {str(layer["holdout"]["damp"]): 1}
            assert layer["holdout"]["damp"] != 0.01  # with 80 rows for 96 channels, light damping overfits
    # fresh rows from the same distribution: the held-out choice generalises better than damp 0.01
    assert errors[(0.01, 1.0, 8.0)] < errors[()]


def test_damp_candidates_are_validated():
    with pytest.raises(ValueError, match="needs sequential"):
        QuantEaseOptions(damp_candidates=(0.1, 1.0))
    with pytest.raises(ValueError, match="damp_candidates"):
        AdaDimOptions(sequential=True, damp_candidates=(-1.0,))
    with pytest.raises(ValueError, match="holdout_fraction"):
        QuantEaseOptions(sequential=True, damp_candidates=(1.0,), holdout_fraction=0.9)


def test_damp_tolerance_takes_the_most_regularised_near_best():
    weight, feeds, _ = _few_rows_case()
    records = {}
    for tolerance in (0.0, 0.9):
        pass_ = QuantEaseRoundPass(iterations=2, group_size=32, sequential=True, damp_candidates=(0.01, 1.0, 8.0),
                                   damp_tolerance=tolerance).with_feeds(feeds)
        records[tolerance] = pass_(one_linear_model(weight)).record["layers"][0]["holdout"]
    scores = records[0.0]["errors"]
    best = min(scores.values())
    assert records[0.9]["damp"] == max(float(d) for d, e in scores.items() if e <= best * 1.9)
    assert records[0.9]["damp"] >= records[0.0]["damp"]
