"""A fitted pipeline: preprocessing, backbone blocks, detector and threshold in one file.

:func:`fit_pipeline` fits a detector on cached features of normal images and records
everything needed to score new images: the backbone and its options, the weights as given
and a fingerprint of the weight tensors themselves, the input size, the preprocessing, the
blocks, the fitted detector, the threshold and how it was chosen, the training scores (for
percentiles), the training set's fingerprint and the library versions.

:meth:`Pipeline.score` streams images through the same code path as feature extraction, at
the same batch size, so an image gets bit-identical scores in this process or after
:func:`load_pipeline` in another. Loading refuses a file from another kad version, a
corrupt file, and (when the network is built) weights whose tensors differ from those the
pipeline was fitted with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import library_versions, load_artifact, save_artifact
from .detector import BaseDetector
from .errors import KadError, WeightsError

ProgressCallback = Callable[[int, int], None]


@dataclass
class Threshold:
    """The flagging threshold (flag when score > value) and how it was chosen."""

    value: float
    method: str  # "contamination" or "sensitivity"
    details: dict = field(default_factory=dict)


@dataclass
class Scores:
    """Scores of a batch of images; unreadable ones are in ``failed`` with the reason."""

    ids: list[str]
    scores: np.ndarray  # NaN where the image could not be read
    failed: dict[str, str]


def weights_fingerprint(model) -> str:
    """SHA-256 over the network's weight tensors: the identity of what was loaded."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(np.asarray(weight.numpy() if hasattr(weight, "numpy")
                                                else weight))
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class Pipeline:
    """See the module docstring. Build one with :func:`fit_pipeline`."""

    def __init__(self, *, backbone: str, weights: str, weights_fingerprint: str,
                 image_size: int, preprocessing: str, blocks: list[str],
                 all_blocks: list[str], detector: BaseDetector, threshold: Threshold,
                 training: dict, batch_size: int):
        self.backbone = backbone
        self.weights = weights
        self.weights_fingerprint = weights_fingerprint
        self.image_size = image_size
        self.preprocessing = preprocessing
        self.blocks = list(blocks)
        self.all_blocks = list(all_blocks)
        self.detector = detector
        self.threshold = threshold
        self.training = training
        self.batch_size = batch_size
        self.versions = library_versions()
        self._model = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_model"] = None  # the network is rebuilt from backbone and weights
        return state

    def describe(self) -> dict:
        """A JSON-able summary (stored in the artefact's manifest too)."""
        return {
            "backbone": self.backbone, "weights": self.weights,
            "weights_fingerprint": self.weights_fingerprint, "image_size": self.image_size,
            "preprocessing": self.preprocessing, "blocks": self.blocks,
            "detector": type(self.detector).__name__,
            "detector_params": {k: repr(v) for k, v in self.detector.get_params().items()},
            "threshold": {"value": self.threshold.value, "method": self.threshold.method,
                          **self.threshold.details},
            "training": {k: v for k, v in self.training.items() if k != "scores"},
            "versions": self.versions,
        }

    # -- scoring ------------------------------------------------------------------------
    def _plan(self):
        from .backbones import get_backbone
        from .features import ExtractionPlan
        from .preprocessing import get_preprocessing

        return ExtractionPlan(get_backbone(self.backbone), self.weights, self.image_size,
                              get_preprocessing(self.preprocessing), "", Path(), {})

    def network(self, weights: str | None = None):
        """The multi-output network, built once, checked against the fitted weights."""
        if self._model is None or weights is not None:
            from .backbones import get_backbone

            model, names = get_backbone(self.backbone).build_extractor(
                self.image_size, weights or self.weights)
            if names != self.all_blocks:
                raise KadError(f"backbone {self.backbone} now has blocks {names}, but the "
                               f"pipeline was fitted with {self.all_blocks}")
            found = weights_fingerprint(model)
            if found != self.weights_fingerprint:
                raise WeightsError(
                    f"the weights {weights or self.weights!r} are not those this pipeline was "
                    f"fitted with (fingerprint {found[:12]}, expected "
                    f"{self.weights_fingerprint[:12]}); pass the original weights file "
                    "with --weights"
                )
            self._model = model
        return self._model

    def score(self, source, ids: Sequence[str] | None = None,
              progress: ProgressCallback | None = None, weights: str | None = None) -> Scores:
        """Scores of every image of an :class:`~kad.datasets.ImageSource`, streamed."""
        from .features import stream_features

        model = self.network(weights)
        ids = np.asarray([str(i) for i in (ids if ids is not None else range(len(source)))])
        columns = [self.all_blocks.index(b) for b in self.blocks]
        scores = np.full(len(source), np.nan)
        failed: dict[str, str] = {}
        for start, outputs, bad in stream_features(model, source, ids, self._plan(),
                                                   self.batch_size):
            features = np.concatenate([outputs[c] for c in columns], axis=1)
            ok = ~np.isin(ids[start:start + len(features)], list(bad))
            if ok.any():
                batch = np.full(len(features), np.nan)
                batch[ok] = self.detector.anomaly_score(features[ok])
                scores[start:start + len(features)] = batch
            failed.update(bad)
            if progress:
                progress(start + len(features), len(source))
        return Scores(list(ids), scores, failed)

    def score_features(self, features: np.ndarray) -> np.ndarray:
        return self.detector.anomaly_score(features)

    def flag(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold.value

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Share (%) of training scores below each score."""
        train = np.sort(np.asarray(self.training["scores"]))
        return 100.0 * np.searchsorted(train, np.asarray(scores), side="left") / len(train)

    def save(self, path: str | Path) -> Path:
        return save_artifact(self, path, kind="pipeline", info=self.describe())


def load_pipeline(path: str | Path) -> Pipeline:
    obj = load_artifact(path, kind="pipeline")
    if not isinstance(obj, Pipeline):
        raise KadError(f"{path} holds a {type(obj).__name__}, not a kad pipeline")
    return obj


def threshold_at_sensitivity(normal_scores, anomaly_scores, sensitivity: float) -> Threshold:
    """The highest threshold that flags at least ``sensitivity`` of the labelled anomalies,
    with the specificity it buys on the labelled normals and Wilson 95% intervals."""
    from scipy.stats import binomtest

    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    normal = np.asarray(normal_scores, dtype=np.float64)
    anomalous = np.sort(np.asarray(anomaly_scores, dtype=np.float64))[::-1]
    if len(anomalous) == 0 or len(normal) == 0:
        raise KadError("setting a threshold at a sensitivity needs labelled normal and "
                       "anomalous images")
    k = int(np.ceil(sensitivity * len(anomalous)))
    value = float(np.nextafter(anomalous[k - 1], -np.inf))  # flag when score > value
    flagged = int((anomalous > value).sum())
    passed = int((normal <= value).sum())
    sens_ci = binomtest(flagged, len(anomalous)).proportion_ci(method="wilson")
    spec_ci = binomtest(passed, len(normal)).proportion_ci(method="wilson")
    return Threshold(value, "sensitivity", {
        "target_sensitivity": sensitivity,
        "sensitivity": flagged / len(anomalous),
        "sensitivity_ci95": [sens_ci.low, sens_ci.high],
        "specificity": passed / len(normal),
        "specificity_ci95": [spec_ci.low, spec_ci.high],
        "n_normal": len(normal), "n_anomalous": len(anomalous),
    })


def fit_pipeline(dataset, *, backbone: str = "inception_resnet_v2", weights: str = "imagenet",
                 image_size: int | Sequence[int] | str | None = None,
                 preprocessing: str | None = None, representation: str = "concat",
                 detector: str | BaseDetector | Sequence[str] = "knn",
                 train_rows: np.ndarray | None = None, labelled_rows: np.ndarray | None = None,
                 labels: np.ndarray | None = None, sensitivity: float | None = None,
                 batch_size: int = 64, cache_dir: str | Path | None = None,
                 progress: ProgressCallback | None = None, features=None) -> Pipeline:
    """Fit a pipeline on the normal images ``train_rows`` of ``dataset``.

    With labelled images (``labelled_rows`` and ``labels``, 1 = anomaly, none of them in
    ``train_rows``) and ``representation="picked"``, the (input size, block or
    concatenation, detector) with the best AUROC on them is picked among ``image_size``
    (one size or several, e.g. ``[224, 448]``) and ``detector`` (one spec or several) with
    :func:`kad.selection.select`; with one size and one detector this is the paper's
    Table 2 block pick (single blocks, then the concatenation). With ``sensitivity`` the
    threshold is set to reach it; otherwise it follows the detector's ``contamination``.

    Without labels there is nothing to choose with: one size and one detector are needed.
    The defaults are :data:`kad.selection.UNSUPERVISED_DEFAULT`'s, the best without labels
    in ``benchmarks/evidence.py``: kNN on the concatenation, and ``image_size=None`` means
    448 px for fundus photographs and the backbone's native size otherwise.
    """
    from .features import plan_extraction
    from .metrics import evaluate
    from .selection import (
        MultiSizeFeatures,
        candidate_grid,
        default_image_size,
        extract_sizes,
        fresh_detector,
        select,
    )

    image_size = default_image_size(dataset, image_size)
    specs = [detector] if isinstance(detector, (str, BaseDetector)) else list(detector)
    if not specs:
        raise KadError("no detector given: name one, e.g. knn")
    if isinstance(features, MultiSizeFeatures):
        multi = features
    elif features is not None:  # one FeatureSet, at the size it was extracted at
        multi = MultiSizeFeatures({int(features.meta["inputs"]["image_size"]): features})
    else:
        multi = extract_sizes(dataset, backbone, weights, image_size, preprocessing,
                              batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    usable = multi.valid
    if train_rows is None:
        train_rows = np.flatnonzero(usable & ~np.asarray(dataset.anomaly, dtype=bool)) if (
            dataset.anomaly is not None) else np.flatnonzero(usable)
    train_rows = np.asarray(train_rows)[usable[np.asarray(train_rows)]]
    if len(train_rows) < 2:
        raise KadError(f"fitting needs at least 2 readable normal images, got {len(train_rows)}")
    labelled = labelled_rows is not None and len(labelled_rows) > 0
    if labelled:
        labelled_rows = np.asarray(labelled_rows)
        labels = np.asarray(labels, dtype=int)
        keep = usable[labelled_rows]
        labelled_rows, labels = labelled_rows[keep], labels[keep]
        if set(np.unique(labels)) != {0, 1}:
            raise KadError("labelled images must include both normal (0) and anomalous (1) ones")
        if np.intersect1d(labelled_rows, train_rows).size:
            raise KadError("labelled validation images must not be among the training images")

    selection: dict = {"representation": representation}
    if representation == "picked":
        if not labelled:
            raise KadError("representation 'picked' needs labelled anomalies to pick a block "
                           "with")
        names = [str(d) if isinstance(d, str) else f"#{i}" for i, d in enumerate(specs)]
        prototypes = dict(zip(names, specs, strict=True))
        # a pipeline scores at one size: no concatenation across sizes
        grid = candidate_grid(multi, names, across_sizes=False)
        chosen = select(multi, grid, train_rows, labelled_rows, labels,
                        make_detector=lambda name, seed: fresh_detector(prototypes[name], seed))
        size = chosen.picked.sizes[0]
        blocks = [b for _, b in multi.resolve(chosen.picked.representation)]
        spec = prototypes[chosen.picked.detector]
        one = len(multi.sizes) == 1 and len(specs) == 1  # the paper's case: key by block
        selection.update(picked=chosen.picked.block, validation_auroc={
            (s.candidate.block if one else s.candidate.label): s.validation_auroc
            for s in chosen.scores})
        selection.update(picked_candidate=chosen.picked.to_json(),
                         picked_validation_auroc=chosen.validation_auroc,
                         candidates=[s.to_json() for s in chosen.scores],
                         failed=chosen.failed)
    else:
        if len(multi.sizes) > 1 or len(specs) > 1:
            raise KadError(
                f"{len(multi.sizes)} image sizes and {len(specs)} detectors given but nothing "
                "to choose with: pass labelled anomalies and representation 'picked', or one "
                "size and one detector")
        size, spec = multi.sizes[0], specs[0]
        blocks = multi.by_size[size].resolve(representation)
    det = fresh_detector(spec).fit(multi.by_size[size].matrix(blocks, train_rows))
    features = multi.by_size[size]
    plan = plan_extraction(dataset, backbone, weights, size,
                           features.meta["inputs"]["preprocessing"], cache_dir)
    train_scores = det.decision_scores_
    val_scores = det.anomaly_score(features.matrix(blocks, labelled_rows)) if labelled else None
    if labelled and sensitivity is not None:
        threshold = threshold_at_sensitivity(val_scores[labels == 0], val_scores[labels == 1],
                                             sensitivity)
    else:
        threshold = Threshold(det.threshold_, "contamination",
                              {"contamination": det.contamination})
    if labelled:
        threshold.details["validation"] = evaluate(labels, val_scores,
                                                   val_scores > threshold.value)
    model = plan.backbone.build_extractor(plan.input_size, weights)[0]
    pipeline = Pipeline(
        backbone=str(plan.backbone.spec), weights=str(weights),
        weights_fingerprint=weights_fingerprint(model), image_size=plan.input_size,
        preprocessing=plan.preprocessing.key, blocks=blocks, all_blocks=features.blocks,
        detector=det, threshold=threshold,
        training={"dataset": dataset.name, "fingerprint": dataset.fingerprint,
                  "n_images": int(len(train_rows)), "feature_cache": features.key,
                  "scores": np.sort(train_scores).tolist(), "selection": selection},
        batch_size=batch_size,
    )
    pipeline._model = model  # scoring right away needs no second build
    return pipeline
