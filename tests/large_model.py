"""A synthetic decoder larger than protobuf's 2 GB limit (random weights; labelled synthetic).

Blocks of ``LayerNorm -> MatMul(up) -> Relu -> MatMul(down) -> + residual`` on a
``[batch, seq, hidden]`` float input. The weights are streamed straight into one
external-data file, one tensor at a time, so building it never holds more than one
weight matrix in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def build_large_decoder(
    out_dir: Path,
    *,
    hidden: int = 4096,
    intermediate: int = 8192,
    layers: int = 8,
    seed: int = 0,
) -> Path:
    """Write ``out_dir/model.onnx`` + ``model.onnx.data``; ~2.15 GB with the defaults."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.onnx"
    data_name = "model.onnx.data"
    rng = np.random.default_rng(seed)
    initializers = []
    nodes = []
    offset = 0
    with open(out_dir / data_name, "wb") as data:

        def external(name: str, array: np.ndarray) -> None:
            nonlocal offset
            raw = np.ascontiguousarray(array, dtype=np.float32).tobytes()
            data.write(raw)
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
            initializers.append(tensor)

        current = "hidden_states"
        for i in range(layers):
            p = f"layers.{i}"
            external(f"{p}.norm.weight", 1.0 + 0.1 * rng.standard_normal(hidden, dtype=np.float32))
            external(f"{p}.norm.bias", 0.1 * rng.standard_normal(hidden, dtype=np.float32))
            external(f"{p}.up.weight", rng.standard_normal((hidden, intermediate), dtype=np.float32) / np.sqrt(hidden))
            external(f"{p}.down.weight", rng.standard_normal((intermediate, hidden), dtype=np.float32) / np.sqrt(intermediate))
            nodes += [
                helper.make_node("LayerNormalization", [current, f"{p}.norm.weight", f"{p}.norm.bias"], [f"{p}.normed"], axis=-1, name=f"{p}.norm"),
                helper.make_node("MatMul", [f"{p}.normed", f"{p}.up.weight"], [f"{p}.up"], name=f"{p}.up"),
                helper.make_node("Relu", [f"{p}.up"], [f"{p}.act"], name=f"{p}.act"),
                helper.make_node("MatMul", [f"{p}.act", f"{p}.down.weight"], [f"{p}.down"], name=f"{p}.down"),
                helper.make_node("Add", [current, f"{p}.down"], [f"{p}.out"], name=f"{p}.residual"),
            ]
            current = f"{p}.out"
        nodes.append(helper.make_node("Identity", [current], ["last_hidden_state"], name="output"))
    graph = helper.make_graph(
        nodes,
        "synthetic_large_decoder",
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="outlierquant-synthetic")
    onnx.save(model, str(model_path))  # tensors already point at the external file
    return model_path


def large_decoder_feeds(n: int, *, hidden: int = 4096, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"hidden_states": rng.standard_normal((1, int(rng.integers(4, 17)), hidden), dtype=np.float32)}
        for _ in range(n)
    ]
