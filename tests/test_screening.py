"""The screening workflow as a user runs it: kad fit, kad score, kad threshold."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from kad.artifact import read_manifest
from kad.cli import app
from kad.pipeline import load_pipeline
from synthetic import screening_folder

pytestmark = pytest.mark.tf
runner = CliRunner()
FAST = ["--backbone", "mobilenet_v2:alpha=0.35", "--weights", "none", "--image-size", "32",
        "--preprocessing", "natural"]


def _kad(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("screening")
    screening_folder(root / "fit", n_normal=40, n_abnormal=8, seed=1)
    screening_folder(root / "new", n_normal=20, n_abnormal=10, seed=2)
    (root / "new" / "normal" / "broken.png").write_text("not an image")
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label"])
        for path in sorted((root / "new").rglob("*.png")):
            writer.writerow([path.relative_to(root).as_posix(), path.parent.name])
    _kad("fit", "--dataset", "folder:kind=natural", "--data-dir", root / "fit", *FAST,
         "--out", root / "model.kad")
    return root


def _read_scores(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_fit_picks_a_block_and_sets_the_threshold_with_labelled_anomalies(work):
    info = read_manifest(work / "model.kad")["info"]
    assert len(info["blocks"]) == 1  # picked, as in Table 2
    assert info["threshold"]["method"] == "sensitivity"
    assert info["threshold"]["target_sensitivity"] == 0.95
    assert info["training"]["n_images"] >= 25 and info["training"]["fingerprint"]


def test_score_ranks_most_suspicious_first_and_lists_unreadable_files(work):
    out = work / "scored"
    result = _kad("score", work / "model.kad", work / "new", "--labels", work / "labels.csv",
                  "--out", out)
    rows = _read_scores(out / "scores.csv")
    scored = [r for r in rows if r["score"]]
    scores = [float(r["score"]) for r in scored]
    assert len(scored) == 30 and scores == sorted(scores, reverse=True)
    broken = {r["file"].rsplit("/", 1)[-1]: r for r in rows if not r["score"]}
    assert set(broken) == {"broken.png", "patients.csv"}
    assert broken["broken.png"]["status"] == "unreadable" and broken["broken.png"]["reason"]
    assert broken["patients.csv"]["status"] == "skipped"
    assert "32 files: 30 scored" in result.output and "1 unreadable, 1 skipped" in result.output
    threshold = load_pipeline(work / "model.kad").threshold.value
    assert all((r["flagged"] == "yes") == (float(r["score"]) > threshold) for r in scored)
    assert all(0 <= float(r["percentile"]) <= 100 for r in scored)
    auroc = roc_auc_score([int(r["label"]) for r in scored], scores)
    assert auroc > 0.9
    assert f"AUROC {auroc:.3f}" in result.output
    page = (out / "report.html").read_text()
    assert f"{100 * auroc:.1f}%" in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page), "the report must be offline"
    assert page.count("data:image/png;base64,") >= 2 + 24
    assert "broken.png" in page


def test_threshold_sets_a_sensitivity_and_reports_specificity(work):
    target = work / "model-90.kad"
    result = _kad("threshold", work / "model.kad", "--labels", work / "labels.csv",
                  "--sensitivity", "0.9", "--out", target)
    assert "specificity" in result.output and "95% CI" in result.output
    chosen = load_pipeline(target).threshold
    assert chosen.method == "sensitivity" and chosen.details["sensitivity"] >= 0.9
    low, high = chosen.details["specificity_ci95"]
    assert low <= chosen.details["specificity"] <= high
    out = work / "scored-90"
    _kad("score", target, work / "new", "--labels", work / "labels.csv", "--out", out)
    rows = [r for r in _read_scores(out / "scores.csv") if r["score"]]
    flagged = np.array([r["flagged"] == "yes" for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    assert flagged[labels == 1].mean() >= 0.9


def test_refusals_are_one_clear_line(work, tmp_path):
    (tmp_path / "junk.kad").write_bytes(b"junk")
    result = runner.invoke(app, ["score", str(tmp_path / "junk.kad"), str(work / "new")])
    assert result.exit_code == 1 and "not a kad model file" in result.output
    result = runner.invoke(app, ["score", str(work / "model.kad"), str(tmp_path / "none")])
    assert result.exit_code == 1 and "no such file or folder" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_score_accounts_for_every_file_it_is_given(work, tmp_path):
    import cv2

    folder = tmp_path / "incoming"
    folder.mkdir()
    good = sorted((work / "new" / "abnormal").glob("*.png"))[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    (folder / "scan.gif").write_bytes(b"GIF89a" + bytes(40))
    (folder / "scan.dcm").write_bytes(bytes(200))
    (folder / "notes.txt").write_text("hello")
    (folder / ".DS_Store").write_bytes(bytes(8))
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    cv2.imwrite(str(folder / "tiny.png"), np.full((1, 1, 3), 90, np.uint8))
    cv2.imwrite(str(folder / "flat.png"), np.full((64, 64, 3), 128, np.uint8))
    extra = tmp_path / "missing.jpg"
    out = tmp_path / "out"
    result = _kad("score", work / "model.kad", folder, extra, "--out", out)
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in _read_scores(out / "scores.csv")}
    assert set(rows) == {p.name for p in good} | {"scan.gif", "scan.dcm", "notes.txt",
                                                   ".DS_Store", "gone.png", "tiny.png",
                                                   "flat.png", "missing.jpg"}
    assert {rows[p.name]["status"] for p in good} == {"scored"}
    assert rows["gone.png"]["status"] == "skipped" and "broken symbolic link" in rows[
        "gone.png"]["reason"]
    assert "unsupported image format .gif" in rows["scan.gif"]["reason"]
    assert "unsupported image format .dcm" in rows["scan.dcm"]["reason"]
    assert rows["tiny.png"]["status"] == "unreadable" and "1x1" in rows["tiny.png"]["reason"]
    assert rows["flat.png"]["status"] == "unreadable" and "one flat colour" in rows[
        "flat.png"]["reason"]
    assert "10 files: 2 scored" in result.output
    assert "2 unreadable, 6 skipped" in result.output
    for name in ("gone.png", "scan.gif", "tiny.png", "missing.jpg"):
        assert name in result.output


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="headless Chromium is not installed")
def test_the_report_renders_in_a_headless_browser(work, tmp_path):
    out = work / "scored"
    if not (out / "report.html").exists():
        _kad("score", work / "model.kad", work / "new", "--out", out)
    shot = tmp_path / "report.png"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,2400", f"--screenshot={shot}", (out / "report.html").as_uri(),
    ], check=True, capture_output=True, timeout=120)
    import cv2

    image = cv2.imread(str(shot))
    assert image is not None and image.shape[0] >= 2000
    assert image.std() > 20, "the page rendered blank"


def test_fit_says_how_many_images_it_fitted_on_and_names_those_left_out(tmp_path):
    import cv2

    from synthetic import screening_folder

    screening_folder(tmp_path / "fit", n_normal=12, n_abnormal=0, seed=3)
    (tmp_path / "fit" / "patients.csv").unlink()
    normal = tmp_path / "fit" / "normal"
    cv2.imwrite(str(normal / "tiny.png"), np.full((1, 1, 3), 90, np.uint8))
    (normal / "broken.png").write_text("not an image")
    (normal / "gone.png").symlink_to(tmp_path / "nowhere.png")
    model = tmp_path / "model.kad"
    result = _kad("fit", "--dataset", "folder:kind=natural", "--data-dir", tmp_path / "fit",
                  *FAST, "--out", model)
    fitted = load_pipeline(model).training["n_images"]
    assert fitted == 12
    assert f"fitted on {fitted} normal images" in result.output
    for name in ("tiny.png", "broken.png", "gone.png"):
        assert name in result.output
    assert "1x1 px" in result.output and "broken symbolic link" in result.output
