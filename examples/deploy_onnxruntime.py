"""Deploy a quantized model: plain onnxruntime, and optimum's ORTModel classes.

    python examples/deploy_onnxruntime.py --model out/quantized/model.onnx
    python examples/deploy_onnxruntime.py --fast      # quantizes the bundled MiniLM first

outlierquant's custom kernels (domain ``ai.outlierquant``) are registered when they were
built (``outlierquant.custom_ops.available()``); models written with standard ops only
run without them too. The quantized folder keeps the tokenizer and config beside the
model, so it loads like any optimum export.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from outlierquant import custom_ops

SENTENCES = ["Quantization keeps the model small.", "Outliers make int8 hard.", "The weather is nice today."]


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    if custom_ops.available():
        custom_ops.session_options(options)
        print(f"custom kernels registered ({custom_ops.DOMAIN})")
    else:
        print(f"custom kernels not available: {custom_ops.unavailable_reason()}")
    return options


def quantize_bundled(workdir: Path, onnx: Path | None) -> Path:
    from outlierquant.export import default_model_dir
    from outlierquant.export.data import bundled_sentences, read_lines
    from outlierquant.plugin.api import OutlierQuantizer

    quantizer = OutlierQuantizer.from_pretrained(onnx or default_model_dir(), export_dir=workdir / "fp32")
    calibration = read_lines(bundled_sentences("calibration"))[:32]
    return quantizer.quantize("w8a8", calibration, workdir / "quantized").path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a quantized model.onnx (tokenizer files beside it)")
    parser.add_argument("--onnx", type=Path, help="with no --model: the fp32 export to quantize first")
    parser.add_argument("--fast", action="store_true", help="few calibration samples")
    args = parser.parse_args()
    if args.model is not None:
        deploy(args.model)
        return
    # nothing to keep: the quantized bundled model is removed after the demonstration
    with tempfile.TemporaryDirectory(prefix="deploy-") as workdir:
        deploy(quantize_bundled(Path(workdir), args.onnx))


def deploy(model: Path) -> None:
    """Run ``model`` with plain onnxruntime, then through optimum's ORTModel class."""
    # 1. plain onnxruntime
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.parent)
    session = ort.InferenceSession(str(model), sess_options=session_options(), providers=["CPUExecutionProvider"])
    input_names = {i.name for i in session.get_inputs()}
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="np")
    feed = {k: v.astype(np.int64) for k, v in encoded.items() if k in input_names}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    hidden = outputs.get("last_hidden_state", outputs.get("token_embeddings"))
    mask = encoded["attention_mask"][..., None].astype(np.float32)
    ours = (hidden * mask).sum(1) / mask.sum(1)
    print(f"onnxruntime: {len(SENTENCES)} sentences -> mean-pooled embeddings {ours.shape}")

    # 2. optimum's ORTModel class on the same folder
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    ort_model = ORTModelForFeatureExtraction.from_pretrained(
        model.parent, file_name=model.name, session_options=session_options(), provider="CPUExecutionProvider"
    )
    output_names = [o.name for o in ort_model.session.get_outputs()]
    if "last_hidden_state" in output_names:
        result = ort_model(**tokenizer(SENTENCES, padding=True, return_tensors="pt"))
        hidden = result.last_hidden_state.numpy()
    else:
        # A sentence-transformers export names its outputs token_embeddings/sentence_embedding,
        # which ORTModelForFeatureExtraction.forward does not map: run the session optimum
        # built (with our session options) directly.
        print(f"ORTModelForFeatureExtraction.forward expects 'last_hidden_state'; this export has "
              f"{output_names}: using the ORTModel's session directly")
        hidden = dict(zip(output_names, ort_model.session.run(None, feed)))["token_embeddings"]
    theirs = (hidden * mask).sum(1) / mask.sum(1)
    agreement = float(np.max(np.abs(ours - theirs)))
    print(f"optimum ORTModelForFeatureExtraction: embeddings {theirs.shape}, max |diff| vs onnxruntime {agreement:.2e}")
    normed = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    print("cosine similarity matrix:")
    print(np.array2string(normed @ normed.T, precision=3))


if __name__ == "__main__":
    main()
