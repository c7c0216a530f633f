"""The benchmarks that read the shared fundus photographs run in a few images (their
``--smoke`` mode), in a file of their own so that the test workers share the benchmarks'
time."""

from __future__ import annotations

import pytest

from benchmark_runner import run_main as _main
from conftest import KAGGLE_DR, MOBILENET_WEIGHTS, SHARED, need


@pytest.mark.tf
@pytest.mark.shared
@pytest.mark.slow
def test_the_lesion_benchmark_runs_in_smoke_mode(capsys, monkeypatch):
    data = need(SHARED / "data" / "idrid-lesions")
    out = _main("lesions.py", capsys, monkeypatch, "--data-dir", str(data),
                "--weights", str(need(MOBILENET_WEIGHTS)))
    table = out[out.index("heatmap from"):]
    for row in ("chance", "centre", "contrast", "knn (gradient"):
        assert f"\n{row}" in table, out
    assert "strict pointing" in table and "AUPRO" in table


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
