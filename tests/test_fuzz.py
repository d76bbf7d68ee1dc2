"""A short coverage-guided fuzz run (fuzz/run.py, atheris) of the loaders and the pipeline.

About 60 seconds over the three targets (model bytes, recipes, .npz feeds). Every input
must either work or raise an OutlierQuantError, and leave no partial output; a finding
fails the test with the input's path and the exception. The long run is
``python fuzz/run.py --seconds 600``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 60


def test_fuzz_short_run(tmp_path):
    pytest.importorskip("atheris", reason="atheris is in the test extra: pip install -e '.[test]'")
    summary = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "run.py"), "--seconds", str(SECONDS), "--json", str(summary),
         "--artifacts", str(tmp_path / "findings"), "--corpus", str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=SECONDS + 600,
    )
    print(done.stdout)
    results = json.loads(summary.read_text())
    findings = [(r["target"], f) for r in results for f in r["findings"]]
    assert not findings, f"{findings}\n{done.stderr[-4000:]}"
    assert done.returncode == 0, done.stderr[-4000:]
    for r in results:
        assert r["runs"] > 50 and r["cov"] > 0, r
