"""The benchmarks run, in a few images, so that none of them rots: each has a ``--smoke``
mode (a few images, seconds) that must finish and print its table. Scripts that start
child processes themselves are started as a user starts them; the others run in this
process, which spares importing TensorFlow again. Those reading the shared fundus
photographs are in ``test_benchmarks_fundus.py``."""

from __future__ import annotations

import pytest

from benchmark_runner import run_main as _main
from benchmark_runner import run_script as _run
from browser import needs_browser


def test_the_patch_knn_benchmark_runs_in_smoke_mode():
    out = _run("patch_knn.py", "--smoke")
    assert "patch kNN (exact)" in out and "fitting, exact" in out
    assert "locations per CPU second" in out


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




@pytest.mark.tf
def test_the_batch_split_benchmark_runs_in_smoke_mode(capsys, monkeypatch):
    out = _main("batch_split.py", capsys, monkeypatch)
    assert "rate / first" in out and "requests of" in out
