"""Simulated low-bit quantization: fake-quantize linear weights (and activations) in float.

For formats onnxruntime has no kernel for (int4 activations, 4-bit weights in recipes that
study a rotation's accuracy): weights are rounded to their grid and stored dequantized
(round to nearest, or QuantEase against the calibration covariance), and activations go
through a quantize-dequantize written with float ops (:mod:`outlierquant.emit.fake_quant`).
The record says ``simulated``: the accuracy is the format's, the speed is float's.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.emit.fake_quant import fake_quantize_activation
from outlierquant.errors import CalibrationError
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import write_linear_weight
from outlierquant.graph.records import Linear
from outlierquant.graph.values import constant_array
from outlierquant.numerics.grids import as_f64, dequantize_levels, fake_quantize_weight, group_grid
from outlierquant.numerics.rounding import DEFAULT_CLIP_RATIOS, output_error, quantease_round, second_moment
from outlierquant.numerics.slabs import slabs
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SimulateQuantizationOptions:
    """Options of :class:`SimulateQuantizationPass` (every number it produces is simulated).

    ``weight_bits`` / ``weight_group_size`` (0: per output channel): symmetric RTN weights,
    with the clipping ratio searched per group when ``weight_clip_search``.
    ``activation_bits`` (``None``: float activations) with ``activations``: ``per_token``
    (symmetric, scale ``clip · max|x_t| / qmax`` per row at run time) or ``static``
    (asymmetric per tensor from the calibrated range). ``skip_output_layers``: leave
    linears whose output is a graph output (the lm_head) in float, as QuaRot does.
    """

    weight_bits: Literal[2, 3, 4, 5, 6, 7, 8] = 4
    weight_group_size: int = 0
    #: search the weight clipping ratio per group in [0.5, 1] (minimum squared error)
    weight_clip_search: bool = True
    activation_bits: int | None = 8
    activations: Literal["per_token", "static"] = "per_token"
    activation_clip: float = 1.0
    skip_output_layers: bool = True
    #: ``rtn``: symmetric round-to-nearest (above). ``quantease``: asymmetric group grid and
    #: QuantEase coordinate-descent rounding against Σ = E[xxᵀ] of each linear's calibrated
    #: input (``passes/weight_rounding.py``'s functions; needs calibration covariances)
    weight_rounding: Literal["rtn", "quantease"] = "rtn"
    #: QuantEase sweeps (``weight_rounding: quantease``)
    quantease_iterations: int = 4
    #: relative diagonal added to Σ (``weight_rounding: quantease``)
    quantease_damp: float = 0.01

    def __post_init__(self) -> None:
        check_fields(self)
        if self.weight_rounding == "quantease" and not self.weight_group_size:
            raise ValueError("weight_rounding='quantease' needs weight_group_size > 0 (groups of input rows)")
        if not isinstance(self.quantease_iterations, int) or self.quantease_iterations < 1:
            raise ValueError(f"quantease_iterations={self.quantease_iterations!r}: an integer >= 1")
        if not float(self.quantease_damp) >= 0.0:
            raise ValueError(f"quantease_damp={self.quantease_damp!r}: must be >= 0")
        if not isinstance(self.weight_group_size, int) or self.weight_group_size < 0:
            raise ValueError(f"weight_group_size={self.weight_group_size!r}: a non-negative integer")
        if self.activation_bits is not None and self.activation_bits not in (4, 6, 8):
            raise ValueError(f"activation_bits={self.activation_bits!r}: allowed 4, 6, 8 or null")
        if not 0.0 < float(self.activation_clip) <= 1.0:
            raise ValueError(f"activation_clip={self.activation_clip!r}: in (0, 1]")


class SimulateQuantizationPass(OutlierPass):
    """Fake-quantize linear weights (and activations) to low bit widths, in float (simulated)."""

    name = "simulate-quant"
    options_type = SimulateQuantizationOptions

    needs_stats = True  # QuantEase rounding, static activations

    def reads(self) -> frozenset[str]:
        options = self.options
        static = options.activation_bits is not None and options.activations == "static"
        return frozenset({"stats"}) if options.weight_rounding == "quantease" or static else frozenset()

    def covariance_targets(self, model: ir.Model) -> list[str]:
        """Inputs whose covariance QuantEase rounding reads (none for round-to-nearest)."""
        if self.options.weight_rounding != "quantease":
            return []
        return self.calibration_targets(model)

    def _quantease_weight(self, linear: Linear) -> tuple[np.ndarray, float]:
        """QuantEase-rounded dequantized weight and its relative output error tr(ΔᵀΣΔ)/tr(WᵀΣW)."""

        options = self.options
        stats = self.require_stats()[linear.input.name]
        if stats.covariance is None:
            raise CalibrationError(
                f"simulate-quant: weight_rounding=quantease needs the covariance of {linear.input.name!r}; collect "
                "statistics with covariance_for=pass.covariance_targets(model) (the pipeline does)")
        sigma, _ = second_moment(stats, options.quantease_damp)
        ratios = DEFAULT_CLIP_RATIOS if options.weight_clip_search else (1.0,)
        stored = linear.weight_array()
        k, n = stored.shape
        # per_oc groups and the coordinate descent are per output column: a slab of columns
        # at a time, so an LM head is never whole in float64 (see weight_rounding._solve)
        dequantized = np.empty((k, n), np.float32)
        error = signal = 0.0
        for cols in slabs(n, k):
            weight = as_f64(stored[:, cols])
            grid = group_grid(weight, "per_oc", options.weight_group_size, options.weight_bits,
                              row_weight=np.diag(sigma), clip_ratios=ratios)
            q = quantease_round(weight, sigma, grid, iterations=options.quantease_iterations)
            part = dequantize_levels(q, grid)
            signal += float(np.einsum("kn,kn->", weight, sigma @ weight))
            error += output_error(part - weight, sigma)
            dequantized[:, cols] = part
        return dequantized, error / (signal or 1.0)

    def _layers(self, model: ir.Model) -> list[Linear]:
        analysis = analyze_graph(model)
        layers = []
        for linear in analysis.linears:
            if linear.op_type == "Conv":
                continue
            if self.options.skip_output_layers and linear.output.is_graph_output():
                continue
            if constant_array(linear.weight).dtype != np.float32:
                continue
            layers.append(linear)
        return layers

    def calibration_targets(self, model: ir.Model) -> list:
        return sorted({linear.input.name for linear in self._layers(model)})

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        options = self.options
        graph = model.graph
        layers = self._layers(model)
        shared: dict[str, ir.Value] = {}
        errors: dict[str, float] = {}
        for linear in layers:
            if options.weight_rounding == "quantease":
                weight, errors[linear.name] = self._quantease_weight(linear)
            else:
                ratios = tuple(np.linspace(1.0, 0.5, 11)) if options.weight_clip_search else (1.0,)
                weight = fake_quantize_weight(linear.weight_array(), options.weight_bits,
                                              options.weight_group_size, clip_ratios=ratios, dtype=np.float32)
            write_linear_weight(graph, linear, weight, f"{linear.name}_weight_fake_quantized")
            if options.activation_bits is None:
                continue
            source = linear.input
            if source.name not in shared:
                shared[source.name] = self._activation(model, source, linear.node)
            linear.node.replace_input_with(0, shared[source.name])
        record = {
            "simulated": True,
            "config": dataclasses.asdict(options),
            "fake_quantized_weights": len(layers),
            "fake_quantized_activations": len(shared),
            "float_layers": [l.name for l in analyze_graph(model).linears if l.output.is_graph_output()]
            if options.skip_output_layers else [],
        }
        if errors:
            record["relative_output_error"] = errors
        logger.info("simulate-quant: W%d (group %d) A%s %s on %d linears (simulated)", options.weight_bits,
                    options.weight_group_size, options.activation_bits, options.activations, len(layers))
        return bool(layers), record

    def _activation(self, model: ir.Model, x: ir.Value, anchor: ir.Node) -> ir.Value:
        tensor_range = None
        if self.options.activations != "per_token":
            stats = self.require_stats()[x.name]
            tensor_range = (stats.tensor_min, stats.tensor_max)
        return fake_quantize_activation(model, x, anchor, int(self.options.activation_bits), self.options.activations,
                                        clip=self.options.activation_clip, tensor_range=tensor_range)
