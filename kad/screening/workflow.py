"""Screening: fit once on normal images, score new ones, hand a person a ranked list.

The library side of ``kad fit``, ``kad score`` and ``kad threshold``: :func:`fit_model`,
:func:`screen` and :func:`set_threshold` each do one command's whole job and return a
record the command line renders. Every input is accounted for: each file handed to
:func:`screen` ends up in ``scores.csv`` either scored or with the reason it was not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kad.errors import KadError
from kad.screening.pipeline import Pipeline
from kad.screening.results import (
    SCORED,
    SKIPPED,
    UNREADABLE,
    NotScored,
    ScoredImage,
    collect_images,
    display_names,
    match_labels,
    no_images,
    rank,
    read_labels,
    write_scores_csv,
)
from kad.screening.thresholds import ThresholdRule
from kad.utils.progress import Progress

__all__ = [
    "FUNDUS_MAPS", "MAPS_SCALE", "SCORED", "SKIPPED", "UNREADABLE", "FitRun", "MapsRequest",
    "NotScored", "ScoredImage", "ScoredImages",
    "PreviewRun", "ScreeningRun", "ThresholdRun", "fit_model", "preview_images", "score_images",
    "screen", "set_threshold",
]

# -- kad fit -------------------------------------------------------------------------------


@dataclass
class FitRun:
    """What :func:`fit_model` did: the fitted pipeline, where it was written, the split of
    the dataset (:class:`kad.screening.calibration.FitSplit`) and every image used for nothing, by
    id, with the reason."""

    pipeline: Pipeline
    path: Path
    split: object
    left_out: dict[str, str]
    replaced: bool = False  # an earlier file at path was replaced

    @property
    def n_fitted(self) -> int:
        return int(self.pipeline.training["n_images"])


def fit_model(dataset, out_path: str | Path, *, backbone: str = "inception_resnet_v2",
              weights: str = "imagenet", image_size: int | str | Sequence[int] | None = None,
              preprocessing: str | None = None, detector: str | Sequence[str] = "knn",
              representation: str | None = None, sensitivity: float | None = None,
              fpr: float | None = None, calibration: float | None = None,
              selection: float | None = None, seed: int = 0, batch_size: int = 64,
              cache_dir: str | Path | None = None, keep_all_blocks: bool = False,
              runtime: str = "auto", heatmap_scale: bool = True,
              progress: Progress | None = None, on_event=None,
              overwrite: bool = False, precision: str = "float32",
              maps: str | None = "auto", maps_size: int | None = None) -> FitRun:
    """Fit the whole pipeline on the normal images of ``dataset`` and save it to
    ``out_path``. The dataset is divided by patient
    (:func:`kad.screening.calibration.plan_fit_split`) into images that fit the detector,
    normals that calibrate the conformal threshold (``fpr``), and, with labelled
    anomalies, images that pick the block and set a ``sensitivity`` threshold and images
    held out to measure the result (:mod:`kad.screening.thresholds` says which rule
    applies). ``out_path`` and the cache folder are checked for writability before any
    work; the training images' cache entry then keeps only the blocks the model uses
    unless ``keep_all_blocks``. An existing ``out_path`` is refused unless ``overwrite``
    (then :attr:`FitRun.replaced` is True); it is locked for the run, so a second fit to
    the same file stops at once, and the file is written aside and renamed when complete.

    With labelled anomalies, several ``image_size`` values (``"224,448"``) and several
    ``detector`` specs (``"iforest,knn"``), the (input size, block or concatenation,
    detector) with the best AUROC on the selection images is picked first
    (:func:`kad.screening.selection.select`, a grid at each size), then fitted and
    calibrated as one. With ``heatmap_scale`` (the default) the heatmaps of up to 64
    calibration normals anchor the report's colour scale
    (:mod:`kad.screening.heatmap_scale`).

    ``precision="int8"`` fits the model on the int8 network (:mod:`kad.features.int8`),
    calibrated on its training images, and it scores on that network; the choice among
    sizes and detectors, when there is one, is made on float32 features.

    ``maps`` fits a lesion maps model beside it (:attr:`Pipeline.maps`, stored in the same
    file): a detector that draws its own maps (``NAME[:key=value,...]``), fitted on the
    same images at ``maps_size`` px (default: :data:`MAPS_SCALE` times the model's input
    size); ``kad score --heatmaps`` then draws its maps while this model gives every score.
    ``"auto"`` (the default) is :data:`FUNDUS_MAPS` for fundus photographs, the best
    lesion maps measured (``benchmarks/lesions.py``), and none for other images or for a
    detector that draws its own maps;
    ``"none"`` or None fits none."""
    from kad.features.cache import cache_root, check_writable
    from kad.features.int8 import check_precision

    request = _FitRequest.of(dataset, image_size, detector, representation, fpr,
                             sensitivity, calibration, selection)
    request.check_calibration_size(dataset, seed)  # before any work
    maps_request = MapsRequest.of(maps, maps_size)
    if maps_request is not None:
        maps_request.check(dataset, preprocessing, request.specs)
    check_precision(precision, runtime)
    precision = str(precision).strip().lower()
    check_writable(out_path, is_file=True, what="--out file")
    check_writable(Path(cache_dir) if cache_dir else cache_root(), what="feature cache folder")
    with model_output(out_path, overwrite=overwrite, flag="--overwrite") as replaced:
        run = _fit(dataset, out_path, request, backbone=backbone, weights=weights,
                   preprocessing=preprocessing, seed=seed, batch_size=batch_size,
                   cache_dir=cache_dir, keep_all_blocks=keep_all_blocks, runtime=runtime,
                   heatmap_scale=heatmap_scale, progress=progress, on_event=on_event,
                   precision=precision, maps=maps_request)
    run.replaced = replaced
    return run


def model_output(path: str | Path, *, overwrite: bool, flag: str, same_as: Path | None = None):
    """Lock the model file ``path`` about to be written (a lock file beside it; a second
    run stops, naming the holder) and refuse it if it exists, unless ``overwrite`` or it is
    ``same_as`` (the model being updated in place). A context manager yielding whether an
    existing file will be replaced."""
    from contextlib import contextmanager

    from kad.utils.files import file_lock_path, output_lock

    path = Path(path)
    exists = path.exists()
    in_place = same_as is not None and exists and path.resolve() == Path(same_as).resolve()
    if exists and not (overwrite or in_place):
        raise KadError(f"{path} exists; kad does not replace it without being asked: pass "
                       f"{flag} to replace it, or choose another --out")

    @contextmanager
    def held():
        with output_lock(file_lock_path(path), path):
            yield exists

    return held()


def _fit(dataset, out_path, request, *, backbone, weights, preprocessing, seed, batch_size,
         cache_dir, keep_all_blocks, runtime, heatmap_scale, progress, on_event,
         precision="float32", maps: MapsRequest | None = None) -> FitRun:
    """:func:`fit_model`'s work once its inputs are checked and ``out_path`` is locked."""
    from kad.features.extract import extract_features
    from kad.features.int8 import check_precision
    from kad.screening.calibration import plan_fit_split
    from kad.screening.fitting import fit_pipeline
    from kad.screening.selection import MultiSizeFeatures

    float_runtime = check_precision(precision, runtime)  # int8 reads float32 on OpenVINO
    by_size = {size: extract_features(dataset, backbone, weights, size, preprocessing,
                                      batch_size=batch_size, cache_dir=cache_dir,
                                      progress=progress, on_event=on_event,
                                      runtime=float_runtime)
               for size in request.sizes}
    multi = MultiSizeFeatures({f.meta["inputs"]["image_size"]: f for f in by_size.values()})
    split = plan_fit_split(dataset, request.calibration, request.selection, seed,
                           valid=multi.valid)
    chosen = request.choose(multi, split, seed, progress)
    size, spec, named = (chosen.picked.sizes[0], chosen.picked.detector, chosen.picked.block
                         ) if chosen else (multi.sizes[0], request.specs[0],
                                           request.representation)
    pipeline = fit_pipeline(
        dataset, backbone=backbone, weights=weights, image_size=size,
        preprocessing=preprocessing, representation=named, detector=spec, split=split,
        sensitivity=request.rule.sensitivity, fpr=request.rule.asked_fpr,
        batch_size=batch_size,
        cache_dir=cache_dir, keep_all_blocks=keep_all_blocks, runtime=runtime,
        features=multi.by_size[size] if precision == "float32" else None,
        heatmap_scale=heatmap_scale, seed=seed, progress=progress, precision=precision)
    if chosen is not None:
        pipeline.training["selection"].update(
            picked_candidate=chosen.picked.to_json(),
            picked_selection_auroc=chosen.validation_auroc,
            candidates=[c.to_json() for c in chosen.scores], failed=chosen.failed)
    spec = maps.spec_for(pipeline) if maps is not None else None
    if spec is not None:
        _fit_maps(pipeline, spec, maps, dataset, split, request, backbone=backbone,
                  weights=weights, batch_size=batch_size, cache_dir=cache_dir,
                  keep_all_blocks=keep_all_blocks, runtime=float_runtime,
                  heatmap_scale=heatmap_scale, seed=seed, progress=progress)
    path = pipeline.save(out_path)
    failed, ids = multi.by_size[size].failed, dataset.ids
    left_out = {str(ids[i]): failed.get(str(ids[i]), why) for i, why in split.left_out.items()}
    return FitRun(pipeline, Path(path), split, left_out)


