"""Fitting a pipeline, as a sequence of short steps.

:func:`fit_pipeline` reads as what it does::

    parts = split_rows(...)        # which images serve which purpose, readable, disjoint
    inputs = prepare_inputs(...)   # the network, the representation, the detector's inputs
    picked = pick_and_fit(...)     # the block (on labelled images) or the named ones; fit
    threshold = calibrate(...)     # the threshold rule (kad.screening.thresholds)
    assessment = assess_held_out(...)  # honest numbers on images used for nothing else
    heatmaps = scale_heatmaps(...)  # the calibration normals' heatmaps: the report's scale

Each step is a function with a small result record, usable on its own. The fitted record
itself and scoring are :mod:`kad.screening.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from kad.errors import KadError
from kad.features.representation import Representation
from kad.screening.calibration import FitSplit
from kad.screening.pipeline import Pipeline, weights_fingerprint
from kad.screening.thresholds import Threshold, ThresholdRule
from kad.utils.progress import Progress, task

__all__ = [
    "DetectorInputs",
    "Picked",
    "assess_held_out",
    "calibrate",
    "fit_pipeline",
    "pick_and_fit",
    "prepare_inputs",
    "recorded_weights",
    "scale_heatmaps",
    "split_rows",
]


# ---------------------------------------------------------------------------- 1. split
def split_rows(dataset, usable: np.ndarray, split: FitSplit | None = None,
               train_rows: np.ndarray | None = None) -> FitSplit:
    """``split`` (or, without one, a split whose only part is ``train_rows``, by default
    every normal image) with the rows of unreadable images left out of every part, counted
    per part in ``unreadable``. Refuses fewer than 2 training images, labelled images of
    one class and parts that overlap."""
    if split is None:
        none = np.zeros(0, dtype=int)
        if train_rows is None:
            normal = (np.ones(len(usable), bool) if dataset.anomaly is None
                      else ~np.asarray(dataset.anomaly, dtype=bool))
            train_rows = np.flatnonzero(normal)
        split = FitSplit(np.asarray(train_rows, dtype=int), none, none, none, none, none)
    kept, unreadable = {}, {}
    for name, rows in split.parts().items():
        rows = np.asarray(rows, dtype=int)
        ok = usable[rows]
        if not ok.all():
            unreadable[name] = int((~ok).sum())
        kept[name] = ok
    readable = replace(
        split, train=split.train[kept["train"]],
        calibration=split.calibration[kept["calibration"]],
        selection=split.selection[kept["selection"]],
        selection_labels=np.asarray(split.selection_labels, int)[kept["selection"]],
        assessment=split.assessment[kept["assessment"]],
        assessment_labels=np.asarray(split.assessment_labels, int)[kept["assessment"]],
        unreadable=unreadable)
    _check_parts(readable)
    return readable


def _check_parts(parts: FitSplit) -> None:
    if len(parts.train) < 2:
        raise KadError(f"fitting needs at least 2 readable normal images, got "
                       f"{len(parts.train)}")
    if parts.labelled and set(np.unique(parts.selection_labels)) != {0, 1}:
        raise KadError("labelled images must include both normal (0) and anomalous (1) ones")
    rows = {"train": parts.train, "selection": parts.selection,
            "calibration": parts.calibration, "assessment": parts.assessment}
    names = list(rows)
    for a, first in enumerate(names):
        for second in names[a + 1:]:
            if np.intersect1d(rows[first], rows[second]).size:
                raise KadError(f"the {first} and {second} images overlap; every image may "
                               "serve one purpose only (use "
                               "kad.screening.calibration.plan_fit_split)")


# ------------------------------------------------------------------- 2. the inputs
@dataclass
class DetectorInputs:
    """The network and how rows of the dataset become a detector's inputs for one
    representation: from the feature cache where it holds them, else through the
    network (:meth:`Representation.network`)."""

    model: object
    network_blocks: list[str]
    features: object
    dataset: object
    plan: object
    weights: object
    batch_size: int
    progress: Progress | None = None
    #: The int8 network's :class:`~kad.features.int8.Quantization`; None for float32.
    quantization: object = None
    _networks: dict = field(default_factory=dict, repr=False)

    @property
    def runtime(self) -> str:
        """The runtime the features came from: rows read through the network use it too,
        as the fitted pipeline will when it scores."""
        return self.features.meta["inputs"].get("runtime", "keras")

    def network(self, representation: Representation):
        """The representation's network on the features' runtime, built (and converted)
        once for every read of the fit."""
        from kad.features.runtime import model_runtime

        if representation not in self._networks:
            self._networks[representation] = model_runtime(
                representation.network(self.model, self.network_blocks), self.plan.backbone,
                self.plan.input_size, self.weights, self.runtime, self.batch_size,
                extractor=self.model, quantization=self.quantization,
                pixels=self.plan.preprocessing.eight_bit)
        return self._networks[representation]

    def read(self, representation: Representation, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=int)
        found = representation.cached(self.features, rows)
        if found is not None:
            return found
        from kad.features.extraction import stream_features

        network = self.network(representation)
        ids = np.asarray(self.dataset.ids, dtype=str)[rows]
        parts = []
        with task(self.progress, "detector inputs", len(rows)) as update:
            for start, outputs, _ in stream_features(network, self.dataset.source.take(rows),
                                                     ids, self.plan, self.batch_size):
                parts.append(representation.assemble(outputs))
                update(start + len(parts[-1]))
        if not parts:
            raise KadError("no rows to read")
        return np.concatenate(parts)


def prepare_inputs(dataset, features, plan, weights, batch_size: int,
                   progress: Progress | None = None) -> DetectorInputs:
    """Build the network the features came from (its weights are fingerprinted into the
    pipeline) and the reader of detector inputs (on the int8 network where ``plan`` has
    one)."""
    from kad.features.batching import network_batch

    model, network_blocks = plan.backbone.build_extractor(plan.input_size, weights)
    return DetectorInputs(model, list(network_blocks), features, dataset, plan, weights,
                          network_batch(plan.backbone, plan.input_size, batch_size), progress,
                          plan.quantization)


# ---------------------------------------------------------------------- 3. pick, fit
@dataclass
class Picked:
    """The representation, the fitted detector, and how the blocks were chosen."""

    representation: Representation
    detector: object
    selection: dict


def pick_and_fit(prototype, named: str, inputs: DetectorInputs, parts: FitSplit) -> Picked:
    """Fit ``prototype`` (cloned) on the training rows. With ``named == "picked"`` and a
    representation that can pick (:attr:`Representation.can_pick`), the block whose
    detector ranks the labelled selection rows best is chosen first (the paper's Table 2,
    :func:`kad.screening.selection.pick_block`); otherwise the named blocks, or the
    representation's default ones."""
    from sklearn.base import clone

    from kad.features.representation import build, representation_class
    from kad.screening.selection import pick_block

    cls = representation_class(prototype)
    backbone = str(inputs.plan.backbone.spec)
    selection: dict = {"representation": named}
    if named == "picked" and cls.can_pick:
        if not parts.labelled:
            raise KadError("representation 'picked' needs labelled anomalies to pick a "
                           "block with")
        choice = pick_block(inputs.features, parts.train, parts.selection,
                            parts.selection_labels, prototype)
        representation = build(cls, inputs.model, inputs.network_blocks, [choice.block],
                               inputs.plan.input_size, backbone)
        selection.update(picked=choice.block, selection_auroc=choice.validation_auroc,
                         blocks=representation.names)
        return Picked(representation, choice.detectors[choice.block], selection)
    representation = build(cls, inputs.model, inputs.network_blocks, named,
                           inputs.plan.input_size, backbone)
    selection["blocks"] = representation.names
    detector = clone(prototype.for_representation(representation))
    detector.fit(inputs.read(representation, parts.train), progress=inputs.progress)
    return Picked(representation, detector, selection)


