"""Pretrained networks whose every block is a feature extractor.

A backbone is a :class:`Backbone` subclass registered under the ``kad.backbones`` entry-point
group (kad's own ``inception_resnet_v2``, ``inception_v3``, ``mobilenet_v2`` and the generic
``keras`` door to any ``keras.applications`` model are registered that way too). It is named
everywhere with one spelling, ``NAME[:key=value,...]``, e.g. ``mobilenet_v2:alpha=0.35``.

:meth:`Backbone.build_extractor` wraps the network into one multi-output Keras model that
returns, for every block in network order, the block output averaged over space. Pooling
happens inside the graph, so only vectors leave the accelerator.

Weights are ``"imagenet"`` (the standard Keras download and cache), ``"none"`` (random,
seeded, for tests) or a path to a local weights file. Missing ImageNet weights never fall
back silently to random ones: :class:`~kad.errors.WeightsError` says which file is needed
and where to put it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kad.errors import KadError, WeightsError
from kad.registry import BACKBONE, create, status
from kad.utils.deps import import_keras
from kad.utils.files import file_sha256
from kad.utils.specs import Spec, parse_spec

DEFAULT_BACKBONE = "inception_resnet_v2"
WEIGHTS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications"


class Backbone:
    """Base class of backbone plugins.

    Subclasses set ``default_size`` (the native input size), ``min_size``, and implement
    :meth:`application` (build the headless ``keras.applications`` model),
    :meth:`preprocess_input` and :meth:`block_outputs`; :meth:`imagenet_file` names the
    standard Keras weight file where ImageNet weights exist.
    """

    name: ClassVar[str] = ""
    default_size: ClassVar[int] = 224
    min_size: ClassVar[int] = 32
    #: Allowed options and their defaults, e.g. ``{"alpha": 1.0}``.
    options: ClassVar[dict[str, Any]] = {}
    #: Elements of the network's largest layer output for one image, per input pixel
    #: (activations grow with the input's area): what bounds the images per network call
    #: (:mod:`kad.features.batching`). kad's backbones state their own; this default fits
    #: every ``keras.applications`` network (VGG's first blocks keep 64 channels at the
    #: full resolution), so an unknown network errs towards smaller batches.
    peak_elements_per_pixel: ClassVar[float] = 64.0

    def __init__(self, **options: Any):
        unknown = set(options) - set(self.options)
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise KadError(
                f"unknown option(s) {', '.join(sorted(unknown))} for backbone "
                f"{self.name or type(self).__name__!r}; "
                f"allowed: {allowed}"
            )
        self.config = {**self.options, **options}

    # -- what plugins implement -------------------------------------------------------
    def application(self, input_shape: tuple[int, int, int], weights: str | None):
        """The headless Keras model (``include_top=False``) for ``input_shape``."""
        raise NotImplementedError

    def preprocess_input(self, x: np.ndarray) -> np.ndarray:
        """Map pixels in [0, 255] (RGB, float32) to the network's input range."""
        raise NotImplementedError

    def block_outputs(self, model) -> list[tuple[str, Any]]:
        """``(name, tensor)`` for every block, in network order."""
        raise NotImplementedError

    # the Backbone hook's signature
    def imagenet_file(self, input_size: int) -> tuple[str, str | None] | None:  # noqa: ARG002
        """``(file name, where to download it or None)`` of the standard ImageNet weights, or
        None where the network has none. Where: a sub-folder of Keras' own weights
        (``WEIGHTS_BASE_URL``) or the URL of another folder."""
        return None

    # -- shared machinery -------------------------------------------------------------
    @property
    def spec(self) -> Spec:
        changed = {k: v for k, v in self.config.items() if self.options.get(k) != v}
        return Spec(self.name, changed)

    def __repr__(self) -> str:
        return f"<backbone {self.spec}>"

    def input_size(self, image_size: int | None) -> int:
        size = self.default_size if image_size is None else int(image_size)
        if size < self.min_size:
            raise KadError(
                f"image size {size} is too small for backbone {self.spec}: the minimum is "
                f"{self.min_size} px"
            )
        return size

    #: ``(scale, offset)`` where the network's input is ``scale * x + offset`` of kad's
    #: images ``x`` in [0, 1], the same for every channel (Inception and MobileNet:
    #: ``(2, -1)``, which is ``x * 255 / 127.5 - 1``). Images are then scaled as they are
    #: written into the batch, in place; None: :meth:`preprocess_input` is applied.
    input_scaling: ClassVar[tuple[float, float] | None] = None

    def preprocess(self, x01: np.ndarray) -> np.ndarray:
        """From images in [0, 1] (kad's preprocessing output) to the network's input."""
        x01 = np.asarray(x01, dtype=np.float32)
        if self.input_scaling is None:
            return self.preprocess_input(x01 * 255.0)
        return self.preprocess_into(x01, np.empty_like(x01))

    def preprocess_into(self, x01: np.ndarray, out: np.ndarray) -> np.ndarray:
        """:meth:`preprocess` of ``x01`` written into ``out`` (``float32``, the same shape;
        it may be ``x01`` itself); returns ``out``. With :attr:`input_scaling` no
        temporary array is made."""
        if self.input_scaling is None:
            out[...] = self.preprocess(x01)
            return out
        scale, offset = self.input_scaling
        np.multiply(x01, np.float32(scale), out=out)
        np.add(out, np.float32(offset), out=out)
        return out

    def build_base(self, input_size: int | None = None, weights: str | Path | None = "imagenet"):
        """The headless network with ``weights`` loaded (see the module docstring)."""
        keras = import_keras()
        size = self.input_size(input_size)
        shape = (size, size, 3)
        kind, value = resolve_weights(weights)
        if kind == "none":
            keras.utils.set_random_seed(0)  # random weights, but the same ones every time
            return self.application(shape, None)
        if kind == "path":
            try:
                return self.application(shape, str(value))
            except (ValueError, OSError, KeyError) as exc:
                raise WeightsError(
                    f"weights file {value} does not fit backbone {self.spec} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); check that "
                    "the file was saved for this network and its options (e.g. alpha)"
                ) from exc
        return self._build_imagenet(shape)

    def _build_imagenet(self, shape):
        found = self.imagenet_file(shape[0])
        if found is None:
            raise WeightsError(
                f"backbone {self.spec} has no standard ImageNet weights; pass --weights PATH "
                "or --weights none"
            )
        filename, subdir = found
        cached = keras_cache_dir() / filename
        if subdir:
            folder = subdir if "://" in subdir else f"{WEIGHTS_BASE_URL}/{subdir}"
            source = f"Download {folder}/{filename}"
        else:
            source = "Put them"
        try:
            return self.application(shape, "imagenet")
        except WeightsError:
            raise
        except Exception as exc:  # the Keras download raises a bare Exception offline
            if cached.exists() and "URL fetch failure" not in str(exc):
                raise
            raise WeightsError(
                f"ImageNet weights for backbone {self.spec} are not available: {filename} is "
                f"not in the Keras cache ({cached.parent}) and could not be downloaded "
                f"({str(exc).splitlines()[0][:200]}). {source} into {cached.parent}/, or pass "
                "--weights PATH to a local copy of that file"
            ) from exc

    def build_extractor(self, input_size: int | None = None,
                        weights: str | Path | None = "imagenet"):
        """``(model, block_names)``: one Keras model returning the spatial average of every
        block, as a list in network order."""
        keras = import_keras()
        base = self.build_base(input_size, weights)
        taps = self.block_outputs(base)
        names = [name for name, _ in taps]
        if len(set(names)) != len(names):
            raise KadError(f"backbone {self.spec} taps duplicate block names: {names}")
        outputs = [
            keras.layers.GlobalAveragePooling2D(name=f"kad_gap_{name}")(tensor)
            for name, tensor in taps
        ]
        model = keras.Model(base.inputs, outputs, name=f"kad_{self.name}_blocks")
        return model, names


