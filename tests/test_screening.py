"""The screening workflow as a user runs it: kad fit, kad score, kad threshold."""

from __future__ import annotations

import csv
import re
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from browser import chromium, keep_screenshot, needs_browser, show_all_images
from conftest import FAST, FAST_CLI
from kad.cli import app
from kad.screening.pipeline import load_pipeline
from kad.utils.artifact import read_manifest
from synthetic import screening_folder

pytestmark = pytest.mark.tf
runner = CliRunner()


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
    _kad("fit", "--dataset", "folder:kind=natural", "--data-dir", root / "fit", *FAST_CLI,
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
    assert info["training"]["n_images"] >= 20 and info["training"]["fingerprint"]


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
    assert all(r["p_value"] == "" or 0 < float(r["p_value"]) <= 1 for r in scored)
    auroc = roc_auc_score([int(r["label"]) for r in scored], scores)
    assert auroc > 0.9
    assert f"AUROC {auroc:.3f} (10 abnormal and 20 normal of the 30 scored images" in (
        result.output.replace("\n", ""))
    # labels of one kind only: no AUROC, and the console says why
    normals = [p for p in sorted((work / "new" / "normal").glob("*.png"))
               if p.name != "broken.png"][:3]
    alone = _kad("score", work / "model.kad", *normals, "--labels", work / "labels.csv",
                 "--out", work / "scored-normals")
    assert "no AUROC: 0 abnormal and 3 normal of the 3 scored images" in (
        alone.output.replace("\n", ""))
    # every other row of the labels file is said to label none of the images given
    with open(work / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    said = " ".join(alone.output.split())
    assert f"labels: {len(rows) - 3} row(s) of {work / 'labels.csv'} label none" in said
    assert "labels:" not in " ".join(result.output.split())  # every row labels a file
    page = (work / "scored-normals" / "report.html").read_text()
    assert f"{len(rows) - 3} row(s) label none of the images given" in page
    assert "label rows not used" not in (out / "report.html").read_text()
    # the batch against the calibration normals, in the report; on the console if unlike
    from scipy.stats import ks_2samp

    test = ks_2samp(scores, load_pipeline(work / "model.kad").calibration["scores"])
    said = [line for line in result.output.splitlines() if line.startswith("batch:")]
    assert len(said) == (test.pvalue < 0.01)
    page = (out / "report.html").read_text()
    assert "Kolmogorov-Smirnov test of the scores of the 30 new images" in page
    assert f"p = {test.pvalue:.2g}" in page
    assert f"{100 * auroc:.1f}%" in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page), "the report must be offline"
    # every picture is a file beside the page, each scored image with its two thumbnails
    assert page.count('"pics":"tm"') == 30
    assert all((out / "report_files" / f"{i:05d}{tag}.jpg").is_file()
               for i in range(30) for tag in "tm")
    assert "broken.png" in page
    # labelled anomalies set this model's threshold, not the calibration normals
    assert "calibration normals: the" in page and "at fitting that set the" not in page


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
    # the figures are said to be of labels.csv, where kad threshold set them, not of fitting
    labelled = f"on {work / 'labels.csv'}: sensitivity"
    assert labelled in result.output.replace("\n", "") and "at fitting:" not in result.output
    page = (out / "report.html").read_text()
    assert f"anomalies of {work / 'labels.csv'}" in page
    assert "anomalies of the selection" not in page


def test_a_sensitivity_threshold_says_how_many_calibration_normals_it_flags(work):
    """The calibration normals set nothing when labelled anomalies set the threshold: the
    share of them it flags is the false-positive rate to expect, said beside the
    optimistic figures."""
    from kad.screening.calibration import fit_summary

    pipeline = load_pipeline(work / "model.kad")
    assert pipeline.threshold.method == "sensitivity"
    scores = np.asarray(pipeline.calibration["scores"])
    flagged = int((scores > pipeline.threshold.value).sum())
    said = " ".join(fit_summary(pipeline).lines())
    assert f"it flags {flagged} of the {len(scores)} calibration normals" in said


def test_refusals_are_one_clear_line(work, tmp_path):
    (tmp_path / "junk.kad").write_bytes(b"junk")
    result = runner.invoke(app, ["score", str(tmp_path / "junk.kad"), str(work / "new")])
    assert result.exit_code == 1 and "not a kad model file" in result.output
    result = runner.invoke(app, ["score", str(work / "model.kad"), str(tmp_path / "none")])
    assert result.exit_code == 1 and "no such file or folder" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["threshold", str(work / "model.kad"), "--sensitivity", "0.9",
                                 "--out", str(tmp_path / "t.kad")])
    assert result.exit_code == 1 and "--sensitivity needs --labels" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["score", str(work / "model.kad"), str(tmp_path / "empty")])
    assert result.exit_code == 1 and "it is an empty folder" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_score_accounts_for_every_file_it_is_given(work, tmp_path):
    import cv2

    folder = tmp_path / "incoming"
    folder.mkdir()
    good = sorted((work / "new" / "abnormal").glob("*.png"))[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    (folder / "scan.gif").write_bytes(b"GIF89a" + bytes(40))
    (folder / "scan.heic").write_bytes(bytes(200))
    (folder / "notes.txt").write_text("hello")
    (folder / ".DS_Store").write_bytes(bytes(8))
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    cv2.imwrite(str(folder / "tiny.png"), np.full((1, 1, 3), 90, np.uint8))
    cv2.imwrite(str(folder / "flat.png"), np.full((64, 64, 3), 128, np.uint8))
    extra = tmp_path / "missing.jpg"
    out = tmp_path / "out"
    result = _kad("score", work / "model.kad", folder, extra, "--out", out)
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in _read_scores(out / "scores.csv")}
    assert set(rows) == {p.name for p in good} | {"scan.gif", "scan.heic", "notes.txt",
                                                   ".DS_Store", "gone.png", "tiny.png",
                                                   "flat.png", "missing.jpg"}
    assert {rows[p.name]["status"] for p in good} == {"scored"}
    assert rows["gone.png"]["status"] == "skipped" and "broken symbolic link" in rows[
        "gone.png"]["reason"]
    assert "unsupported image format .gif" in rows["scan.gif"]["reason"]
    assert "unsupported image format .heic" in rows["scan.heic"]["reason"]
    assert rows["tiny.png"]["status"] == "unreadable" and "1x1" in rows["tiny.png"]["reason"]
    assert rows["flat.png"]["status"] == "unreadable" and "one flat colour" in rows[
        "flat.png"]["reason"]
    assert "10 files: 2 scored" in result.output
    assert "2 unreadable, 6 skipped" in result.output
    for name in ("gone.png", "scan.gif", "tiny.png", "missing.jpg"):
        assert name in result.output