def _fit_maps(pipeline: Pipeline, spec: str, maps: MapsRequest, dataset, split, request, *,
              backbone, weights, batch_size, cache_dir, keep_all_blocks, runtime,
              heatmap_scale, seed, progress) -> None:
    """Fit ``pipeline``'s lesion maps model ``spec`` on the same images and attach it; one
    progress task names it while it fits."""
    from kad.screening.fitting import fit_pipeline
    from kad.utils.progress import task

    size = maps.size or MAPS_SCALE * pipeline.image_size
    with task(progress, f"lesion maps model ({spec} at {size} px)", 1) as done:
        pipeline.attach_maps(fit_pipeline(
            dataset, backbone=backbone, weights=weights, image_size=size,
            preprocessing=pipeline.preprocessing, representation="concat", detector=spec,
            split=split, sensitivity=request.rule.sensitivity, fpr=request.rule.asked_fpr,
            batch_size=batch_size, cache_dir=cache_dir, keep_all_blocks=keep_all_blocks,
            runtime=runtime, heatmap_scale=heatmap_scale, seed=seed, progress=progress))
        done(1)


#: The lesion maps model ``kad fit`` adds for fundus photographs: patch kNN with a greedy
#: coreset bank, at :data:`MAPS_SCALE` times the screening model's input size. On IDRiD's
#: lesion masks it points at a lesion in 89 % of held-out photographs where kNN's gradient
#: maps point in 37 %, while kNN screens far better (``benchmarks/lesions.py``,
#: ``benchmarks/README.md``): the scores come from one model, the maps from the other.
FUNDUS_MAPS = "patchknn:sampling=coreset,bank_size=10000"
MAPS_SCALE = 2


