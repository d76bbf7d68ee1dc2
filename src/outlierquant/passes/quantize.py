"""Quantization: QDQ insertion for the linear layers.

Two phases, as in onnxruntime's QDQ quantizer: :func:`plan_quantization` *declares* which
tensors are quantized, how, and along which axis (one :class:`TensorQuant` each);
:func:`insert_qdq` is the one place that writes Q/DQ nodes. Other passes (LLM.int8()
split, weight-only int4, per-token activations) add or change declarations, not nodes.

Formats (``r = s · (q − z)``):

- weights: int8, symmetric (``z = 0``), per output channel: ``s_n = max_k |W_kn| / 127``
  — onnxruntime's choice for QInt8 symmetric, so the int8 grid is [−127, 127];
- static activations: uint8, asymmetric, one scale per tensor from the calibrated range
  (zero included): ``s = (max − min) / 255``, ``z = round(−min / s)``. uint8 activations
  take MLAS's u8×s8 kernels, ~11x faster than s8×s8 on the CPUs we target;
- per-token activations (``per_token``): symmetric int8 with ``s_t = max_k |X_tk| / 127``
  computed at run time, written with standard ops (simulated: onnxruntime runs it in float).

Why our own inserter instead of ``onnxruntime.quantization.quantize_static``: its
calibration runs on whatever batches it is given and has no notion of padding (on MiniLM
padded calibration batches push the attention-score range to −3.4e38 and cosine falls
from 0.82 to 0.37); it round-trips the model through temporary files with shape
inference; it materializes every weight; and it has no per-token or blocked forms the
outlier methods need. We keep its conventions (ranges, rounding, QDQ layout) so that the
same choices give the same model — ``tests/test_quantize.py`` checks our ``w8a8`` against
its static QDQ with identical settings.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.targets import CalibrationTarget, quantizable_targets
from outlierquant.emit.kernels import use_kernel
from outlierquant.emit.mixed_int8 import mixed_int8_builder
from outlierquant.emit.qdq import QuantConfig, TensorQuant, insert_qdq, plan_quantization
from outlierquant.graph.edit import replace_linear, splittable
from outlierquant.graph.values import MS_DOMAIN, constant_array
from outlierquant.numerics.rounding import quantease_int8_weight, second_moment
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)


# -- attention probabilities: a second int8 pass on the rounding residual --------------------
#
# A static uint8 grid for softmax probabilities has the step s = max P / 255 ≈ 1/255, so
# every probability below s/2 ≈ 0.002 rounds to zero. An LLM whose heads park most of their
# attention on a sink token leaves the rest spread thinly over the other keys: on
# SmolLM2-135M 0.9-2.1 % of the attention mass sits below s/2 in every layer
# (all-MiniLM-L6-v2: 0.06-0.34 %), and probs·V loses it. Writing P = P̂ + R, with
# R = P − P̂ in [−s/2, s/2] (while P stays within the calibrated range; above it P̂ clips
# and R̂ saturates at ±s/2) quantized symmetric int8 at step s/254, gives
#
#     P·V̂ ≈ P̂·V̂ + R̂·V̂
#
# two int8 MatMuls (onnxruntime fuses each DQ-MatMul pair into MatMulIntegerToFloat)
# whose probabilities carry ~15 bits between them. No runtime op computes an int16 GEMM,
# and a float probs·V would leave the MatMul unquantized.


# -- scale math ----------------------------------------------------------------------------


# -- phase two: the one place that writes nodes ----------------------------------------


class QuantizeQDQPass(OutlierPass):
    """Insert QDQ nodes: int8 per-channel weights, uint8 static (or per-token) activations."""

    name = "quantize"
    needs_stats = True
    options_type = QuantConfig

    @property
    def config(self) -> QuantConfig:
        return self.options

    def reads(self) -> frozenset[str]:
        """Static ranges and QuantEase's Σ come from calibration; per-token scales do not."""
        config = self.config
        return frozenset({"stats"}) if config.activations == "static" or config.weight_rounding == "quantease" \
            else frozenset()

    def calibration_targets(self, model: ir.Model) -> list:

        targets = quantizable_targets(model, outputs=self.config.quantize_outputs)
        if self.config.quantize_outputs:
            # the plan quantizes every planned MatMul's output, attention MatMuls included
            known = {target.tensor for target in targets}
            for decl in plan_quantization(model, self.config):
                if decl.role == "output" and decl.tensor not in known:
                    targets.append(CalibrationTarget(decl.tensor, -1, decl.consumer or "", "output"))
                    known.add(decl.tensor)
        return targets

    def covariance_targets(self, model: ir.Model) -> list[str]:
        """The inputs of the planned linears when QuantEase rounds the weights (needs Σ)."""
        if self.config.weight_rounding != "quantease":
            return []
        nodes = {node.name: node for node in model.graph}
        return sorted({nodes[d.consumer].inputs[0].name for d in plan_quantization(model, self.config)
                       if d.role == "weight" and d.input_index == 1})

    def _rounded_weights(self, model: ir.Model, plan: list[TensorQuant]) -> dict:
        """QuantEase int8 levels for every planned ``x @ W`` weight (Gemm transB transposed)."""

        stats = self.require_stats()
        nodes = {node.name: node for node in model.graph}
        rounded = {}
        for decl in plan:
            node = nodes[decl.consumer]
            if decl.role != "weight" or decl.input_index != 1 or node.inputs[0].name not in stats:
                continue
            array = constant_array(node.inputs[1])
            if array is None or array.dtype != np.float32 or array.ndim != 2:
                continue
            transposed = node.op_type == "Gemm" and decl.axis == 0  # stored [N, K]
            weight_kn = array.T if transposed else array
            st = stats[node.inputs[0].name]
            if st.channels != weight_kn.shape[0]:
                continue
            sigma, _ = second_moment(st, self.config.quantease_damp)
            q, scale = quantease_int8_weight(weight_kn, sigma, self.config.quantease_iterations)
            rounded[(node.name, 1)] = (np.ascontiguousarray(q.T) if transposed else q, scale)
        return rounded

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        plan = plan_quantization(model, self.config)
        rounded = self._rounded_weights(model, plan) if self.config.weight_rounding == "quantease" else {}
        integer_layers: list[str] = []
        kernel = False
        if self.config.per_token_form in ("integer", "auto"):
            kernel = self.config.per_token_form == "auto" and use_kernel("auto")
            plan, integer_layers = _rewrite_integer_per_token(model, plan, rounded, kernel=kernel)
        stats = self.stats if self.config.activations == "static" else None
        counts = insert_qdq(model, plan, stats, self.config, rounded)
        layers = sorted({d.consumer for d in plan if d.role == "weight"} | set(integer_layers))
        record = {
            "quantease_rounded_weights": len(rounded),
            "integer_per_token_layers": len(integer_layers),
            "per_token_kernel": kernel and bool(integer_layers),
            "config": dataclasses.asdict(self.config),
            "quantized_weights": counts["weights"],
            "static_activation_qdq": counts["activations"],
            "per_token_activation_qdq": counts["per_token"],
            "quantized_outputs": counts["outputs"],
            "linear_layers": len(layers),
            "simulated": counts["per_token"] > 0,
        }
        logger.info(
            "quantized %d weights, %d static activation tensors, %d per-token",
            counts["weights"],
            counts["activations"],
            counts["per_token"],
        )
        return bool(plan), record