def test_score_leaves_out_its_own_out_folder_inside_the_folder_scored(work, tmp_path):
    """``kad score incoming/ --out incoming/scored``: an earlier run's pictures and the
    run's own lock are kad's, never images to score; the folder is listed once."""
    folder = tmp_path / "incoming"
    (folder / "scored" / "report_files").mkdir(parents=True)
    good = sorted((work / "new" / "abnormal").glob("*.png"))[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    (folder / "scored" / "report_files" / ".kad-report").write_text("")  # an earlier run's
    shutil.copy(good[0], folder / "scored" / "report_files" / "00000m.jpg")  # a thumbnail
    (folder / "scored" / "heatmaps").mkdir()  # an earlier run's, with --heatmaps
    again = folder / "." / good[0].name  # in the folder, and named as well
    result = _kad("score", work / "model.kad", folder, again, "--out", folder / "scored")
    rows = _read_scores(folder / "scored" / "scores.csv")
    assert sorted(r["file"].rsplit("/", 1)[-1] for r in rows) == sorted(
        [p.name for p in good] + ["scored", good[0].name])
    assert [r["status"] for r in rows if r["file"].endswith("scored")] == ["skipped"]
    assert "4 files: 2 scored" in result.output and "the --out folder" in result.output
    twice = {r["status"]: r for r in rows if r["file"].endswith(good[0].name)}
    assert sorted(twice) == ["scored", "skipped"]  # scored once, the second listed
    assert "given more than once" in twice["skipped"]["reason"]
    # kept, but never taken for this run's
    said = result.output.replace("\n", "")
    assert f"{folder / 'scored' / 'heatmaps'} is an earlier run's: this run drew no" in said


@pytest.mark.parametrize("folder, options", [("report_files", []),
                                             ("heatmaps", ["--heatmaps"])])
def test_score_refuses_before_any_work_to_replace_a_folder_holding_a_users_file(
        work, tmp_path, folder, options):
    """``report_files/`` (and ``heatmaps/`` with --heatmaps) are replaced as a whole at
    the end of a run: a file kad did not write there stops the run first, named."""
    out = tmp_path / "out"
    (out / folder).mkdir(parents=True)
    (out / "report_files").mkdir(exist_ok=True)
    (out / "report_files" / ".kad-report").write_text("")
    (out / folder / "notes.txt").write_text("a file of the user's")
    image = sorted((work / "new" / "abnormal").glob("*.png"))[0]
    result = runner.invoke(app, ["score", str(work / "model.kad"), str(image), "--out",
                                 str(out), *options])
    assert result.exit_code == 1 and "notes.txt was not written by kad score" in (
        result.output.replace("\n", "")), result.output
    assert "scoring" not in result.output and not (out / "scores.csv").exists()
    assert (out / folder / "notes.txt").read_text() == "a file of the user's"


@pytest.fixture(scope="module")
def browser():
    with chromium() as opened:  # one browser for every page of this module
        yield opened


@needs_browser
def test_the_report_renders_in_a_headless_browser(work, browser):
    out = work / "scored"
    if not (out / "report.html").exists():
        _kad("score", work / "model.kad", work / "new", "--out", out)
    scored = [r for r in _read_scores(out / "scores.csv") if r["score"]]  # in rank order
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto((out / "report.html").as_uri())
    # what a person sees: the worklist's rows, in rank order, every scored image once
    shown = page.locator("#worklist tbody tr td:nth-child(2)").all_inner_texts()
    assert shown == [r["file"].split("/new/", 1)[1] for r in scored]
    show_all_images(page)
    broken = page.evaluate("Array.from(document.images).filter(i => !i.naturalWidth)"
                           ".map(i => i.src)")
    plots = page.locator(".plots img").count()  # the histogram, and the ROC with labels
    assert broken == [] and plots >= 1 and page.locator("img").count() == plots + 2 * len(scored)
    lazy = page.evaluate("Array.from(document.images).filter(i => i.loading == 'lazy').length")
    assert lazy == 2 * len(scored)
    page.close()


def test_a_sensitivity_without_labelled_anomalies_is_refused_with_what_kad_fit_takes(tmp_path):
    from synthetic import screening_folder

    screening_folder(tmp_path / "fit", n_normal=6, n_abnormal=0)
    result = runner.invoke(app, ["fit", "--dataset", "folder:kind=natural", "--data-dir",
                                 str(tmp_path / "fit"), *map(str, FAST_CLI), "--out",
                                 str(tmp_path / "m.kad"), "--sensitivity", "0.9"])
    assert result.exit_code == 1 and "abnormal/" in result.output, result.output
    assert "--labels" not in result.output  # an option of kad threshold, not of kad fit
    assert "features of" not in result.output, "refused before any work"


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
    args = ["fit", "--dataset", "folder:kind=natural", "--data-dir", tmp_path / "fit", *FAST_CLI,
            "--out", model, "--no-heatmap-scale"]
    small = runner.invoke(app, [str(a) for a in args] + ["--fpr", "0.05"])  # 0.2 of 14
    assert small.exit_code == 1 and "needs at least 19 calibration images" in small.output
    assert "features of" not in small.output, "refused before any work"
    result = _kad(*args, "--calibration", "0.5", "--fpr", "0.2")
    pipeline = load_pipeline(model)
    fitted = pipeline.training["n_images"]
    assert fitted + pipeline.calibration["n"] == 12  # the 12 readable normal images
    assert (f"trained on {fitted} normal images, {pipeline.calibration['n']} more kept aside "
            "for calibration") in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.output.count("no patient ids") == 1 and len(lines) == len(set(lines)), (
        "every line once")
    for name in ("tiny.png", "broken.png", "gone.png"):
        assert name in result.output
    assert "1x1 px" in result.output and "broken symbolic link" in result.output

@pytest.mark.parametrize("n_normal", [40, 89])
def test_a_few_dozen_normals_get_a_model_and_the_guarantee_it_actually_gives(tmp_path,
                                                                            n_normal):
    from kad.screening.calibration import fpr_text

    root = screening_folder(tmp_path / "fit", n_normal=n_normal, n_abnormal=0, seed=4)
    model = tmp_path / "model.kad"
    base = ["fit", "--dataset", "folder:kind=natural", "--data-dir", root, *FAST_CLI,
            "--no-heatmap-scale"]
    result = _kad(*base, "--out", model)  # the defaults: --fpr 0.05 cannot be guaranteed
    details = load_pipeline(model).threshold.details
    n_cal = details["n_calibration"]
    assert n_cal < 19 and details["alpha"] == pytest.approx(1 / (n_cal + 1))
    given = fpr_text(details["fpr_bound"])
    assert f"the default false-positive rate 0.05 needs 19 calibration images and there " \
           f"are {n_cal}: the threshold guarantees {given} instead" in result.output
    assert f"flagged with probability at most {given}" in " ".join(result.output.split())
    # the rate asked for is refused, and the rate the refusal suggests works as typed
    refused = runner.invoke(app, [str(a) for a in [*base, "--out", model, "--fpr", "0.05"]])
    assert refused.exit_code == 1, refused.output
    suggested = re.search(r"--fpr (\S+) or more", " ".join(refused.output.split())).group(1)
    _kad(*base, "--out", model, "--fpr", suggested, "--overwrite")
    assert load_pipeline(model).threshold.details["rank"] == n_cal


def test_the_guarantee_is_withheld_when_a_patient_has_several_photographs(tmp_path):
    from kad.data.datasets import FileSource
    from synthetic import multi_photo_folder

    multi_photo_folder(tmp_path / "fit", n_patients=40, photos=4, seed=1)
    multi_photo_folder(tmp_path / "new", n_patients=100, photos=1, seed=2, first=500)
    new = FileSource(sorted((tmp_path / "new" / "normal").glob("*.png")))
    base = ["fit", "--dataset", "folder:kind=natural", "--data-dir", tmp_path / "fit", *FAST_CLI,
            "--fpr", "0.1", "--no-heatmap-scale"]

    def fit(*extra):
        result = _kad(*base, "--out", tmp_path / "model.kad", "--overwrite", *extra)
        pipeline = load_pipeline(tmp_path / "model.kad")
        rate = float((pipeline.score(new).scores > pipeline.threshold.value).mean())
        return " ".join(result.output.split()), pipeline.threshold.details, rate

    # photographs split one by one: calibration images have near-copies in training
    output, details, ungrouped = fit()
    assert details["guarantee_withheld"] and details["near_copies"]["share"] > 0.1
    assert "guarantee: withheld:" in output and "flagged with probability" not in output
    assert "--patient-pattern" in details["guarantee_withheld"]
    assert ungrouped > 0.3  # new patients are flagged far more often than 0.1
    # grouped by patient from the file names: the promise is given, and holds
    output, details, grouped = fit("--patient-pattern", r"^(\d+)_")
    assert "--patient-pattern found 40 patients in 160 images: 4 to 4 images per " \
           "patient" in output
    assert "guarantee_withheld" not in details and details["near_copies"]["n"] == 0
    assert "flagged with probability at most 0.091 (asked 0.1)" in output
    assert grouped <= 0.2  # 0.1 promised; 100 new patients


def test_a_patient_pattern_that_misses_a_name_or_is_invalid_is_one_clear_line(tmp_path):
    from kad.data.datasets import load_dataset
    from kad.errors import KadError
    from synthetic import multi_photo_folder

    root = multi_photo_folder(tmp_path / "fit", n_patients=3, photos=2)
    (root / "normal" / "odd.png").write_bytes((root / "normal" / "000_0.png").read_bytes())
    with pytest.raises(KadError, match=r"finds no patient id in 1 file name\(s\): odd.png"):
        load_dataset("folder", root, kind="natural", patient_pattern=r"^(\d+)_")
    with pytest.raises(KadError, match="not a valid regular expression"):
        load_dataset("folder", root, kind="natural", patient_pattern="(")
    whole = load_dataset("folder", root, kind="natural", patient_pattern=r"^\d+|odd")
    assert sorted(set(whole.patient)) == ["000", "001", "002", "odd"]


# -- calibrated fitting, through the library ------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from kad.data.datasets import load_dataset
    from kad.screening.calibration import plan_fit_split
    from kad.screening.fitting import fit_pipeline

    root = screening_folder(tmp_path_factory.mktemp("calibrated"), n_normal=60, n_abnormal=24,
                            seed=5)
    dataset = load_dataset("folder", root, kind="natural")
    split = plan_fit_split(dataset, calibration=0.3, selection=0.3, seed=0)
    pipeline = fit_pipeline(dataset, split=split, representation="picked", fpr=0.1,
                            cache_dir=root / "cache", **FAST)
    return pipeline, split, dataset, root


def test_a_calibrated_fit_uses_each_image_once_and_keeps_what_it_measured(calibrated):
    pipeline, split, dataset, _ = calibrated
    parts = split.parts()
    assert sum(len(v) for v in parts.values()) == len(dataset)
    assert pipeline.training["rows"] == {k: len(v) for k, v in parts.items()}
    assert pipeline.training["n_images"] == len(split.train)
    threshold = pipeline.threshold
    assert threshold.method == "conformal" and threshold.details["alpha"] == 0.1
    n_cal = len(split.calibration)
    assert threshold.details["n_calibration"] == n_cal == pipeline.calibration["n"]
    # the threshold is the ceil((n+1)(1-alpha))-th smallest calibration score
    cal = np.sort(pipeline.calibration["scores"])
    assert threshold.value == cal[int(np.ceil((n_cal + 1) * 0.9)) - 1]
    assessed = pipeline.assessed()
    assert assessed.honest and assessed.n_anomalous == split.assessment_labels.sum() > 0
    assert assessed.n_normal == (split.assessment_labels == 0).sum() > 0
    assert assessed.specificity.low <= assessed.specificity.value <= assessed.specificity.high
    assert "held out of fitting, calibration, block picking" in assessed.measured_on
    info = pipeline.describe()
    assert info["calibration"]["n"] == n_cal and info["assessment"]["sensitivity"]["n"] > 0


def test_p_values_survive_saving_and_follow_the_threshold(calibrated, tmp_path):
    from kad.data.datasets import FileSource
    from kad.screening.thresholds import threshold_at_fpr
    from kad.screening.workflow import rank, write_scores_csv

    pipeline, _, dataset, root = calibrated
    files = [root / i for i in dataset.ids]
    result = pipeline.score(FileSource(files), ids=[str(f) for f in files])
    loaded = load_pipeline(pipeline.save(tmp_path / "model.kad"))
    np.testing.assert_array_equal(loaded.p_values(result.scores),
                                  pipeline.p_values(result.scores))
    rows = rank(loaded, files, result)
    assert all((r.p_value <= 0.1) == r.flagged for r in rows)
    write_scores_csv(tmp_path / "scores.csv", rows, {})
    written = _read_scores(tmp_path / "scores.csv")
    assert [float(r["p_value"]) for r in written] == pytest.approx([r.p_value for r in rows],
                                                                    rel=1e-5)
    # moving the threshold by false-positive rate needs no refit
    loaded.threshold = threshold_at_fpr(loaded, 0.25)
    assert loaded.threshold.value <= pipeline.threshold.value
    flagged = loaded.flag(result.scores)
    np.testing.assert_array_equal(flagged, loaded.p_values(result.scores) <= 0.25)
    assert loaded.assessed().threshold == loaded.threshold.value


def test_the_report_shows_the_photograph_the_fit_and_the_p_values(calibrated, tmp_path):
    from kad.data.datasets import FileSource
    from kad.screening.report import write_report
    from kad.screening.workflow import rank

    pipeline, _, dataset, root = calibrated
    files = [root / i for i in dataset.ids[:10]]
    result = pipeline.score(FileSource(files), ids=[str(f) for f in files])
    rows = rank(pipeline, files, result)
    path, _ = write_report(tmp_path / "report.html", pipeline, rows, {}, [], "model.kad")
    page = path.read_text()
    assert page.count('"pics":"tm"') == 10  # as taken and model input, of each
    assert "How the threshold was set" in page and "conformal at false-positive rate 0.1" in page
    from kad.screening.report import _ordinal

    rank = pipeline.threshold.details["rank"]
    assert re.search(rf"\(the {rank}(st|nd|rd|th) smallest of", page)  # not "the 9-th"
    assert [_ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "111th"]
    assert pipeline.threshold.details["guarantee"] in page
    assessed = pipeline.assessed()
    assert f"specificity (held out)</th><td>{assessed.specificity.text()}" in page
    assert f"{rows[0].p_value:.3g}" in page and "Worklist" in page
    # the histogram shows the normals that set the threshold and the held-out images
    n_cal = len(pipeline.calibration["scores"])
    assert f"calibration normals: the {n_cal} normal images kept aside at fitting that set " \
        "the threshold" in page  # a conformal threshold
    assert "held-out labelled images" in page and "training normals" not in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)


