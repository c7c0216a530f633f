"""A fitted pipeline: preprocessing, backbone blocks, detector and threshold in one file.

:func:`kad.screening.fitting.fit_pipeline` fits a detector on normal images and records
here everything needed to score new images: the backbone and its options, the weights as given
and a fingerprint of the weight tensors themselves, the input size, the preprocessing, the
blocks, the fitted detector, the threshold and how it was chosen, the training scores (for
percentiles), the training set's fingerprint and the library versions.

:meth:`Pipeline.score` streams images through the same code path as feature extraction, at
the same batch size (:attr:`Pipeline.network_batch`), so an image gets bit-identical scores
in this process or after :func:`load_pipeline` in another. The file holds plain data only
(see :mod:`kad.utils.artifact`): loading it cannot run code. Loading refuses a file of a
format or detector state version this kad does not read (:mod:`kad.utils.artifact`,
*Versions*), a corrupt file, and (when the network is built) weights whose tensors differ
from those the pipeline was fitted with. A weights file is recorded by its absolute path;
``weights=`` (the command line's ``--weights PATH``) overrides it when the file has moved.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kad.detectors.base import BaseDetector, decode_detector, encode_detector
from kad.errors import ArtifactError, KadError, WeightsError
from kad.features.extraction import Scores
from kad.features.representation import Representation, from_record
from kad.screening.thresholds import Threshold
from kad.utils.artifact import Encoder, library_versions, open_artifact, write_artifact
from kad.utils.progress import Progress, task
from kad.utils.settings import SettingError, check_pipeline_record


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
    """See the module docstring. Build one with
    :func:`kad.screening.fitting.fit_pipeline`.

    ``representation`` (:mod:`kad.features.representation`) is what the detector receives:
    its blocks, their layout, and how the network's outputs become the detector's input.
    ``all_blocks`` are the network's blocks, checked when it is built again."""

    def __init__(self, *, backbone: str, weights: str, weights_fingerprint: str,
                 image_size: int, preprocessing: str, representation: Representation,
                 all_blocks: list[str], detector: BaseDetector, threshold: Threshold,
                 training: dict, batch_size: int, calibration: dict | None = None,
                 assessment: dict | None = None, runtime: str = "keras",
                 quantization: dict | None = None):
        self.backbone = backbone
        self.weights = weights
        self.weights_fingerprint = weights_fingerprint
        self.image_size = image_size
        self.preprocessing = preprocessing
        self.representation = representation
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
        #: The int8 network's record (:meth:`kad.features.int8.Quantization.record`) when
        #: the pipeline was fitted on int8 features; None for float32. Scoring uses it too.
        self.quantization = quantization
        self.versions = library_versions()
        #: The revision of the preprocessing's numbers it was fitted with (a file written
        #: by an older kad lacks it: see :func:`_preprocessing_as_fitted`).
        self.versions["preprocessing_revision"] = str(_revision(preprocessing))
        self.source: Path | None = None  # the file it was loaded from
        self._model = None
        self._runners: dict = {}
        self.weights_used = weights
        #: The network of an export folder (:mod:`kad.features.exported`) when the pipeline
        #: was read from one: it then runs on that OpenVINO IR and builds no Keras network.
        self.exported = None
        #: The lesion maps model: a second pipeline, fitted on the same images, whose maps
        #: ``--heatmaps`` draws (its detector's own, at its own input size) while this one
        #: gives every score; None where the heatmaps come from this pipeline.
        self.maps: Pipeline | None = None
        #: Whether this pipeline is another's :attr:`maps`, stored in that one's file.
        self.is_maps = False

    def __getstate__(self):  # Ray ships pipelines to its actors: without the network
        state = dict(self.__dict__)
        state["_model"] = None  # rebuilt from backbone and weights
        state["_runners"] = {}
        return state

    @property
    def precision(self) -> str:
        """``int8`` when the pipeline was fitted (and scores) on the int8 network, else
        ``float32``."""
        return "float32" if self.quantization is None else "int8"

    @property
    def blocks(self) -> list[str]:
        """The blocks the detector sees, in order."""
        return self.representation.names

    def describe(self) -> dict:
        """A JSON-able summary (stored in the artefact's manifest too)."""
        return {
            "backbone": self.backbone, "weights": self.weights,
            "weights_fingerprint": self.weights_fingerprint, "image_size": self.image_size,
            "preprocessing": self.preprocessing, "blocks": self.blocks,
            "representation": self.representation.name,
            "runtime": self.runtime, "precision": self.precision,
            **({"int8": self.quantization} if self.quantization is not None else {}),
            **({"exported": str(self.exported.folder)} if self.exported is not None else {}),
            **({"maps": self.maps.describe_maps()} if self.maps is not None else {}),
            "detector": type(self.detector).__name__,
            "detector_params": {k: repr(v) for k, v in self.detector.get_params().items()},
            "threshold": {"value": self.threshold.value, "method": self.threshold.method,
                          **self.threshold.details},
            "training": {k: v for k, v in self.training.items() if k != "scores"},
            "calibration": _calibration_info(self.calibration),
            "assessment": self.assessed().as_dict() if self.assessed() else None,
            "versions": self.versions,
        }

    def attach_maps(self, maps: Pipeline | None) -> None:
        """Make ``maps`` this pipeline's lesion maps model (:attr:`maps`; None removes it)."""
        if maps is not None:
            if maps.maps is not None or maps is self:
                raise KadError("a lesion maps model cannot have a maps model of its own")
            maps.is_maps = True
        self.maps = maps

    def drawer(self, method: str = "auto") -> Pipeline:
        """The pipeline whose maps heatmaps by ``method`` show: the lesion maps model
        (:attr:`maps`) for ``auto`` where there is one, else this pipeline itself. The
        scores stay this pipeline's either way."""
        return self.maps if method == "auto" and self.maps is not None else self

    def describe_maps(self) -> dict:
        """What a lesion maps model is, in a few plain values (its file's manifest and the
        report show them)."""
        return {"detector": type(self.detector).__name__,
                "detector_params": {k: repr(v) for k, v in self.detector.get_params().items()},
                "image_size": self.image_size, "preprocessing": self.preprocessing,
                "blocks": self.blocks, "n_images": int(self.training["n_images"])}

    # -- scoring ------------------------------------------------------------------------
    @property
    def has_network(self) -> bool:
        """Whether the Keras network can be built (:meth:`network`); an exported model
        (:mod:`kad.features.exported`) holds its network as OpenVINO IR only."""
        return self.exported is None

    def input_scaling(self):
        """What maps images in [0, 1] to the network's input (its ``preprocess``): the
        backbone plugin, or an exported model's scaling."""
        from kad.features.backbones import get_backbone

        if self.exported is not None:
            return self.exported.scaling
        return get_backbone(self.backbone)

    @property
    def network_batch(self) -> int:
        """Images per network call: the recorded batch size, lowered to what the memory
        budget holds at the input size (:func:`kad.features.batching.network_batch`)."""
        from kad.features.backbones import get_backbone
        from kad.features.batching import network_batch

        return network_batch(get_backbone(self.backbone), self.image_size, self.batch_size)

    @property
    def _eight_bit(self) -> bool:
        """Whether the preprocessing gives 8-bit images (scored as such on OpenVINO)."""
        from kad.data.preprocessing import get_preprocessing

        return get_preprocessing(self.preprocessing).eight_bit

    def _plan(self):
        from kad.data.preprocessing import get_preprocessing
        from kad.features.extraction import ExtractionPlan

        return ExtractionPlan(self.input_scaling(), self.weights, self.image_size,
                              get_preprocessing(self.preprocessing), "", Path(), {})

    def network(self, weights: str | None = None):
        """The multi-output network, built once, checked against the fitted weights;
        ``weights`` (a file) replaces the recorded weights file."""
        if self.exported is not None:
            raise KadError(f"{self.source} is an exported model: it holds its network as "
                           "OpenVINO IR, not as a Keras network; use the model file it was "
                           "exported from (and TensorFlow) for this")
        if self._model is None or weights is not None:
            from kad.features.backbones import get_backbone

            if weights is None:
                weights = self._recorded_weights()

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
            self._runners = {}
            #: The weights the network was built from: the recorded ones, or where they are.
            self.weights_used = weights or self.weights
        return self._model

    def _recorded_weights(self) -> str | None:
        """The recorded weights file where it is, or the file of the same name beside the
        model file (a model shipped with its weights); None for ``imagenet`` and ``none``.
        Either way the tensors are checked against the fingerprint before use."""
        if str(self.weights).lower() in ("imagenet", "none", "random"):
            return None
        recorded = Path(self.weights)
        if recorded.is_file():
            return None
        beside = self.source.parent / recorded.name if self.source else None
        if beside is not None and beside.is_file():
            return str(beside)
        where = f"the model file {self.source}" if self.source else "the model"
        looked = f" nor beside it ({beside})" if beside is not None else ""
        raise WeightsError(
            f"the weights file {self.weights}, whose path came from {where}, cannot be "
            f"found{looked}; pass --weights PATH (weights=PATH) to use the file where it is "
            "now, or put it beside the model file"
        )

    def runner(self, weights: str | None = None, runtime: str | None = None):
        """The representation's network on a runtime: the one the pipeline was fitted with
        unless ``runtime`` names another (``auto``, ``keras``, ``openvino``). The Keras
        network is built and its weights checked first; OpenVINO converts that checked
        network (or reuses its cached conversion, :func:`kad.features.runtime.model_runtime`).
        A pipeline fitted on int8 features runs on its int8 network, on OpenVINO, only: it
        is found in the cache (:mod:`kad.features.int8`), never replaced by a float one."""
        from kad.features.runtime import model_runtime, resolve_runtime

        if self.exported is not None:
            return self._exported_runner(weights, runtime)
        quantization = None
        if self.quantization is not None:
            from kad.features.int8 import Quantization

            if runtime not in (None, "auto", "openvino"):
                raise KadError(f"{self.source or 'this model'} was fitted on int8 features, "
                               f"which run on OpenVINO only, not on runtime {runtime!r}; drop "
                               "--runtime or use openvino")
            runtime = "openvino"
            quantization = Quantization.from_record(self.quantization)
        choice = resolve_runtime(runtime or self.runtime).name
        if weights is not None or choice not in self._runners:
            model = self.network(weights)
            self._runners[choice] = model_runtime(
                self.representation.network(model, self.all_blocks), self.backbone,
                self.image_size, self.weights_used, choice, self.network_batch,
                extractor=model, quantization=quantization, pixels=self._eight_bit)
        return self._runners[choice]

    def _exported_runner(self, weights: str | None, runtime: str | None):
        if weights is not None:
            raise KadError(f"{self.source} is an exported model: it holds its network and "
                           "its weights, so --weights does not apply; drop it")
        if runtime not in (None, "auto", "openvino"):
            raise KadError(f"{self.source} is an exported model: it runs on OpenVINO only, "
                           f"not on runtime {runtime!r}; drop --runtime or use openvino")
        if "openvino" not in self._runners:
            self._runners["openvino"] = self.exported.runtime(
                self.network_batch, pixels=self._eight_bit,
                int8=self.quantization is not None)
        return self._runners["openvino"]

    def score(self, source, ids: Sequence[str] | None = None,
              progress: Progress | None = None, weights: str | None = None,
              runtime: str | None = None) -> Scores:
        """Scores of every image of an :class:`~kad.data.datasets.ImageSource`, streamed, on the
        pipeline's runtime (or ``runtime``); ``progress`` gets the task ``scoring``."""
        from kad.features.extraction import stream_features

        ids = np.asarray([str(i) for i in (ids if ids is not None else range(len(source)))])
        scores = np.full(len(source), np.nan)
        failed: dict[str, str] = {}
        runner = self.runner(weights, runtime)
        with task(progress, "scoring", len(source)) as update:
            for start, outputs, bad in stream_features(runner, source, ids, self._plan(),
                                                       self.network_batch):
                inputs = self.representation.assemble(outputs)
                ok = ~np.isin(ids[start:start + len(inputs)], list(bad))
                if ok.any():
                    batch = np.full(len(inputs), np.nan)
                    batch[ok] = self.detector.anomaly_score(inputs[ok])
                    scores[start:start + len(inputs)] = batch
                failed.update(bad)
                update(start + len(inputs))
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

        calibration = self.calibration
        if not calibration or not calibration.get("scores"):
            return None
        return conformal_p_values(calibration["scores"], scores)

    def assessed(self):
        """Sensitivity and specificity at the current threshold on the held-out labelled
        images (a :class:`~kad.screening.calibration.Assessment`), or None without them."""
        from kad.screening.calibration import assess

        held = self.assessment
        if not held:
            return None
        return assess(held["scores"], held["labels"], self.threshold.value,
                      held["measured_on"], honest=True)

    def save(self, path: str | Path, *, with_maps: bool = True) -> Path:
        """Write the pipeline to one file of plain data (see :mod:`kad.utils.artifact`); raises
        :class:`~kad.errors.UnstorableError` naming the value when part of it cannot be
        stored that way. ``with_maps=False`` leaves its lesion maps model (:attr:`maps`)
        out."""
        if self.exported is not None:
            raise KadError(f"{self.source} is an exported model and is not written back: "
                           "change the model file it was exported from (kad threshold "
                           f"MODEL ...) and export it again, not {path}")
        if self.is_maps:
            raise KadError("a lesion maps model is saved with the model it draws maps for")
        maps = self.maps if with_maps else None
        fitted = [self] if maps is None else [self, maps]
        encoder = Encoder(trusted=tuple(t for p in fitted
                                        for t in type(p.detector).trusted_types))
        tree = self._encode(encoder, "")
        if maps is not None:
            tree[MAPS] = maps._encode(encoder, f"{MAPS}.")
        return write_artifact(path, "pipeline", tree, encoder.members, info=self.describe())

    def _encode(self, encoder: Encoder, prefix: str) -> dict:
        """The ``pipeline`` and ``detector`` records of this pipeline (the members of
        ``encoder`` named from ``prefix``)."""
        fields = {name: getattr(self, name) for name in _FIELDS}
        if self.quantization is not None:  # absent for float32: files older kad reads
            fields["quantization"] = dict(self.quantization)
        fields["representation"] = self.representation.to_record()
        fields["threshold"] = {"value": self.threshold.value, "method": self.threshold.method,
                               "details": self.threshold.details}
        return {"pipeline": encoder.encode(fields, f"{prefix}pipeline"),
                "detector": encode_detector(self.detector, encoder, f"{prefix}detector")}