def _rewrite_integer_per_token(model: ir.Model, plan: list[TensorQuant], rounded: dict | None = None, *,
                               kernel: bool = False) -> tuple[list[TensorQuant], list[str]]:
    """Replace each planned linear by real per-token int8 arithmetic: standard ops, or with
    ``kernel`` our per-token quantizer (shared by the linears of one input) feeding
    onnxruntime's MatMulIntegerToFloat.

    Returns the rest of the plan (the declarations of the linears that could not be
    rewritten, and the activation x activation MatMuls) and the rewritten linears' names.
    """
    from outlierquant.graph.analysis import analyze_graph

    weighted = {d.consumer for d in plan if d.role == "weight"}
    analysis = analyze_graph(model)
    opset = model.opset_imports.get("", 13)
    done: list[str] = []
    shared: dict = {}
    for node in list(model.graph):
        if node.name not in weighted:
            continue
        linear = analysis.linear_for_node(node)
        if linear is None or splittable(linear) is not None:
            continue
        weight = np.asarray(linear.weight_array(), dtype=np.float32)
        label = f"{node.name or 'linear'}_pt_int8"
        prepared = (rounded or {}).get((node.name, 1))
        if prepared is not None and node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            prepared = (np.ascontiguousarray(prepared[0].T), prepared[1])  # back to [K, N]
        build = mixed_int8_builder(weight, np.zeros(0, np.int64), label, "gemm" if kernel else "integer", opset,
                                   prepared=prepared, shared=shared)
        replace_linear(model.graph, linear, build, label)
        done.append(node.name)
    if kernel and done:
        from outlierquant.custom_ops import DOMAIN

        model.opset_imports.setdefault(DOMAIN, 1)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    rewritten = set(done)
    return [d for d in plan if d.consumer not in rewritten], done