def test_the_fit_summary_says_what_each_number_was_measured_on(calibrated):
    from kad.screening.calibration import fit_summary

    pipeline, split, _, _ = calibrated
    summary = fit_summary(pipeline)
    assert summary.n_calibration == len(split.calibration)
    assert summary.n_train == len(split.train) and summary.method == "conformal"
    text = "\n".join(summary.lines())
    assert summary.guarantee in text and "measured on" in text
    assert f"specificity {summary.held_out.specificity.text()}" in text


def test_a_sensitivity_threshold_is_set_on_selection_and_reported_on_assessment(calibrated):
    from kad.data.datasets import FileSource
    from kad.screening.fitting import fit_pipeline
    from kad.screening.heatmap_scale import anchor

    first, split, dataset, root = calibrated
    pipeline = fit_pipeline(dataset, split=split, representation="picked", sensitivity=0.9,
                            cache_dir=root / "cache", heatmap_scale=False, **FAST)
    assert pipeline.blocks == first.blocks  # the same selection images pick the same block
    assert "--no-heatmap-scale" in anchor(pipeline, "gradient").reason  # none made, said why
    details = pipeline.threshold.details
    assert details["n_anomalous"] == split.selection_labels.sum()
    assert details["n_normal"] == (split.selection_labels == 0).sum()
    # the reported figures are measured on the assessment images, scored by the detector
    files = [root / dataset.ids[i] for i in split.assessment]
    np.testing.assert_allclose(pipeline.score(FileSource(files)).scores,
                               pipeline.assessment["scores"], rtol=1e-6)
    held = pipeline.assessed()
    flagged = np.asarray(pipeline.assessment["scores"]) > pipeline.threshold.value
    labels = np.asarray(split.assessment_labels)
    assert held.sensitivity.k == flagged[labels == 1].sum()
    assert held.specificity.k == (~flagged[labels == 0]).sum()


