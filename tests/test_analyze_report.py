"""``outlierquant analyze``: the numbers behind the report, and the page in a real browser."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from outlierquant.evaluate.metrics import sqnr_db
from outlierquant.evaluate.probes import Labeller, _AlignedError, _Moments, recurring_channels
from outlierquant.evaluate.report_data import InputStats
from outlierquant.numerics.estimates import kurtosis
from outlierquant.plugin.cli import main

CHROMIUM = Path("/usr/bin/chromium")


# -- the pieces, on planted numbers --------------------------------------------------------


def _inputs(absmaxes):
    return [InputStats(f"t{i}", [f"n{i}"], f"n{i}", len(a), np.asarray(a, dtype=float)) for i, a in enumerate(absmaxes)]


def test_recurring_channels_follow_the_llm_int8_criterion():
    base = np.ones(16)
    layers = []
    for i in range(8):
        a = base.copy()
        a[3] = 9.0  # an outlier in every layer
        if i < 2:
            a[7] = 6.0  # in 2 of 8 layers: exactly 25%, at the threshold
        if i == 0:
            a[11] = 50.0  # once only: large but not systematic
        layers.append(a)
    layers.append(np.full(4, 20.0))  # the only input of its width: never recurring
    recurring = recurring_channels(_inputs(layers), threshold=6.0, fraction=0.25)
    assert recurring == {16: [3, 7]}
    assert recurring_channels(_inputs(layers), threshold=6.0, fraction=0.5) == {16: [3]}


def test_streamed_kurtosis_matches_the_metric():
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=(5, 7, 32)) + 0.5
    moments = _Moments()
    for block in x:
        moments.update(block)
    assert moments.kurtosis() == pytest.approx(kurtosis(x), rel=1e-9)


def test_sqnr_is_aligned_only_through_a_per_channel_affine_map():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(4, 10, 8))
    noisy = ref + 0.01 * rng.normal(size=ref.shape)
    scale, shift = rng.uniform(0.2, 5, size=8), rng.normal(size=8)
    error = _AlignedError()
    for r, c in zip(ref, noisy * scale + shift):  # a smoothing scale and a shift folded in
        error.update(r, c, -1)
    raw, aligned = error.sqnr()
    assert raw < 10 < aligned
    assert aligned == pytest.approx(sqnr_db(ref, noisy), abs=1.0)
    plain = _AlignedError()
    plain.update(ref, noisy, -1)
    assert plain.sqnr()[0] == pytest.approx(sqnr_db(ref, noisy))


def test_layer_labels_drop_the_common_prefix_and_op_suffix():
    labels = Labeller([
        "/0/encoder/layer.0/attention/self/query/MatMul",
        "/0/encoder/layer.0/attention/self/key/MatMul",
        "/0/encoder/layer.1/output/dense/MatMul",
    ])
    assert labels("/0/encoder/layer.1/output/dense/MatMul") == "layer.1/output/dense"
    assert labels.group([
        "/0/encoder/layer.0/attention/self/query/MatMul", "/0/encoder/layer.0/attention/self/key/MatMul"
    ]) == "layer.0/attention/self/{query,key}"


# -- the report on the real MiniLM --------------------------------------------------------


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, minilm_onnx) -> Path:
    from outlierquant.export.data import bundled_sentences, read_lines
    from outlierquant.pipeline import quantize_model
    from outlierquant.plugin.api import OutlierQuantizer

    root = tmp_path_factory.mktemp("analyze")
    for split, count in (("calibration", 24), ("heldout", 8)):
        lines = read_lines(bundled_sentences(split))[:count]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    feeds = OutlierQuantizer(minilm_onnx).feeds(root / "calibration.txt")
    quantize_model(minilm_onnx, root / "q.onnx", "w8a8", feeds, progress=False)
    code = main([
        "analyze", str(minilm_onnx), "--calibration-data", str(root / "calibration.txt"),
        "-o", str(root / "report"), "--quantized", str(root / "q.onnx"), "--data", str(root / "heldout.txt"),
        "--probe-samples", "4", "--sensitivity-layers", "4", "-q",
    ])
    assert code == 0
    return root / "report"


@pytest.mark.slow
def test_report_files_and_numbers(report_dir):
    page = (report_dir / "index.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 6  # self-contained: every plot inlined
    for name in ("ratio.png", "kurtosis.png", "sqnr.png", "sensitivity.png", "heatmap_384.png", "heatmap_1536.png"):
        assert (report_dir / name).stat().st_size > 10_000, name
    data = json.loads((report_dir / "analysis.json").read_text(encoding="utf-8"))
    assert data["probe_samples"] == 4 and data["probe_source"] == "held-out data"
    # 6 layers x (QKV input, attention-output input, FFN-up input, FFN-down input)
    assert len(data["inputs"]) == 24
    assert sum(len(i["consumers"]) for i in data["inputs"]) == 36
    assert all(i["kurtosis"] is not None and i["kurtosis"] > 1 for i in data["inputs"])
    # MiniLM's residual stream carries LLM.int8()-style outliers in a few fixed channels
    assert data["recurring_outlier_channels"].get("384")
    assert len(data["fidelity"]) == 36 and not data["unmatched_layers"]
    assert all(5 < f["sqnr_db"] < 60 for f in data["fidelity"])
    cosines = [s["cosine"] for s in data["sensitivity"]]
    assert len(cosines) == 4 and cosines == sorted(cosines) and all(0.9 < c < 1 for c in cosines)
    assert "4 of 36 linears measured" in data["sensitivity_note"]
    # the model-level result, the recipe read from q.report.json, and advice at the end
    assert data["recipe"] == "w8a8" and data["sensitivity_method"].startswith("the quantize settings of the recipe")
    e2e = data["end_to_end"]
    assert e2e["metric"] == "sentence-embedding cosine" and 0.9 < e2e["cosine_min"] <= e2e["cosine_mean"] < 1
    assert data["advice"] and all(a["rule"] and a["text"] for a in data["advice"])
    page = (report_dir / "index.html").read_text(encoding="utf-8")
    assert "end-to-end sentence-embedding cosine (mean)" in page and page.index("What to do next") > page.index("Sensitivity")


@pytest.mark.slow
def test_analyze_bad_input_is_one_line(capsys, tmp_path, minilm_onnx):
    code = main(["analyze", str(minilm_onnx), "--calibration-data", str(tmp_path / "none.txt"), "-o", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "none.txt" in err[0]
    assert not (tmp_path / "index.html").exists()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (CI: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    import matplotlib.image

    shot = tmp_path / "shot.png"
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
        (report_dir / "index.html").resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), done.stderr[-2000:]
    assert shot.stat().st_size > 50_000
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 0.05  # not a blank page
    # the heatmap's dark colours are on screen: the images rendered, not only the text
    assert (pixels.mean(axis=2) < 0.15).mean() > 0.01


# -- coverage, end-to-end and advice on a synthetic model with a planted outlier ------------


def _planted_model(path: Path) -> Path:
    """Synthetic: /l1 reads x, /l2 reads Relu(x), /l3 reads their sum; 16 channels. The
    feeds plant channel 3 of x at ~500 (the others ~1), so channel 3 recurs in the inputs
    of /l1 and /l2; a small weight row behind it keeps it out of their outputs, whose error
    is then set by the per-tensor activation scale the outlier forces. /l3's input is clean."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2, w3 = (rng.normal(scale=0.25, size=(16, 16)).astype(np.float32) for _ in range(3))
    w1[3, :] *= 1e-3
    w2[3, :] *= 1e-3
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="/l1/MatMul"),
        helper.make_node("Relu", ["x"], ["r"], name="/relu"),
        helper.make_node("MatMul", ["r", "w2"], ["h2"], name="/l2/MatMul"),
        helper.make_node("Add", ["h1", "h2"], ["h"], name="/add"),
        helper.make_node("MatMul", ["h", "w3"], ["y"], name="/l3/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "planted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
        [numpy_helper.from_array(w, name) for w, name in ((w1, "w1"), (w2, "w2"), (w3, "w3"))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_advice_names_the_layer_behind_a_planted_outlier(tmp_path):
    from outlierquant.evaluate.report import analyze_model
    from outlierquant.pipeline import quantize_model

    model = _planted_model(tmp_path / "planted.onnx")
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(1, 12, 16)).astype(np.float32)} for _ in range(6)]
    for feed in feeds:
        feed["x"][..., 3] = 500.0 + rng.normal(size=(1, 12))  # the planted outlier channel
    quantize_model(model, tmp_path / "q.onnx", "w8a8", feeds, progress=False)
    report = analyze_model(model, feeds, tmp_path / "report", quantized=tmp_path / "q.onnx", probe_samples=3,
                           progress=False)
    assert report.recipe == "w8a8"  # read from q.report.json beside the model
    assert len(report.fidelity) == 3 and not report.unmatched_layers
    sqnr = {f.node: f.sqnr_db for f in report.fidelity}
    assert max(sqnr["/l1/MatMul"], sqnr["/l2/MatMul"]) < 20
    # /l3 reads the sum of both: its output SQNR inherits their error, it adds little of its own
    assert report.upstream["/l3/MatMul"] == ["/l1/MatMul", "/l2/MatMul"]
    assert sqnr["/l3/MatMul"] > min(sqnr["/l1/MatMul"], sqnr["/l2/MatMul"]) - 3
    keep = next(a for a in report.advice if a["rule"] == "keep-float")
    assert set(keep["exclude"]) == {"/l1/MatMul", "/l2/MatMul"}  # the planted layers, not /l3
    assert report.end_to_end["metric"] == "cosine of y" and report.end_to_end["cosine_mean"] < 0.99
    assert report.recurring == {16: [3]}
    outlier = next(a for a in report.advice if a["rule"] == "outlier-method")
    assert "llm-int8" in outlier["recipes"] and 3 in outlier["channels"]
    data = json.loads((tmp_path / "report" / "analysis.json").read_text(encoding="utf-8"))
    assert [a["rule"] for a in data["advice"]] == [a["rule"] for a in report.advice]
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "What to do next" in page and "/l2/MatMul" in page
    # the ranking quantized each layer with the recipe's quantize settings, and says so
    assert report.sensitivity_method.startswith("the quantize settings of the recipe 'w8a8'")
    assert "the quantize settings of the recipe" in page