@dataclass
class MapsRequest:
    """What ``kad fit --maps`` asked, checked before any work: ``spec`` a detector that
    draws its own maps, ``"auto"`` (:data:`FUNDUS_MAPS` for fundus photographs) or None;
    ``size`` the maps model's input size (None: :data:`MAPS_SCALE` times the model's)."""

    spec: str | None
    size: int | None

    @classmethod
    def of(cls, maps: str | None, size: int | None) -> MapsRequest | None:
        from kad.registry import get_detector

        text = None if maps is None else str(maps).strip()
        if size is not None and (isinstance(size, bool) or int(size) != size or size < 32):
            raise KadError(f"--maps-size must be a whole number of pixels of at least 32, "
                           f"got {size!r}")
        if text is None or text.lower() == "none":
            if size is not None:
                raise KadError("--maps-size sets the lesion maps model's input size, but "
                               "--maps is none: drop one")
            return None
        if text.lower() != "auto":
            detector = get_detector(text)
            if not detector.draws_own_maps():
                raise KadError(f"--maps {text}: {type(detector).__name__} draws no map of its "
                               "own; use a detector that does (e.g. patchknn), or none")
        return cls(text, None if size is None else int(size))

    def spec_for(self, pipeline: Pipeline) -> str | None:
        """The maps model's detector for ``pipeline`` (None: no maps model). ``auto`` fits
        none for a model whose detector draws its own maps (a patch kNN model is its own
        lesion maps model)."""
        if self.spec.lower() != "auto":
            return self.spec
        return None if _auto_fits_no_maps(pipeline.preprocessing,
                                          pipeline.detector.draws_own_maps()) else FUNDUS_MAPS

    def check(self, dataset, preprocessing: str | None, specs: list[str]) -> None:
        """Before any work: refuse ``--maps-size`` where ``auto`` will fit no maps model
        (the size would be ignored)."""
        if self.size is None or self.spec.lower() != "auto":
            return
        from kad.features.extraction import default_preprocessing
        from kad.registry import get_detector

        draws = len(specs) == 1 and get_detector(specs[0]).draws_own_maps()
        why = _auto_fits_no_maps(preprocessing or default_preprocessing(dataset), draws)
        if why:
            raise KadError(f"--maps-size sets the lesion maps model's input size, but --maps "
                           f"auto fits none {why}: drop --maps-size, or name a detector "
                           "with --maps (e.g. --maps patchknn)")


def _auto_fits_no_maps(preprocessing: str, draws_own_maps: bool) -> str | None:
    """Why ``--maps auto`` fits no lesion maps model (None: it fits :data:`FUNDUS_MAPS`)."""
    from kad.data.preprocessing import get_preprocessing

    if draws_own_maps:
        return "beside a detector that draws its own maps"
    name = get_preprocessing(preprocessing).name
    return None if name == "fundus" else f"for {name} images (only for fundus photographs)"