def test_a_model_without_a_calibration_set_says_it_has_no_p_values(calibrated, tmp_path):
    from kad.data.datasets import FileSource
    from kad.errors import KadError
    from kad.screening.calibration import fit_summary
    from kad.screening.fitting import fit_pipeline
    from kad.screening.report import write_report
    from kad.screening.thresholds import threshold_at_fpr
    from kad.screening.workflow import rank, write_scores_csv

    _, split, dataset, root = calibrated
    plain = fit_pipeline(dataset, train_rows=split.train, cache_dir=root / "cache", **FAST)
    assert plain.threshold.method == "contamination" and plain.calibration is None
    files = [root / i for i in dataset.ids[:4]]
    rows = rank(plain, files, plain.score(FileSource(files)))
    assert all(r.p_value is None for r in rows)
    write_scores_csv(tmp_path / "scores.csv", rows, {})
    assert all(r["p_value"] == "" for r in _read_scores(tmp_path / "scores.csv"))
    page = write_report(tmp_path / "report.html", plain, rows, {}, [], "m.kad")[0].read_text()
    assert "this model has no p-values" in page and "th pct of training" in page
    # the histogram falls back to the training normals, and says they are in-sample
    assert "training normals: this model has no calibration set" in page
    assert any("no calibration set" in line for line in fit_summary(plain).lines())
    with pytest.raises(KadError, match="no calibration set"):
        threshold_at_fpr(plain, 0.1)


