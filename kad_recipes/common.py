"""What every recipe shares: its options, the data it works on, fitting one detector on
one split, and writing results (``results.json``, ``results.csv``, ROC curves)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from kad.errors import KadError
from kad.utils.metrics import evaluate, mean_std
from kad.utils.progress import Progress

PIXELS, FEATURES = "pixels", "features"


@dataclass
class RecipeOptions:
    dataset: str = "digits"
    data_dir: Path | None = None
    backbone: str = "inception_resnet_v2"
    weights: str = "imagenet"
    image_size: int | list[int] | None = None  # several sizes: one cache entry each
    preprocessing: str | None = None
    detectors: list[str] = field(default_factory=lambda: ["iforest"])
    inputs: list[str] = field(default_factory=lambda: [PIXELS, FEATURES])
    representation: str = "concat"
    seeds: int | None = None
    folds: int = 5
    limit: int | None = None
    classes: list[str] | None = None
    pixel_size: int | None = None
    batch_size: int = 64
    cache_dir: Path | None = None
    out: Path | None = None
    runtime: str = "auto"

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class Run:
    """One detector on one input for one split: the unit every table aggregates."""

    detector: str
    input: str
    representation: str
    split: str
    seed: int
    fold: int | None
    normal_class: str | None
    auroc: float
    auprc: float
    recall: float
    fit_seconds: float
    score_seconds: float
    n_train: int
    n_test: int
    n_test_anomalies: int
    supervised: bool = False
    ratio: float | None = None
    n_train_anomalies: int = 0

    @property
    def column(self) -> str:
        label = f"{self.detector} ({self.input})"
        return label + " [supervised]" if self.supervised else label

    @property
    def label(self) -> str:
        """The column, and the anomaly ratio where there is one: one ROC panel each."""
        return self.column if self.ratio is None else f"{self.column} ρ={self.ratio:.0%}"


class Workbench:
    """The dataset of a recipe run with its features and pixels, loaded on first use.

    ``log(text)`` receives diagnostics (the dataset's summary first); ``progress`` (a
    :class:`~kad.utils.progress.Progress`) receives the feature extractions' tasks;
    ``report_skipped(items, what)`` receives the images that could not be used, with the
    reason.
    """

    def __init__(self, options: RecipeOptions, log=print, progress: Progress | None = None,
                 report_skipped=None):
        from kad.data.datasets import load_dataset
        from kad.data.protocols import check_protocol, subsample
        from kad.features.cache import cache_root, check_writable

        if options.out is not None:  # before any work, not after it
            check_writable(options.out, what="--out folder")
        check_writable(Path(options.cache_dir) if options.cache_dir else cache_root(),
                       what="feature cache folder")
        self.options = options
        self.log = log
        self.progress = progress
        self._report_skipped = report_skipped
        dataset = load_dataset(options.dataset, options.data_dir)
        log(dataset.summary())
        check_protocol(dataset, options.folds)
        if options.limit:
            dataset = dataset.subset(subsample(dataset, options.limit))
        self.dataset = dataset
        self._multi = None
        self._pixels = None
        self._failed: dict[str, str] = {}
        self._matrix_cache: dict = {}

    @property
    def natural(self) -> bool:
        return self.dataset.anomaly is None

    @property
    def seeds(self) -> int:
        return self.options.seeds or (1 if self.natural else 5)

    @property
    def multi(self):
        """Features at every ``image_size`` (:class:`kad.screening.selection.MultiSizeFeatures`),
        each size extracted once into its own cache entry."""
        if self._multi is None:
            from kad.features.extract import extract_features
            from kad.screening.selection import extract_sizes

            o = self.options

            def extract(dataset, backbone, weights, size, preprocessing):
                return extract_features(dataset, backbone, weights, size, preprocessing,
                                        batch_size=o.batch_size, cache_dir=o.cache_dir,
                                        progress=self.progress, runtime=o.runtime)

            self._multi = extract_sizes(self.dataset, o.backbone, o.weights, o.image_size,
                                        o.preprocessing, extract=extract)
            self._failed.update(self._multi.failed)
            if self._report_skipped:
                self._report_skipped(self._multi.failed.items(),
                                     "image(s) could not be used")
        return self._multi

    @property
    def features(self):
        """The features at the first ``image_size``."""
        multi = self.multi
        return multi.by_size[multi.sizes[0]]

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            from kad.features.extract import default_preprocessing
            from kad.features.pixels import load_pixels
            from kad.screening.selection import preprocessing_at

            size = self.options.pixel_size or 32
            prep = (preprocessing_at(self.options.preprocessing, None)
                    or default_preprocessing(self.dataset))
            self._pixels, failed = load_pixels(self.dataset, size, prep, self.options.cache_dir)
            self._failed.update(failed)
        return self._pixels

    def valid(self, inputs) -> np.ndarray:
        """Rows usable by every input of the run (unreadable images are left out)."""
        if FEATURES in inputs:
            _ = self.features
        if PIXELS in inputs:
            _ = self.pixels
        return ~np.isin(np.asarray(self.dataset.ids, dtype=str), list(self._failed))

    def inputs(self, kind: str, representation, rows: np.ndarray) -> np.ndarray:
        if kind == PIXELS:
            return self.pixels[rows]
        if kind == FEATURES:
            key = (str(representation), rows.tobytes())
            if key not in self._matrix_cache:
                if len(self._matrix_cache) > 4:
                    self._matrix_cache.clear()
                self._matrix_cache[key] = self.multi.matrix(representation, rows)
            return self._matrix_cache[key]
        raise KadError(f"unknown input {kind!r}: use {PIXELS!r} or {FEATURES!r}")

    @property
    def unreadable(self) -> dict[str, str]:
        """Images left out because they could not be read, with the reason."""
        return dict(self._failed)

    @property
    def detector_defaults(self) -> dict:
        return {"backbone": self.options.backbone, "weights": self.options.weights}

    def cache_keys(self) -> dict:
        keys = {}
        if self._multi is not None:
            entries = {size: {"key": f.key, "path": str(f.path), "inputs": f.meta["inputs"]}
                       for size, f in self._multi.by_size.items()}
            keys["features"] = entries[self._multi.sizes[0]]
            if len(entries) > 1:
                keys["features_by_size"] = entries
        return keys


def compatible(detector_cls, kind: str) -> bool:
    """Whether a detector takes the recipes' ``kind`` of input: pixels (images, which
    detectors of vectors take flattened) or the network's pooled features
    (:class:`kad.features.representation.PooledVectors`). A detector of block maps takes
    neither."""
    from kad.features.representation import BlockMaps, PooledVectors

    accepts = detector_cls.input_kind
    if kind == PIXELS:
        return accepts not in BlockMaps.serves
    return accepts in PooledVectors.serves


def refuse_maps(detector_cls, name: str) -> None:
    """The recipes pool every block into feature vectors; a detector of unpooled block maps
    is refused before any work, with where to use it."""
    from kad.features.representation import BlockMaps

    if detector_cls.input_kind in BlockMaps.serves:
        raise KadError(f"{name} scores unpooled block maps, and the recipes pool every block "
                       f"into feature vectors; screen with it through kad fit --detector "
                       f"{name}")


def plan_columns(detectors: list[str], inputs: list[str]) -> list[tuple[str, str]]:
    """``(detector spec, input)`` pairs: every detector on every input it accepts."""
    from kad.registry import DETECTORS, load
    from kad.utils.specs import parse_spec

    columns = []
    for spec in detectors:
        name = parse_spec(spec, "detector").name
        cls = load(DETECTORS, name)
        refuse_maps(cls, name)
        for kind in inputs:
            if kind not in (PIXELS, FEATURES):
                raise KadError(f"unknown input {kind!r}: use {PIXELS!r} or {FEATURES!r}")
            if compatible(cls, kind):
                columns.append((spec, kind))
    if not columns:
        raise KadError(f"no detector among {detectors} accepts the inputs {inputs}")
    return columns


def make_detector(spec: str, seed: int, defaults: dict | None = None):
    """A fresh detector seeded with ``seed``. ``defaults`` (the recipe's backbone and
    weights) fill parameters the detector has and the spec leaves unset, so the supervised
    upper bound fine-tunes the network the recipe extracts features with."""
    from kad.registry import get_detector
    from kad.utils.specs import parse_spec

    detector = get_detector(spec)
    params = detector.get_params()
    given = parse_spec(spec, "detector").options
    extra = {k: v for k, v in (defaults or {}).items() if k in params and k not in given}
    if "random_state" in params and "random_state" not in given:
        extra["random_state"] = seed
    return detector.set_params(**extra)


def fit_and_score(spec: str, seed: int, x_train, x_test, y_test, y_train=None,
                  defaults: dict | None = None, progress: Progress | None = None):
    """Fit a fresh detector and score the test set: ``(metrics, scores, detector)``; the
    detector reports its long work (epochs, passes) to ``progress``."""
    detector = make_detector(spec, seed, defaults)
    start = time.perf_counter()
    detector.fit(x_train, y_train if detector.supervised else None, progress=progress)
    fitted = time.perf_counter()
    scores = detector.anomaly_score(x_test, progress=progress)
    scored = time.perf_counter()
    metrics = evaluate(y_test, scores, scores > detector.threshold_)
    metrics.update(fit_seconds=fitted - start, score_seconds=scored - fitted)
    return metrics, scores, detector


def summarise(runs: list[Run], by: tuple[str, ...]) -> list[dict]:
    """Mean and std of every metric over runs grouped by the attributes ``by``."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(getattr(run, k) for k in by), []).append(run)
    rows = []
    for key, members in groups.items():
        row = dict(zip(by, key, strict=True))
        row["column"] = members[0].column
        row["n_runs"] = len(members)
        for metric in ("auroc", "auprc", "recall", "fit_seconds", "score_seconds"):
            mean, std = mean_std(getattr(m, metric) for m in members)
            row[metric] = mean
            row[f"{metric}_std"] = std
        rows.append(row)
    return rows