@dataclass
class _FitRequest:
    """What ``kad fit`` was asked, checked before any work: the sizes and detectors to
    choose among, the representation, the threshold rule and the split's shares."""

    sizes: list
    specs: list[str]
    representation: str
    rule: ThresholdRule
    calibration: float
    selection: float
    labelled: bool

    @classmethod
    def of(cls, dataset, image_size, detector, representation, fpr, sensitivity,
           calibration, selection) -> _FitRequest:
        from kad.screening.calibration import DEFAULT_CALIBRATION, DEFAULT_SELECTION
        from kad.screening.selection import parse_sizes
        from kad.utils.specs import split_specs

        if dataset.anomaly is None:
            raise KadError(f"{dataset.name} has no normal/abnormal labels; fit on a folder, "
                           "dr or rop dataset")
        labelled = bool(np.any(dataset.anomaly))
        calibration = DEFAULT_CALIBRATION if calibration is None else calibration
        rule = ThresholdRule(fpr=fpr, sensitivity=sensitivity).resolve(
            labelled=labelled, calibrated=calibration > 0)
        request = cls(parse_sizes(image_size) or [None],
                      split_specs(detector) if isinstance(detector, str) else list(detector),
                      representation or ("picked" if labelled else "concat"), rule,
                      calibration, DEFAULT_SELECTION if selection is None else selection,
                      labelled)
        request.check_choice()
        return request

    @property
    def choosing(self) -> bool:
        return len(self.sizes) > 1 or len(self.specs) > 1

    def check_choice(self) -> None:
        """Several sizes or detectors are chosen among on labelled anomalies, as
        candidates of one representation: pooled vectors."""
        from kad.features.representation import PooledVectors, representation_class
        from kad.registry import DETECTORS, load
        from kad.utils.specs import parse_spec

        if not self.choosing:
            return
        other = [s for s in self.specs if representation_class(
            load(DETECTORS, parse_spec(s, "detector").name)) is not PooledVectors]
        if other:
            raise KadError(f"{', '.join(other)} does not score pooled features and cannot be "
                           "chosen among detectors that do; fit it on its own, at one image "
                           "size")
        if not (self.labelled and self.representation == "picked"):
            raise KadError(f"{len(self.sizes)} image sizes and {len(self.specs)} detectors "
                           "but nothing to choose with: add labelled anomalies (abnormal/), "
                           "or give one of each")

    def check_calibration_size(self, dataset, seed: int) -> None:
        """Is the calibration share large enough for the false-positive rate asked?"""
        from kad.screening.calibration import min_calibration_size, plan_fit_split
        from kad.screening.thresholds import too_few_calibration_images

        alpha = self.rule.asked_fpr  # the default rate falls back to what can be guaranteed
        if alpha is None:
            return
        n_cal = len(plan_fit_split(dataset, self.calibration, self.selection, seed)
                    .calibration)
        if n_cal < min_calibration_size(alpha):
            raise KadError(too_few_calibration_images(
                alpha, n_cal, f"raise --calibration (now {self.calibration:g} of "
                              f"{dataset.name})"))

    def choose(self, multi, split, seed: int, progress: Progress | None = None):
        """On the selection images only (calibration and assessment stay untouched): the
        best candidate of the grid, or None when there is nothing to choose."""
        from kad.screening.selection import candidate_grid, fresh_detector, select

        if not self.choosing:
            return None
        return select(multi, candidate_grid(multi, self.specs, across_sizes=False),
                      split.train, split.selection, split.selection_labels, seed=seed,
                      make_detector=fresh_detector, progress=progress)


# -- kad score -----------------------------------------------------------------------------


@dataclass
class ScreeningRun:
    """What :func:`screen` did. ``rows`` are the scored images, most suspicious first;
    ``not_scored`` every other input with its status and reason: together, every input."""

    rows: list[ScoredImage]
    not_scored: list[NotScored]
    scores_csv: Path
    report: Path
    metrics: dict | None
    heatmaps: object = None  # kad.screening.heatmaps.HeatmapRun, with heatmaps
    replaced: list[Path] = field(default_factory=list)  # earlier files now replaced
    # the batch against the calibration normals (kad.screening.shift.BatchShift); None
    # for a model without them
    shift: object = None
    #: Folders of an earlier run left in the output folder that this run did not write
    #: (``heatmaps/`` after a run without heatmaps): kept, and said to be earlier.
    earlier: list[Path] = field(default_factory=list)
    #: Rows of the labels CSV that label none of the images given
    #: (:attr:`ScoredImages.unmatched_labels`).
    unmatched_labels: list[str] = field(default_factory=list)

    @property
    def n_inputs(self) -> int:
        return len(self.rows) + len(self.not_scored)

    def count(self, status: str) -> int:
        if status == SCORED:
            return len(self.rows)
        return sum(other.status == status for other in self.not_scored)


