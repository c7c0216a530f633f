"""How long a large screening report takes to open in a real browser.

Builds ``report.html`` for ``--n`` synthetic images (48 px photographs written to a work
folder, random scores and p-values against 200 calibration scores, a heatmap for every
image) with :func:`kad.screening.report.write_report`, exactly as ``kad score --heatmaps``
writes it, then opens it ``--repeats`` times in headless Chromium (Debian's ``chromium``,
driven by playwright) in a fresh page each time and reports the medians of:

- ``load``: the browser's own ``loadEventEnd`` (navigation timing, ms from the start of the
  navigation): the page parsed, laid out, and the pictures in view loaded (the others are
  ``loading="lazy"``);
- ``wall``: the seconds ``page.goto`` took as seen from Python, launch excluded.

The stand-in model describes a conformal threshold; no network is built, so the numbers
are those of the page alone. Run from the repository root::

    python benchmarks/report.py --n 5000 --repeats 5
    python benchmarks/report.py --smoke          # 90 images, once: a few seconds
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class StandInModel:
    """What the report reads of a fitted pipeline, for a conformal threshold at 0.05 on
    ``n_calibration`` calibration scores."""

    def __init__(self, calibration: np.ndarray):
        from kad.screening.thresholds import conformal_threshold

        n = len(calibration)
        self.preprocessing, self.image_size = "natural", 32
        self.threshold = conformal_threshold(calibration.tolist(), 0.05)
        self.calibration = {"scores": np.sort(calibration).tolist(), "n": n,
                            "measured_on": f"{n} synthetic calibration scores"}
        self.training = {"scores": (calibration * 0.8).tolist(), "n_images": 4 * n,
                         "dataset": "synthetic"}
        self.assessment = None

    def describe(self) -> dict:
        from kad.utils.artifact import library_versions

        return {"backbone": "stand-in", "image_size": 32, "weights": "none", "blocks": ["b"],
                "detector": "none", "preprocessing": "natural",
                "training": {"n_images": self.training["n_images"], "dataset": "synthetic"},
                "versions": library_versions()}

    def assessed(self):
        return None

    def p_values(self, scores):
        from kad.screening.calibration import conformal_p_values

        return conformal_p_values(self.calibration["scores"], scores)


def build(folder: Path, n: int, seed: int = 0) -> tuple[Path, float]:
    """Write ``n`` images and their report into ``folder``; returns the report and the
    seconds :func:`write_report` took."""
    import cv2

    from kad.screening._report_images import SKETCH, HeatmapSketches, Sketch
    from kad.screening.report import write_report
    from kad.screening.results import ScoredImage

    rng = np.random.default_rng(seed)
    model = StandInModel(rng.gamma(4.0, 1.0, 200))
    scores = np.sort(rng.gamma(4.0, 1.1, n))[::-1]
    p_values = model.p_values(scores)
    sketches = HeatmapSketches(method="gradient")
    rows = []
    for i, (score, p) in enumerate(zip(scores, p_values, strict=True)):
        file = folder / "images" / f"{i // 500:02d}" / f"eye{i:05d}.png"
        file.parent.mkdir(parents=True, exist_ok=True)
        image = np.repeat(np.linspace(60, 160, 48, dtype=np.float32)[None, :, None], 48, 0)
        image = np.repeat(image, 3, 2) + rng.normal(0, 4, (48, 48, 3))
        cv2.imwrite(str(file), np.clip(image, 0, 255).astype(np.uint8))
        heat = rng.gamma(1.0, score / 1e4, (SKETCH, SKETCH)).astype(np.float32)
        sketches.sketches[str(file)] = Sketch(heat, float(heat.max()), (0, 0, 48, 48),
                                              (48, 48))
        rows.append(ScoredImage(str(file), float(score), 50.0,
                                bool(score > model.threshold.value), None, float(p)))
    began = time.perf_counter()
    path, _ = write_report(folder / "report.html", model, rows, {}, [], "stand-in.kad",
                           heatmaps=sketches)
    return path, time.perf_counter() - began


def open_times(path: Path, repeats: int) -> tuple[list[float], list[float]]:
    """``(loadEventEnd ms, goto seconds)`` of each opening, in a fresh page each time."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    loads, walls = [], []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=FLAGS)
        for _ in range(repeats):
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            began = time.perf_counter()
            page.goto(path.as_uri(), wait_until="load")
            walls.append(time.perf_counter() - began)
            loads.append(page.evaluate(
                "performance.getEntriesByType('navigation')[0].loadEventEnd"))
            # the first cards are drawn at once, the others as they scroll into view
            rows = page.evaluate("JSON.parse(document.getElementById('records')"
                                 ".textContent).length")
            assert page.locator("article.card").count() == min(60, rows)
            assert page.locator("#worklist tbody tr").count() == min(200, rows)
            if rows <= 200:  # scrolled to the end, every card is drawn
                for _ in range(50):
                    if page.locator("article.card").count() == rows:
                        break
                    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
                    page.wait_for_timeout(100)
                assert page.locator("article.card").count() == rows
            page.close()
        browser.close()
    return loads, walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="images in the report")
    parser.add_argument("--repeats", type=int, default=5, help="openings to time")
    parser.add_argument("--smoke", action="store_true", help="90 images, opened once")
    parser.add_argument("--keep", type=Path, help="build the report here and keep it")
    args = parser.parse_args()
    n, repeats = (90, 1) if args.smoke else (args.n, args.repeats)
    work = args.keep or Path(tempfile.mkdtemp(prefix="kad-report-bench-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        path, built = build(work, n)
        loads, walls = open_times(path, repeats)
        size = path.stat().st_size / 2**20
        pictures = sum(1 for _ in (work / "report_files").iterdir())
        print(f"report of {n} images: {size:.1f} MiB of HTML, {pictures} files beside it, "
              f"written in {built:.1f} s")
        print(f"opened {repeats} times in headless Chromium: load event at "
              f"{statistics.median(loads):.0f} ms (median; "
              f"{', '.join(f'{v:.0f}' for v in loads)}), page.goto "
              f"{statistics.median(walls):.2f} s (median)")
        print(f"command: python benchmarks/report.py --n {n} --repeats {repeats}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