# ------------------------------------------------------------------- 4. calibrate
def calibrate(rule: ThresholdRule, picked: Picked, inputs: DetectorInputs,
              parts: FitSplit) -> tuple[Threshold, np.ndarray | None]:
    """The threshold ``rule`` (resolved for the parts at hand) gives the fitted detector,
    with, on the labelled selection rows, the metrics at that threshold; returns it and
    the sorted calibration scores (None without calibration rows). A conformal guarantee
    is withheld when the calibration images have near-copies among the training images,
    measured on the pooled features of the representation's blocks (from the cache)."""
    from kad.utils.metrics import evaluate

    detector, representation = picked.detector, picked.representation
    rule = rule.resolve(labelled=parts.labelled, calibrated=len(parts.calibration) > 0)

    def scores(rows):
        return detector.anomaly_score(inputs.read(representation, rows),
                                      progress=inputs.progress)

    calibration = np.sort(scores(parts.calibration)) if len(parts.calibration) else None
    selected = scores(parts.selection) if parts.labelled else None
    labels = parts.selection_labels
    threshold = rule.apply(
        calibration_scores=calibration, detector=detector,
        normal_scores=None if selected is None else selected[labels == 0],
        anomaly_scores=None if selected is None else selected[labels == 1])
    if selected is not None:
        threshold.details["selection"] = evaluate(labels, selected, selected > threshold.value)
    if threshold.method == "conformal" and len(parts.train) > 1:
        pooled = inputs.features.matrix
        _check_near_copies(threshold, pooled(representation.names, parts.train),
                           pooled(representation.names, parts.calibration), parts.by_patient)
    return threshold, calibration


