"""The measurements behind the analysis report: which linear reads which input, matching
the quantized model's layers to the fp32 ones, per-layer SQNR (after a per-channel affine
alignment where an equivalence rewrite moved a scale into the layer), and the
one-layer-at-a-time sensitivity ranking. Each probe runs onnxruntime on the probe samples.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable, Sequence

import numpy as np

from outlierquant.calibration.session import create_session
from outlierquant.emit.qdq import QuantConfig
from outlierquant.errors import InputError
from outlierquant.evaluate.report_data import InputStats, LayerFidelity, Sensitivity
from outlierquant.graph.values import is_constant
from outlierquant.progress import track

logger = logging.getLogger(__name__)


_LINEAR_OPS = ("MatMul", "Gemm", "Conv")


def layer_inputs(model) -> dict[str, list[tuple[str, tuple[str, int]]]]:
    """activation input tensor -> [(linear node name, (output tensor, output channel axis))]."""

    found: dict[str, list[tuple[str, tuple[str, int]]]] = {}
    for index, node in enumerate(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _LINEAR_OPS or len(node.inputs) < 2:
            continue
        first, second = node.inputs[0], node.inputs[1]
        if first is None or second is None or not node.outputs:
            continue
        if is_constant(second) and not is_constant(first):
            activation = first
        elif node.op_type != "Conv" and is_constant(first) and not is_constant(second):
            activation = second
        else:
            continue
        if not activation.name:
            continue
        name = node.name or f"{node.op_type}_{index}"
        axis = 1 if node.op_type == "Conv" else -1
        found.setdefault(activation.name, []).append((name, (node.outputs[0].name, axis)))
    return found


def match_linears(
    linears, quant_model, reference_model=None, rewritten: dict[str, list[str]] | None = None
) -> tuple[list[tuple[str, str, int, str]], list[str], dict[str, str]]:
    """(fp32 output, quantized output, axis, node) for each linear found in both models.

    A linear is matched by its node name, then by its output tensor's name, then — for a
    linear a pass rewrote into several nodes (``llm-int8``'s int8 part + float outlier
    channels, ``online-hadamard``'s rotation) — through the consumers of its output: the
    node that read the fp32 output (its bias ``Add``, say) usually keeps its name, and the
    tensor it reads at the same input position is the rewritten linear's output.
    ``rewritten``: node -> the passes whose records name it (from the quantized model's
    report). Returns the matches, the unmatched nodes and, for those, why.
    """
    rewritten = rewritten or {}
    by_node = {n.name: n for n in quant_model.graph if n.name}
    produced = {out.name for n in quant_model.graph for out in n.outputs}
    consumers: dict[str, list[tuple[str, int]]] = {}
    if reference_model is not None:
        for n in reference_model.graph:
            for index, value in enumerate(n.inputs):
                if value is not None and value.name and n.name:
                    consumers.setdefault(value.name, []).append((n.name, index))
    matched, unmatched, reasons = [], [], {}
    for node_name, output, axis in linears:
        node = by_node.get(node_name)
        if node is not None and node.outputs and node.outputs[0].name:
            matched.append((output, node.outputs[0].name, axis, node_name))
            continue
        if output in produced:
            matched.append((output, output, axis, node_name))
            continue
        found = None
        for consumer, index in consumers.get(output, []):
            twin = by_node.get(consumer)
            if twin is None or twin.op_type in _LINEAR_OPS or index >= len(twin.inputs):
                continue
            value = twin.inputs[index]
            if value is not None and value.name and value.name in produced:
                found = value.name
                break
        if found is not None:
            matched.append((output, found, axis, node_name))
            continue
        unmatched.append(node_name)
        passes = rewritten.get(node_name)
        reasons[node_name] = (
            f"rewritten by {', '.join(passes)}; neither it, its output nor a consumer of its output keeps its name"
            if passes else "no node, output or consumer of that name in the quantized model"
        )
    if unmatched:
        logger.info("%d linears have no counterpart in the quantized model", len(unmatched))
    return matched, unmatched, reasons


def upstream_linears(model, linears: Iterable[str]) -> dict[str, list[str]]:
    """linear node -> the nearest linears upstream of its activation input (through any
    non-linear nodes), in the fp32 graph: whose error a layer's output SQNR inherits."""
    names = set(linears)
    memo: dict[int, frozenset[str]] = {}

    def above(value) -> frozenset[str]:
        if value is None or is_constant(value):
            return frozenset()
        key = id(value)
        if key in memo:
            return memo[key]
        memo[key] = frozenset()  # cycles cannot occur in a valid graph; guard anyway
        producer = value.producer()
        if producer is None:
            found: frozenset[str] = frozenset()
        elif producer.name in names:
            found = frozenset([producer.name])
        else:
            found = frozenset().union(*[above(v) for v in producer.inputs]) if producer.inputs else frozenset()
        memo[key] = found
        return found

    result: dict[str, list[str]] = {}
    for node in model.graph:
        if node.name in names and node.inputs:
            found = frozenset().union(*[above(v) for v in node.inputs if v is not None and not is_constant(v)])
            result[node.name] = sorted(found)
    return result


def rewritten_linears(records: Sequence[dict], names: Iterable[str]) -> dict[str, list[str]]:
    """node -> passes whose record names it as done (not skipped), from a quantization report.

    Reads the entries passes write per linear or group — ``llm-int8``'s ``layers``
    (``linear``), ``online-hadamard``'s ``rotated`` and ``outliertune``'s ``groups``
    (``linears``), ``quantize-embeddings``' ``tables`` (``node``) — in any nesting, and
    keeps those without a ``skipped`` reason.
    """
    known = set(names)
    found: dict[str, list[str]] = {}

    def walk(value, pass_name: str) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("skipped"), str):  # a reason: this entry was left alone
                return
            for key in ("linear", "linears", "node", "nodes"):
                entry = value.get(key)
                for name in [entry] if isinstance(entry, str) else entry if isinstance(entry, list) else []:
                    if isinstance(name, str) and name in known and pass_name not in found.get(name, []):
                        found.setdefault(name, []).append(pass_name)
            for key, item in value.items():
                if key not in ("options", "skipped", "summary"):
                    walk(item, pass_name)
        elif isinstance(value, list):
            for item in value:
                walk(item, pass_name)

    for record in records:
        if isinstance(record, dict):
            walk(record, str(record.get("pass", "?")))
    return found