def test_threshold_moves_to_a_false_positive_rate_without_labels(work):
    target = work / "model-fpr.kad"
    result = _kad("threshold", work / "model.kad", "--fpr", "0.3", "--out", target)
    pipeline = load_pipeline(target)
    chosen = pipeline.threshold
    assert chosen.method == "conformal" and chosen.details["alpha"] == 0.3
    calibration = np.sort(pipeline.calibration["scores"])
    n = len(calibration)
    assert chosen.value == calibration[int(np.ceil((n + 1) * 0.7)) - 1]
    assert "guarantee" in result.output and str(target) in result.output


def test_score_with_heatmaps_and_explain_draw_where_the_score_comes_from(work, tmp_path):
    import cv2

    out = tmp_path / "heat"
    new = sorted((work / "new" / "abnormal").glob("*.png"))[:3]
    result = _kad("score", work / "model.kad", *new, "--out", out, "--heatmaps",
                  "--grid", "4")
    drawn = sorted((out / "heatmaps").glob("*.png"))
    assert len(drawn) == 2 * len(new), drawn  # over the model input and over the photograph
    assert "heatmaps by gradient" in result.output  # kNN, the default, has a gradient
    assert "network passes" in result.output
    arrays = sorted((out / "heatmaps").glob("*_map.npy"))
    assert len(arrays) == len(new)  # the maps themselves, as arrays beside the overlays
    for array in arrays:
        heat = np.load(array, allow_pickle=False)
        assert heat.dtype == np.float32 and heat.ndim == 2
        assert array.with_suffix(".json").is_file()
    page = (out / "report.html").read_text()
    assert page.count('"pics":"tmhp"') == len(new)  # with both heatmaps
    picture = tmp_path / "one.png"
    (tmp_path / "one.json").write_text("a file of the user's")
    result = _kad("explain", work / "model.kad", new[0], "--out", picture, "--grid", "4",
                  "--original", tmp_path / "taken.png", "--heatmap-method", "occlusion")
    assert "map by occlusion, 17 network passes" in result.output
    said = result.output.replace("\n", "")
    assert f"replaced the earlier {tmp_path / 'one.json'}" in said  # never silently
    assert "taken.png" not in said.split("replaced the earlier")[1]  # new: not replaced
    assert np.load(tmp_path / "one.npy").shape == cv2.imread(str(picture)).shape[:2]
    assert cv2.imread(str(picture)) is not None and cv2.imread(str(tmp_path / "taken.png")) \
        is not None