def default_out(recipe: str) -> Path:
    return Path("kad-results") / f"{recipe}-{datetime.now():%Y%m%d-%H%M%S}"


def write_results(out: Path, recipe: str, bench: Workbench, runs: list[Run],
                  summary: list[dict], extra: dict | None = None) -> Path:
    """``results.json`` (everything), ``results.csv`` (one line per run), each written
    aside and renamed when complete; a text cell a spreadsheet would read as a formula is
    escaped with a leading ``'`` (:func:`kad.utils.files.csv_cell`)."""
    import csv

    from kad.utils.artifact import library_versions
    from kad.utils.files import atomic_write, csv_cell, write_text

    out.mkdir(parents=True, exist_ok=True)
    document = {
        "recipe": recipe,
        "created": datetime.now().isoformat(timespec="seconds"),
        "options": bench.options.to_json(),
        "dataset": {"name": bench.dataset.name, "fingerprint": bench.dataset.fingerprint,
                    "n_images": len(bench.dataset), "summary": bench.dataset.summary()},
        "seeds": list(range(bench.seeds)),
        "versions": library_versions(),
        "cache": bench.cache_keys(),
        "unreadable_images": bench.unreadable,
        "summary": summary,
        "runs": [asdict(r) for r in runs],
        **(extra or {}),
    }
    write_text(out / "results.json", json.dumps(document, indent=2, default=_json_default))
    with atomic_write(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(runs[0])))
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in asdict(r).items()} for r in runs)
    return out


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure as a PNG, written aside and renamed when complete."""
    from kad.utils.files import atomic_write

    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    return path


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def plot_rocs(path: Path, curves: dict[str, list[tuple[np.ndarray, np.ndarray]]],
              aurocs: dict[str, float], title: str) -> Path:
    """One panel per column, one thin line per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, curves.items(), strict=False):
        for fpr, tpr in lines:
            ax.plot(fpr, tpr, lw=0.8, alpha=0.6)
        ax.plot([0, 1], [0, 1], "k--", lw=0.6)
        ax.set_title(f"{name}\nAUROC {100 * aurocs[name]:.1f}%", fontsize=9)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path