def test_sensitivity_uses_the_recipe_quantize_settings_or_says_plain_w8a8():
    from outlierquant.evaluate.report import sensitivity_config

    config, method = sensitivity_config("w8a8-per-token")
    assert config is not None and config.activations != "static" and "w8a8-per-token" in method
    config, method = sensitivity_config("default")  # its quantizer is llm-int8, not the quantize pass
    assert config is None and method.startswith("plain w8a8") and "no quantize pass" in method
    assert sensitivity_config(None) == (None, sensitivity_config(None)[1])
    assert sensitivity_config("my-own")[0] is None and "not a built-in" in sensitivity_config("my-own")[1]


def test_rewritten_linears_are_matched_through_the_consumers_of_their_output():
    import onnx_ir as ir

    from outlierquant.evaluate.probes import match_linears, rewritten_linears

    def graph(names):
        x = ir.Value(name="x")
        nodes, value = [], x
        for op, name, out in names:
            w = ir.Value(name=f"w_{len(nodes)}", const_value=ir.tensor(np.ones((2, 2), np.float32)))
            inputs = [value, w] if op == "MatMul" else [w, value]
            node = ir.Node("", op, inputs, name=name, num_outputs=1)
            node.outputs[0].name = out
            nodes.append(node)
            value = node.outputs[0]
        return ir.Model(ir.Graph([x], [value], nodes=nodes, opset_imports={"": 17}), ir_version=9)

    fp32 = graph([("MatMul", "/a/MatMul", "a_out"), ("Add", "/a/Add", "add_out")])
    quant = graph([("Mul", "/a/MatMul_llm_int8/Mul", "int8_out"), ("Add", "/a/Add", "add_out")])
    records = [{"pass": "llm-int8", "layers": [{"linear": "/a/MatMul"}], "skipped": [{"linear": "/b", "skipped": "x"}]}]
    rewritten = rewritten_linears(records, ["/a/MatMul", "/b"])
    assert rewritten == {"/a/MatMul": ["llm-int8"]}
    matched, unmatched, _ = match_linears([("/a/MatMul", "a_out", -1)], quant, fp32, rewritten)
    assert matched == [("a_out", "int8_out", -1, "/a/MatMul")] and not unmatched
    alone = graph([("Mul", "/other", "o")])
    matched, unmatched, reasons = match_linears([("/a/MatMul", "a_out", -1)], alone, fp32, rewritten)
    assert unmatched == ["/a/MatMul"] and "rewritten by llm-int8" in reasons["/a/MatMul"]