def _calibration_info(calibration: dict | None) -> dict | None:
    """The calibration record without its scores, and of its heatmaps
    (:mod:`kad.screening.heatmap_scale`) what they are, without their arrays."""
    if not calibration:
        return None
    info = {k: v for k, v in calibration.items() if k not in ("scores", "heatmaps")}
    heatmaps = calibration.get("heatmaps")
    if heatmaps is not None:
        info["heatmaps"] = {k: v for k, v in heatmaps.items()
                            if not isinstance(v, np.ndarray)}
    return info


#: What a saved pipeline stores besides its detector.
_FIELDS = ("backbone", "weights", "weights_fingerprint", "image_size", "preprocessing",
           "representation", "all_blocks", "threshold", "training", "batch_size", "versions",
           "calibration", "assessment", "runtime")
#: Stored only when set: ``quantization``, for a pipeline fitted on int8 features (a kad
#: that does not know it refuses such a file instead of scoring it with a float network).
_OPTIONAL_FIELDS = ("quantization",)
#: The key of a model file's lesion maps model (:attr:`Pipeline.maps`), beside its
#: ``pipeline`` and ``detector``: absent where there is none (files older kad wrote).
MAPS = "maps"


def load_pipeline(path: str | Path) -> Pipeline:
    """Read a pipeline written by :meth:`Pipeline.save`; nothing in the file can run code:
    it is JSON, NumPy arrays, scikit-learn objects of allowed types and Keras networks in
    safe mode (see :mod:`kad.utils.artifact`). A folder written by ``kad export``
    (:func:`kad.screening.export.export_pipeline`) is checked file by file
    (:func:`kad.features.exported.read_export`) and scores with OpenVINO alone."""
    if Path(path).is_dir():
        return _load_export(Path(path))
    artifact = open_artifact(path, kind="pipeline")
    tree = artifact.tree
    if not isinstance(tree, dict) or not (
            {"pipeline", "detector"} <= set(tree) <= {"pipeline", "detector", MAPS}):
        raise ArtifactError(f"{path} is corrupt: it does not hold a pipeline and a detector")
    pipeline = _decode(artifact, tree, path, "")
    if MAPS in tree:
        maps = tree[MAPS]
        if not isinstance(maps, dict) or set(maps) != {"pipeline", "detector"}:
            raise ArtifactError(f"{path} is corrupt: its lesion maps model does not hold a "
                                "pipeline and a detector")
        pipeline.attach_maps(_decode(artifact, maps, path, f"{MAPS}."))
    return pipeline


