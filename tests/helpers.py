"""Small helpers the pass tests share: load + canonicalize, run in onnxruntime, compare."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from outlierquant.passes.canonicalize import CanonicalizePass


def load_canonical(path: Path) -> ir.Model:
    """The model at ``path`` in the IR, canonicalized as every recipe starts."""
    model = ir.load(str(path))
    CanonicalizePass()(model)
    return model


def run_outputs(model: ir.Model, feeds, options=None) -> list[list[np.ndarray]]:
    """Every graph output for every feed, from an in-memory onnxruntime session."""
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return [session.run(names, feed) for feed in feeds]


def max_relative_error(before, after) -> float:
    """Worst |a - b| / max|a| over every output of every sample."""
    worst = 0.0
    for sample_before, sample_after in zip(before, after):
        for a, b in zip(sample_before, sample_after):
            worst = max(worst, float(np.abs(a - b).max()) / (float(np.abs(a).max()) or 1.0))
    return worst