def test_lesions_measures_maps_on_masks_and_accounts_for_every_photograph(work, tmp_path):
    import json
    from pathlib import Path

    import cv2

    photos = sorted((work / "new" / "abnormal").glob("*.png"))[:3]
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in photos[:2]:  # the third has no mask
        rows, cols = cv2.imread(str(path)).shape[:2]
        for kind, (top, left) in (("EX", (8, 8)), ("OD", (30, 30))):
            mask = np.zeros((rows, cols), np.uint8)
            mask[top:top + 10, left:left + 10] = 255
            cv2.imwrite(str(masks / f"{path.stem}_{kind}.png"), mask)
    out = tmp_path / "out"
    result = _kad("lesions", work / "model.kad", *photos, "--masks", masks,
                  "--normals", work / "new" / "normal", "--out", out, "--runtime", "keras")
    rows = _read_scores(out / "lesions.csv")
    mine = {Path(r["image"]).name: r for r in rows}
    assert [mine[p.name]["status"] for p in photos] == ["measured", "measured", "no mask"]
    normal = [r for r in rows if Path(r["image"]).parent.name == "normal"]
    assert sorted({r["status"] for r in normal}) == ["normal", "unreadable"]  # broken.png
    assert len(rows) == 3 + len(list((work / "new" / "normal").iterdir()))
    record = json.loads((out / "summary.json").read_text())
    summary = record["summary"]
    assert summary["n"] == 2 and 0 <= summary["image_auroc"] <= 1
    assert summary["hits"] == sum(mine[p.name]["hit"] == "yes" for p in photos)
    assert summary["misses"] == 2 - summary["hits"] == summary["misses_with_disc"]
    assert record["photographs"]["by_status"] == {"measured": 2, "no mask": 1,
                                                  "normal": len(normal) - 1, "unreadable": 1}
    assert "strict pointing" in result.output and "not measured" in result.output
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["lesions", str(work / "model.kad"), str(tmp_path / "empty"),
                                "--masks", str(masks), "--out", str(tmp_path / "l2")])
    assert empty.exit_code == 1 and "it is an empty folder" in empty.output, empty.output


def test_fit_picks_size_block_and_detector_on_the_selection_images_only(tmp_path):
    screening_folder(tmp_path / "fit", n_normal=40, n_abnormal=16, seed=4)
    model = tmp_path / "model.kad"
    result = _kad("fit", "--dataset", "folder:kind=natural", "--data-dir", tmp_path / "fit",
                  "--backbone", "mobilenet_v2:alpha=0.35", "--weights", "none",
                  "--preprocessing", "natural", "--image-size", "32,48",
                  "--detector", "iforest:n_estimators=20,knn", "--out", model,
                  "--no-heatmap-scale")
    pipeline = load_pipeline(model)
    selection = pipeline.training["selection"]
    picked = selection["picked_candidate"]
    candidates = selection["candidates"]
    assert {c["size"] for c in candidates} == {"32", "48"}
    assert {c["detector"] for c in candidates} == {"iforest:n_estimators=20", "knn"}
    best = max(c["validation_auroc"] for c in candidates)
    assert selection["picked_selection_auroc"] == best
    assert pipeline.image_size == picked["sizes"][0]
    assert f"picked {picked['label']}" in result.output
    assessed = pipeline.assessed()  # measured on images the pick never saw
    assert assessed is not None and assessed.honest


def test_threshold_rewrites_the_model_only_with_in_place(work, tmp_path):
    model = tmp_path / "model.kad"
    shutil.copy(work / "model.kad", model)
    before = model.read_bytes()
    refused = runner.invoke(app, ["threshold", str(model), "--fpr", "0.3"])
    assert refused.exit_code == 1 and "--in-place" in refused.output
    assert model.read_bytes() == before
    _kad("threshold", model, "--fpr", "0.3", "--in-place")
    assert load_pipeline(model).threshold.method == "conformal"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.kad"]  # no lock, no temp


def test_dicom_photographs_are_scored_as_their_png_twins(work, tmp_path):
    """The same pixels as DICOM files (RGB, with a PatientID) and as PNG files get the same
    scores from one model, in one run."""
    pytest.importorskip("pydicom")
    import cv2

    from synthetic import dicom_photograph

    picked = [p for sub in ("normal", "abnormal")
              for p in sorted((work / "new" / sub).glob(f"{sub}*.png"))[:3]]
    for path in picked:
        (tmp_path / "png").mkdir(exist_ok=True)
        (tmp_path / "dicom").mkdir(exist_ok=True)
        shutil.copy(path, tmp_path / "png" / path.name)
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        dicom_photograph((tmp_path / "dicom" / path.name).with_suffix(".dcm"), rgb, "P1")
    out = tmp_path / "out"
    _kad("score", work / "model.kad", tmp_path / "png", tmp_path / "dicom", "--out", out)
    scores = {}
    for row in _read_scores(out / "scores.csv"):
        name = row["file"].replace("\\", "/").rsplit("/", 1)[-1]
        scores.setdefault(name.rsplit(".", 1)[0], {})[name.rsplit(".", 1)[1]] = row["score"]
    assert len(scores) == 6
    assert all(pair["dcm"] == pair["png"] != "" for pair in scores.values()), scores
# -- the report as a grader sees it --------------------------------------------------------


@pytest.fixture(scope="module")
def case_report(calibrated, tmp_path_factory):
    """Six photographs scored with heatmaps, two of them named x.jpeg in sub1/ and sub2/."""
    from kad.screening.workflow import screen
    from synthetic import report_case

    pipeline, _, _, _ = calibrated
    root = tmp_path_factory.mktemp("case")
    model = pipeline.save(root / "model.kad")
    run = screen(model, [report_case(root / "new")], root / "out", heatmaps=True)
    return run, root


def _boxes(page, selector):
    return page.evaluate("""s => Array.from(document.querySelectorAll(s)).map(e => {
        const b = e.getBoundingClientRect();
        return [b.left + scrollX, b.top + scrollY, b.right + scrollX, b.bottom + scrollY]})""",
                         selector)


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) - max(a[0], b[0]) > 0.5 and min(a[3], b[3]) - max(a[1], b[1]) > 0.5