class Labeller:
    """Short, readable layer names: the common prefix and the op suffix stripped."""

    def __init__(self, names: Iterable[str]) -> None:
        names = list(names)
        parts = [n.strip("/").split("/") for n in names]
        common = 0
        if len(parts) > 1:
            while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
                common += 1
        self._short = {}
        for name, p in zip(names, parts):
            rest = p[common:]
            if len(rest) > 1 and rest[-1].split("_")[0] in _LINEAR_OPS:
                rest = rest[:-1]
            self._short[name] = "/".join(rest) or name

    def __call__(self, name: str) -> str:
        return self._short.get(name, name)

    def group(self, names: Sequence[str]) -> str:
        shorts = [self(n) for n in names]
        if len(shorts) == 1:
            return shorts[0]
        split = [s.split("/") for s in shorts]
        common = 0
        while all(len(p) > common + 1 for p in split) and len({p[common] for p in split}) == 1:
            common += 1
        head = "/".join(split[0][:common])
        tails = ",".join("/".join(p[common:]) for p in split)
        return f"{head}/{{{tails}}}" if head else "{" + tails + "}"


def recurring_channels(inputs: Sequence[InputStats], threshold: float, fraction: float) -> dict[int, list[int]]:
    recurring: dict[int, list[int]] = {}
    by_width: dict[int, list[InputStats]] = {}
    for s in inputs:
        by_width.setdefault(s.channels, []).append(s)
    for width, group in sorted(by_width.items()):
        if len(group) < 2:
            continue
        hits = np.sum([s.absmax >= threshold for s in group], axis=0)
        needed = max(2, math.ceil(fraction * len(group)))
        channels = [int(j) for j in np.flatnonzero(hits >= needed)]
        if channels:
            recurring[width] = channels
    return recurring


