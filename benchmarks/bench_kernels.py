"""Speed of the ai.outlierquant kernels against the graphs they replace (not a test).

Every number is a ratio of median wall times measured in this one run, on this machine,
with onnxruntime's default threading (``--threads N`` to pin). Compared:

- HadamardTransform vs a dense ``X @ R`` MatMul (what an un-fused online rotation costs)
  and vs the Kronecker standard-op form (two small MatMuls).
- MixedInt8MatMul (LLM.int8(), ~0.4% outlier channels in float) vs plain per-token int8
  through standard ops + ``com.microsoft::MatMulIntegerToFloat`` (no outliers at all),
  vs the mixed standard-op form, vs our quantizer feeding onnxruntime's GEMM (the gemm form
  llm-int8 writes), vs onnxruntime's own per-tensor ``DynamicQuantizeMatMul`` (what
  ``quantize_dynamic`` emits), and vs the fp32 MatMul.
- DynamicQuantizePerToken vs onnxruntime's ``DynamicQuantizeLinear``.

Usage: ``python benchmarks/bench_kernels.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from outlierquant import custom_ops
from outlierquant.custom_ops import reference, standard_forms
from outlierquant.numerics.hadamard import default_hadamard_block, hadamard_rotation

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaffold  # noqa: E402

OPSET = 18


def _model(tape: ir.tape.Tape, x: ir.Value, y: ir.Value) -> bytes:
    y.name = "y"
    opsets = {"": OPSET}
    for domain, version in tape.used_opsets:
        if domain not in ("", "ai.onnx"):
            opsets[domain] = version or 1
    graph = ir.Graph([x], [y], nodes=tape.nodes, initializers=tape.initializers, opset_imports=opsets)
    return ir.serde.serialize_model(ir.Model(graph, ir_version=10)).SerializeToString()


INTRA_OP_THREADS = 0  # 0: onnxruntime's default (all cores); set by --threads


def _session(model: bytes, kernels: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = INTRA_OP_THREADS
    if kernels:
        custom_ops.session_options(options)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _median_seconds(sessions: dict[str, ort.InferenceSession], x: np.ndarray, repeat: int) -> dict[str, float]:
    """Median time per session; the sessions take turns so that load on the machine
    during the run hits all of them alike."""
    feeds = {"x": x}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, feeds)
    for _ in range(repeat):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _input() -> ir.Value:
    return ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT))


def bench_hadamard(shape: tuple[int, ...], repeat: int) -> list[tuple[str, float]]:
    dim = shape[-1]
    block = default_hadamard_block(dim)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    tape = ir.tape.Tape()
    xv = _input()
    kernel = _session(_model(tape, xv, standard_forms.hadamard_kernel_form(tape, xv, block)), True)
    tape = ir.tape.Tape()
    xv = _input()
    kronecker = _session(_model(tape, xv, standard_forms.hadamard_standard_form(tape, xv, dim, block)), False)
    tape = ir.tape.Tape()
    xv = _input()
    rotation = hadamard_rotation(dim, block).astype(np.float32)
    dense_out = tape.op("MatMul", [xv, tape.initializer(ir.tensor(rotation, name="rotation"))])
    dense = _session(_model(tape, xv, dense_out), False)

    times = _median_seconds({"kernel": kernel, "dense": dense, "kronecker": kronecker}, x, repeat)
    t_kernel, t_dense, t_kron = times["kernel"], times["dense"], times["kronecker"]
    label = "x".join(map(str, shape))
    return [
        (f"HadamardTransform {label}: kernel ms", t_kernel * 1e3),
        (f"HadamardTransform {label}: dense MatMul / kernel", t_dense / t_kernel),
        (f"HadamardTransform {label}: Kronecker std form / kernel", t_kron / t_kernel),
    ]


def bench_mixed(shape: tuple[int, ...], n: int, repeat: int) -> list[tuple[str, float]]:
    k = shape[-1]
    rng = np.random.default_rng(1)
    outliers = rng.choice(k, size=max(1, k // 256), replace=False)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., outliers] *= 30
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    mixed = reference.prepare_mixed_int8_weights(weight, outliers)
    plain_q, plain_scale = reference.quantize_weight_per_channel(weight)

    def build(fn, kernels: bool) -> ort.InferenceSession:
        tape = ir.tape.Tape()
        xv = _input()
        return _session(_model(tape, xv, fn(tape, xv)), kernels)

    sessions = {
        "kernel": build(lambda t, v: standard_forms.mixed_int8_matmul_kernel_form(t, v, *mixed), True),
        "gemm_form": build(lambda t, v: standard_forms.mixed_int8_matmul_gemm_form(t, v, *mixed), True),
        "plain_int8": build(lambda t, v: standard_forms.mixed_int8_matmul_standard_form(
            t, v, plain_q, plain_scale, use_contrib_ops=True), False),
        "mixed_std": build(lambda t, v: standard_forms.mixed_int8_matmul_standard_form(
            t, v, *mixed, use_contrib_ops=True), False),
        "ort_dynamic": build(lambda t, v: t.op("DynamicQuantizeMatMul", [
            v, t.initializer(ir.tensor(plain_q, name="wq")),
            t.initializer(ir.tensor(plain_scale, name="ws"))], domain="com.microsoft", version=1), False),
        "fp32": build(lambda t, v: t.op("MatMul", [v, t.initializer(ir.tensor(weight, name="w"))]), False),
    }
    times = _median_seconds(sessions, x, repeat)
    label = f"{'x'.join(map(str, shape))}x{n}"
    exact = x.reshape(-1, k) @ weight
    error_kernel = np.linalg.norm(sessions["kernel"].run(None, {"x": x})[0].reshape(-1, n) - exact)
    error_plain = np.linalg.norm(sessions["plain_int8"].run(None, {"x": x})[0].reshape(-1, n) - exact)
    return [
        (f"MixedInt8MatMul {label}: kernel ms", times["kernel"] * 1e3),
        (f"MixedInt8MatMul {label}: kernel / plain per-token int8 (goal <= 1.25)", times["kernel"] / times["plain_int8"]),
        (f"MixedInt8MatMul {label}: mixed std form / kernel", times["mixed_std"] / times["kernel"]),
        (f"MixedInt8MatMul {label}: our quantizer + ORT GEMM (gemm form) / kernel",
         times["gemm_form"] / times["kernel"]),
        (f"MixedInt8MatMul {label}: ORT DynamicQuantizeMatMul / kernel", times["ort_dynamic"] / times["kernel"]),
        (f"MixedInt8MatMul {label}: fp32 MatMul / kernel", times["fp32"] / times["kernel"]),
        (f"MixedInt8MatMul {label}: error vs fp32, plain int8 / mixed", error_plain / error_kernel),
    ]


def bench_quantize(shape: tuple[int, ...], repeat: int) -> list[tuple[str, float]]:
    """DynamicQuantizePerToken (its uint8 output and scales) against onnxruntime's per-tensor
    DynamicQuantizeLinear, which does comparable work per element."""
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)

    tape = ir.tape.Tape()
    xv = _input()
    codes, scale, shifted = tape.op_multi_out("DynamicQuantizePerToken", [xv], num_outputs=3,
                                              domain=custom_ops.DOMAIN, version=1)
    codes.name, scale.name = "", "scale"
    per_token = _session(_model(tape, xv, shifted), True)
    tape = ir.tape.Tape()
    xv = _input()
    levels, _, _ = tape.op_multi_out("DynamicQuantizeLinear", [xv], num_outputs=3)
    per_tensor = _session(_model(tape, xv, levels), False)
    times = _median_seconds({"per_token": per_token, "per_tensor": per_tensor}, x, repeat)
    label = "x".join(map(str, shape))
    return [
        (f"DynamicQuantizePerToken {label}: kernel us", times["per_token"] * 1e6),
        (f"DynamicQuantizePerToken {label}: kernel / ORT DynamicQuantizeLinear",
         times["per_token"] / times["per_tensor"]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime default)")
    args = parser.parse_args(argv)
    global INTRA_OP_THREADS
    INTRA_OP_THREADS = args.threads
    if not custom_ops.available():
        print(f"custom kernels unavailable: {custom_ops.unavailable_reason()}", file=sys.stderr)
        return 1
    if args.quick:
        cases = [lambda: bench_hadamard((64, 1536), 5), lambda: bench_mixed((64, 1536), 1536, 5),
                 lambda: bench_quantize((64, 1536), 5)]
    else:
        cases = [
            lambda: bench_hadamard((256, 4096), 20),
            lambda: bench_hadamard((32, 384, 1536), 5),
            lambda: bench_mixed((256, 4096), 4096, 10),
            lambda: bench_mixed((32, 384, 1536), 1536, 5),
            lambda: bench_mixed((12, 384), 1536, 200),  # a short sentence: weight packing dominates
            lambda: bench_quantize((192, 1536), 200),
        ]
    threads = args.threads or "default"
    print(f"onnxruntime {ort.__version__}, {ort.get_device()}, intra-op threads: {threads}")
    scaffold.print_table(("measure", "value"), [(name, f"{value:.2f}") for case in cases for name, value in case()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
