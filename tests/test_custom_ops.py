"""The ai.outlierquant kernels and their standard-op forms against the numpy references."""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import kernel_cases
from outlierquant import custom_ops
from outlierquant.custom_ops import reference, standard_forms
from outlierquant.numerics import hadamard
from outlierquant.errors import OutlierQuantError, UnsupportedModelError

OPSET = 18
HADAMARD_DIMS = [1, 2, 64, 384, 576, 768, 1536, 4096]

requires_kernels = pytest.mark.skipif(
    not custom_ops.available() and os.environ.get("OUTLIERQUANT_REQUIRE_KERNELS") != "1",
    reason=f"custom kernels unavailable: {custom_ops.unavailable_reason()}",
)


# --- helpers ---------------------------------------------------------------------------


def _input(name: str, rank: int = 3) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None] * rank))


def _model(tape: ir.tape.Tape, inputs: list[ir.Value], outputs: list[ir.Value],
           dtypes: tuple[ir.DataType, ...] = ()) -> onnx.ModelProto:
    for index, value in enumerate(outputs):
        value.name = f"out{index}"
        if value.type is None:
            value.type = ir.TensorType(dtypes[index] if dtypes else ir.DataType.FLOAT)
        if value.shape is None:
            value.shape = ir.Shape([None] * inputs[0].shape.rank())
    opsets = {"": OPSET}
    for domain, version in tape.used_opsets:
        if domain not in ("", "ai.onnx"):
            opsets[domain] = version or 1
    graph = ir.Graph(inputs, outputs, nodes=tape.nodes, initializers=tape.initializers, opset_imports=opsets,
                     name="test")
    return ir.serde.serialize_model(ir.Model(graph, ir_version=10))


def _session(model: onnx.ModelProto, *, kernels: bool) -> ort.InferenceSession:
    options = custom_ops.session_options() if kernels else ort.SessionOptions()
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = float(np.abs(expected).max()) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _activations(rng: np.random.Generator, shape: tuple[int, ...], outliers: tuple[int, ...] = ()) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    for channel in outliers:
        x[..., channel] *= 40
    return x


def _hadamard_model(dim: int, *, kernel: bool, rank: int = 3) -> onnx.ModelProto:
    tape = ir.tape.Tape()
    x = _input("x", rank)
    block = hadamard.default_hadamard_block(dim)
    if kernel:
        y = standard_forms.hadamard_kernel_form(tape, x, block)
    else:
        y = standard_forms.hadamard_standard_form(tape, x, dim, block)
    return _model(tape, [x], [y])


def _quant_model(*, kernel: bool, rank: int = 3) -> onnx.ModelProto:
    tape = ir.tape.Tape()
    x = _input("x", rank)
    if kernel:
        q, s = standard_forms.dynamic_quantize_per_token_kernel_form(tape, x)
    else:
        q, s = standard_forms.dynamic_quantize_per_token_standard_form(tape, x, opset=OPSET)
    return _model(tape, [x], [q, s], (ir.DataType.INT8, ir.DataType.FLOAT))


def _mixed_model(weights, *, form: str, threshold: float = 0.0) -> onnx.ModelProto:
    tape = ir.tape.Tape()
    x = _input("x")
    if form == "kernel":
        y = standard_forms.mixed_int8_matmul_kernel_form(tape, x, *weights, threshold=threshold)
    else:
        y = standard_forms.mixed_int8_matmul_standard_form(
            tape, x, *weights, threshold=threshold, use_contrib_ops=form == "contrib", opset=OPSET
        )
    return _model(tape, [x], [y])


# --- references ------------------------------------------------------------------------


