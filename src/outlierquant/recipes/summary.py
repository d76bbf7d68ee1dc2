"""One row per recipe for ``outlierquant recipes``: method, bits, real or simulated, kernels.

Derived from the passes and their options (defaults filled in), not written into the
YAML files, so a user's own recipe gets the same row and the built-in YAML stays as it
is. The rules mirror what the passes record when they run (``simulated`` in a pass
record, the ``kernels`` option):

- **simulated**: a format onnxruntime has no kernel for runs its rounding in float
  (``simulate-quant``, ``olive``, per-token activations in their QDQ form, weight rounding
  with ``activation_bits``, MX/BFP/FP4 formats); accuracy is real, speed is not.
- **our kernels**: ``required`` when a pass says ``kernels: custom``; ``if built`` for
  ``kernels: auto`` (used when the library loads, standard ops otherwise); ``no`` else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from outlierquant.recipes import Recipe, spec_options

_REAL_FORMATS = ("fp8_e4m3", "fp8_e5m2", "none")
_FORMAT_BITS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4, "mxfp8": 8, "mxfp6": 6, "mxfp4": 4, "mxint8": 8,
                "bfp8": 8, "none": 16}


@dataclasses.dataclass(frozen=True)
class RecipeSummary:
    name: str
    method: str
    bits: str
    simulated: bool
    kernels: str

    @property
    def execution(self) -> str:
        return "simulated" if self.simulated else "real"


def _get(options: Any, name: str, default: Any = None) -> Any:
    return getattr(options, name, default) if options is not None else default


def _pass_facts(name: str, options: Any) -> tuple[str | None, bool]:
    """(bits, simulated) that one pass contributes; bits ``None`` for a float rewrite."""
    if name == "quantize":
        activations = _get(options, "activations", "static")
        bits = f"W{_get(options, 'weight_bits', 8)}A{16 if activations == 'none' else 8}"
        return bits, activations == "per_token" and _get(options, "per_token_form", "qdq") == "qdq"
    if name == "llm-int8":
        simulated = _get(options, "activations") == "per_token" and _get(options, "standard_form") == "qdq" \
            and _get(options, "kernels") == "standard"
        return "W8A8 + float outliers", simulated
    if name in ("simulate-quant", "olive"):
        activation_bits = _get(options, "activation_bits")
        return f"W{_get(options, 'weight_bits', 4)}A{activation_bits or 16}", True
    if name in ("adadim", "quantease"):
        activation_bits = _get(options, "activation_bits")
        return f"W{_get(options, 'bits', 4)}A{activation_bits or 16}", activation_bits is not None
    if name == "weight-only":
        if _get(options, "layers", "all") == "output":  # the LM head only: an addition, see summarize
            return f"+ W{_get(options, 'bits', 4)} head", False
        return f"W{_get(options, 'bits', 4)}A16", False
    if name == "outliertune":
        return "W8A8", False
    if name == "format-quantize":
        weights, activations = _get(options, "weights", "none"), _get(options, "activations", "none")
        label = weights if weights == activations else f"{weights}/{activations}"
        simulated = not (weights in _REAL_FORMATS and activations in _REAL_FORMATS and _get(options, "real_types", True))
        return f"W{_FORMAT_BITS.get(weights, '?')}A{_FORMAT_BITS.get(activations, '?')} {label}", simulated
    if name == "llm-fp4":  # FP4 in float ops; the pre-shift alone (quantize: false) is a float rewrite
        return ("W4A4 fp4", True) if _get(options, "quantize", True) else (None, False)
    if name == "kv-quantize":  # the KV cache only; a packed cache is real memory, a simulated one float32
        k, v = _get(options, "key_bits", 4), _get(options, "value_bits", 4)
        return (f"KV{k}" if k == v else f"K{k or 'float'}V{v or 'float'}") + " cache", \
            _get(options, "form", "simulated") == "simulated"
    return None, False


def summarize(recipe: Recipe) -> RecipeSummary:
    bits = None
    head = None
    simulated = False
    kernels = "no"
    steps = []
    for spec in recipe.passes:
        options = spec_options(spec)
        if spec.name not in ("canonicalize", "simplify-shapes", "merge-linears"):  # graph housekeeping
            steps.append(spec.name)
        pass_bits, pass_simulated = _pass_facts(spec.name, options)
        if pass_bits and pass_bits.startswith("+ "):  # a head-only pass adds to the body's bits
            head = pass_bits
        else:
            bits = pass_bits or bits  # the last quantizer decides
        simulated = simulated or pass_simulated
        choice = _get(options, "kernels")
        if spec.name == "llm-int8" and _get(options, "activations") == "static":
            choice = None  # the static form is written as QDQ, never the kernel
        if spec.name == "quantize" and _get(options, "per_token_form") == "auto":
            choice = "auto"  # our per-token quantizer when the library loads
        if choice == "custom":
            kernels = "required"
        elif choice == "auto" and kernels == "no":
            kernels = "if built"
    bits = bits or "float"
    if head:
        bits = f"{bits} {head}"
    return RecipeSummary(recipe.name, " → ".join(steps) or "canonicalize", bits, simulated, kernels)


def recipe_table(recipes: list[Recipe]) -> str:
    """A plain-text table: name, method, bits, real/simulated, our kernels."""
    rows = [("name", "method (passes)", "bits", "runs as", "our kernels")]
    for recipe in recipes:
        s = summarize(recipe)
        rows.append((s.name, s.method, s.bits, "simulated" if s.simulated else "real", s.kernels))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