def _check_near_copies(threshold: Threshold, train, calibration, by_patient: bool) -> None:
    """Withhold the conformal guarantee when calibration images have near-copies among the
    training images (:func:`kad.screening.calibration.near_copies`): the threshold is
    kept, its record says no guarantee holds and why."""
    from kad.screening.calibration import near_copies

    found = near_copies(train, calibration)
    threshold.details["near_copies"] = found.as_dict()
    if found.withholds:
        reason = found.reason(by_patient)
        threshold.details["guarantee_withheld"] = reason
        threshold.details["guarantee"] = reason


# ----------------------------------------------------------------------- 5. assess
def assess_held_out(picked: Picked, inputs: DetectorInputs, parts: FitSplit,
                    who: Callable[[np.ndarray], str]) -> dict | None:
    """Scores of the assessment rows, kept with their labels to measure sensitivity and
    specificity on images used for nothing else (:meth:`Pipeline.assessed`)."""
    if not len(parts.assessment):
        return None
    labels = np.asarray(parts.assessment_labels, dtype=int)
    scores = picked.detector.anomaly_score(inputs.read(picked.representation,
                                                       parts.assessment),
                                           progress=inputs.progress)
    return {"scores": scores.tolist(), "labels": labels.tolist(),
            "measured_on": (f"{who(parts.assessment)} ({int((labels == 0).sum())} normal, "
                            f"{int(labels.sum())} abnormal) held out of fitting, "
                            "calibration, block picking and threshold setting")}


# ------------------------------------------------------------ 6. the heatmaps' scale
def scale_heatmaps(pipeline: Pipeline, dataset, parts: FitSplit, *, enabled: bool = True,
                   seed: int = 0, progress: Progress | None = None) -> dict | None:
    """The record of the calibration normals' heatmaps that anchors the report's colour
    scale (:func:`kad.screening.heatmap_scale.calibration_heatmaps`), made with the fitted
    ``pipeline``; with ``enabled`` False, a record saying they were not made. None without
    calibration rows."""
    from kad.screening.heatmap_scale import calibration_heatmaps, not_computed

    if not len(parts.calibration):
        return None
    if not enabled:
        return not_computed("the model was fitted without them (kad fit "
                            "--no-heatmap-scale, heatmap_scale=False)")
    ids = np.asarray(dataset.ids, dtype=str)[parts.calibration]
    return calibration_heatmaps(pipeline, dataset.source.take(parts.calibration), ids,
                                seed=seed, progress=progress)