def _decode(artifact, tree: dict, path, prefix: str) -> Pipeline:
    """The pipeline of a :meth:`Pipeline._encode` record."""
    detector = decode_detector(artifact, tree["detector"], f"{prefix}detector")
    fields = artifact.decode(tree["pipeline"], f"{prefix}pipeline")
    what = "its lesion maps model's" if prefix else "its"
    if not isinstance(fields, dict) or not (
            set(_FIELDS) <= set(fields) <= set(_FIELDS) | set(_OPTIONAL_FIELDS)):
        raise ArtifactError(f"{path} is corrupt: {what} pipeline record does not have the "
                            f"fields {', '.join(_FIELDS)}")
    try:
        check_pipeline_record(fields)
    except SettingError as exc:
        raise ArtifactError(f"{path} is damaged: {what} setting {exc}; refit the model, or "
                            "set a new threshold with kad threshold") from exc
    try:
        threshold = Threshold(**fields.pop("threshold"))
        versions = fields.pop("versions")
        if not isinstance(versions, dict):
            raise TypeError("its versions are not a mapping")
        fields["preprocessing"] = _preprocessing_as_fitted(fields["preprocessing"], versions,
                                                           path)
        fields["representation"] = from_record(fields["representation"])
        pipeline = Pipeline(**fields, detector=detector, threshold=threshold)
    except (TypeError, KadError) as exc:
        raise ArtifactError(f"{path} is corrupt: {what} pipeline record is malformed "
                            f"({exc})") from exc
    pipeline.versions = versions
    pipeline.source = Path(path)
    return pipeline