def _pooling(model, block: str):
    """The spatial-average layer of ``block`` in a model of
    :meth:`Backbone.build_extractor`: its input is the block's map, its output the pooled
    vector."""
    try:
        return model.get_layer(f"kad_gap_{block}")
    except ValueError as exc:
        raise KadError(f"the extractor has no block {block!r}") from exc


def spatial_extractor(model, blocks: list[str]):
    """From a model of :meth:`Backbone.build_extractor`, one that returns, for each of
    ``blocks`` in order, the pooled vector ``(n, c)`` and then the block's unpooled map
    ``(n, h, w, c)``: ``[pooled_1, map_1, pooled_2, map_2, ...]``.

    It shares the extractor's layers and weights (nothing is loaded again) and keeps the
    pooling inside the graph, so the pooled outputs are those the pipeline scores, and
    the maps are the tensors they are the spatial mean of.
    """
    keras = import_keras()
    outputs = []
    for name in blocks:
        gap = _pooling(model, name)
        outputs += [gap.output, gap.input]
    return keras.Model(model.inputs, outputs, name=f"{model.name}_maps")


def map_extractor(model, blocks: list[str]):
    """From a model of :meth:`Backbone.build_extractor`, one that returns only the unpooled
    maps ``(n, h, w, c)`` of ``blocks``, in order (for detectors that score locations)."""
    keras = import_keras()
    return keras.Model(model.inputs, [_pooling(model, b).input for b in blocks],
                       name=f"{model.name}_block_maps")


