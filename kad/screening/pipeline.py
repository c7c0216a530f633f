"""A fitted pipeline: preprocessing, backbone blocks, detector and threshold in one file.

:func:`fit_pipeline` fits a detector on cached features of normal images and records
everything needed to score new images: the backbone and its options, the weights as given
and a fingerprint of the weight tensors themselves, the input size, the preprocessing, the
blocks, the fitted detector, the threshold and how it was chosen, the training scores (for
percentiles), the training set's fingerprint and the library versions.

:meth:`Pipeline.score` streams images through the same code path as feature extraction, at
the same batch size, so an image gets bit-identical scores in this process or after
:func:`load_pipeline` in another. The file holds plain data only (see :mod:`kad.utils.artifact`):
loading it cannot run code. Loading refuses a file from another kad version, a corrupt
file, and (when the network is built) weights whose tensors differ from those the pipeline
was fitted with. A weights file is recorded by its absolute path; ``weights=`` (the
command line's ``--weights PATH``) overrides it when the file has moved.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kad.detectors.base import BaseDetector, decode_detector, encode_detector, uses_maps
from kad.errors import ArtifactError, KadError, WeightsError
from kad.features.extraction import Scores
from kad.screening.calibration import Threshold
from kad.utils.artifact import Encoder, library_versions, open_artifact, write_artifact

ProgressCallback = Callable[[int, int], None]


def weights_fingerprint(model) -> str:
    """SHA-256 over the network's weight tensors: the identity of what was loaded."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(np.asarray(weight.numpy() if hasattr(weight, "numpy")
                                                else weight))
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


#: Detectors that score locations get, by default, the deepest block whose map has a
#: stride of at most ``MAP_STRIDES[0]`` pixels and the deepest of stride at most
#: ``MAP_STRIDES[1]``: about 8 and 16, PatchCore's two layers.
MAP_STRIDES = (9, 18)


def stack_maps(maps: list[np.ndarray]) -> np.ndarray:
    """Block maps ``(n, h_b, w_b, c_b)`` as one ``(n, h, w, Σ c_b)`` array on the finest
    block's grid, coarser blocks resized bilinearly (as PatchCore aligns its layers)."""
    import cv2

    maps = [np.asarray(m, dtype=np.float32) for m in maps]
    h, w = max(m.shape[1] for m in maps), max(m.shape[2] for m in maps)
    out = []
    for m in maps:
        if m.shape[1:3] != (h, w):
            n, _, _, c = m.shape
            flat = m.transpose(1, 2, 0, 3).reshape(m.shape[1], m.shape[2], n * c)
            # OpenCV resizes at most 128 channels at once (CV_CN_MAX in OpenCV 5)
            parts = [cv2.resize(np.ascontiguousarray(flat[..., i:i + 128]), (w, h),
                                interpolation=cv2.INTER_LINEAR)
                     for i in range(0, n * c, 128)]
            up = np.concatenate([p.reshape(h, w, -1) for p in parts], axis=2)
            m = up.reshape(h, w, n, c).transpose(2, 0, 1, 3)
        out.append(m)
    return np.ascontiguousarray(np.concatenate(out, axis=3))


def default_map_blocks(model, blocks: list[str], image_size: int) -> list[str]:
    """The blocks a location-scoring detector uses by default: for each stride limit of
    :data:`MAP_STRIDES`, the deepest of ``blocks`` whose map's stride is within it (the
    first block where none is)."""
    from kad.features.backbones import map_shapes

    shapes = map_shapes(model, blocks)
    chosen = []
    for limit in MAP_STRIDES:
        fine = [b for b in blocks if image_size / shapes[b][0] <= limit]
        block = fine[-1] if fine else blocks[0]
        if block not in chosen:
            chosen.append(block)
    return chosen


def stream_maps(network, source, ids, plan, batch_size: int):
    """``(start, stacked maps, failed)`` batch by batch, as
    :func:`kad.features.extraction.stream_features` gives pooled features; ``network`` is a
    :func:`kad.features.backbones.map_extractor` model."""
    from kad.features.extraction import stream_features

    for start, outputs, failed in stream_features(network, source, ids, plan, batch_size):
        yield start, stack_maps(outputs), failed


