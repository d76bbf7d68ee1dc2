"""How much each recipe depends on its calibration set: size and source (issue 17, item 5).

MiniLM (all-MiniLM-L6-v2) calibrated on 16 / 32 / 64 / all samples of one text source and
scored on held-out text of the *other* source, so a recipe that fits its calibration text
rather than the model shows up as a low minimum:

- ``bundled->wiki``: the bundled ``calibration`` sentences; scored on sentences of the
  ``heldout`` slice of the offline Wikipedia summaries (``--heldout`` of them);
- ``wiki->bundled``: sentences of the ``calibration`` slice of the Wikipedia summaries;
  scored on the bundled ``heldout`` sentences (all 164).

Subsets are the first ``n`` of the source after a fixed shuffle (``--seed``), so the 16 are
inside the 32 and so on; ``all`` is every bundled calibration sentence (164) or as many
Wikipedia sentences. The metric is the sentence-embedding cosine vs fp32 (mean / min over
the held-out set), from :func:`outlierquant.evaluate.validate.validate`. Each result is
printed as it comes and appended to ``--jsonl`` (a rerun skips what is already there), and
the table is printed at the end.

    python benchmarks/bench_calibration_size.py [--model DIR/model.onnx] [--recipes ...]
        [--sizes 16 32 64 all] [--directions bundled->wiki wiki->bundled] [--jsonl FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaffold  # noqa: E402

RECIPES = ("w8a8", "default", "llm-int8", "quarot-w8a8", "smoothquant-w8a8",
           "rtn-w4a16", "smoothquant+-w4a16", "adadim-w4a16", "quantease-w4a16", "quantease-w3a16")
SIZES = ("16", "32", "64", "all")
DIRECTIONS = ("bundled->wiki", "wiki->bundled")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def wiki_sentences(split: str, count: int) -> list[str]:
    """``count`` sentences of 5-60 words from the Wikipedia summaries of ``split`` (in
    article order; at most 3 per article, so one long article does not dominate)."""
    from outlierquant.export.data import wikipedia_texts

    out: list[str] = []
    for text in wikipedia_texts(split, limit=count * 2):
        taken = 0
        for sentence in _SENTENCE_END.split(text):
            if 5 <= len(sentence.split()) <= 60 and taken < 3:
                out.append(sentence)
                taken += 1
            if len(out) >= count:
                return out
    return out


def texts(source: str, role: str, count: int) -> list[str]:
    from outlierquant.export.data import bundled_sentences, read_lines

    if source == "bundled":
        return read_lines(bundled_sentences(role))[:count]
    return wiki_sentences(role, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="fp32 MiniLM .onnx (default: export the bundled one)")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help="numbers of calibration samples, or 'all'")
    parser.add_argument("--directions", nargs="*", default=list(DIRECTIONS), choices=DIRECTIONS)
    parser.add_argument("--heldout", type=int, default=200, help="held-out Wikipedia sentences (bundled->wiki)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jsonl", default=None, help="append each result here; results already in it are skipped")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from outlierquant.evaluate.validate import validate
    from outlierquant.export.data import model_inputs, text_feeds
    from outlierquant.pipeline import quantize_model

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-calibration-size-"))
    out.mkdir(parents=True, exist_ok=True)
    work = scaffold.minilm(out / "fp32", args.model)
    spec = model_inputs(work.model)

    def feeds(lines: list[str]) -> list[dict]:
        return text_feeds(lines, tokenizer=work.tokenizer, input_names=spec)

    bundled_all = len(texts("bundled", "calibration", 10**6))
    pools = {"bundled": texts("bundled", "calibration", bundled_all), "wiki": texts("wiki", "calibration", bundled_all)}
    for lines in pools.values():
        random.Random(args.seed).shuffle(lines)
    heldout = {"bundled->wiki": feeds(texts("wiki", "heldout", args.heldout)),
               "wiki->bundled": feeds(texts("bundled", "heldout", 10**6))}
    done: dict[tuple, dict] = {}
    jsonl = Path(args.jsonl) if args.jsonl else None
    if jsonl and jsonl.is_file():
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            done[(row["recipe"], row["direction"], str(row["size"]))] = row
    print(f"MiniLM; held-out: {len(heldout['bundled->wiki'])} Wikipedia sentences (bundled->wiki), "
          f"{len(heldout['wiki->bundled'])} bundled sentences (wiki->bundled); pools: "
          + ", ".join(f"{k} {len(v)}" for k, v in pools.items()), flush=True)
    for direction in args.directions:
        source = direction.split("->")[0]
        for size in args.sizes:
            count = len(pools[source]) if size == "all" else int(size)
            calibration = feeds(pools[source][:count])
            for recipe in args.recipes:
                key = (scaffold.recipe_stem(recipe), direction, size)
                if key in done:
                    continue
                started = time.perf_counter()
                stem = scaffold.recipe_stem(recipe)
                result = quantize_model(work.model, out / f"{stem}-{source}-{size}.onnx", recipe, calibration,
                                        progress=False)
                seconds = time.perf_counter() - started
                report = validate(work.model, result.output, heldout[direction], latency_runs=0, progress=False)
                row = {"recipe": stem, "direction": direction, "size": size, "samples": count,
                       "cos_mean": round(report.embedding.cosine_mean, 6),
                       "cos_min": round(report.embedding.cosine_min, 6), "seconds": round(seconds, 1)}
                done[key] = row
                print(json.dumps(row), flush=True)
                if jsonl:
                    with jsonl.open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps(row) + "\n")
    header = ["recipe", "direction", *[f"{s} mean / min" for s in args.sizes]]
    rows = []
    for recipe in args.recipes:
        for direction in args.directions:
            cells = []
            for size in args.sizes:
                row = done.get((scaffold.recipe_stem(recipe), direction, size))
                cells.append(f"{row['cos_mean']:.4f} / {row['cos_min']:.4f}" if row else "")
            rows.append([scaffold.recipe_stem(recipe), direction, *cells])
    scaffold.print_table(header, rows)


if __name__ == "__main__":
    main()