class PreprocessingRevisionWarning(UserWarning):
    """A model file was fitted with an earlier revision of its preprocessing's numbers than
    this kad computes, and cannot be scored exactly as fitted."""


def _revision(spec: str) -> int:
    from kad.data.preprocessing import get_preprocessing

    return int(get_preprocessing(spec).revision)


def _preprocessing_as_fitted(spec: str, versions: dict, path) -> str:
    """The preprocessing that scores a loaded model as it was fitted. A file without the
    revision in its ``versions`` was written before kad recorded it: its natural images
    were resized in float32 (``natural:resize=float``, revision 2). Where the recorded
    revision can no longer be computed (the fundus recipe before revision 4), the model
    scores with today's and a :class:`PreprocessingRevisionWarning` says so."""
    from kad.data.preprocessing import get_preprocessing

    recorded = versions.get("preprocessing_revision")
    prep = get_preprocessing(spec)
    if recorded is None and prep.name == "natural" and prep.eight_bit:
        fitted = get_preprocessing("natural:resize=float")
        versions["preprocessing_revision"] = str(fitted.revision)
        return fitted.key
    if recorded is None or str(recorded) != str(prep.revision):
        fitted = (f"revision {recorded}" if recorded is not None
                  else f"an earlier revision (kad {versions.get('kad', '?')})")
        warnings.warn(
            f"{path} was fitted with {fitted} of the {prep.name} preprocessing and this kad "
            f"computes revision {prep.revision}, whose features differ slightly, so its scores "
            "may move a little; refit with kad fit to score exactly as fitted",
            PreprocessingRevisionWarning, stacklevel=3)
    return spec


def _load_export(folder: Path) -> Pipeline:
    from kad.features.exported import read_export

    network = read_export(folder)
    pipeline = load_pipeline(network.pipeline_file)
    if network.input_size != pipeline.image_size:
        raise ArtifactError(f"the exported model {folder} is damaged: its network takes "
                            f"{network.input_size} px but its pipeline scores at "
                            f"{pipeline.image_size} px; export it again")
    pipeline.exported = network
    pipeline.source = folder
    return pipeline
