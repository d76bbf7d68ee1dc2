"""The analysis report as one self-contained HTML page: summary cards, the plots inlined as
base64, and tables of outlier channels, layer fidelity and sensitivity."""

from __future__ import annotations

import base64
import datetime
import html

import math
from pathlib import Path

from outlierquant.evaluate.report_data import AnalysisReport

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
header{background:#1d2b3a;color:#fff;padding:22px 36px}
header h1{margin:0 0 6px;font-size:24px} header p{margin:2px 0;color:#c9d3de;font-size:14px}
main{padding:8px 36px 40px;max-width:1400px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:18px 24px;margin:18px 0}
h2{font-size:19px;margin:0 0 10px} p.note{color:#56616d;font-size:13.5px;margin:6px 0 12px;max-width:1050px}
.cards{display:flex;flex-wrap:wrap;gap:14px;margin-top:18px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 20px;min-width:190px}
.card .v{font-size:26px;font-weight:600} .card .k{font-size:12.5px;color:#56616d;text-transform:uppercase;letter-spacing:.04em}
.card.bad .v{color:#c0392b} .card.good .v{color:#1e8449}
img{max-width:100%;height:auto;display:block;margin:6px 0}
.row{display:flex;flex-wrap:wrap;gap:18px} .row>div{flex:1 1 560px;min-width:0}
table{border-collapse:collapse;font-size:13.5px;width:100%}
th,td{padding:5px 10px;border-bottom:1px solid #e4e7eb;text-align:right;white-space:nowrap}
th{background:#f0f2f5;position:sticky;top:0} td.l,th.l{text-align:left;white-space:normal}
tr.hot td{background:#fdecea} code{font-size:12.5px;background:#f0f2f5;padding:1px 4px;border-radius:3px}
footer{color:#7b8691;font-size:12.5px;padding:0 36px 30px}
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:,.{digits}f}"


def _card(value: str, key: str, tone: str = "") -> str:
    return f'<div class="card {tone}"><div class="v">{html.escape(value)}</div><div class="k">{html.escape(key)}</div></div>'


def _end_to_end_cards(report: AnalysisReport) -> list[str]:
    summary = report.end_to_end
    if not summary:
        return []
    from outlierquant.evaluate.report_data import end_to_end_ok

    tone = {True: "good", False: "bad", None: ""}[end_to_end_ok(summary)]
    cards = []
    if summary.get("perplexity_delta") is not None:
        cards.append(_card(f"{summary['perplexity_delta']:+.3f}", "perplexity Δ vs fp32 "
                           f"({_num(summary['perplexity_reference'], 2)} → {_num(summary['perplexity_candidate'], 2)})",
                           tone))
    if summary.get("cosine_mean") is not None:
        cards.append(_card(f"{summary['cosine_mean']:.4f}", f"end-to-end {summary.get('cosine_metric', 'cosine')} (mean)",
                           tone if summary.get("perplexity_delta") is None else ""))
        if summary.get("cosine_min") is not None:
            cards.append(_card(f"{summary['cosine_min']:.4f}", "end-to-end cosine (worst sample)"))
    return cards


def _advice_section(report: AnalysisReport) -> str:
    from outlierquant.evaluate.report_data import ADVICE_RULES

    e = html.escape
    items = []
    for item in report.advice:
        text = e(item["text"])
        if item.get("exclude"):
            yaml = "exclude: [" + ", ".join(f'"{n}"' for n in item["exclude"]) + "]"
            text += f"<br><code>{e(yaml)}</code>"
        items.append(f"<li><b>{e(item['rule'])}</b>: {text}</li>")
    rules = "".join(f"<li>{e(rule)}</li>" for rule in ADVICE_RULES)
    return (
        "<section id='advice'><h2>What to do next</h2><ul>" + "".join(items) + "</ul>"
        "<p class='note'>Derived from the measurements above by these rules (the recipe's <code>exclude</code> "
        f"option takes node-name substrings):</p><ol class='note'>{rules}</ol></section>"
    )


def write_html(report: AnalysisReport, out_dir: Path) -> Path:
    e = html.escape
    t = report.threshold
    with_outliers = [s for s in report.inputs if s.outlier_channels(t)]
    worst = report.worst_inputs(1)[0]
    recurring_total = sum(len(v) for v in report.recurring.values())
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>outlierquant analysis — {e(Path(report.model).name)}</title><style>{_CSS}</style></head><body>",
        "<header><h1>Activation outlier analysis</h1>",
        f"<p>model <code style='background:#2c3e50;color:#fff'>{e(report.model)}</code></p>",
    ]
    if report.quantized:
        recipe = f" · recipe <b>{e(report.recipe)}</b>" if report.recipe else " · no quantization report beside it"
        parts.append(f"<p>quantized <code style='background:#2c3e50;color:#fff'>{e(report.quantized)}</code>{recipe}</p>")
    parts.append(
        f"<p>{report.calibration_samples} calibration samples · {report.probe_samples} probe samples from "
        f"{e(report.probe_source)} · outlier threshold |x| ≥ {t:g} (LLM.int8())</p></header><main>"
    )
    cards = _end_to_end_cards(report) + [
        _card(str(len(report.inputs)), "layer inputs analysed"),
        _card(f"{len(with_outliers)}", f"inputs with |x| ≥ {t:g}", "bad" if with_outliers else "good"),
        _card(str(recurring_total), "recurring outlier channels", "bad" if recurring_total else "good"),
        _card(f"{_num(worst.ratio)}×", "worst max / median"),
    ]
    if report.fidelity:
        lowest = min(report.fidelity, key=lambda f: f.sqnr_db)
        cards.append(_card(f"{_num(lowest.sqnr_db)} dB", "lowest layer SQNR", "bad" if lowest.sqnr_db < 20 else ""))
    if report.sensitivity:
        cards.append(_card(f"{report.sensitivity[0].cosine:.4f}", "cos, most sensitive layer"))
    parts.append(f"<div class='cards'>{''.join(cards)}</div>")

    recurring_text = "; ".join(
        f"width {w}: channel{'s' if len(ch) > 1 else ''} {', '.join(map(str, ch))}" for w, ch in report.recurring.items()
    ) or "none"
    parts.append("<section><h2>Per-channel abs-max, every layer input</h2>")
    parts.append(
        "<p class='note'>Each row is the activation a linear layer reads (Q, K and V sharing one input are one row), "
        "each column a channel; the colour is max |x| over the calibration data on a log scale. "
        f"Recurring outlier channels (|x| ≥ {t:g} in at least {report.recurring_fraction:.0%} of the inputs of "
        f"that width) are marked with red triangles: <b>{e(recurring_text)}</b>.</p>"
    )
    for key in [k for k in report.plots if k.startswith("heatmap")]:  # most rows first
        parts.append(_img(report.plots[key], "channel abs-max heatmap"))
    parts.append("</section>")

    parts.append("<section><h2>How far the worst channel sits above the rest</h2><div class='row'>")
    parts.append(
        "<div><p class='note'>max / median of the per-channel abs-max. A per-tensor int8 scale spends its 255 "
        "levels on the largest channel: at a ratio of 100 a typical channel gets about 2–3 of them.</p>"
        f"{_img(report.plots['ratio'], 'max/median ratio')}</div>"
    )
    parts.append(
        "<div><p class='note'>Kurtosis of all values of the input on the probe samples (3 for a Gaussian, "
        "dashed line). Heavy tails mean a few huge values set the range.</p>"
        f"{_img(report.plots['kurtosis'], 'kurtosis')}</div></div></section>"
    )

    parts.append("<section><h2>Worst layer inputs</h2><table><tr><th class='l'>layer input</th><th>channels</th>"
                 "<th>max |x|</th><th>median</th><th>max/median</th><th>kurtosis</th>"
                 f"<th class='l'>channels ≥ {t:g} (share of probe tokens)</th></tr>")
    for s in report.worst_inputs(12):
        outliers = s.outlier_channels(t)
        shown = ", ".join(
            f"{j}" + (f" ({s.outlier_token_share[j]:.0%})" if j in s.outlier_token_share else "") for j in outliers[:8]
        )
        if len(outliers) > 8:
            shown += f", … {len(outliers) - 8} more"
        parts.append(
            f"<tr class='{'hot' if outliers else ''}'><td class='l'>{e(s.label)}</td><td>{s.channels}</td>"
            f"<td>{_num(s.max, 2)}</td><td>{_num(s.median, 3)}</td><td>{_num(s.ratio)}</td>"
            f"<td>{_num(s.kurtosis)}</td><td class='l'>{e(shown) or '–'}</td></tr>"
        )
    parts.append("</table></section>")

    if report.quantized:
        parts.append("<section><h2>Quantized model: per-layer SQNR of the linear outputs</h2>")
        parts.append(
            "<p class='note'>10·log10(Σy² / Σ(y−ŷ)²) of each linear's output against fp32 on the probe samples "
            "(higher is better; 20 dB ≈ 10% relative error). Hatched bars: the layer's output channels were "
            "rescaled by an equivalence rewrite, compared after a per-channel affine fit.</p>"
        )
        if "sqnr" in report.plots:
            parts.append(_img(report.plots["sqnr"], "per-layer SQNR"))
        total = len(report.fidelity) + len(report.unmatched_layers)
        rewritten = [f for f in report.fidelity if f.node in report.rewritten]
        parts.append(
            f"<p class='note'>{len(report.fidelity)} of {total} linears of the fp32 model compared"
            + (f", {len(rewritten)} of them rewritten by the recipe (matched through the quantization report and the "
               "nodes that read their output)" if rewritten else "") + ".</p>"
        )
        if rewritten:
            parts.append("<table><tr><th class='l'>rewritten linear</th><th class='l'>by</th><th>SQNR dB</th></tr>")
            for f in sorted(rewritten, key=lambda f: f.sqnr_db)[:12]:
                parts.append(f"<tr class='{'hot' if f.sqnr_db < 20 else ''}'><td class='l'>{e(f.label)}</td>"
                             f"<td class='l'>{e(', '.join(report.rewritten[f.node]))}</td><td>{_num(f.sqnr_db)}</td></tr>")
            parts.append("</table>")
        if report.unmatched_layers:
            parts.append(f"<p class='note'>{len(report.unmatched_layers)} linears have no counterpart in the quantized "
                         "model:</p><table><tr><th class='l'>linear</th><th class='l'>why</th></tr>")
            for node in report.unmatched_layers[:20]:
                parts.append(f"<tr><td class='l'>{e(node)}</td>"
                             f"<td class='l'>{e(report.unmatched_reasons.get(node, 'no counterpart'))}</td></tr>")
            parts.append("</table>")
        parts.append("</section>")
        if report.sensitivity:
            plain = report.sensitivity_method.startswith("plain")
            parts.append("<section><h2>Sensitivity ranking: one layer quantized at a time "
                         f"({'plain w8a8' if plain else 'the recipe'})</h2>")
            parts.append(
                f"<p class='note'>The fp32 model with only this linear quantized by <b>{e(report.sensitivity_method)}"
                "</b>; 1 − cosine of the model output against fp32. The layers at the top are where an outlier "
                "method pays off. "
                + (f"The ranking uses plain w8a8, not the recipe {e(report.recipe)}: it says which layers int8 "
                   "hurts, not what the recipe leaves of that. " if plain and report.recipe else "")
                + f"{e(report.sensitivity_note)}</p>"
            )
            parts.append("<div class='row'><div>" + _img(report.plots["sensitivity"], "sensitivity ranking") + "</div>")
            parts.append("<div><table><tr><th>#</th><th class='l'>layer</th><th>cosine</th><th>1 − cos</th></tr>")
            for rank, s in enumerate(report.sensitivity[:15], 1):
                parts.append(
                    f"<tr><td>{rank}</td><td class='l'>{e(s.label)}</td><td>{s.cosine:.5f}</td>"
                    f"<td>{s.loss:.2e}</td></tr>"
                )
            parts.append("</table></div></div></section>")

    parts.append(_advice_section(report))

    from outlierquant import __version__

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts.append(
        f"</main><footer>outlierquant {e(__version__)} · {stamp} · numbers in <code>analysis.json</code> "
        "beside this page</footer></body></html>"
    )
    path = out_dir / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
