"""The core invariant, enforced over the whole pass catalog: every pass that claims to
leave the fp32 function unchanged does, on random inputs of tiny synthetic models
(decoder and post-norm encoder) and on real sentences through all-MiniLM-L6-v2.

A new pass that sets ``claims_equivalence`` fails ``test_every_claiming_pass_is_checked``
until it is listed in ``FLOAT_OPTIONS`` with the options under which it is a float
rewrite. Each pass runs through :func:`outlierquant.pipeline.run_recipe`, so statistics
and calibration samples reach it exactly as in a real recipe.
"""

from __future__ import annotations

import pytest
import synthetic
from helpers import load_canonical, max_relative_error, run_outputs

from outlierquant.pipeline import run_recipe
from outlierquant.recipes import PASS_CATALOG, Recipe, pass_class

#: pass name -> options that keep it a float rewrite (short learning runs for speed)
FLOAT_OPTIONS: dict[str, dict] = {
    "canonicalize": {},
    "tie-weights": {},
    "smoothquant": {"alpha": 0.5},
    "os+": {},
    "reparameterize": {},
    "rotate-residual": {},
    "rotate-heads": {},
    "online-hadamard": {"kernels": "standard"},
    "rotate-qk": {"kernels": "standard"},
    "flatquant": {"steps": 5, "max_rows": 256},
    "splitquant": {},
    "qllm-disassemble": {},
    "simplify-shapes": {},
    "merge-linears": {},
}
RTOL = 1e-4


def _claiming() -> set[str]:
    return {name for name in PASS_CATALOG if pass_class(name).claims_equivalence}


def test_every_claiming_pass_is_checked():
    assert _claiming() == set(FLOAT_OPTIONS)


def _check(path, name: str, calibration, evaluation) -> None:
    model = load_canonical(path)
    reference = run_outputs(model, evaluation)
    recipe = Recipe.from_dict({"name": f"only-{name}", "passes": [{name: FLOAT_OPTIONS[name]}]})
    run_recipe(model, recipe, calibration, progress=False)
    error = max_relative_error(reference, run_outputs(model, evaluation))
    assert error <= RTOL, f"{name}: relative error {error:.2e} on {path.parent.name}"


@pytest.mark.parametrize("name", sorted(FLOAT_OPTIONS))
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert"])
def test_claiming_pass_keeps_the_function_on_random_inputs(request, fixture, name):
    path = request.getfixturevalue(fixture)
    _check(path, name, synthetic.random_feeds(path, 4, seed=1), synthetic.random_feeds(path, 3, seed=7))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FLOAT_OPTIONS))
def test_claiming_pass_keeps_the_function_on_real_sentences(minilm_onnx, minilm_feeds, name):
    calibration, heldout = minilm_feeds
    _check(minilm_onnx, name, calibration[:12], heldout[:6])