def screen(model: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, *,
           labels: str | Path | None = None, weights: str | None = None,
           engine: str = "local", ray_address: str | None = None,
           heatmaps: bool = False, heatmap_method: str = "auto", grid: int = 8,
           steps: int = 16, runtime: str | None = None,
           maps_from: str | Path | None = None,
           progress: Progress | None = None) -> ScreeningRun:
    """Score every image under ``inputs`` with the model file ``model`` and write
    ``scores.csv`` and ``report.html`` to ``out_dir`` (checked for writability first).
    ``engine="ray"`` scores on a Ray cluster (:func:`kad.features.ray_engine.score_with_ray`).
    With ``heatmaps``, every scored image's heatmap overlays go to ``out_dir/heatmaps``
    and the report shows them (:func:`kad.screening.heatmaps.write_heatmaps`);
    ``maps_from``, another model file, draws them instead of ``model``, which still gives
    every score, p-value and flag (see :func:`score_images`).

    ``out_dir`` is locked for the run (:func:`kad.utils.files.staged_output`): a second run
    with the same ``out_dir`` stops at once, naming the process that holds it. The files
    are written into a staging folder inside ``out_dir`` and renamed into place together
    at the end, so an interrupted or failed run leaves ``out_dir`` as it was;
    :attr:`ScreeningRun.replaced` lists the earlier files the run replaced."""
    from kad.features.cache import check_writable
    from kad.screening.pipeline import load_pipeline
    from kad.utils.files import staged_output

    _check_engine(engine, heatmaps, maps_from is not None)
    pipeline = load_pipeline(model)
    maps = _maps_model(maps_from, heatmap_method, grid, steps, runtime, pipeline, heatmaps,
                       weights)
    out_dir = check_writable(Path(out_dir), what="--out folder")
    with staged_output(out_dir) as stage:
        _check_replaceable(out_dir, heatmaps)  # locked: nothing appears there meanwhile
        run = _screen(pipeline, model, inputs, stage.path, labels=labels, weights=weights,
                      engine=engine, ray_address=ray_address, heatmaps=heatmaps,
                      heatmap_method=heatmap_method, grid=grid, steps=steps, runtime=runtime,
                      maps=maps, progress=progress, exclude=out_dir)
        run.replaced = stage.publish()
    if not heatmaps and (out_dir / "heatmaps").is_dir():
        run.earlier.append(out_dir / "heatmaps")
    run.scores_csv, run.report = stage.final(run.scores_csv), stage.final(run.report)
    if run.heatmaps is not None:
        from dataclasses import replace

        run.heatmaps.files = {
            key: replace(f, seen=stage.final(f.seen),
                         original=None if f.original is None else stage.final(f.original),
                         map=None if f.map is None else stage.final(f.map))
            for key, f in run.heatmaps.files.items()}
    return run