# --------------------------------------------------------------------- the sequence
def recorded_weights(weights) -> str:
    """How a pipeline records ``weights``: ``"imagenet"``, ``"none"`` or the absolute path
    of a weights file, so that the model file works from any folder."""
    from kad.features.backbones import resolve_weights

    kind, value = resolve_weights(weights)
    return str(value) if kind == "path" else kind


def _counter(dataset) -> Callable[[np.ndarray], str]:
    patients = (np.asarray(dataset.patient, dtype=str) if dataset.patient is not None
                else None)

    def who(rows: np.ndarray) -> str:
        if patients is None:
            return f"{len(rows)} images"
        return f"{len(rows)} images of {len(np.unique(patients[rows]))} patients"

    return who


def fit_pipeline(dataset, *, backbone: str = "inception_resnet_v2", weights: str = "imagenet",
                 image_size: int | None = None, preprocessing: str | None = None,
                 representation: str = "concat", detector="knn", split=None,
                 train_rows: np.ndarray | None = None, fpr: float | None = None,
                 sensitivity: float | None = None, batch_size: int = 64,
                 cache_dir: str | Path | None = None, features=None,
                 keep_all_blocks: bool = True, out: str | Path | None = None,
                 runtime: str = "auto", heatmap_scale: bool = True, seed: int = 0,
                 progress: Progress | None = None,
                 precision: str = "float32") -> Pipeline:
    """Fit a pipeline on the normal images of ``dataset``; see the module docstring.

    The defaults are the best without labels in ``benchmarks/evidence.py``: kNN on the
    concatenation of every block, and ``image_size=None`` the network input size of
    :func:`kad.features.extraction.default_input_size` (448 px for fundus photographs). ``split`` (a
    :class:`~kad.screening.calibration.FitSplit`) says which images fit, calibrate, pick
    and assess; without one, ``train_rows`` (by default every normal image) fit and the
    threshold is the detector's contamination. ``fpr`` / ``sensitivity`` choose the
    threshold rule (:class:`~kad.screening.thresholds.ThresholdRule`). ``features`` are
    the cached features of ``dataset`` when already at hand; ``out`` and the cache folder
    are checked for writability before any work. With ``keep_all_blocks=False`` the cache
    entry then keeps only the pipeline's blocks (:func:`kad.features.cache.prune_entry`).
    With calibration images and ``heatmap_scale``, the heatmaps of up to 64 of them (chosen
    from ``seed``) anchor the report's colour scale (:mod:`kad.screening.heatmap_scale`);
    ``heatmap_scale=False`` saves their cost.

    ``precision="int8"`` fits (and the pipeline scores) on the int8 network of
    :mod:`kad.features.int8`, calibrated on the training images (at most
    :data:`~kad.features.int8.CALIBRATION_LIMIT`), on OpenVINO; refused before any work
    without NNCF, on Keras, or for a detector of block maps.
    """
    from kad.features.cache import check_writable
    from kad.features.extract import extract_features, plan_extraction
    from kad.features.int8 import check_precision
    from kad.registry import get_detector

    rule = ThresholdRule(fpr=fpr, sensitivity=sensitivity)
    runtime = check_precision(precision, runtime)
    prototype = get_detector(detector) if isinstance(detector, str) else detector
    int8 = str(precision).strip().lower() == "int8"
    if int8:
        _check_pooled(prototype)
    plan = plan_extraction(dataset, backbone, weights, image_size, preprocessing, cache_dir,
                           runtime)
    if out is not None:
        check_writable(out, is_file=True, what="--out file")
    if int8:
        if features is not None:
            raise KadError("precision int8 extracts its own features; do not pass features")
        from kad.features.extraction import plan_quantization

        plan = plan_extraction(dataset, backbone, weights, image_size, preprocessing,
                               cache_dir, runtime, plan_quantization(
                                   dataset, _training_rows(dataset, split, train_rows), plan,
                                   progress=progress))
    if features is None:
        check_writable(plan.path.parent, what="feature cache folder")
        features = extract_features(dataset, plan.backbone, weights, image_size, preprocessing,
                                    batch_size=batch_size, cache_dir=cache_dir,
                                    progress=progress, runtime=runtime,
                                    quantization=plan.quantization)
    parts = split_rows(dataset, features.valid, split, train_rows)
    inputs = prepare_inputs(dataset, features, plan, weights, batch_size, progress)
    picked = pick_and_fit(prototype, representation, inputs, parts)
    threshold, calibration_scores = calibrate(rule, picked, inputs, parts)
    who = _counter(dataset)
    pipeline = Pipeline(
        backbone=str(plan.backbone.spec), weights=recorded_weights(weights),
        weights_fingerprint=weights_fingerprint(inputs.model), image_size=plan.input_size,
        preprocessing=plan.preprocessing.key, representation=picked.representation,
        all_blocks=inputs.network_blocks, detector=picked.detector, threshold=threshold,
        training=_training_record(dataset, features, picked, parts, split),
        batch_size=batch_size,
        calibration=None if calibration_scores is None else {
            "scores": calibration_scores.tolist(), "n": int(len(calibration_scores)),
            "measured_on": f"{who(parts.calibration)}: normal images kept aside, used "
                           "neither to fit nor to pick the block",
            **{k: threshold.details[k] for k in ("near_copies", "guarantee_withheld")
               if k in threshold.details}},
        assessment=assess_held_out(picked, inputs, parts, who),
        runtime=inputs.runtime,
        quantization=None if plan.quantization is None else plan.quantization.record(),
    )
    pipeline._model = inputs.model  # scoring right away needs no second build
    heatmaps = scale_heatmaps(pipeline, dataset, parts, enabled=heatmap_scale, seed=seed,
                              progress=progress)
    if heatmaps is not None:
        pipeline.calibration["heatmaps"] = heatmaps
    if not keep_all_blocks:
        from kad.features.cache import prune_entry

        pruned = prune_entry(features.path, picked.representation.names)
        pipeline.training["pruned"] = {"removed_blocks": len(pruned.removed),
                                       "freed_bytes": pruned.freed_bytes}
    return pipeline


