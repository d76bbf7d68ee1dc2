"""One LM-head-sized linear in the forms onnxruntime can run it in (not a test).

Why: which 8-bit form an LM head gets decides prefill and decode speed on a CPU. Compared,
at batch-1 decode (1 row) and prefill (128 rows), interleaved, medians in this one run:

- ``fp32``: a float MatMul;
- ``int8 u8u8``: DynamicQuantizeLinear + ``com.microsoft::MatMulIntegerToFloat`` with
  uint8 weights (zero point 128), what ``default`` writes on a CPU without VNNI;
- ``int8 u8s8 7-bit``: the same with signed weights in [-63, 63] (no int16 saturation
  without VNNI, one bit of weight precision less);
- ``MatMulNBits 8-bit``: blockwise (32) 8-bit weight-only with int8 compute
  (``accuracy_level`` 4), what ``default`` wrote until 2026-12-07.

Random weights: only the speed is measured. Usage:
``python benchmarks/bench_head_forms.py [--k 576] [--n 49152] [--rows 1 128] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _session(nodes, initializers, k: int, n: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _integer(weight: np.ndarray, signed: bool, k: int, n: int) -> ort.InferenceSession:
    qmax = 63 if signed else 127
    scale = (np.abs(weight).max(axis=0) / qmax).astype(np.float32)
    levels = np.round(weight / scale)
    codes = levels.astype(np.int8) if signed else (levels + 128).astype(np.uint8)
    zero = np.zeros(n, np.int8) if signed else np.full(n, 128, np.uint8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulIntegerToFloat", ["xq", "w", "xs", "ws", "xz", "wz"], ["y"],
                              domain="com.microsoft")]
    return _session(nodes, [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(scale, "ws"),
                            numpy_helper.from_array(zero, "wz")], k, n)


def _nbits(weight: np.ndarray, k: int, n: int, block: int = 32) -> ort.InferenceSession:
    blocks = weight.T.reshape(n, k // block, block)
    scale = np.abs(blocks).max(axis=-1) / 127
    codes = (np.round(blocks / scale[..., None]) + 128).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                            block_size=block, accuracy_level=4)
    return _session([node], [numpy_helper.from_array(codes, "b"),
                             numpy_helper.from_array(scale.astype(np.float32).reshape(-1), "s")], k, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=576, help="input features (SmolLM2-135M: 576)")
    parser.add_argument("--n", type=int, default=49152, help="vocabulary (SmolLM2-135M: 49152)")
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 128])
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (median)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((args.k, args.n)) * 0.05).astype(np.float32)
    forms = {
        "fp32": _session([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(weight, "w")],
                         args.k, args.n),
        "int8 u8u8": _integer(weight, False, args.k, args.n),
        "int8 u8s8 7-bit": _integer(weight, True, args.k, args.n),
        "MatMulNBits 8-bit": _nbits(weight, args.k, args.n),
    }
    print(f"{args.k} x {args.n} linear, onnxruntime {ort.__version__}, median ms of {args.repeat} interleaved rounds")
    for rows in args.rows:
        x = rng.standard_normal((rows, args.k)).astype(np.float32)
        calls = 20 if rows == 1 else 5
        times: dict[str, list[float]] = {name: [] for name in forms}
        for session in forms.values():
            session.run(None, {"x": x})  # warm-up
        for _ in range(args.repeat):
            for name, session in forms.items():
                started = time.perf_counter()
                for _ in range(calls):
                    session.run(None, {"x": x})
                times[name].append((time.perf_counter() - started) / calls * 1e3)
        fp32 = statistics.median(times["fp32"])
        print(f"rows {rows}: " + ", ".join(f"{name} {statistics.median(t):.2f} ms ({statistics.median(t) / fp32:.2f})"
                                           for name, t in times.items()))


if __name__ == "__main__":
    main()