def _inside(inner, outer) -> bool:
    return (inner[0] >= outer[0] - 0.5 and inner[1] >= outer[1] - 0.5
            and inner[2] <= outer[2] + 0.5 and inner[3] <= outer[3] + 0.5)


@needs_browser
@pytest.mark.parametrize("width", [360, 1600])
def test_every_card_shows_its_pictures_whole_and_apart(case_report, browser, width):
    run, root = case_report
    page = browser.new_page(viewport={"width": width, "height": 800})
    page.goto(run.report.as_uri())
    cards = page.locator("article.card")
    assert cards.count() == 6  # each image once
    names = cards.locator("h3 a").all_inner_texts()
    assert sorted(names) == ["speckled.png", "sub1/wide.png", "sub1/x.jpeg",
                             "sub2/deeper/square.png", "sub2/tall.png", "sub2/x.jpeg"]
    assert sorted(cards.locator("h3 a").evaluate_all("a => a.map(e => e.title)")) == sorted(
        str(root / "new" / n) for n in names)  # the full path on hover
    for i in range(6):
        card = cards.nth(i)
        card.scroll_into_view_if_needed()
        images = card.locator("img")
        assert images.count() == 4  # as taken, model input, both heatmaps: shown by default
        for k in range(4):
            image = images.nth(k)
            image.scroll_into_view_if_needed()
            assert image.evaluate("i => i.decode().then(() => i.naturalWidth)") > 0
            assert image.is_visible()
            box = image.bounding_box()  # in the viewport, now that it is scrolled to
            assert box["width"] > 40 and 0 <= box["x"] and box["x"] + box["width"] <= width
            assert 0 <= box["y"] and box["y"] + box["height"] <= 800
    card_boxes = _boxes(page, "article.card")
    assert all(b[2] <= width for b in card_boxes), "a card is cut at the window's edge"
    assert not any(_overlap(a, b) for n, a in enumerate(card_boxes) for b in card_boxes[:n])
    for n, card in enumerate(card_boxes):
        parts = _boxes(page, f"#{cards.nth(n).get_attribute('id')} figure > *")
        assert all(_inside(p, card) for p in parts), "a panel or caption spills out"
        assert not any(_overlap(a, b) for k, a in enumerate(parts) for b in parts[:k])
    assert page.locator(".colourbar").count() == 1 and page.locator(".colourbar").is_visible()
    spilled = page.evaluate("""Array.from(document.querySelectorAll('#worklist td'))
        .filter(td => td.scrollWidth > td.clientWidth + 1).map(td => td.textContent)""")
    assert spilled == [], "worklist cells spill into their neighbours"
    assert page.locator("img[alt^='score histogram']").evaluate("i => i.naturalWidth") > 0
    if width > 1000:
        page.evaluate("window.scrollTo(0, 0)")
        keep_screenshot(page, f"report-case-{width}px.png")
    page.close()


@needs_browser
def test_the_worklist_sorts_filters_and_finds_a_file(case_report, browser):
    run, _ = case_report
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(run.report.as_uri())
    rows = page.locator("#worklist tbody tr")

    def shown(attribute):
        return [rows.nth(i).get_attribute(attribute) for i in range(rows.count())
                if rows.nth(i).is_visible()]

    def card_order():
        return [c.get_attribute("data-i") for c in page.locator("article.card").all()
                if c.is_visible()]

    ranked = [r.score for r in run.rows]
    page.click("th[data-key=score] button")  # most suspicious first
    assert [float(v) for v in shown("data-score")] == pytest.approx(ranked, rel=1e-6)
    page.click("th[data-key=score] button")  # and back
    assert [float(v) for v in shown("data-score")] == pytest.approx(ranked[::-1], rel=1e-6)
    assert card_order() == shown("data-i"), "the cards follow the worklist"
    page.click("th[data-key=p] button")
    p_values = [float(v) for v in shown("data-p")]
    assert p_values == sorted(p_values) and len(set(p_values)) > 1
    page.click("th[data-key=name] button")
    names = shown("data-name")
    assert names == sorted(names) and names != [r.file for r in run.rows]
    page.check("#flagged-only")
    flagged = sum(r.flagged for r in run.rows)
    assert 0 < flagged < 6 and shown("data-flag") == ["1"] * flagged
    assert len(card_order()) == flagged
    page.uncheck("#flagged-only")
    page.fill("#search", "X.JPEG")
    assert shown("data-name") == ["sub1/x.jpeg", "sub2/x.jpeg"] and len(card_order()) == 2
    assert page.locator("#shown").inner_text() == "2 of 6 images shown"
    row = rows.filter(has_text="sub2/x.jpeg")
    row.locator("a").click()  # the row leads to its card
    target = page.locator(f"#img-{row.get_attribute('data-i')}")
    assert page.evaluate("location.hash") == f"#img-{row.get_attribute('data-i')}"
    assert target.is_visible() and target.bounding_box()["y"] < 800
    page.close()


def test_the_case_report_names_each_file_by_its_path_and_calls_out_nothing(case_report):
    run, _ = case_report
    page = run.report.read_text()
    assert "sub1/x.jpeg" in page and "sub2/x.jpeg" in page and ">x.jpeg<" not in page
    assert run.shift is not None and "Kolmogorov-Smirnov" in page
    assert page.count('"pics":') == 6  # a row per image, a card drawn from each