class Runner:
    """One onnxruntime session over an in-memory model with extra outputs added lazily."""

    def __init__(self, model, stack: contextlib.ExitStack, *, custom_ops: bool = False) -> None:
        self.model = model
        self.stack = stack
        self.custom_ops = custom_ops
        self.outputs = [v.name for v in model.graph.outputs]
        self.session = None
        self.extra: list[str] = []

    def open(self, extra: Sequence[str]) -> None:
        import onnxruntime as ort


        self.extra = [name for name in dict.fromkeys(extra) if name not in self.outputs]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        if self.custom_ops:
            from outlierquant import custom_ops

            if custom_ops.available():
                options = custom_ops.session_options(options)
        try:
            self.session = create_session(self.model, self.extra, options, None, self.stack, bind_weights=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"onnxruntime cannot load the model for analysis ({first})") from exc

    def run(self, feed: dict) -> dict[str, np.ndarray]:
        names = self.outputs + self.extra
        return dict(zip(names, self.session.run(names, feed)))


class _Moments:
    """Streaming raw moments of all values of a tensor, for the kurtosis."""

    def __init__(self) -> None:
        self.n = 0
        self.sums = np.zeros(4)

    def update(self, x: np.ndarray) -> None:
        x = x.astype(np.float64, copy=False).ravel()
        x2 = x * x
        self.n += x.size
        self.sums += (x.sum(), x2.sum(), (x2 * x).sum(), (x2 * x2).sum())

    def kurtosis(self) -> float:
        if self.n == 0:
            return float("nan")
        m1, m2, m3, m4 = self.sums / self.n
        var = m2 - m1 * m1
        if var <= 0:
            return float("nan")
        central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        return float(central4 / (var * var))


