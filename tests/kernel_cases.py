"""Direct-kernel cases for the ``ai.outlierquant`` ops, each a one-node model run through
onnxruntime with the kernel library registered by :func:`outlierquant.custom_ops.session_options`.

Two kinds of case, in one table (:data:`CASES`):

- malformed nodes or inputs (``error`` set): onnxruntime must raise, at session creation or
  at run time, with a message matching ``error``; a crash is a failure;
- edge cases that are valid (``error`` None): absent optional inputs and outputs, empty
  dimensions, thread-pool splits; the outputs must match the numpy references.

A crash must not take pytest down with it, so the cases run in child processes:
:func:`run_isolated` starts ``python kernel_cases.py``, which runs the cases one after another
and reports each on stdout; when the child dies, the case it was running is recorded as
crashed and a new child continues with the next one. ``--library PATH`` makes the child use
another build of the library (the sanitizer test's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from outlierquant import custom_ops
from outlierquant.custom_ops import reference
from outlierquant.numerics import hadamard

HADAMARD = "HadamardTransform"
QUANTIZE = "DynamicQuantizePerToken"
MIXED = "MixedInt8MatMul"
OPS = (HADAMARD, QUANTIZE, MIXED)
OPSET = 18
#: the element type of each output, as the ops declare them
OUTPUT_TYPES = {
    HADAMARD: [TensorProto.FLOAT],
    QUANTIZE: [TensorProto.INT8, TensorProto.FLOAT, TensorProto.UINT8],
    MIXED: [TensorProto.FLOAT],
}

Outputs = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Case:
    name: str
    op: str
    inputs: Sequence[str]  # node inputs; "" leaves an optional input out
    outputs: Sequence[str]  # node outputs; "" leaves an optional output out
    feeds: Mapping[str, np.ndarray] = field(default_factory=dict)  # graph inputs
    initializers: Mapping[str, np.ndarray] = field(default_factory=dict)
    attributes: Mapping[str, object] = field(default_factory=dict)
    #: regex onnxruntime's error must match; None: the case must run and pass ``check``
    error: str | None = None
    check: Callable[[Outputs], None] | None = None
    #: element types declared for graph outputs, where they differ from the op's
    output_types: Mapping[str, int] = field(default_factory=dict)
    #: run the session concurrently from this many Python threads
    threads: int = 1


# --- model building and one case's run -------------------------------------------------


def build_model(case: Case) -> onnx.ModelProto:
    nodes = [helper.make_node(case.op, list(case.inputs), list(case.outputs), domain=custom_ops.DOMAIN,
                              **case.attributes)]
    graph_inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), None)
                    for name, value in case.feeds.items()]
    declared = OUTPUT_TYPES[case.op]
    graph_outputs = [
        helper.make_tensor_value_info(
            name, case.output_types.get(name, declared[i] if i < len(declared) else TensorProto.FLOAT), None)
        for i, name in enumerate(case.outputs) if name
    ]
    if not graph_outputs and case.feeds:
        # a graph needs an output even when the node under test leaves all of its own out
        first = next(iter(case.feeds))
        nodes.append(helper.make_node("Identity", [first], ["passthrough"]))
        graph_outputs.append(helper.make_tensor_value_info(
            "passthrough", helper.np_dtype_to_tensor_dtype(case.feeds[first].dtype), None))
    initializers = [numpy_helper.from_array(value, name) for name, value in case.initializers.items()]
    graph = helper.make_graph(nodes, case.name, graph_inputs, graph_outputs, initializers)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", OPSET),
                                                                   helper.make_opsetid(custom_ops.DOMAIN, 1)])


def run_case(case: Case) -> str | None:
    """Run one case in this process; None when it passes, else what went wrong."""
    import onnxruntime as ort

    model = build_model(case).SerializeToString()
    try:
        session = ort.InferenceSession(model, custom_ops.session_options(), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        if case.threads > 1:
            results: list = [None] * case.threads
            errors: list[BaseException] = []

            def worker(index: int) -> None:
                try:
                    results[index] = session.run(None, dict(case.feeds))
                except BaseException as error:  # noqa: BLE001 - reported below
                    errors.append(error)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(case.threads)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
        else:
            results = [session.run(None, dict(case.feeds))]
    except Exception as error:  # onnxruntime raises its own exception types
        if case.error is None:
            return f"unexpected error: {error}"
        if not re.search(case.error, str(error)):
            return f"the error does not match {case.error!r}: {error}"
        return None
    if case.error is not None:
        return f"no error; expected one matching {case.error!r}"
    try:
        for values in results:
            if case.check is not None:
                case.check(dict(zip(names, values)))
    except AssertionError as failure:
        return f"wrong outputs: {failure}"
    return None


# --- checks against the references -----------------------------------------------------


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5) -> None:
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    scale = float(np.abs(expected).max()) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _hadamard_check(x: np.ndarray, block: np.ndarray | None = None) -> Callable[[Outputs], None]:
    expected = hadamard.hadamard_transform(x, block)
    return lambda out: _close(out["y"], expected)


def _quantize_check(x: np.ndarray, q_name: str | None = "q", s_name: str | None = "s",
                    u8_name: str | None = None) -> Callable[[Outputs], None]:
    q_ref, s_ref = reference.dynamic_quantize_per_token(x)

    def check(out: Outputs) -> None:
        if q_name:
            np.testing.assert_array_equal(out[q_name], q_ref)
            assert out[q_name].dtype == np.int8
        if s_name:
            np.testing.assert_array_equal(out[s_name], s_ref)
            assert out[s_name].dtype == np.float32
        if u8_name:  # the codes + 128, in onnxruntime's u8 activation layout
            np.testing.assert_array_equal(out[u8_name].astype(np.int16) - 128, q_ref)
            assert out[u8_name].dtype == np.uint8

    return check


def _mixed_check(x: np.ndarray, *weights, threshold: float = 0.0) -> Callable[[Outputs], None]:
    expected = reference.mixed_int8_matmul(x, *weights, threshold=threshold)
    return lambda out: _close(out["y"], expected)


def _shape_check(name: str, shape: tuple[int, ...]) -> Callable[[Outputs], None]:
    def check(out: Outputs) -> None:
        assert out[name].shape == shape, f"{name} has shape {out[name].shape}, expected {shape}"

    return check


# --- the table -------------------------------------------------------------------------


def _x(*shape: int, seed: int = 0, outliers: Sequence[int] = ()) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for channel in outliers:
        x[..., channel] *= 40
    return x


def _with_nan(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.flat[0] = np.nan
    x.flat[-1] = np.inf
    return x


def _hadamard_cases() -> list[Case]:
    x8 = _x(2, 8)
    block3 = hadamard.orthogonal_block(3).astype(np.float32)
    x48 = _x(4, 48, seed=1)

    def bad(name: str, error: str, *, inputs=("x",), outputs=("y",), feeds=None, inits=None, **kw) -> Case:
        return Case(name, HADAMARD, inputs, outputs, {"x": x8} if feeds is None else feeds, inits or {},
                    error=error, **kw)

    def run_time(name: str, problem: str, x: np.ndarray, block: np.ndarray | None = None) -> Case:
        inputs = ("x", "block") if block is not None else ("x",)
        feeds = {"x": x} if block is None else {"x": x, "block": block}
        return bad(name, rf"{HADAMARD}: .*{problem}", inputs=inputs, feeds=feeds)

    ok_x = _x(256, 1024, seed=2)
    return [
        bad("hadamard/no_inputs", r"input size|required", inputs=(), feeds={}),
        bad("hadamard/x_empty_name", r"empty string|required", inputs=("",), feeds={}),
        bad("hadamard/x_empty_name_with_block", r"empty string|required", inputs=("", "block"),
            feeds={"block": block3}),
        bad("hadamard/three_inputs", r"input size|at most", inputs=("x", "block", "x"),
            feeds={"x": x48, "block": block3}),
        bad("hadamard/two_outputs", r"output size|at most", outputs=("y", "z")),
        bad("hadamard/output_empty_name", r"empty string|required", outputs=("",)),
        bad("hadamard/no_outputs", r"output size|required|at least", outputs=()),
        bad("hadamard/x_float64", r"Type Error|float32", feeds={"x": x8.astype(np.float64)}),
        bad("hadamard/x_int8", r"Type Error|float32", feeds={"x": x8.astype(np.int8)}),
        bad("hadamard/x_float16", r"Type Error|float32", feeds={"x": x8.astype(np.float16)}),
        bad("hadamard/block_float64", r"Type Error|float32", inputs=("x", "block"),
            feeds={"x": x48, "block": block3.astype(np.float64)}),
        bad("hadamard/block_int64", r"Type Error|float32", inputs=("x", "block"),
            feeds={"x": x48, "block": np.eye(3, dtype=np.int64)}),
        bad("hadamard/y_declared_int8", r"Type Error|type|int8", output_types={"y": TensorProto.INT8}),
        run_time("hadamard/x_scalar", r"rank >= 1", np.array(1.0, np.float32)),
        run_time("hadamard/last_dim_zero", r"last dimension 0 is not", _x(2, 0)),
        run_time("hadamard/last_dim_zero_no_rows", r"last dimension 0 is not", _x(0, 0)),
        run_time("hadamard/last_dim_12", r"last dimension 12 is not m \* 2\^k for block size m = 1", _x(2, 12)),
        run_time("hadamard/last_dim_7", r"last dimension 7 is not", _x(3, 7)),
        run_time("hadamard/block_not_square", r"square m x m.*\[3, 4\]", x48, np.ones((3, 4), np.float32)),
        run_time("hadamard/block_rank1", r"square m x m.*\[9\]", x48, np.ones(9, np.float32)),
        run_time("hadamard/block_rank3", r"square m x m.*\[1, 3, 3\]", x48, block3[None]),
        run_time("hadamard/block_scalar", r"square m x m.*\[\]", x48, np.array(1.0, np.float32)),
        run_time("hadamard/block_0x0", r"square m x m matrix with m >= 1.*\[0, 0\]", x48, np.zeros((0, 0), np.float32)),
        run_time("hadamard/block_does_not_divide", r"last dimension 10 is not m \* 2\^k for block size m = 3",
                 _x(2, 10), block3),
        run_time("hadamard/block_quotient_not_power_of_two", r"last dimension 18 is not .* m = 3", _x(2, 18), block3),
        run_time("hadamard/block_larger_than_dim", r"last dimension 2 is not .* m = 3", _x(2, 2), block3),
        # valid edge cases
        Case("hadamard/ok_block_left_out_by_empty_name", HADAMARD, ("x", ""), ("y",), {"x": x8},
             check=_hadamard_check(x8)),
        Case("hadamard/ok_block_3", HADAMARD, ("x", "block"), ("y",), {"x": x48, "block": block3},
             check=_hadamard_check(x48, block3)),
        Case("hadamard/ok_block_1x1", HADAMARD, ("x", "block"), ("y",), {"x": x8, "block": np.ones((1, 1), np.float32)},
             check=_hadamard_check(x8, np.ones((1, 1), np.float32))),
        Case("hadamard/ok_dim_1", HADAMARD, ("x",), ("y",), {"x": _x(3, 1)}, check=_hadamard_check(_x(3, 1))),
        Case("hadamard/ok_no_rows", HADAMARD, ("x",), ("y",), {"x": _x(0, 8)}, check=_shape_check("y", (0, 8))),
        Case("hadamard/ok_rank1", HADAMARD, ("x",), ("y",), {"x": _x(16)}, check=_hadamard_check(_x(16))),
        Case("hadamard/ok_rank4", HADAMARD, ("x",), ("y",), {"x": _x(2, 1, 3, 32)},
             check=_hadamard_check(_x(2, 1, 3, 32))),
        Case("hadamard/ok_thread_pool", HADAMARD, ("x",), ("y",), {"x": ok_x}, check=_hadamard_check(ok_x)),
        Case("hadamard/ok_concurrent_runs", HADAMARD, ("x", "block"), ("y",), {"x": x48, "block": block3},
             check=_hadamard_check(x48, block3), threads=4),
        Case("hadamard/ok_non_finite_input_runs", HADAMARD, ("x",), ("y",), {"x": _with_nan(x8)},
             check=_shape_check("y", (2, 8))),
    ]


def _quantize_cases() -> list[Case]:
    x = _x(3, 7, 64, seed=3, outliers=(0,))
    x[0, 0] = 0  # an all-zero row

    def bad(name: str, error: str, *, inputs=("x",), outputs=("q", "s"), feeds=None, **kw) -> Case:
        return Case(name, QUANTIZE, inputs, outputs, {"x": x} if feeds is None else feeds, error=error, **kw)

    def ok(name: str, value: np.ndarray, outputs=("q", "s"), **kw) -> Case:
        q_name = outputs[0] if len(outputs) > 0 and outputs[0] else None
        s_name = outputs[1] if len(outputs) > 1 and outputs[1] else None
        u8_name = outputs[2] if len(outputs) > 2 and outputs[2] else None
        return Case(name, QUANTIZE, ("x",), outputs, {"x": value},
                    check=_quantize_check(value, q_name, s_name, u8_name), **kw)

    big = _x(1024, 256, seed=4, outliers=(5,))
    return [
        bad("quantize/no_inputs", r"input size|required", inputs=(), feeds={}),
        bad("quantize/x_empty_name", r"empty string|required", inputs=("",), feeds={}),
        bad("quantize/two_inputs", r"input size|at most", inputs=("x", "x")),
        bad("quantize/four_outputs", r"output size|at most", outputs=("q", "s", "u", "t")),
        bad("quantize/x_float64", r"Type Error|float32", feeds={"x": x.astype(np.float64)}),
        bad("quantize/x_int32", r"Type Error|float32", feeds={"x": x.astype(np.int32)}),
        bad("quantize/x_uint8", r"Type Error|float32", feeds={"x": x.astype(np.uint8)}),
        bad("quantize/x_float16", r"Type Error|float32", feeds={"x": x.astype(np.float16)}),
        bad("quantize/x_bool", r"Type Error|float32", feeds={"x": x > 0}),
        bad("quantize/second_input_empty_name", r"input size|at most", inputs=("x", "")),
        bad("quantize/fourth_output_empty_name", r"output size|at most", outputs=("q", "s", "u", "")),
        bad("quantize/u8_declared_int8", r"Type Error|type", outputs=("q", "s", "u"),
            output_types={"u": TensorProto.INT8}),
        bad("quantize/q_declared_float", r"Type Error|type", output_types={"q": TensorProto.FLOAT}),
        bad("quantize/scale_declared_int8", r"Type Error|type", output_types={"s": TensorProto.INT8}),
        bad("quantize/x_scalar", rf"{QUANTIZE}: input 0 \(X\) must have rank >= 1",
            feeds={"x": np.array(2.0, np.float32)}),
        bad("quantize/x_scalar_only_scale", rf"{QUANTIZE}: input 0 \(X\) must have rank >= 1", outputs=("", "s"),
            feeds={"x": np.array(2.0, np.float32)}),
        # valid edge cases: the tester's crash was the first three
        ok("quantize/ok_only_q_declared", x, ("q",)),
        ok("quantize/ok_scale_left_out_by_empty_name", x, ("q", "")),
        ok("quantize/ok_q_left_out_by_empty_name", x, ("", "s")),
        ok("quantize/ok_both_left_out", x, ("", "")),
        ok("quantize/ok_both", x),
        ok("quantize/ok_all_three", x, ("q", "s", "u")),
        ok("quantize/ok_third_output_empty_name", x, ("q", "s", "")),
        ok("quantize/ok_only_u8_and_scale", x, ("", "s", "u")),
        ok("quantize/ok_thread_pool_only_u8", big, ("", "", "u")),
        ok("quantize/ok_ties_to_even", np.array([[127, 0.5, 1.5, 2.5, -0.5, -2.5, -126.5]], np.float32)),
        ok("quantize/ok_last_dim_zero", _x(3, 0)),
        ok("quantize/ok_last_dim_zero_only_scale", _x(3, 0), ("", "s")),
        ok("quantize/ok_no_rows", _x(0, 5)),
        ok("quantize/ok_rank1", _x(7, seed=5)),
        ok("quantize/ok_rank4", _x(2, 3, 1, 9, seed=6)),
        ok("quantize/ok_thread_pool", big),
        ok("quantize/ok_thread_pool_only_q", big, ("q",)),
        ok("quantize/ok_concurrent_runs", big, threads=4),
        Case("quantize/ok_non_finite_input_runs", QUANTIZE, ("x",), ("q", "s"), {"x": _with_nan(x)},
             check=_shape_check("q", x.shape)),
    ]


def _mixed_cases() -> list[Case]:
    k, n = 8, 4
    rng = np.random.default_rng(7)
    x = _x(2, 3, k, seed=8, outliers=(1,))
    weight = rng.standard_normal((k, n)).astype(np.float32)
    wq, ws, idx, wo = reference.prepare_mixed_int8_weights(weight, [1, 5])
    inits = {"wq": wq, "ws": ws, "idx": idx, "wo": wo}
    all_inputs = ("x", "wq", "ws", "idx", "wo")

    def bad(name: str, error: str, *, inputs=all_inputs, outputs=("y",), feeds=None, replace=None, **kw) -> Case:
        used = {**inits, **(replace or {})}
        used = {key: value for key, value in used.items() if key in inputs}
        return Case(name, MIXED, inputs, outputs, {"x": x} if feeds is None else feeds, used, error=error, **kw)

    def run_time(name: str, problem: str, **kw) -> Case:
        return bad(name, rf"{MIXED}: .*{problem}", **kw)

    def attribute(name: str, value: object, problem: str) -> Case:
        return bad(name, rf"{MIXED}: attribute 'threshold' {problem}", attributes={"threshold": value})

    def ok(name: str, x_value: np.ndarray, weights: tuple, *, inputs=all_inputs, threshold: float = 0.0,
           **kw) -> Case:
        names = ("wq", "ws", "idx", "wo")
        used = {key: value for key, value in zip(names, weights) if key in inputs and value is not None}
        attributes = {"threshold": threshold} if threshold else {}
        present = [value if key in inputs else None for key, value in zip(names, weights)]
        return Case(name, MIXED, inputs, ("y",), {"x": x_value}, used, attributes,
                    check=_mixed_check(x_value, *present, threshold=threshold), **kw)

    big_x = _x(600, 16, seed=9, outliers=(4,))
    big_weights = reference.prepare_mixed_int8_weights(rng.standard_normal((16, 2048)).astype(np.float32), [4])
    pool_x = _x(512, 256, seed=10, outliers=(3, 70))
    pool_weights = reference.prepare_mixed_int8_weights(rng.standard_normal((256, 32)).astype(np.float32), [3])
    no_outliers = reference.prepare_mixed_int8_weights(weight, [])
    every_channel = reference.prepare_mixed_int8_weights(weight, np.arange(k))
    return [
        # arity and element types (onnxruntime checks them against the declared signature)
        bad("mixed/no_inputs", r"input size|required", inputs=(), feeds={}),
        bad("mixed/only_x", r"input size|required", inputs=("x",)),
        bad("mixed/w_scale_left_out", r"input size|required", inputs=("x", "wq")),
        bad("mixed/w_q_empty_name", r"empty string|required", inputs=("x", "", "ws")),
        bad("mixed/x_empty_name", r"empty string|required", inputs=("", "wq", "ws"), feeds={}),
        bad("mixed/w_scale_empty_name", r"empty string|required", inputs=("x", "wq", "")),
        bad("mixed/six_inputs", r"input size|at most", inputs=(*all_inputs, "x")),
        bad("mixed/two_outputs", r"output size|at most", outputs=("y", "z")),
        bad("mixed/output_empty_name", r"empty string|required", outputs=("",)),
        bad("mixed/no_outputs", r"output size|required|at least", outputs=()),
        bad("mixed/x_float64", r"Type Error|float32", feeds={"x": x.astype(np.float64)}),
        bad("mixed/x_int8", r"Type Error|float32", feeds={"x": x.astype(np.int8)}),
        bad("mixed/w_q_uint8", r"Type Error|int8", replace={"wq": wq.view(np.uint8)}),
        bad("mixed/w_q_float32", r"Type Error|int8", replace={"wq": wq.astype(np.float32)}),
        bad("mixed/w_scale_float64", r"Type Error|float32", replace={"ws": ws.astype(np.float64)}),
        bad("mixed/outlier_channels_int32", r"Type Error|int64", replace={"idx": idx.astype(np.int32)}),
        bad("mixed/W_outlier_float16", r"Type Error|float32", replace={"wo": wo.astype(np.float16)}),
        bad("mixed/y_declared_int8", r"Type Error|type", output_types={"y": TensorProto.INT8}),
        # shapes
        run_time("mixed/x_scalar", r"input 0 \(X\) must have rank >= 1", feeds={"x": np.array(1.0, np.float32)}),
        run_time("mixed/w_q_rank1", r"input 1 \(W_q\) must be \[K, N\] with K = X.shape\[-1\] = 8, got \[32\]",
                 replace={"wq": wq.reshape(-1)}),
        run_time("mixed/w_q_rank3", r"input 1 \(W_q\) must be \[K, N\].*\[1, 8, 4\]", replace={"wq": wq[None]}),
        run_time("mixed/k_mismatch", r"input 1 \(W_q\) must be \[K, N\] with K = X.shape\[-1\] = 8, got \[6, 4\]",
                 replace={"wq": wq[:6]}),
        run_time("mixed/k_mismatch_x_empty_rows", r"K = X.shape\[-1\] = 8, got \[6, 4\]",
                 feeds={"x": _x(0, 8)}, replace={"wq": wq[:6]}),
        run_time("mixed/x_last_dim_zero_w_q_not", r"K = X.shape\[-1\] = 0, got \[8, 4\]", feeds={"x": _x(2, 0)}),
        run_time("mixed/w_scale_short", r"input 2 \(w_scale\) must be \[N\] = \[4\], got \[3\]",
                 replace={"ws": ws[:3]}),
        run_time("mixed/w_scale_long", r"input 2 \(w_scale\) must be \[N\] = \[4\], got \[5\]",
                 replace={"ws": np.ones(5, np.float32)}),
        run_time("mixed/w_scale_rank2", r"input 2 \(w_scale\) must be \[N\] = \[4\], got \[1, 4\]",
                 replace={"ws": ws[None]}),
        run_time("mixed/w_scale_scalar", r"input 2 \(w_scale\) must be \[N\] = \[4\], got \[\]",
                 replace={"ws": np.array(1.0, np.float32)}),
        # outlier channels
        run_time("mixed/outlier_channels_rank2", r"input 3 \(outlier_channels\) must be 1-D, got shape \[1, 2\]",
                 replace={"idx": idx[None]}),
        run_time("mixed/outlier_channels_scalar", r"input 3 \(outlier_channels\) must be 1-D, got shape \[\]",
                 replace={"idx": np.array(1, np.int64)}),
        run_time("mixed/outlier_channel_equal_to_k", r"channel 8 is out of range \[0, 8\)",
                 replace={"idx": np.array([1, 8], np.int64)}),
        run_time("mixed/outlier_channel_negative", r"channel -1 is out of range \[0, 8\)",
                 replace={"idx": np.array([-1, 5], np.int64)}),
        run_time("mixed/outlier_channel_huge", r"channel 1099511627776 is out of range",
                 replace={"idx": np.array([1, 1 << 40], np.int64)}),
        run_time("mixed/outlier_channel_int64_min", r"channel -9223372036854775808 is out of range",
                 replace={"idx": np.array([1, np.iinfo(np.int64).min], np.int64)}),
        run_time("mixed/outlier_channel_duplicate", r"channel 1 is listed twice",
                 replace={"idx": np.array([1, 1], np.int64)}),
        run_time("mixed/outlier_channels_more_than_k", r"lists 9 channels, more than K = 8",
                 replace={"idx": np.arange(9, dtype=np.int64), "wo": np.zeros((9, n), np.float32)}),
        run_time("mixed/W_outlier_left_out", r"input 4 \(W_outlier\) is required when input 3", inputs=all_inputs[:4]),
        run_time("mixed/W_outlier_empty_name", r"input 4 \(W_outlier\) is required when input 3",
                 inputs=(*all_inputs[:4], "")),
        run_time("mixed/W_outlier_too_few_rows",
                 r"input 4 \(W_outlier\) must be \[n_outliers, N\] = \[2, 4\].*\[1, 4\]",
                 replace={"wo": wo[:1]}),
        run_time("mixed/W_outlier_too_many_rows", r"W_outlier\) must be \[n_outliers, N\] = \[2, 4\].*\[3, 4\]",
                 replace={"wo": np.zeros((3, n), np.float32)}),
        run_time("mixed/W_outlier_wrong_n", r"W_outlier\) must be \[n_outliers, N\] = \[2, 4\].*\[2, 3\]",
                 replace={"wo": wo[:, :3]}),
        run_time("mixed/W_outlier_rank1", r"W_outlier\) must be \[n_outliers, N\] = \[2, 4\].*\[8\]",
                 replace={"wo": wo.reshape(-1)}),
        run_time("mixed/W_outlier_without_outlier_channels", r"W_outlier\) must be \[n_outliers, N\] = \[0, 4\]",
                 inputs=("x", "wq", "ws", "", "wo")),
        # the threshold attribute
        attribute("mixed/threshold_negative", -1.0, r"must be a finite float >= 0"),
        attribute("mixed/threshold_nan", float("nan"), r"must be a finite float >= 0"),
        attribute("mixed/threshold_inf", float("inf"), r"must be a finite float >= 0"),
        attribute("mixed/threshold_int", 6, r"must be a float, got an int"),
        attribute("mixed/threshold_string", "6.0", r"must be a float, got a string"),
        attribute("mixed/threshold_floats", [6.0, 7.0], r"must be a float, got a list of floats"),
        attribute("mixed/threshold_ints", [6], r"must be a float, got a list of ints"),
        attribute("mixed/threshold_tensor", numpy_helper.from_array(np.array([6.0], np.float32)),
                  r"must be a float, got a tensor"),
        # valid edge cases
        ok("mixed/ok_static_outliers", x, (wq, ws, idx, wo)),
        ok("mixed/ok_static_and_runtime_outliers", x, (wq, ws, idx, wo), threshold=6.0),
        ok("mixed/ok_three_inputs", x, no_outliers, inputs=("x", "wq", "ws")),
        ok("mixed/ok_explicit_empty_outlier_list", x, no_outliers),
        ok("mixed/ok_outlier_channels_left_out_by_empty_name", x, no_outliers, inputs=("x", "wq", "ws", "")),
        ok("mixed/ok_both_optional_left_out_by_empty_names", x, no_outliers, inputs=("x", "wq", "ws", "", "")),
        ok("mixed/ok_every_channel_an_outlier", x, every_channel),
        Case("mixed/ok_last_dim_zero", MIXED, ("x", "wq", "ws"), ("y",), {"x": _x(2, 0)},
             {"wq": np.zeros((0, n), np.int8), "ws": np.ones(n, np.float32)},
             check=lambda out: np.testing.assert_array_equal(out["y"], np.zeros((2, n), np.float32))),
        ok("mixed/ok_n_zero", x, (np.zeros((k, 0), np.int8), np.ones(0, np.float32), None, None),
           inputs=("x", "wq", "ws")),
        ok("mixed/ok_no_rows", _x(0, k), (wq, ws, idx, wo)),
        ok("mixed/ok_rank1", _x(k, seed=11), (wq, ws, idx, wo)),
        ok("mixed/ok_all_zero_rows", np.zeros((3, k), np.float32), (wq, ws, idx, wo), threshold=1.0),
        ok("mixed/ok_row_chunks", big_x, big_weights, threshold=5.0),
        ok("mixed/ok_thread_pool", pool_x, pool_weights, threshold=6.0),
        ok("mixed/ok_concurrent_runs", pool_x, pool_weights, threshold=6.0, threads=4),
        Case("mixed/ok_non_finite_input_runs", MIXED, all_inputs, ("y",), {"x": _with_nan(x)}, inits,
             check=_shape_check("y", (2, 3, n))),
    ]


CASES: list[Case] = [*_hadamard_cases(), *_quantize_cases(), *_mixed_cases()]
CASES_BY_NAME: dict[str, Case] = {case.name: case for case in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"


# --- running the table in child processes ----------------------------------------------


@dataclass
class Result:
    name: str
    passed: bool
    detail: str = ""


def run_isolated(names: Sequence[str], *, library: Path | None = None, env: Mapping[str, str] | None = None,
                 timeout: float = 300.0) -> dict[str, Result]:
    """Run the named cases in child processes; a child that dies fails only its current case."""
    results: dict[str, Result] = {}
    pending = list(names)
    child_env = {**os.environ, **(env or {})}
    while pending:
        command = [sys.executable, str(Path(__file__).resolve()), *pending]
        if library is not None:
            command[2:2] = ["--library", str(library)]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env)
            stdout, stderr, returncode = completed.stdout, completed.stderr, completed.returncode
        except subprocess.TimeoutExpired as expired:
            stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
            stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else expired.stderr or ""
            returncode = f"timeout after {timeout:.0f} s"
        started = None
        for line in stdout.splitlines():
            if line.startswith("START "):
                started = line[len("START "):]
            elif line.startswith("RESULT "):
                report = json.loads(line[len("RESULT "):])
                results[report["name"]] = Result(report["name"], report["passed"], report["detail"])
                started = None
        # sanitizers report on stderr; one that does not stop the process still fails the run
        reports = [line for line in stderr.splitlines() if "runtime error:" in line or "Sanitizer" in line]
        finished = "DONE" in stdout.splitlines()
        if finished and returncode == 0 and not reports:
            break
        culprit = started or next((name for name in pending if name not in results), None)
        detail = f"the child process failed (exit status {returncode}) while running this case"
        # a sanitizer's headline ("ERROR: AddressSanitizer: ...") precedes a long stack
        headlines = [line for line in stderr.splitlines() if "ERROR:" in line or "runtime error:" in line][:3]
        tail = "\n".join([*headlines, *stderr.splitlines()[-30:]])
        if culprit is None:  # every case reported, then the process failed (e.g. at exit)
            culprit = pending[-1]
            detail = f"the child process failed (exit status {returncode}) after the last case"
        results[culprit] = Result(culprit, False, f"{detail}:\n{tail}")
        pending = [name for name in pending if name not in results]
    return results


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", type=Path, help="kernel library to register instead of the installed one")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("names", nargs="*", help="cases to run (default: all)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(case.name for case in CASES))
        return 0
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # the expected failures would fill stderr
    if args.library is not None:
        library = args.library.resolve()
        custom_ops.library_path = lambda: library
    for name in args.names or [case.name for case in CASES]:
        print(f"START {name}", flush=True)
        detail = run_case(CASES_BY_NAME[name])
        report = {"name": name, "passed": detail is None, "detail": detail or ""}
        print(f"RESULT {json.dumps(report)}", flush=True)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