def extractor_outputs(model, extractor=None) -> list[str]:
    """What each output of ``model``, made from ``extractor`` (a :meth:`Backbone.build_extractor`
    model; default ``model`` itself, enough unless ``model`` has no pooled output), is:
    ``pooled:BLOCK`` (the block's spatial average) or ``map:BLOCK`` (its unpooled map), in
    output order. Raises :class:`~kad.errors.KadError` for an output that is neither."""
    known: dict[int, str] = {}
    for layer in (extractor if extractor is not None else model).layers:
        if layer.name.startswith("kad_gap_"):
            block = layer.name[len("kad_gap_"):]
            known[id(layer.output)] = f"pooled:{block}"
            known[id(layer.input)] = f"map:{block}"
    missing = [t.name for t in model.outputs if id(t) not in known]
    if missing:
        raise KadError(f"model {model.name} has outputs {missing} that are no block's map or "
                       "spatial average")
    return [known[id(t)] for t in model.outputs]


def map_shapes(model, blocks: list[str]) -> dict[str, tuple[int, int, int]]:
    """The shape ``(h, w, c)`` of each block's map in a model of
    :meth:`Backbone.build_extractor`."""
    return {b: tuple(int(v) for v in _pooling(model, b).input.shape[1:]) for b in blocks}


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights (``$KERAS_HOME/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def resolve_weights(weights: str | Path | None) -> tuple[str, str | Path | None]:
    """``("imagenet", None)``, ``("none", None)`` or ``("path", Path)``."""
    if weights is None or str(weights).lower() in ("none", "random"):
        return "none", None
    if str(weights).lower() == "imagenet":
        return "imagenet", None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights {str(weights)!r} is neither 'imagenet', 'none' nor an existing file"
        )
    return "path", path.resolve()


@lru_cache(maxsize=32)
# size and mtime key the cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:  # noqa: ARG001
    return file_sha256(path)


def weights_identity(weights: str | Path | None) -> str:
    """A stable identity of ``weights`` for cache keys and saved pipelines: the SHA-256 of
    a local file (so renaming it does not matter), ``imagenet`` or ``none``."""
    kind, value = resolve_weights(weights)
    if kind != "path":
        return kind
    stat = Path(value).stat()
    return "sha256:" + _file_digest(str(value), stat.st_size, stat.st_mtime_ns)


def get_backbone(spec: str | Spec = DEFAULT_BACKBONE) -> Backbone:
    """The backbone plugin named by ``NAME[:key=value,...]``, with its options applied."""
    parsed = parse_spec(spec, BACKBONE.what)
    instance = create(BACKBONE, parsed)
    instance.name = parsed.name
    return instance


def list_backbones():
    """Every backbone plugin with its distribution and whether it loads."""
    return status(BACKBONE)