def test_a_batch_of_abnormal_images_is_called_out_in_one_line(case_report, calibrated):
    _, root = case_report
    out = root / "abnormal-batch"
    result = _kad("score", root / "model.kad", calibrated[3] / "abnormal", "--out", out)
    said = [line for line in result.output.splitlines() if line.startswith("batch:")]
    assert len(said) == 1 and "does not look like the calibration normals" in said[0]
    assert "Kolmogorov-Smirnov" in said[0]
    page = (out / "report.html").read_text()
    assert 'class="shift"' in page


# -- the heatmaps' colour scale, anchored on the calibration normals -------------------------


def test_fitting_keeps_the_calibration_normals_heatmaps_as_kad_score_makes_them(calibrated):
    from kad.screening.heatmaps import explain

    pipeline, split, dataset, _ = calibrated
    kept = pipeline.calibration["heatmaps"]
    assert kept["method"] == "gradient" and kept["unreadable"] == 0
    assert kept["n"] == len(split.calibration) < 64  # so every one of them
    made = explain(pipeline, dataset.source.take(split.calibration), keep_images=False)
    np.testing.assert_allclose(kept["peaks"], [h.map.max() for h in made], rtol=1e-6)
    np.testing.assert_allclose(kept["quantiles"][:, -1],
                               [np.quantile(h.map, 0.99) for h in made], rtol=1e-6)


def test_the_calibration_heatmaps_are_bounded_in_images_and_in_cost(calibrated, monkeypatch):
    from kad.screening import heatmap_scale

    pipeline, split, dataset, _ = calibrated
    source = dataset.source.take(split.calibration)
    ids = np.asarray(dataset.ids)[split.calibration]
    monkeypatch.setattr(heatmap_scale, "MAX_IMAGES", 5)
    first = heatmap_scale.calibration_heatmaps(pipeline, source, ids, seed=3)
    again = heatmap_scale.calibration_heatmaps(pipeline, source, ids, seed=3)
    assert first["n"] == 5 and np.array_equal(first["peaks"], again["peaks"])  # the seed's
    assert f"5 of the {len(ids)}, chosen at random (seed 3)" in first["measured_on"]
    # occlusion costs grid² + 1 passes an image: too few images affordable, none made
    monkeypatch.setattr("kad.screening.heatmaps.choose_method", lambda d, m: "occlusion")
    monkeypatch.setattr(heatmap_scale, "MAX_PASSES", 400)
    skipped = heatmap_scale.calibration_heatmaps(pipeline, source, ids)
    assert set(skipped) == {"skipped"} and "65 network passes per image" in skipped["skipped"]


def test_kad_threshold_moves_the_heatmaps_anchor_with_the_rate(work, tmp_path):
    from kad.screening.heatmap_scale import anchor

    fitted = load_pipeline(work / "model.kad")
    kept = fitted.calibration["heatmaps"]
    assert kept["n"] == fitted.calibration["n"] > 0  # kad fit makes them by default
    result = _kad("threshold", work / "model.kad", "--fpr", "0.4", "--out", tmp_path / "m.kad")
    moved = load_pipeline(tmp_path / "m.kad")
    assert np.array_equal(moved.calibration["heatmaps"]["peaks"], kept["peaks"])
    before, after = anchor(fitted, "gradient"), anchor(moved, "gradient")
    calibration = np.asarray(moved.calibration["scores"])
    rate = float((calibration > moved.threshold.value).mean())
    assert after.rate == rate > 0 and after.value == np.quantile(kept["peaks"], 1 - rate)
    assert after.rate != before.rate and after.value != before.value
    assert "heatmap scale: report heatmaps (by gradient) take full colour at" in result.output


def test_a_report_anchored_on_the_calibration_normals_draws_lesions_brighter(case_report):
    import json

    import cv2

    run, _ = case_report
    page = run.report.read_text()
    legend = re.search(r'id="heat-scale">(.*?)</p>', page, re.S).group(1)
    assert "anchored on the calibration normals" in legend
    assert "heatmap peaks of 18 calibration normals" in legend or (
        "highest heatmap peak of 18 calibration normals" in legend)
    records = json.loads(re.search(r'id="records">(.*?)</script>', page, re.S).group(1))
    folder = run.report.parent / "report_files"

    def drawn(i):  # how much colour the heatmap lays over the model's input
        over = cv2.imread(str(folder / f"{i:05d}h.jpg")).astype(np.float32)
        under = cv2.imread(str(folder / f"{i:05d}m.jpg")).astype(np.float32)
        return float(np.quantile(np.abs(over - under).sum(axis=2), 0.99))

    lesions = {"sub1/x.jpeg", "sub2/tall.png", "speckled.png"}
    colour = {r["name"]: drawn(r["i"]) for r in records}
    assert min(colour[n] for n in lesions) > max(v for n, v in colour.items()
                                                 if n not in lesions), colour
    for r in records:  # each card says whether its peak is above healthy regions'
        above = "above what healthy calibration regions reach" in r["caption"]
        assert above == (r["name"] in lesions), r


def test_label_rows_that_label_no_given_image_are_named_in_the_files_order():
    from pathlib import Path

    from kad.screening.results import match_labels

    files = [Path("/data/new/abnormal/a1.png"), Path("/data/new/normal/n1.png"),
             Path("/data/new/normal/n2.png")]
    labels = {"gone.png": 0, "new/abnormal/a1.png": 1, "n1": 0, "elsewhere/n2.png": 0,
              "n2.png": 1}
    # a1 by its path's suffix, n1 by its stem, n2 by its name, from the first row that
    # gives that name: the row "n2.png" after it labels nothing
    found, unmatched = match_labels(files, labels)
    assert found.tolist() == [1, 0, 0]
    assert unmatched == ["gone.png", "n2.png"]
    assert match_labels([], labels)[1] == list(labels)
