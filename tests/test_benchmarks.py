"""The benchmarks run, in a few images, so that none of them rots: each has a ``--smoke``
mode (a few images, seconds) that must finish and print its table. Scripts that start
child processes themselves are started as a user starts them; the others run in this
process, which spares importing TensorFlow again."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from browser import needs_browser
from conftest import KAGGLE_DR, MOBILENET_WEIGHTS, SHARED, need

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _main(script: str, capsys, monkeypatch, *args: str) -> str:
    """``script``'s ``main(["--smoke", *args])`` in this process; what it printed."""
    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}",
                                                  ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    threads = cv2.getNumThreads()  # some benchmarks time OpenCV on one thread
    try:
        spec.loader.exec_module(module)
        module.main(["--smoke", *args])
    finally:
        cv2.setNumThreads(threads)
    return capsys.readouterr().out


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


@pytest.mark.tf
def test_the_end_to_end_benchmark_runs_in_smoke_mode():
    out = _run("end_to_end.py", "--smoke")
    assert "bare img/s" in out and "smoke      after" in out


@pytest.mark.tf
def test_the_main_job_benchmark_runs_in_smoke_mode():
    out = _run("main_job.py", "--smoke")
    assert "network input size: 80 px" in out and "wall time" in out


@pytest.mark.tf
def test_the_extraction_benchmark_runs_in_smoke_mode():
    out = _run("extract.py", "--smoke")
    assert "kad:openvino end to end / plain predict" in out


@pytest.mark.tf
def test_the_int8_benchmark_runs_in_smoke_mode(capsys, monkeypatch):
    pytest.importorskip("nncf")
    out = _main("int8.py", capsys, monkeypatch)
    assert "speed-up" in out and "\nsmoke " in out and "paired bootstrap" in out


@pytest.mark.tf
def test_the_flops_benchmark_runs_in_smoke_mode(capsys, monkeypatch):
    assert "GFLOP per image" in _main("flops.py", capsys, monkeypatch)


def test_the_model_file_benchmark_runs_in_smoke_mode(capsys, monkeypatch):
    out = _main("model_files.py", capsys, monkeypatch)
    assert "bit-identical" in out and "iforest" in out


@pytest.mark.shared
def test_the_preprocessing_benchmark_runs_in_smoke_mode(capsys, monkeypatch):
    need(KAGGLE_DR)
    out = _main("preprocess.py", capsys, monkeypatch)
    assert "fundus full-size" in out and "full decode" in out


@pytest.mark.tf
@pytest.mark.shared
@pytest.mark.parametrize("script, printed", [
    ("heatmaps.py", "pointing"),
    ("evidence.py", "AUROC"),
    ("calibration_dr.py", "images:"),
])
def test_the_fundus_benchmarks_run_in_smoke_mode(script, printed, capsys, monkeypatch,
                                                 tmp_path):
    need(KAGGLE_DR), need(MOBILENET_WEIGHTS)
    args = ("--work", str(tmp_path / "work")) if script == "calibration_dr.py" else ()
    assert printed in _main(script, capsys, monkeypatch, *args)