def _training_rows(dataset, split, train_rows) -> np.ndarray:
    """The rows that will fit the detector (unreadable ones included: the calibration of
    the int8 network leaves them out as it reads them)."""
    if split is not None:
        return np.asarray(split.train, dtype=int)
    if train_rows is not None:
        return np.asarray(train_rows, dtype=int)
    if dataset.anomaly is None:
        return np.arange(len(dataset))
    return np.flatnonzero(~np.asarray(dataset.anomaly, dtype=bool))


def _check_pooled(prototype) -> None:
    from kad.features.representation import PooledVectors, representation_class

    if not issubclass(representation_class(prototype), PooledVectors):
        raise KadError(f"precision int8 gives pooled features only, and detector "
                       f"{type(prototype).__name__} reads block maps; drop --precision int8")


def _training_record(dataset, features, picked: Picked, parts: FitSplit, split) -> dict:
    training = {"dataset": dataset.name, "fingerprint": dataset.fingerprint,
                "n_images": int(len(parts.train)), "feature_cache": features.key,
                "scores": np.sort(picked.detector.anomaly_scores_).tolist(),
                "selection": picked.selection, "rows": parts.counts()}
    if parts.unreadable:
        training["unreadable_left_out"] = parts.unreadable
    if split is not None:
        training["split"] = split.describe()
    return training