class Pipeline:
    """See the module docstring. Build one with :func:`fit_pipeline`."""

    def __init__(self, *, backbone: str, weights: str, weights_fingerprint: str,
                 image_size: int, preprocessing: str, blocks: list[str],
                 all_blocks: list[str], detector: BaseDetector, threshold: Threshold,
                 training: dict, batch_size: int, calibration: dict | None = None,
                 assessment: dict | None = None,
                 runtime: str = "keras"):
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
        # scores of the held-aside calibration normals (conformal threshold, p-values) and
        # of the labelled images used for nothing but measuring (honest metrics)
        self.calibration = calibration
        self.assessment = assessment
        #: The runtime the training features were computed with; scoring uses it too.
        self.runtime = runtime
        self.versions = library_versions()
        self.source: Path | None = None  # the file it was loaded from
        self._model = None
        self._engine = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_model"] = None  # the network is rebuilt from backbone and weights
        state["_engine"] = None
        state.pop("_maps", None)
        return state

    def __setstate__(self, state):
        state.setdefault("runtime", "keras")  # pipelines saved before runtimes existed
        state.setdefault("_engine", None)
        self.__dict__.update(state)

    def describe(self) -> dict:
        """A JSON-able summary (stored in the artefact's manifest too)."""
        return {
            "backbone": self.backbone, "weights": self.weights,
            "weights_fingerprint": self.weights_fingerprint, "image_size": self.image_size,
            "preprocessing": self.preprocessing, "blocks": self.blocks,
            "runtime": self.runtime,
            "detector": type(self.detector).__name__,
            "detector_params": {k: repr(v) for k, v in self.detector.get_params().items()},
            "threshold": {"value": self.threshold.value, "method": self.threshold.method,
                          **self.threshold.details},
            "training": {k: v for k, v in self.training.items() if k != "scores"},
            "calibration": ({k: v for k, v in self.calibration.items() if k != "scores"}
                            if getattr(self, "calibration", None) else None),
            "assessment": self.assessed().as_dict() if self.assessed() else None,
            "versions": self.versions,
        }

    # -- scoring ------------------------------------------------------------------------
    def _plan(self):
        from kad.data.preprocessing import get_preprocessing
        from kad.features.backbones import get_backbone
        from kad.features.extraction import ExtractionPlan

        return ExtractionPlan(get_backbone(self.backbone), self.weights, self.image_size,
                              get_preprocessing(self.preprocessing), "", Path(), {})

    def network(self, weights: str | None = None):
        """The multi-output network, built once, checked against the fitted weights;
        ``weights`` (a file) replaces the recorded weights file."""
        if self._model is None or weights is not None:
            from kad.features.backbones import get_backbone

            if weights is None:
                self._check_recorded_weights()

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

    def _check_recorded_weights(self) -> None:
        if str(self.weights).lower() in ("imagenet", "none", "random"):
            return
        if not Path(self.weights).is_file():
            where = f"the model file {self.source}" if self.source else "the model"
            raise WeightsError(
                f"the weights file {self.weights}, whose path came from {where}, cannot be "
                "found; pass --weights PATH (weights=PATH) to use the file where it is now"
            )

    def engine(self, weights: str | None = None, runtime: str | None = None):
        """The runtime that scores: the one the pipeline was fitted with unless ``runtime``
        names another (``auto``, ``keras``, ``openvino``). The Keras network is built
        and its weights checked first; OpenVINO converts that checked network (or reuses
        its cached conversion)."""
        from kad.features.runtime import KerasRuntime, build_runtime, resolve_runtime

        choice = resolve_runtime(runtime or self.runtime).name
        cached = self._engine
        if cached is None or weights is not None or cached.name != choice:
            model = self.network(weights)
            if choice == "keras":
                cached = KerasRuntime(model, self.all_blocks)
            else:
                cached = build_runtime(self.backbone, self.image_size, weights or self.weights,
                                       choice, self.batch_size,
                                       keras_model=(model, self.all_blocks))
            self._engine = cached
        return cached

    def map_network(self, weights: str | None = None, runtime: str | None = None):
        """The Keras model that gives the unpooled maps of the pipeline's blocks, for a
        detector that scores locations (:func:`uses_maps`); such pipelines run on Keras."""
        from kad.features.backbones import map_extractor

        if runtime not in (None, "auto", "keras"):
            raise KadError(f"{type(self.detector).__name__} scores block maps, which kad "
                           f"computes with Keras only; drop --runtime {runtime}")
        model = self.network(weights)
        if getattr(self, "_maps", (None, None))[0] is not model:
            self._maps = (model, map_extractor(model, self.blocks))
        return self._maps[1]

    def score(self, source, ids: Sequence[str] | None = None,
              progress: ProgressCallback | None = None, weights: str | None = None,
              runtime: str | None = None) -> Scores:
        """Scores of every image of an :class:`~kad.data.datasets.ImageSource`, streamed, on the
        pipeline's runtime (or ``runtime``)."""
        from kad.features.extraction import stream_features

        ids = np.asarray([str(i) for i in (ids if ids is not None else range(len(source)))])
        scores = np.full(len(source), np.nan)
        failed: dict[str, str] = {}
        if uses_maps(self.detector):
            batches = stream_maps(self.map_network(weights, runtime), source, ids,
                                  self._plan(), self.batch_size)
        else:
            columns = [self.all_blocks.index(b) for b in self.blocks]
            batches = ((start, np.concatenate([outputs[c] for c in columns], axis=1), bad)
                       for start, outputs, bad in stream_features(
                           self.engine(weights, runtime), source, ids, self._plan(),
                           self.batch_size))
        for start, features, bad in batches:
            ok = ~np.isin(ids[start:start + len(features)], list(bad))
            if ok.any():
                batch = np.full(len(features), np.nan)
                batch[ok] = self.detector.anomaly_score(features[ok])
                scores[start:start + len(features)] = batch
            failed.update(bad)
            if progress:
                progress(start + len(features), len(source))
        return Scores(list(ids), scores, failed)

    def flag(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold.value

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Share (%) of training scores below each score."""
        train = np.sort(np.asarray(self.training["scores"]))
        return 100.0 * np.searchsorted(train, np.asarray(scores), side="left") / len(train)

    def p_values(self, scores: np.ndarray) -> np.ndarray | None:
        """Conformal p-value of each score against the calibration normals (None when the
        pipeline was fitted without a calibration set)."""
        from kad.screening.calibration import conformal_p_values

        calibration = getattr(self, "calibration", None)
        if not calibration or not calibration.get("scores"):
            return None
        return conformal_p_values(calibration["scores"], scores)

    def assessed(self):
        """Sensitivity and specificity at the current threshold on the held-out labelled
        images (a :class:`~kad.screening.calibration.Assessment`), or None without them."""
        from kad.screening.calibration import assess

        held = getattr(self, "assessment", None)
        if not held:
            return None
        return assess(held["scores"], held["labels"], self.threshold.value,
                      held["measured_on"], honest=True)

    def save(self, path: str | Path) -> Path:
        """Write the pipeline to one file of plain data (see :mod:`kad.utils.artifact`); raises
        :class:`~kad.errors.UnstorableError` naming the value when part of it cannot be
        stored that way."""
        encoder = Encoder(trusted=tuple(type(self.detector).trusted_types))
        fields = {name: getattr(self, name) for name in _FIELDS}
        fields["threshold"] = {"value": self.threshold.value, "method": self.threshold.method,
                               "details": self.threshold.details}
        tree = {"pipeline": encoder.encode(fields, "pipeline"),
                "detector": encode_detector(self.detector, encoder, "detector")}
        return write_artifact(path, "pipeline", tree, encoder.members, info=self.describe())


#: What a saved pipeline stores besides its detector.
_FIELDS = ("backbone", "weights", "weights_fingerprint", "image_size", "preprocessing",
           "blocks", "all_blocks", "threshold", "training", "batch_size", "versions",
           "calibration", "assessment", "runtime")


def load_pipeline(path: str | Path) -> Pipeline:
    """Read a pipeline written by :meth:`Pipeline.save`; nothing in the file can run code:
    it is JSON, NumPy arrays, scikit-learn objects of allowed types and Keras networks in
    safe mode (see :mod:`kad.utils.artifact`)."""
    artifact = open_artifact(path, kind="pipeline")
    tree = artifact.tree
    if not isinstance(tree, dict) or set(tree) != {"pipeline", "detector"}:
        raise ArtifactError(f"{path} is corrupt: it does not hold a pipeline and a detector")
    detector = decode_detector(artifact, tree["detector"], "detector")
    fields = artifact.decode(tree["pipeline"], "pipeline")
    if not isinstance(fields, dict) or set(fields) != set(_FIELDS):
        raise ArtifactError(f"{path} is corrupt: its pipeline record does not have the fields "
                            f"{', '.join(_FIELDS)}")
    try:
        threshold = Threshold(**fields.pop("threshold"))
        versions = fields.pop("versions")
        pipeline = Pipeline(**fields, detector=detector, threshold=threshold)
    except TypeError as exc:
        raise ArtifactError(f"{path} is corrupt: its pipeline record is malformed ({exc})") \
            from exc
    pipeline.versions = versions
    pipeline.source = Path(path)
    return pipeline


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


def recorded_weights(weights) -> str:
    """How a pipeline records ``weights``: ``"imagenet"``, ``"none"`` or the absolute path
    of a weights file, so that the model file works from any folder."""
    from kad.features.backbones import resolve_weights

    kind, value = resolve_weights(weights)
    return str(value) if kind == "path" else kind


def fit_pipeline(dataset, *, backbone: str = "inception_resnet_v2", weights: str = "imagenet",
                 image_size: int | None = None,
                 preprocessing: str | None = None, representation: str = "concat",
                 detector: str | BaseDetector = "knn",
                 train_rows: np.ndarray | None = None, labelled_rows: np.ndarray | None = None,
                 labels: np.ndarray | None = None, sensitivity: float | None = None,
                 batch_size: int = 64, cache_dir: str | Path | None = None,
                 progress: ProgressCallback | None = None, features=None,
                 split=None, calibration_rows: np.ndarray | None = None,
                 assessment_rows: np.ndarray | None = None,
                 assessment_labels: np.ndarray | None = None,
                 fpr: float | None = None, keep_all_blocks: bool = True,
                 out: str | Path | None = None, runtime: str = "auto") -> Pipeline:
    """Fit a pipeline on the normal images ``train_rows`` of ``dataset``.

    The defaults are the best without labels in ``benchmarks/evidence.py``
    (:data:`kad.screening.selection.UNSUPERVISED_DEFAULT`): kNN on the concatenation of every block,
    and ``image_size=None`` means 448 px for fundus photographs and the backbone's native
    size otherwise.

    With labelled images (``labelled_rows`` and ``labels``, 1 = anomaly, none of them in
    ``train_rows``), the block with the best AUROC on them is picked (as in the paper's
    Table 2, :func:`kad.screening.selection.pick_block`) when ``representation`` is ``"picked"``,
    and, with ``sensitivity``, the threshold is set to reach it on them.

    ``calibration_rows`` (normal images used for nothing else) give the conformal p-values
    and, with ``fpr`` (or by default when no sensitivity is asked), a threshold that flags a
    healthy image with probability at most ``fpr`` (:mod:`kad.screening.calibration`). Without them
    the threshold follows the detector's ``contamination``. ``assessment_rows`` and
    ``assessment_labels`` are scored and kept to measure sensitivity and specificity at the
    threshold on images used for nothing else (:meth:`Pipeline.assessed`).

    ``split`` (a :class:`kad.screening.calibration.FitSplit` from
    :func:`kad.screening.calibration.plan_fit_split`) fills all the row arguments at once.

    With ``keep_all_blocks=False`` the feature cache entry then keeps only the pipeline's
    blocks (:func:`kad.features.cache.prune_entry`; ``pipeline.training["pruned"]`` says what was
    freed), so a screening programme does not store every block of every image.

    ``out``, the file the pipeline will be saved to, and the cache folder are checked for
    writability before any work starts (:func:`kad.features.cache.check_writable`).
    """

    from sklearn.base import clone

    from kad.features.extract import extract_features, plan_extraction
    from kad.registry import get_detector
    from kad.screening.calibration import DEFAULT_FPR, conformal_threshold
    from kad.screening.selection import default_image_size, pick_block
    from kad.utils.metrics import evaluate

    image_size = default_image_size(dataset, image_size)
    if split is not None:
        train_rows, calibration_rows = split.train, split.calibration
        labelled_rows, labels = split.selection, split.selection_labels
        assessment_rows, assessment_labels = split.assessment, split.assessment_labels
    if fpr is not None and sensitivity is not None:
        raise KadError("set the threshold either by a false-positive rate or by a "
                       "sensitivity, not both")
    plan = plan_extraction(dataset, backbone, weights, image_size, preprocessing, cache_dir,
                           runtime)
    if out is not None:
        from kad.features.cache import check_writable

        check_writable(out, is_file=True, what="--out file")
    if features is None:
        from kad.features.cache import check_writable

        check_writable(plan.path.parent, what="feature cache folder")
        features = extract_features(dataset, plan.backbone, weights, image_size, preprocessing,
                                    batch_size=batch_size, cache_dir=cache_dir,
                                    progress=progress, runtime=runtime)
    usable = features.valid
    unreadable: dict[str, int] = {}

    def readable(rows, name, extra=None):
        rows = np.asarray(rows, dtype=int)
        keep = usable[rows]
        if not keep.all():
            unreadable[name] = int((~keep).sum())
        return (rows[keep], None if extra is None else np.asarray(extra, dtype=int)[keep])

    if train_rows is None:
        train_rows = np.flatnonzero(usable & ~np.asarray(dataset.anomaly, dtype=bool)) if (
            dataset.anomaly is not None) else np.flatnonzero(usable)
    train_rows, _ = readable(train_rows, "train")
    if len(train_rows) < 2:
        raise KadError(f"fitting needs at least 2 readable normal images, got {len(train_rows)}")
    prototype = get_detector(detector) if isinstance(detector, str) else detector
    labelled = labelled_rows is not None and len(labelled_rows) > 0
    if labelled:
        labelled_rows, labels = readable(labelled_rows, "selection", labels)
        if set(np.unique(labels)) != {0, 1}:
            raise KadError("labelled images must include both normal (0) and anomalous (1) ones")
    has_calibration = calibration_rows is not None and len(calibration_rows) > 0
    if has_calibration:
        calibration_rows, _ = readable(calibration_rows, "calibration")
    assessing = assessment_rows is not None and len(assessment_rows) > 0
    if assessing:
        assessment_rows, assessment_labels = readable(assessment_rows, "assessment",
                                                      assessment_labels)
    parts = {"train": train_rows, "selection": labelled_rows if labelled else [],
             "calibration": calibration_rows if has_calibration else [],
             "assessment": assessment_rows if assessing else []}
    names = list(parts)
    for a, first in enumerate(names):
        for second in names[a + 1:]:
            if np.intersect1d(parts[first], parts[second]).size:
                raise KadError(f"the {first} and {second} images overlap; every image may "
                               "serve one purpose only (use "
                               "kad.screening.calibration.plan_fit_split)")

    model, network_blocks = plan.backbone.build_extractor(plan.input_size, weights)
    matrix = features.matrix
    if uses_maps(prototype):
        # A detector that scores locations gets the blocks' unpooled maps, computed here
        # for the rows it needs (the feature cache holds pooled vectors only).
        from kad.features.backbones import map_extractor, map_shapes

        # Its default block (rather than one picked on labelled images, which would take a
        # pass over them per block) unless blocks are named.
        if representation in ("concat", "picked"):
            map_blocks = default_map_blocks(model, network_blocks, plan.input_size)
        else:
            map_blocks = [b.strip() for b in representation.split(",") if b.strip()]
            unknown = [b for b in map_blocks if b not in network_blocks]
            if unknown or not map_blocks:
                raise KadError(f"no block {', '.join(unknown) or repr(representation)} in "
                               f"{plan.backbone.spec}; its blocks are "
                               f"{', '.join(network_blocks)}")
        network = map_extractor(model, map_blocks)
        if "block_channels" in prototype.get_params():  # where each block's channels are
            shapes = map_shapes(model, map_blocks)
            prototype = clone(prototype).set_params(
                block_channels=tuple(shapes[b][2] for b in map_blocks))

        # the selection's matrix(blocks, rows); maps hold every block
        def matrix(blocks, rows):  # noqa: ARG001
            rows = np.asarray(rows, dtype=int)
            ids = np.asarray(dataset.ids, dtype=str)[rows]
            parts = []
            for start, maps, _ in stream_maps(network, dataset.source.take(rows), ids, plan,
                                              batch_size):
                parts.append(maps)
                if progress:  # the maps pass counts again from 0, over these rows
                    progress(start + len(maps), len(rows))
            return np.concatenate(parts) if parts else np.zeros((0, 1, 1, 1), np.float32)

        representation = ",".join(map_blocks)

    def fitted_on(blocks):
        return clone(prototype).fit(matrix(blocks, train_rows))

    selection: dict = {"representation": representation}
    if labelled and representation == "picked":
        choice = pick_block(features, train_rows, labelled_rows, labels, prototype)
        blocks = [choice.block]
        det = choice.detectors[choice.block]
        selection.update(picked=choice.block, validation_auroc=choice.validation_auroc)
    elif representation == "picked":
        raise KadError("representation 'picked' needs labelled anomalies to pick a block with")
    else:
        blocks = features.resolve(representation)
        det = fitted_on(blocks)
    train_scores = det.anomaly_scores_
    val_scores = det.anomaly_score(matrix(blocks, labelled_rows)) if labelled else None
    cal_scores = (np.sort(det.anomaly_score(matrix(blocks, calibration_rows)))
                  if has_calibration else None)
    if fpr is not None:
        if not has_calibration:
            raise KadError("a threshold by false-positive rate needs calibration images "
                           "(normal images kept aside: --calibration)")
        threshold = conformal_threshold(cal_scores, fpr)
    elif labelled and sensitivity is not None:
        threshold = threshold_at_sensitivity(val_scores[labels == 0], val_scores[labels == 1],
                                             sensitivity)
    elif has_calibration:
        threshold = conformal_threshold(cal_scores, DEFAULT_FPR)
    else:
        threshold = Threshold(det.threshold_, "contamination",
                              {"contamination": det.contamination})
    if labelled:
        threshold.details["validation"] = evaluate(labels, val_scores,
                                                   val_scores > threshold.value)
    patients = (np.asarray(dataset.patient, dtype=str) if dataset.patient is not None
                else None)

    def who(rows):
        n = len(rows)
        return (f"{n} images of {len(np.unique(patients[rows]))} patients"
                if patients is not None else f"{n} images")

    calibration = None
    if has_calibration:
        calibration = {"scores": cal_scores.tolist(), "n": int(len(cal_scores)),
                       "measured_on": f"{who(calibration_rows)}: normal images kept aside, "
                                      "used neither to fit nor to pick the block"}
    assessment = None
    if assessing:
        assessment_labels = np.asarray(assessment_labels, dtype=int)
        assessment = {
            "scores": det.anomaly_score(matrix(blocks, assessment_rows)).tolist(),
            "labels": assessment_labels.tolist(),
            "measured_on": (f"{who(assessment_rows)} ({int((assessment_labels == 0).sum())} "
                            f"normal, {int(assessment_labels.sum())} abnormal) held out of "
                            "fitting, calibration, block picking and threshold setting"),
        }
    training = {"dataset": dataset.name, "fingerprint": dataset.fingerprint,
                "n_images": int(len(train_rows)), "feature_cache": features.key,
                "scores": np.sort(train_scores).tolist(), "selection": selection,
                "rows": {k: int(len(v)) for k, v in parts.items()}}
    if unreadable:
        training["unreadable_left_out"] = unreadable
    if split is not None:
        training["split"] = split.describe()
    pipeline = Pipeline(
        backbone=str(plan.backbone.spec), weights=recorded_weights(weights),
        weights_fingerprint=weights_fingerprint(model), image_size=plan.input_size,
        preprocessing=plan.preprocessing.key, blocks=blocks, all_blocks=features.blocks,
        detector=det, threshold=threshold, training=training, batch_size=batch_size,
        calibration=calibration, assessment=assessment,
        runtime=("keras" if uses_maps(det)
                 else features.meta["inputs"].get("runtime", "keras")),
    )
    pipeline._model = model  # scoring right away needs no second build
    if not keep_all_blocks:
        from kad.features.cache import prune_entry

        pruned = prune_entry(features.path, blocks)
        pipeline.training["pruned"] = {"removed_blocks": len(pruned.removed),
                                       "freed_bytes": pruned.freed_bytes}
    return pipeline
