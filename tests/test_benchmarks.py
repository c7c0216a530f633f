"""The benchmarks run, in a few images, so that none of them rots: each is started as a
user starts it, with the smallest sizes it takes, and must finish and print its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from browser import needs_browser
from conftest import KAGGLE_DR, MOBILENET_WEIGHTS, SHARED, need

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.shared
@pytest.mark.slow
def test_the_preprocessing_benchmark_runs_on_a_few_photographs():
    need(KAGGLE_DR)
    out = _run("preprocess.py", "--n", "4", "--full-size", "2", "--repeat", "1")
    assert "fundus full-size" in out and "full decode" in out


def test_the_patch_knn_benchmark_runs_in_smoke_mode():
    out = _run("patch_knn.py", "--smoke")
    assert "patch kNN (exact)" in out and "fitting, exact" in out


@pytest.mark.shared
@pytest.mark.slow
def test_the_lesion_benchmark_runs_in_smoke_mode():
    data = need(SHARED / "data" / "idrid-lesions")
    out = _run("lesions.py", "--smoke", "--data-dir", str(data),
               "--weights", str(need(MOBILENET_WEIGHTS)))
    table = out[out.index("heatmap from"):]
    for row in ("chance", "centre", "contrast", "knn (gradient"):
        assert f"\n{row}" in table, out
    assert "strict pointing" in table and "AUPRO" in table
@needs_browser
def test_the_report_benchmark_runs_in_smoke_mode():
    out = _run("report.py", "--smoke")
    assert "report of 90 images" in out and "load event at" in out
    assert "command: python benchmarks/report.py" in out