@pytest.mark.parametrize("dim", HADAMARD_DIMS)
def test_hadamard_rotation_is_orthogonal_and_kronecker_structured(dim):
    block = hadamard.default_hadamard_block(dim)
    rotation = hadamard.hadamard_rotation(dim, block)
    rows = rotation[:: max(1, dim // 64)]  # a sample of rows keeps d = 4096 cheap
    np.testing.assert_allclose(rows @ rotation.T, np.eye(dim)[:: max(1, dim // 64)], atol=1e-6)
    m, n = hadamard.hadamard_factorization(dim)
    assert m * n == dim and hadamard.is_power_of_two(n)
    if m > 1:
        # the default block spreads each input over every output of its block
        assert np.all(np.abs(block) > 0)


def test_hadamard_defaults_for_common_hidden_sizes():
    assert hadamard.hadamard_factorization(4096) == (1, 4096)
    assert hadamard.hadamard_factorization(384) == (12, 32)  # Paley Hadamard of order 12
    assert hadamard.hadamard_factorization(576) == (9, 64)  # no Paley order among 9, 18, 36
    np.testing.assert_allclose(np.abs(hadamard.orthogonal_block(12)), 1 / np.sqrt(12), atol=1e-12)


def test_hadamard_reference_rejects_unsupported_size_with_reason():
    with pytest.raises(UnsupportedModelError, match=r"dimension 6 is not m \* 2\^k.*m = 3"):
        hadamard.hadamard_transform(np.ones((2, 6), np.float32))
    with pytest.raises(UnsupportedModelError, match="orthogonal"):
        hadamard.hadamard_transform(np.ones((2, 6), np.float32), np.ones((3, 3), np.float32))


def test_per_token_reference_rounds_half_to_even_and_handles_zero_rows():
    x = np.array([[127, 0.5, 1.5, 2.5, -0.5, -2.5, -127], [0, 0, 0, 0, 0, 0, 0]], np.float32)
    q, scale = reference.dynamic_quantize_per_token(x)
    np.testing.assert_array_equal(q, [[127, 0, 2, 2, 0, -2, -127], [0] * 7])
    np.testing.assert_array_equal(scale, [[1.0], [1.0]])


def test_mixed_reference_equals_float_matmul_on_outlier_channels():
    rng = np.random.default_rng(0)
    x = _activations(rng, (4, 32), outliers=(5,))
    weight = rng.standard_normal((32, 16)).astype(np.float32)
    # every channel an outlier: the op degenerates to the float MatMul exactly
    weights = reference.prepare_mixed_int8_weights(weight, np.arange(32))
    np.testing.assert_allclose(reference.mixed_int8_matmul(x, *weights), x @ weight, rtol=1e-5, atol=1e-4)


# --- kernels vs references -------------------------------------------------------------


@requires_kernels
@pytest.mark.parametrize("dim", HADAMARD_DIMS)
def test_hadamard_kernel_matches_reference(dim):
    rng = np.random.default_rng(dim)
    x = _activations(rng, (2, 3, dim), outliers=(0,))
    block = hadamard.default_hadamard_block(dim)
    (y,) = _session(_hadamard_model(dim, kernel=True), kernels=True).run(None, {"x": x})
    _assert_close(y, hadamard.hadamard_transform(x, block))


@requires_kernels
def test_hadamard_kernel_with_explicit_block():
    rng = np.random.default_rng(1)
    block = hadamard.orthogonal_block(3).astype(np.float32)  # Householder reflection for m = 3
    x = _activations(rng, (5, 3 * 128))
    tape = ir.tape.Tape()
    xv = _input("x", rank=2)
    model = _model(tape, [xv], [standard_forms.hadamard_kernel_form(tape, xv, block)])
    (y,) = _session(model, kernels=True).run(None, {"x": x})
    _assert_close(y, hadamard.hadamard_transform(x, block))


@requires_kernels
def test_hadamard_kernel_rejects_unsupported_size():
    session = _session(_hadamard_model(64, kernel=True, rank=2), kernels=True)
    with pytest.raises(Exception, match=r"last dimension 96 is not m \* 2\^k"):
        session.run(None, {"x": np.ones((2, 96), np.float32)})


@requires_kernels
@pytest.mark.parametrize("shape", [(3, 7, 64), (5, 1), (1, 4096)])
def test_per_token_kernel_is_exact(shape):
    rng = np.random.default_rng(len(shape))
    x = _activations(rng, shape, outliers=(0,))
    x[0] = 0  # an all-zero row
    session = _session(_quant_model(kernel=True, rank=len(shape)), kernels=True)
    q, scale = session.run(None, {"x": x})
    q_ref, scale_ref = reference.dynamic_quantize_per_token(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(scale, scale_ref)
    assert np.all(np.isfinite(scale)) and np.all(scale[0] == 1)


@requires_kernels
def test_per_token_kernel_rounds_ties_to_even():
    x = np.array([[127, 0.5, 1.5, 2.5, -0.5, -2.5, -126.5]], np.float32)
    q, _ = _session(_quant_model(kernel=True, rank=2), kernels=True).run(None, {"x": x})
    np.testing.assert_array_equal(q, [[127, 0, 2, 2, 0, -2, -126]])


def _mixed_case(seed: int, k: int = 96, n: int = 40, outliers=(3, 17, 60)):
    rng = np.random.default_rng(seed)
    x = _activations(rng, (2, 5, k), outliers=outliers)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    return x, weight


@requires_kernels
@pytest.mark.parametrize("static", [(3, 17, 60), ()])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_mixed_int8_kernel_matches_reference(static, threshold):
    x, weight = _mixed_case(len(static) + int(threshold))
    weights = reference.prepare_mixed_int8_weights(weight, list(static))
    (y,) = _session(_mixed_model(weights, form="kernel", threshold=threshold), kernels=True).run(None, {"x": x})
    expected = reference.mixed_int8_matmul(x, *weights, threshold=threshold)
    _assert_close(y, expected)
    # and the decomposition is what it claims: close to the float product
    assert np.linalg.norm(y - x @ weight) / np.linalg.norm(x @ weight) < 0.05


@requires_kernels
@pytest.mark.parametrize("static", [(3, 17, 60), ()])
def test_mixed_int8_gemm_form_is_the_kernel_bit_for_bit(static):
    """Our per-token quantizer's uint8 codes into onnxruntime's MatMulIntegerToFloat: the
    same integers and rescale as the single kernel node; only the float outlier channels
    are summed in another order (a MatMul instead of the kernel's running updates)."""
    x, weight = _mixed_case(30 + len(static))
    weights = reference.prepare_mixed_int8_weights(weight, list(static))
    tape = ir.tape.Tape()
    xv = _input("x")
    model = _model(tape, [xv], [standard_forms.mixed_int8_matmul_gemm_form(tape, xv, *weights)])
    quantizer = next(node for node in model.graph.node if node.op_type == "DynamicQuantizePerToken")
    assert quantizer.output[0] == "" and quantizer.output[2]  # the int8 codes are left out
    (y,) = _session(model, kernels=True).run(None, {"x": x})
    (expected,) = _session(_mixed_model(weights, form="kernel"), kernels=True).run(None, {"x": x})
    if static:
        _assert_close(y, expected, rtol=1e-6)
    else:
        np.testing.assert_array_equal(y, expected)
    _assert_close(y, reference.mixed_int8_matmul(x, *weights))


@pytest.mark.parametrize("encoding", ["auto", "unsigned", "signed"])
@pytest.mark.parametrize("form", ["kernel", "contrib", "standard"])
def test_mixed_int8_extreme_codes_stay_exact(form, encoding, monkeypatch):
    """Every activation at its row maximum (uint8 code 255) against every weight at its
    column maximum (127): each u8 x s8 pair sums to 64770, which MLAS saturates at 32767 on
    an x86 CPU without VNNI. The encoding chosen for this CPU (``auto``, and the kernel's own
    check) and ``unsigned`` anywhere keep the product exact; ``signed`` is exact wherever
    this CPU does not saturate."""
    from outlierquant.numerics import int8

    if form == "kernel" and not custom_ops.available():
        pytest.skip("kernels not built")
    if encoding == "signed" and int8.host_saturates_u8s8():
        pytest.skip("this CPU saturates u8 x s8 pair sums: signed weights are not exact here")
    monkeypatch.setenv("OUTLIERQUANT_INT8_WEIGHTS", encoding)
    k, n = 64, 8
    x = np.full((2, 3, k), 0.5, np.float32)
    weight = np.full((k, n), 0.25, np.float32)
    weights = reference.prepare_mixed_int8_weights(weight, [])
    (y,) = _session(_mixed_model(weights, form=form), kernels=form == "kernel").run(None, {"x": x})
    _assert_close(y, reference.mixed_int8_matmul(x, *weights))
    np.testing.assert_allclose(y, x @ weight, rtol=1e-5)  # the codes are exact: 0.5 * 0.25 * 64


@requires_kernels
def test_per_token_kernel_uint8_output_is_codes_plus_128():
    x = _activations(np.random.default_rng(8), (2, 3, 64), outliers=(5,))
    tape = ir.tape.Tape()
    xv = _input("x")
    q, s, u8 = tape.op_multi_out("DynamicQuantizePerToken", [xv], num_outputs=3, domain=custom_ops.DOMAIN, version=1)
    model = _model(tape, [xv], [q, s, u8], (ir.DataType.INT8, ir.DataType.FLOAT, ir.DataType.UINT8))
    q, scale, u8 = _session(model, kernels=True).run(None, {"x": x})
    q_ref, scale_ref = reference.dynamic_quantize_per_token(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(scale, scale_ref)
    assert u8.dtype == np.uint8
    np.testing.assert_array_equal(u8.astype(np.int16) - 128, q_ref)


@requires_kernels
def test_mixed_int8_kernel_processes_large_inputs_in_row_chunks():
    # N = 4096 makes the kernel split 600 rows into chunks of 256, 256 and 88
    rng = np.random.default_rng(21)
    x = _activations(rng, (600, 32), outliers=(4,))
    weights = reference.prepare_mixed_int8_weights(rng.standard_normal((32, 4096)).astype(np.float32), [4])
    tape = ir.tape.Tape()
    xv = _input("x", rank=2)
    model = _model(tape, [xv], [standard_forms.mixed_int8_matmul_kernel_form(tape, xv, *weights, threshold=5.0)])
    (y,) = _session(model, kernels=True).run(None, {"x": x})
    _assert_close(y, reference.mixed_int8_matmul(x, *weights, threshold=5.0))


@requires_kernels
def test_mixed_int8_kernel_accepts_explicit_empty_outlier_list():
    x, weight = _mixed_case(7)
    weight_q, weight_scale, _, _ = reference.prepare_mixed_int8_weights(weight, [])
    nodes = [onnx.helper.make_node("MixedInt8MatMul", ["x", "wq", "ws", "idx", "wo"], ["y"],
                                   domain=custom_ops.DOMAIN)]
    inits = [onnx.numpy_helper.from_array(weight_q, "wq"), onnx.numpy_helper.from_array(weight_scale, "ws"),
             onnx.numpy_helper.from_array(np.zeros(0, np.int64), "idx"),
             onnx.numpy_helper.from_array(np.zeros((0, weight.shape[1]), np.float32), "wo")]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET),
                                                         onnx.helper.make_opsetid(custom_ops.DOMAIN, 1)])
    (y,) = _session(model, kernels=True).run(None, {"x": x})
    _assert_close(y, reference.mixed_int8_matmul(x, weight_q, weight_scale))


@requires_kernels
def test_mixed_int8_kernel_all_zero_rows_give_zero():
    x, weight = _mixed_case(3)
    x[0] = 0
    weights = reference.prepare_mixed_int8_weights(weight, [3])
    (y,) = _session(_mixed_model(weights, form="kernel"), kernels=True).run(None, {"x": x})
    assert np.all(y[0] == 0) and np.all(np.isfinite(y))


@requires_kernels
def test_kernels_are_thread_safe_on_one_session():
    rng = np.random.default_rng(11)
    tape = ir.tape.Tape()
    x = _input("x", rank=2)
    # large enough that every op splits its rows over onnxruntime's thread pool
    weight = rng.standard_normal((1536, 64)).astype(np.float32)
    rotated = standard_forms.hadamard_kernel_form(tape, x, hadamard.default_hadamard_block(1536))
    q, scale = standard_forms.dynamic_quantize_per_token_kernel_form(tape, rotated)
    y = standard_forms.mixed_int8_matmul_kernel_form(
        tape, rotated, *reference.prepare_mixed_int8_weights(weight, [1, 2]), threshold=4.0
    )
    model = _model(tape, [x], [q, scale, y], (ir.DataType.INT8, ir.DataType.FLOAT, ir.DataType.FLOAT))
    session = _session(model, kernels=True)
    inputs = [_activations(rng, (64, 1536), outliers=(i,)) for i in range(4)]
    expected = [session.run(None, {"x": value}) for value in inputs]
    failures = []

    def worker(worker_id: int) -> None:
        for step in range(12):
            index = (worker_id + step) % len(inputs)
            got = session.run(None, {"x": inputs[index]})
            if not all(np.array_equal(a, b) for a, b in zip(got, expected[index])):
                failures.append((worker_id, step))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


# --- malformed nodes and edge cases, in child processes --------------------------------


@pytest.fixture(scope="module")
def kernel_case_results() -> dict[str, kernel_cases.Result]:
    return kernel_cases.run_isolated([case.name for case in kernel_cases.CASES])


@requires_kernels
@pytest.mark.parametrize("name", [case.name for case in kernel_cases.CASES])
def test_kernel_case(name, kernel_case_results):
    """Malformed cases raise an onnxruntime error (a crash fails only its case); valid edge
    cases (optional inputs and outputs left out, empty dimensions) match the references."""
    result = kernel_case_results[name]
    assert result.passed, result.detail


def test_kernel_case_table_covers_every_op():
    malformed = {op: sum(case.op == op and case.error is not None for case in kernel_cases.CASES)
                 for op in kernel_cases.OPS}
    assert all(count >= 10 for count in malformed.values()), malformed


# --- standard-op forms vs references ---------------------------------------------------


@pytest.mark.parametrize("dim", HADAMARD_DIMS)
def test_hadamard_standard_form_matches_reference(dim):
    model = _hadamard_model(dim, kernel=False)
    onnx.checker.check_model(model, full_check=True)
    assert {node.op_type for node in model.graph.node} <= {"Shape", "Reshape", "MatMul"}
    assert sum(node.op_type == "MatMul" for node in model.graph.node) <= 2
    rng = np.random.default_rng(dim)
    x = _activations(rng, (2, 3, dim), outliers=(0,))
    (y,) = _session(model, kernels=False).run(None, {"x": x})
    _assert_close(y, hadamard.hadamard_transform(x, hadamard.default_hadamard_block(dim)))


def test_hadamard_standard_form_uses_small_constants():
    assert standard_forms.kronecker_split(4096) == (64, 64)
    p, q = standard_forms.kronecker_split(1536, hadamard.default_hadamard_block(1536))
    assert p * q == 1536 and max(p, q) <= 48


def test_per_token_standard_form_is_exact():
    model = _quant_model(kernel=False)
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(5)
    x = _activations(rng, (3, 6, 64), outliers=(2,))
    x[1, 2] = 0
    x[0, 0, :7] = [127, 0.5, 1.5, 2.5, -0.5, -2.5, -126.5]
    x[0, 0, 7:] = 0
    q, scale = _session(model, kernels=False).run(None, {"x": x})
    q_ref, scale_ref = reference.dynamic_quantize_per_token(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(scale, scale_ref)


def test_per_token_standard_form_opset13_spelling():
    tape = ir.tape.Tape()
    x = _input("x")
    standard_forms.dynamic_quantize_per_token_standard_form(tape, x, opset=13)
    reduce = next(node for node in tape.nodes if node.op_type == "ReduceMax")
    assert "axes" in reduce.attributes and len(reduce.inputs) == 1


@pytest.mark.parametrize("form", ["standard", "contrib"])
@pytest.mark.parametrize("static", [(3, 17, 60), ()])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_mixed_int8_standard_form_matches_reference(form, static, threshold):
    x, weight = _mixed_case(len(static) + int(threshold))
    weights = reference.prepare_mixed_int8_weights(weight, list(static))
    model = _mixed_model(weights, form=form, threshold=threshold)
    if form == "standard":
        onnx.checker.check_model(model, full_check=True)
        assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    (y,) = _session(model, kernels=False).run(None, {"x": x})
    _assert_close(y, reference.mixed_int8_matmul(x, *weights, threshold=threshold))


# --- library helpers -------------------------------------------------------------------


def test_session_options_without_library_raises_clear_error(monkeypatch):
    monkeypatch.setattr(custom_ops, "library_path", lambda: None)
    with pytest.raises(custom_ops.KernelsUnavailableError, match="was not built") as info:
        custom_ops.session_options()
    assert isinstance(info.value, OutlierQuantError)


def test_old_onnxruntime_is_refused(monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.28.2")
    with pytest.raises(custom_ops.KernelsUnavailableError, match=r"1\.28\.2 is too old.*>=1\.29"):
        custom_ops.session_options()


def test_warn_once_unavailable_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(custom_ops, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="outlierquant.custom_ops"):
        custom_ops.warn_once_unavailable()
        custom_ops.warn_once_unavailable()
    messages = [r.getMessage() for r in caplog.records if "standard-op forms" in r.getMessage()]
    assert len(messages) == 1 and "unavailable" in messages[0]


@requires_kernels
def test_session_options_registers_on_given_options():
    base = ort.SessionOptions()
    assert custom_ops.session_options(base) is base
    assert custom_ops.library_path().name == custom_ops.LIBRARY_NAME