@dataclass
class ScoredImages:
    """What :func:`score_images` found: ``rows``, the scored images, most suspicious first;
    ``not_scored``, every other input with its status and reason; together, every input.
    ``heatmaps`` is the :class:`kad.screening.heatmaps.HeatmapRun` when heatmaps were drawn."""

    rows: list[ScoredImage]
    not_scored: list[NotScored]
    heatmaps: object = None
    #: Rows of the labels CSV (their image keys, in its order) that label none of the
    #: images given: accounted for, not used.
    unmatched_labels: list[str] = field(default_factory=list)

    @property
    def n_inputs(self) -> int:
        return len(self.rows) + len(self.not_scored)

    def records(self) -> list[dict]:
        """Every input as a plain dict, in the order of ``scores.csv``: ``file``,
        ``status`` (scored, unreadable or skipped), ``score``, ``p_value``, ``percentile``,
        ``flagged``, ``label`` and ``reason`` (None where they do not apply)."""
        out = [{"file": r.file, "status": SCORED, "score": r.score, "p_value": r.p_value,
                "percentile": r.percentile, "flagged": r.flagged, "label": r.label,
                "reason": None} for r in self.rows]
        out += [{"file": str(o.file), "status": o.status, "score": None, "p_value": None,
                 "percentile": None, "flagged": None, "label": None, "reason": o.reason}
                for o in self.not_scored]
        return out

    def to_dataframe(self):
        """:meth:`records` as a pandas DataFrame (pandas is not a dependency of kad)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise KadError("a DataFrame of the scores needs pandas, which kad does not "
                           "install: pip install pandas, or use records()") from exc
        return pd.DataFrame.from_records(self.records(), columns=list(_RECORD_COLUMNS))


_RECORD_COLUMNS = ("file", "status", "score", "p_value", "percentile", "flagged", "label",
                   "reason")


def _check_engine(engine: str, heatmaps: bool, maps_from: bool = False) -> None:
    if engine not in ("local", "ray"):
        raise KadError(f"unknown engine {engine!r}: use local or ray")
    if maps_from and engine != "local":
        raise KadError("--maps-from draws heatmaps, which the local engine draws; drop "
                       "--engine ray or --maps-from")
    if maps_from and not heatmaps:
        raise KadError("--maps-from says which model draws the heatmaps: add --heatmaps, "
                       "or drop --maps-from")
    if heatmaps and engine != "local":
        raise KadError("heatmaps are drawn by the local engine; drop --engine ray or "
                       "--heatmaps")


def score_images(model: str | Path | Pipeline, inputs: Sequence[str | Path], *,
                 labels: str | Path | None = None, weights: str | None = None,
                 engine: str = "local", ray_address: str | None = None,
                 heatmaps_dir: str | Path | None = None, heatmap_method: str = "auto",
                 grid: int = 8, steps: int = 16, runtime: str | None = None,
                 maps_from: str | Path | Pipeline | None = None,
                 progress: Progress | None = None, on_heatmap=None,
                 exclude: str | Path | None = None) -> ScoredImages:
    """Score every image under ``inputs`` (files, or folders searched recursively) with a
    fitted pipeline or the model file ``model``, writing nothing: the rows of
    ``scores.csv`` as records (:meth:`ScoredImages.records`). :func:`screen` (``kad
    score``) is this plus the files it writes.

    ``labels`` (a CSV ``image,label``) adds each image's label; ``engine="ray"`` scores on a
    Ray cluster (:func:`kad.features.ray_engine.score_with_ray`); with ``heatmaps_dir``
    every scored image's heatmap overlays are written there
    (:func:`kad.screening.heatmaps.write_heatmaps`, which hands each heatmap to
    ``on_heatmap`` when given).

    ``maps_from`` (a fitted pipeline or model file; needs ``heatmaps_dir``) draws the
    heatmaps with that model instead: the scores, p-values and flags still come from
    ``model`` alone, exactly as without it, and the maps from ``maps_from``'s own pass over
    the images ``model`` scored (the best screening model and the best lesion maps are
    often two models). Both models are loaded and checked before any image is read. An
    image that either model cannot read is listed as unreadable with the reason.
    ``exclude`` (:func:`screen`'s output folder) is left out of the folders searched."""
    from kad.data.datasets import FileSource

    _check_engine(engine, heatmaps_dir is not None, maps_from is not None)
    pipeline = _pipeline(model)
    maps = _maps_model(maps_from, heatmap_method, grid, steps, runtime, pipeline,
                       heatmaps_dir is not None, weights)
    files, not_scored = collect_images(inputs, exclude)
    if not files:
        raise no_images(inputs, not_scored)
    truth, unmatched = (match_labels(files, read_labels(Path(labels))) if labels
                        else (None, []))
    ids = [str(f) for f in files]
    drawn = None
    if heatmaps_dir is not None:
        from kad.screening.heatmaps import write_heatmaps

        # the model's own scores, less the images the maps model cannot read
        drawn = write_heatmaps(pipeline, FileSource(files), ids, Path(heatmaps_dir),
                               method=heatmap_method, grid=grid, steps=steps, weights=weights,
                               runtime=runtime, progress=progress, on_heatmap=on_heatmap,
                               maps=maps)
        result = drawn.scores
    elif engine == "ray":
        from kad.features.ray_engine import score_with_ray

        result = score_with_ray(pipeline, FileSource(files), ids, address=ray_address,
                                weights=weights, runtime=runtime, progress=progress)
    else:
        result = pipeline.score(FileSource(files), ids=ids, progress=progress, weights=weights,
                                runtime=runtime)
    rows = rank(pipeline, files, result, truth)
    not_scored = [NotScored(f, UNREADABLE, why) for f, why in result.failed.items()] + not_scored
    return ScoredImages(rows, not_scored, drawn, unmatched)


#: What an earlier ``kad score`` wrote into the folders it replaces as a whole at the end
#: of a run (``report_files/`` holds the report's marker file too).
_OURS = {"report_files": re.compile(r"(\d{5}[a-z]\.jpg|scores\.png|roc\.png|\.kad-report)"),
         "heatmaps": re.compile(r".+_(seen\.png|original\.png|map\.npy|map\.json)")}


def _check_replaceable(out_dir: Path, heatmaps: bool) -> None:
    """Before any work: the folders of ``out_dir`` that this run will replace as a whole
    (``report_files/``, and ``heatmaps/`` with heatmaps) hold nothing but an earlier
    run's files, so that publishing never deletes a file kad did not write."""
    from kad.screening.report import MARKER

    for name in ("report_files", "heatmaps") if heatmaps else ("report_files",):
        folder = out_dir / name
        if not (folder.exists() or folder.is_symlink()):
            continue
        if folder.is_symlink() or not folder.is_dir() or (
                name == "report_files" and not (folder / MARKER).is_file()):
            raise KadError(f"{folder} was not written by kad score, which replaces it as a "
                           "whole: move it away, or choose another --out")
        for item in sorted(folder.iterdir()):
            if item.is_symlink() or not item.is_file() or not _OURS[name].fullmatch(item.name):
                raise KadError(f"{item} was not written by kad score, which replaces {folder} "
                               "as a whole at the end of the run: move it away, or choose "
                               "another --out")


def _pipeline(model: str | Path | Pipeline) -> Pipeline:
    if isinstance(model, Pipeline):
        return model
    from kad.screening.pipeline import load_pipeline

    return load_pipeline(model)


def _maps_model(maps_from, method: str, grid: int, steps: int, runtime: str | None,
                pipeline: Pipeline, heatmaps: bool,
                weights: str | None = None) -> Pipeline | None:
    """The model that draws the heatmaps where it is not ``pipeline``: ``maps_from``,
    else, for ``method`` auto, ``pipeline``'s own lesion maps model
    (:meth:`Pipeline.drawer`); None where ``pipeline`` draws them itself or there are
    none. Loaded and checked (it can make heatmaps by ``method``: network built, weights
    checked) before any work."""
    from kad.screening.heatmaps import check_heatmaps

    maps = _pipeline(maps_from) if maps_from is not None else None
    drawer = maps if maps is not None else pipeline.drawer(method) if heatmaps else pipeline
    if drawer is pipeline:
        return None
    check_heatmaps(pipeline, method, grid, steps, weights=weights, runtime=runtime, maps=maps)
    return drawer


def _screen(pipeline, model, inputs, out_dir: Path, *, labels, weights, engine, ray_address,
            heatmaps, heatmap_method, grid, steps, runtime, progress,
            maps: Pipeline | None = None, exclude: Path | None = None) -> ScreeningRun:
    """:func:`screen`'s work, writing into ``out_dir`` (the staging folder)."""
    from kad.screening.report import HeatmapSketches, write_report
    from kad.screening.shift import batch_shift

    sketches = HeatmapSketches(grid=grid, steps=steps) if heatmaps else None
    found = score_images(pipeline, inputs, labels=labels, weights=weights, engine=engine,
                         ray_address=ray_address,
                         heatmaps_dir=out_dir / "heatmaps" if heatmaps else None,
                         heatmap_method=heatmap_method, grid=grid, steps=steps,
                         runtime=runtime, maps_from=maps, progress=progress,
                         on_heatmap=sketches, exclude=exclude)
    rows, not_scored, drawn = found.rows, found.not_scored, found.heatmaps
    csv_path = write_scores_csv(out_dir / "scores.csv", rows, not_scored)
    shift = batch_shift(pipeline, [r.score for r in rows])
    report, metrics = write_report(out_dir / "report.html", pipeline, rows,
                                   {o.file: o.reason for o in not_scored if o.status == UNREADABLE},
                                   [(o.file, o.reason) for o in not_scored
                                    if o.status != UNREADABLE], str(model),
                                   heatmaps=sketches,
                                   names=display_names([*(Path(r.file) for r in rows),
                                                        *(Path(o.file) for o in not_scored)],
                                                       inputs),
                                   shift=shift, maps=maps, progress=progress,
                                   unmatched_labels=found.unmatched_labels)
    return ScreeningRun(rows, not_scored, csv_path, report, metrics, drawn, shift=shift,
                        unmatched_labels=found.unmatched_labels)


# -- kad preview ---------------------------------------------------------------------------


@dataclass
class PreviewRun:
    """What :func:`preview_images` did: the picture, the images in it, every other input
    with the reason it is not (together, every input), and whether it replaced a file."""

    path: Path
    shown: list[Path]
    left_out: list[tuple[str, str]]
    n_inputs: int
    replaced: bool


def preview_images(inputs: Sequence[str | Path], out: str | Path,
                   preprocessing: str = "fundus") -> PreviewRun:
    """The picture of :func:`kad.data.preview.save_preview` for the images under
    ``inputs`` (files and folders, as :func:`score_images` finds them): the first
    :data:`~kad.data.preview.MAX_IMAGES`, less those that cannot be read, which are left
    out with the reason, as is every other input. Raises :class:`~kad.errors.KadError`,
    writing nothing, when no input is an image or none can be read."""
    from kad.data.preview import MAX_IMAGES, save_preview

    files, others = collect_images(inputs)
    if not files:
        raise no_images(inputs, others)
    left_out = [(str(o.file), o.reason) for o in others]
    left_out += [(str(f), f"a preview shows the first {MAX_IMAGES} images")
                 for f in files[MAX_IMAGES:]]
    out = Path(out)
    replaced, before = out.exists(), len(left_out)
    path = save_preview(files[:MAX_IMAGES], out, preprocessing, left_out=left_out)
    unreadable = {name for name, _ in left_out[before:]}
    shown = [f for f in files[:MAX_IMAGES] if str(f) not in unreadable]
    return PreviewRun(path, shown, left_out, len(files) + len(others), replaced)


# -- kad threshold -------------------------------------------------------------------------


@dataclass
class ThresholdRun:
    """What :func:`set_threshold` did: the updated pipeline, where it was written, how many
    labelled images set the threshold, and the labelled files that could not be used."""

    pipeline: Pipeline
    path: Path
    n_used: int
    not_used: list[NotScored]


def set_threshold(model: str | Path, labels: str | Path | None = None, *,
                  sensitivity: float | None = None, fpr: float | None = None,
                  out_path: str | Path | None = None, weights: str | None = None,
                  progress: Progress | None = None, in_place: bool = False,
                  overwrite: bool = False) -> ThresholdRun:
    """Move the threshold of ``model`` without refitting, and save it: to a false-positive
    rate ``fpr`` on its calibration normals (conformal), or to ``sensitivity`` on a labelled
    validation CSV (``image,label``; paths relative to the CSV's folder or absolute; 0.95
    when only ``labels`` is given).

    The updated model goes to ``out_path`` (refused if it exists, unless ``overwrite``),
    or over ``model`` only with ``in_place``: the model file is never rewritten unasked.
    The file written is locked for the run and written aside, then renamed."""
    from kad.features.cache import check_writable
    from kad.screening.pipeline import load_pipeline

    if sensitivity is not None and labels is None:
        raise KadError("--sensitivity needs --labels, a CSV image,label of labelled images")
    if fpr is None and labels is None:
        raise KadError("give --fpr ALPHA (no labels needed) or --labels CSV (with "
                       "--sensitivity, 0.95 by default)")
    if fpr is not None and labels is not None:
        raise KadError("give --fpr ALPHA or --labels CSV, not both: one threshold is set")
    if out_path is not None and in_place:
        raise KadError("give --out NEW.kad or --in-place, not both")
    rule = ThresholdRule(fpr=fpr, sensitivity=sensitivity).resolve(labelled=labels is not None)
    pipeline = load_pipeline(model)
    if not pipeline.has_network:
        raise KadError(f"{model} is an exported model, which kad does not rewrite: move the "
                       "threshold of the model file it was exported from and export that "
                       "again")
    if out_path is None and not in_place:
        raise KadError(f"kad threshold does not rewrite {model} unasked: write the updated "
                       f"model to a new file with --out NEW.kad, or pass --in-place to "
                       f"replace {model}")
    target = Path(model) if in_place else Path(out_path)
    check_writable(target, is_file=True, what="model file to write")
    with model_output(target, overwrite=overwrite, flag="--overwrite",
                      same_as=Path(model) if in_place else None):
        return _move_threshold(pipeline, target, rule, labels, weights, progress)


def _move_threshold(pipeline, target: Path, rule, labels, weights, progress) -> ThresholdRun:
    from kad.data.datasets import FileSource
    from kad.screening.thresholds import threshold_at_fpr

    if rule.fpr is not None:
        pipeline.threshold = threshold_at_fpr(pipeline, rule.fpr)
        path = pipeline.save(target)
        return ThresholdRun(pipeline, Path(path), int(pipeline.calibration["n"]), [])
    labels = Path(labels)
    table = read_labels(labels)
    files = [p if p.is_absolute() else labels.parent / p for p in map(Path, table)]
    y = np.array(list(table.values()))
    result = pipeline.score(FileSource(files), ids=[str(f) for f in files], progress=progress,
                            weights=weights)
    ok = np.isfinite(result.scores)
    scores = result.scores[ok]
    chosen = rule.apply(normal_scores=scores[y[ok] == 0], anomaly_scores=scores[y[ok] == 1])
    chosen.details["labels"] = str(labels)
    pipeline.threshold = chosen
    path = pipeline.save(target)
    not_used = [NotScored(f, UNREADABLE, why) for f, why in result.failed.items()]
    return ThresholdRun(pipeline, Path(path), int(ok.sum()), not_used)