class _AlignedError:
    """Σy², Σ(y−ŷ)² and the per-channel sums for the affine fit ``y ≈ α ŷ + β``."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.sums: list[np.ndarray] | None = None  # n, Σŷ, Σy, Σŷ², Σŷy, Σy² per channel

    def update(self, ref: np.ndarray, cand: np.ndarray, axis: int) -> None:
        ref = np.moveaxis(ref.astype(np.float64, copy=False), axis, -1).reshape(-1, ref.shape[axis])
        cand = np.moveaxis(cand.astype(np.float64, copy=False), axis, -1).reshape(-1, cand.shape[axis])
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum((ref - cand) ** 2))
        block = [
            np.full(ref.shape[1], ref.shape[0], dtype=np.float64),
            cand.sum(0),
            ref.sum(0),
            (cand * cand).sum(0),
            (cand * ref).sum(0),
            (ref * ref).sum(0),
        ]
        self.sums = block if self.sums is None else [a + b for a, b in zip(self.sums, block)]

    def sqnr(self) -> tuple[float, float]:
        """(raw SQNR, SQNR after the per-channel affine fit) in dB."""
        from outlierquant.evaluate.metrics import sqnr_from_sums

        raw = sqnr_from_sums(self.signal, self.noise)
        n, sc, sr, scc, scr, srr = self.sums
        with np.errstate(invalid="ignore", divide="ignore"):
            var_c = scc - sc * sc / n
            cov = scr - sc * sr / n
            var_r = srr - sr * sr / n
            residual = np.where(var_c > 1e-12 * np.maximum(scc, 1e-30), var_r - cov * cov / var_c, var_r)
        aligned = sqnr_from_sums(self.signal, float(np.maximum(residual, 0.0).sum()))
        return raw, aligned


def probe_fidelity(report, reference, quant_runner, fidelity_targets, feeds, labels, progress) -> None:
    moments = {s.tensor: _Moments() for s in report.inputs}
    outlier_counts: dict[str, np.ndarray] = {}
    token_counts: dict[str, int] = {}
    reference.open(list(moments) + [ref for ref, _, _, _ in fidelity_targets])
    if quant_runner is not None:
        quant_runner.open([cand for _, cand, _, _ in fidelity_targets])
    errors = {node: _AlignedError() for _, _, _, node in fidelity_targets}
    by_tensor = {s.tensor: s for s in report.inputs}
    for feed in track(feeds, desc="probing layers", unit="sample", progress=progress):
        ref_out = reference.run(feed)
        for name, acc in moments.items():
            value = ref_out[name]
            acc.update(value)
            rows = np.abs(value.reshape(-1, value.shape[-1])) >= report.threshold
            if rows.shape[1] == by_tensor[name].channels:
                outlier_counts[name] = outlier_counts.get(name, 0) + rows.sum(0)
                token_counts[name] = token_counts.get(name, 0) + rows.shape[0]
        if quant_runner is not None:
            cand_out = quant_runner.run(feed)
            for ref_name, cand_name, axis, node in fidelity_targets:
                ref_value, cand_value = ref_out[ref_name], cand_out[cand_name]
                if ref_value.shape != cand_value.shape:
                    continue
                errors[node].update(ref_value, cand_value, axis)
        del ref_out
    for name, acc in moments.items():
        s = by_tensor[name]
        s.kurtosis = acc.kurtosis()
        if name in outlier_counts:
            share = outlier_counts[name] / max(token_counts[name], 1)
            s.outlier_token_share = {j: float(share[j]) for j in s.outlier_channels(report.threshold)}
    for _, _, _, node in fidelity_targets:
        error = errors[node]
        if error.sums is None:
            report.unmatched_layers.append(node)
            report.unmatched_reasons[node] = "its counterpart's output has another shape on the probe samples"
            continue
        raw, aligned = error.sqnr()
        use_aligned = aligned > raw + 3.0
        report.fidelity.append(
            LayerFidelity(node, labels(node), aligned if use_aligned else raw, aligned=use_aligned, raw_sqnr_db=raw)
        )


def probe_sensitivity(report, model, stats, feeds, reference, labels, limit, progress, config=None) -> None:
    """Quantize one linear at a time and measure the first output's cosine.

    ``config``: the :class:`~outlierquant.emit.qdq.QuantConfig` to quantize each layer with
    (its ``exclude_nodes`` replaced by every other linear); default plain w8a8 static."""
    import dataclasses

    import onnx_ir as ir
    import onnxruntime as ort

    from outlierquant.evaluate.metrics import cosine_rows
    from outlierquant.passes.quantize import QuantizeQDQPass

    nodes = [node for s in sorted(report.inputs, key=lambda s: -s.ratio) for node in s.consumers]
    all_linears = [node for s in report.inputs for node in s.consumers]
    if limit is not None and len(nodes) > limit:
        report.sensitivity_note = (
            f"{limit} of {len(nodes)} linears measured: those whose input has the largest max/median ratio"
        )
        nodes = nodes[:limit]
    first_output = reference.outputs[0]
    reference_outputs = [reference.run(feed)[first_output] for feed in feeds]
    proto = ir.to_proto(model)
    for node in track(nodes, desc="sensitivity", unit="layer", progress=progress):
        candidate = ir.from_proto(proto)
        copy_external_base(model, candidate)
        others = tuple(n for n in all_linears if n != node)
        if config is None:
            layer_config = QuantConfig(
                activations="static", activation_type="uint8", dynamic_matmuls=False, exclude_nodes=others
            )
        else:
            layer_config = dataclasses.replace(config, dynamic_matmuls=False, exclude_nodes=others)
        QuantizeQDQPass(layer_config).with_stats(stats)(candidate)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        if config is not None:
            from outlierquant import custom_ops

            if custom_ops.available():
                options = custom_ops.session_options(options)
        with contextlib.ExitStack() as stack:
            session = create_session(candidate, [], options, None, stack, bind_weights=True)
            cosines = [
                cosine_rows(ref, session.run([first_output], feed)[0]) for ref, feed in zip(reference_outputs, feeds)
            ]
        report.sensitivity.append(Sensitivity(node, labels(node), float(np.mean(np.concatenate(cosines)))))
    report.sensitivity.sort(key=lambda s: (s.cosine, s.label))


def copy_external_base(source, target) -> None:
    """Point the external tensors of a proto round-trip back at the source model's folder."""
    import onnx_ir as ir

    bases = {
        v.name: v.const_value.base_dir
        for v in source.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    if not bases:
        return
    for name, value in target.graph.initializers.items():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and name in bases:
            tensor.base_dir = bases[name]
