"""Where the network runs: Keras, or OpenVINO on a CPU.

The Keras multi-output model of :meth:`kad.features.backbones.Backbone.build_extractor` is the one
definition of every network. On a CPU, OpenVINO runs the same graph in 40 % (MobileNetV2)
to 89-98 % (the Inception networks, which Keras already runs near the processor's peak) of
Keras' CPU time (``benchmarks/README.md``), so kad converts the Keras model with
``openvino.convert_model``, keeps the converted model on disk and reuses it.

``runtime`` is one of :data:`RUNTIMES`:

``keras``
    ``model.predict_on_batch`` on the Keras model.
``openvino``
    The converted model, compiled for the CPU with the throughput hint and float32
    inference (OpenVINO otherwise picks bfloat16 on CPUs that have it, which changes the
    features by up to 25 % of their scale), fed with asynchronous inference requests so
    that every core is busy. Each request runs a fixed slice of the batch (the last one
    padded), so an image's features never depend on the images that came with it.
``auto``
    ``openvino`` when it is installed and no GPU is visible, else ``keras``. The GPU test
    does not import TensorFlow (it looks for the NVIDIA driver's devices and honours
    ``CUDA_VISIBLE_DEVICES``), so resolving ``auto`` stays cheap.

Converted models are cached under ``<cache root>/openvino/<backbone>-<key>/`` where the key
hashes the backbone and its options, the weights' identity, the input size and the
OpenVINO, Keras and kad versions. ``manifest.json`` records the SHA-256 of the weights
file: a damaged or incomplete entry is detected, reported and rebuilt, never used. Weights
are saved uncompressed (float32), never as float16.

int8 (:mod:`kad.features.int8`, opt-in) quantizes the float conversion with NNCF: the int8
extractor is cached under a key that adds the :class:`~kad.features.int8.Quantization`
(calibration images, their number, NNCF's version), and the network of a representation is
that int8 extractor with only the representation's pooled outputs, cached under a key that
holds those names too. Without calibration images (a model file being scored) an int8
network missing from the cache is refused, never made again from other images.

Both runtimes are objects with ``names`` (the block names, in network order) and
``predict(batch) -> list[np.ndarray]`` (one float32 ``(n, dim)`` array per block).

Any other Keras model built from the extractor (:func:`kad.features.backbones.map_extractor`,
:func:`~kad.features.backbones.spatial_extractor`, the pooled outputs of a few blocks) runs
on either runtime through :func:`model_runtime`: its outputs are named by what they are
(``pooled:BLOCK`` or ``map:BLOCK``, :func:`kad.features.backbones.extractor_outputs`), and its
conversion is cached and checked as the extractor's is, under a key that also holds those
names, so a model of maps never takes the place of the pooled one. Its ``predict`` gives one
float32 array per output, ``(n, h, w, c)`` for a map.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kad.errors import KadError, MissingDependencyError
from kad.utils.files import file_sha256, record_key

__all__ = [
    "RUNTIMES",
    "KerasRuntime",
    "OpenVINORuntime",
    "RuntimeChoice",
    "as_runtime",
    "build_runtime",
    "converted_files",
    "gpu_visible",
    "model_runtime",
    "openvino_available",
    "openvino_model_dir",
    "read_runtime",
    "resolve_runtime",
]

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "keras", "openvino")
_MANIFEST = "manifest.json"
_XML, _BIN = "model.xml", "model.bin"
_OV_FORMAT = 1
_OV_HINT = "pip install 'kad[tf]' (it brings openvino), or choose --runtime keras"


@dataclass(frozen=True)
class RuntimeChoice:
    """What ``runtime`` resolved to, and why: for logs and the command line."""

    requested: str
    name: str  # "keras" or "openvino"
    reason: str


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed (it is not imported)."""
    return importlib.util.find_spec("openvino") is not None


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible to this process, without importing TensorFlow."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        if gpus.is_dir() and any(gpus.iterdir()):
            return True
    except OSError:
        pass
    return Path("/dev/nvidia0").exists()


def resolve_runtime(runtime: str = "auto") -> RuntimeChoice:
    """``runtime`` (see :data:`RUNTIMES`) resolved to ``keras`` or ``openvino``.

    Raises :class:`~kad.errors.KadError` for an unknown name, and
    :class:`~kad.errors.MissingDependencyError` for ``openvino`` when it is not installed.
    """
    name = str(runtime or "auto").strip().lower()
    if name not in RUNTIMES:
        raise KadError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if name == "keras":
        return RuntimeChoice(name, "keras", "requested")
    if name == "openvino":
        if not openvino_available():
            raise MissingDependencyError(f"runtime 'openvino' needs OpenVINO; {_OV_HINT}")
        return RuntimeChoice(name, "openvino", "requested")
    if gpu_visible():
        return RuntimeChoice(name, "keras", "a GPU is visible")
    if not openvino_available():
        return RuntimeChoice(name, "keras", "OpenVINO is not installed")
    return RuntimeChoice(name, "openvino", "CPU only and OpenVINO is installed")


# ------------------------------------------------------------------------------ Keras


class KerasRuntime:
    """``model.predict_on_batch`` on the Keras multi-output model."""

    name = "keras"

    def __init__(self, model, names: list[str]):
        self.model = model
        self.names = list(names)
        self.dims = [int(out.shape[-1]) for out in model.outputs]

    def predict(self, batch: np.ndarray) -> list[np.ndarray]:
        result = self.model.predict_on_batch(batch)
        if not isinstance(result, (list, tuple)):  # a model with one output
            result = [result]
        return [np.asarray(o, dtype=np.float32) for o in result]

    def describe(self) -> str:
        return "keras"


# --------------------------------------------------------------------------- OpenVINO


class OpenVINORuntime:
    """A converted model compiled for the CPU, fed with asynchronous inference requests.

    ``predict`` splits the batch into slices of ``slice_size`` images (the last padded with
    zeros), runs them on ``requests`` parallel inference requests and joins the results.

    It takes the network's float32 input, or, where ``scaling`` (the backbone's
    :attr:`~kad.features.backbones.Backbone.input_scaling`) is known (``takes_pixels``),
    8-bit images (``uint8``, 0-255) that the compiled model converts and scales itself
    (OpenVINO's preprocessing, :func:`_with_pixel_input`): the loader then fills batches a
    quarter the size and no pass in Python scales them. Each kind of input has its own
    compiled model, compiled when first used (``pixels`` at construction: the 8-bit one
    first). The two agree to float rounding, not bit for bit: whatever compares features
    exactly feeds the same kind (the loader gives 8-bit batches wherever the runtime takes
    them, for extraction and scoring alike).
    """

    name = "openvino"

    def __init__(self, core, model, names: list[str], slice_size: int, requests: int,
                 model_dir: Path | None = None, scaling: tuple[float, float] | None = None,
                 config: dict | None = None, pixels: bool = False,
                 precision: str = "float32"):
        self._core, self._model, self._config = core, model, dict(config or {})
        self.scaling = None if scaling is None else tuple(float(v) for v in scaling)
        self.names = list(names)
        self.slice_size = int(slice_size)
        self.requests = int(requests)
        self.model_dir = model_dir
        self.precision = precision
        self._variants: dict[bool, tuple] = {}
        self._results: dict[int, list[np.ndarray]] = {}
        first = self._variant(bool(pixels and self.takes_pixels))
        self.dims = [int(o.get_partial_shape()[-1].get_length()) for o in first[1]]

    @property
    def takes_pixels(self) -> bool:
        """Whether ``predict`` also takes 8-bit images and scales them in the network."""
        return self.scaling is not None

    @property
    def compiled(self):
        """The compiled model of the kind compiled first."""
        return next(iter(self._variants.values()))[0]

    def _variant(self, pixels: bool):
        """``(compiled model, outputs, request queue)`` for 8-bit or float32 input."""
        found = self._variants.get(pixels)
        if found is None:
            import openvino as ov

            model = self._model.clone()
            if pixels:
                model = _with_pixel_input(model, self.scaling)
            compiled = self._core.compile_model(model, "CPU", self._config)
            outputs = [compiled.output(_output_name(n)) for n in self.names]
            queue = ov.AsyncInferQueue(compiled, self.requests)

            def done(request, index: int) -> None:
                # The request's buffers are reused by the next job: copy what it produced.
                self._results[index] = [np.array(request.get_tensor(o).data) for o in outputs]

            queue.set_callback(done)
            found = self._variants[pixels] = (compiled, outputs, queue)
        return found

    def predict(self, batch: np.ndarray) -> list[np.ndarray]:
        pixels = np.asarray(batch).dtype == np.uint8
        if pixels and not self.takes_pixels:
            raise KadError("this OpenVINO network does not know its input scaling, so it "
                           "takes the network's float32 input, not 8-bit images")
        dtype = np.uint8 if pixels else np.float32
        queue = self._variant(pixels)[2]
        batch = np.ascontiguousarray(batch, dtype=dtype)
        n, step = len(batch), self.slice_size
        self._results.clear()
        starts = range(0, n, step)
        for index, start in enumerate(starts):
            part = batch[start:start + step]
            if len(part) < step:
                part = np.concatenate([part, np.zeros((step - len(part), *part.shape[1:]),
                                                      dtype)])
            queue.start_async({0: part}, index)
        queue.wait_all()
        joined = [np.concatenate([self._results[i][b] for i in range(len(starts))])[:n]
                  for b in range(len(self.names))]
        self._results.clear()
        return joined

    def describe(self) -> str:
        scaling = "; 8-bit images scaled in the network" if self.takes_pixels else ""
        return (f"openvino (CPU, {self.precision}, {self.requests} requests of "
                f"{self.slice_size} images{scaling})")


def as_runtime(model) -> KerasRuntime | OpenVINORuntime:
    """``model`` as a runtime: a Keras model (it has ``predict_on_batch``) is wrapped in a
    :class:`KerasRuntime`; anything else with ``predict(batch)`` is taken as a runtime."""
    if hasattr(model, "predict_on_batch"):
        return KerasRuntime(model, [f"output_{i}" for i in range(len(model.outputs))])
    return model


def _output_name(block: str) -> str:
    return f"kad_block:{block}"


def openvino_model_dir(backbone, input_size: int, weights, cache_dir: str | Path | None = None,
                       outputs: list[str] | None = None, quantization=None) -> Path:
    """Where the OpenVINO conversion of ``backbone`` at ``input_size`` with ``weights`` is
    cached (see the module docstring for what the key holds): of the extractor itself, or,
    with ``outputs`` (:func:`kad.features.backbones.extractor_outputs`), of the model made from
    it that has those outputs; with ``quantization`` (a
    :class:`~kad.features.int8.Quantization`), of its int8 network."""
    from importlib.metadata import PackageNotFoundError, version

    from kad import __version__
    from kad.features.backbones import weights_identity
    from kad.features.cache import _safe, cache_root

    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "absent"

    inputs = {
        "format": _OV_FORMAT, "backbone": str(backbone.spec),
        "weights": weights_identity(weights), "input_size": int(input_size),
        "openvino": installed("openvino"), "keras": installed("keras"), "kad": __version__,
    }
    if outputs is not None:
        inputs["outputs"] = [str(o) for o in outputs]
    if quantization is not None:
        inputs["int8"] = quantization.record()
    key = record_key(inputs)
    root = Path(cache_dir) if cache_dir else cache_root()
    return root / "openvino" / f"{_safe(backbone.name)}-{key}"


def _read_cached(folder: Path, core):
    """``(model, names)`` from a complete, intact cache folder, else None (and why, logged)."""
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        names = list(manifest["names"])
        expected = manifest["sha256"]
        found = {f: file_sha256(folder / f) for f in (_XML, _BIN)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("OpenVINO model cache %s is unreadable (%s); converting again", folder, exc)
        return None
    if found != expected:
        bad = ", ".join(f for f in (_XML, _BIN) if found.get(f) != expected.get(f))
        log.warning("OpenVINO model cache %s is damaged (%s does not match its checksum); "
                    "converting again", folder, bad)
        return None
    return core.read_model(str(folder / _XML)), names


#: Folders this process converted into, by key: another cache folder asking for the same
#: key (a second cache root) copies the verified files instead of converting again.
_CONVERTED: dict[str, Path] = {}


def _copy_converted(folder: Path, core):
    """``(model, names)`` copied from a folder this process converted the same key into."""
    source = _CONVERTED.get(folder.name)
    if source is None or source == folder:
        return None
    found = _read_cached(source, core)
    if found is None:
        return None
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in (_XML, _BIN, _MANIFEST):
            shutil.copyfile(source / name, partial / name)
        _replace(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return _read_cached(folder, core)


def _replace(partial: Path, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)


def _convert(backbone, input_size: int, weights, folder: Path, core, keras_model=None):
    """Build the Keras model (unless ``keras_model``, ``(model, output names)``, is given),
    convert it, name its outputs, save it."""
    import openvino as ov

    model, names = keras_model or backbone.build_extractor(input_size, weights)
    converted = ov.convert_model(model)
    by_tensor = {tensor.name: block for tensor, block in zip(model.outputs, names, strict=True)}
    for output in converted.outputs:
        found = {by_tensor[n] for n in output.get_names() if n in by_tensor}
        if len(found) != 1:
            raise KadError(
                f"OpenVINO's conversion of backbone {backbone.spec} has an output "
                f"{sorted(output.get_names())} that matches no block; use --runtime keras"
            )
        found = sorted(found)
        output.get_tensor().set_names({_output_name(found[0])})
    return _save(converted, names, backbone, input_size, folder, core)


def _save(model, names: list[str], backbone, input_size: int, folder: Path, core,
          extra: dict | None = None):
    """Write ``model`` (its outputs named for ``names``) and its manifest into ``folder``,
    aside then renamed; ``(model read back, names)``."""
    import openvino as ov

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        ov.save_model(model, str(partial / _XML), compress_to_fp16=False)
        manifest = {"names": names, "backbone": str(backbone.spec), "input_size": input_size,
                    "openvino": ov.__version__, **(extra or {}),
                    "sha256": {f: file_sha256(partial / f) for f in (_XML, _BIN)}}
        (partial / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        _replace(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _CONVERTED[folder.name] = folder
    return core.read_model(str(folder / _XML)), names


def _found(folder: Path, core):
    """``(model, names)`` cached in ``folder`` (or copied from where this process wrote the
    same key), else None."""
    return _read_cached(folder, core) or _copy_converted(folder, core)


def _quantized_extractor(bb, input_size: int, weights, quantization, cache_dir, core,
                         keras_model, log_line):
    """``(model, block names)``: the int8 extractor of ``quantization``, from the cache, or
    quantized from the float conversion (itself cached) when the calibration images are at
    hand; otherwise refused."""
    from kad.features.int8 import quantize

    folder = openvino_model_dir(bb, input_size, weights, cache_dir, quantization=quantization)
    found = _found(folder, core)
    if found is not None:
        return found
    if not quantization.can_calibrate:
        raise KadError(
            f"the int8 network this model was fitted with (calibration {quantization.key}) "
            f"is not in the cache ({folder}); it is made from the training images when the "
            "model is fitted: score on the machine and cache it was fitted with, or export "
            "it there (kad export) and score the export")
    float_dir = openvino_model_dir(bb, input_size, weights, cache_dir)
    model, names = _found(float_dir, core) or _convert(bb, input_size, weights, float_dir,
                                                       core, keras_model)
    if log_line:
        log_line(f"quantizing {bb.spec} @{input_size}px to int8 on {quantization.images} "
                 f"training images, cached at {folder}")
    quantized = quantize(model, quantization)
    return _save(quantized, names, bb, input_size, folder, core,
                 {"int8": quantization.record()})


def _check_pooled(blocks: list[str], outputs: list[str]) -> None:
    for output in outputs:
        kind, _, block = output.partition(":")
        if kind != "pooled" or block not in blocks:
            raise KadError(f"precision int8 gives the blocks' pooled features only, not "
                           f"{output!r}; drop --precision int8 for this detector")


def _select(full, blocks: list[str], outputs: list[str], name: str):
    """The int8 extractor ``full`` (outputs named for ``blocks``) with only ``outputs``
    (``pooled:BLOCK`` names), named for them: one quantized graph for every representation."""
    import openvino as ov

    _check_pooled(blocks, outputs)
    chosen = [full.output(_output_name(o.partition(":")[2])) for o in outputs]
    model = ov.Model(chosen, full.get_parameters(), name)
    for result, output in zip(model.outputs, outputs, strict=True):
        result.get_tensor().set_names({_output_name(output)})
    return model


def build_runtime(backbone, input_size: int, weights, runtime: str = "auto",
                  batch_size: int = 64, cache_dir: str | Path | None = None,
                  log_line: Callable[[str], None] | None = None, keras_model=None,
                  quantization=None, pixels: bool = False):
    """The network of ``backbone`` at ``input_size`` with ``weights`` on ``runtime``.

    Returns a :class:`KerasRuntime` or an :class:`OpenVINORuntime` (see the module
    docstring). ``batch_size`` is the batch the caller will pass to ``predict``; OpenVINO
    splits it into equal slices, one per inference request. ``log_line`` receives one line
    saying what runs where, and when a model is converted. ``keras_model``: an already
    built ``(model, block names)`` of the same backbone, input size and weights, used
    instead of building one again. ``quantization`` (a
    :class:`~kad.features.int8.Quantization`): the int8 network it names, on OpenVINO.
    On OpenVINO, where the backbone's scaling is a scale and an offset
    (:attr:`~kad.features.backbones.Backbone.input_scaling`), a float32 runtime also takes
    8-bit images and scales them in the network (:class:`OpenVINORuntime`; the converted
    model on disk is unchanged); ``pixels`` compiles that kind first.
    """
    from kad.features.backbones import Backbone, get_backbone

    bb = backbone if isinstance(backbone, Backbone) else get_backbone(backbone)
    choice = resolve_runtime("openvino" if quantization is not None else runtime)
    if choice.name == "keras":
        model, names = keras_model or bb.build_extractor(input_size, weights)
        return KerasRuntime(model, names)
    folder = openvino_model_dir(bb, input_size, weights, cache_dir, quantization=quantization)
    return _openvino_runtime(bb, input_size, weights, folder, keras_model, batch_size,
                             log_line, choice, quantization,
                             scaling=bb.input_scaling, pixels=pixels)


def model_runtime(model, backbone, input_size: int, weights, runtime: str = "auto",
                  batch_size: int = 64, cache_dir: str | Path | None = None,
                  log_line: Callable[[str], None] | None = None, extractor=None,
                  quantization=None, pixels: bool = False):
    """``model``, a Keras model made from the extractor of ``backbone`` at ``input_size``
    with ``weights`` (a :func:`~kad.features.backbones.map_extractor`, a
    :func:`~kad.features.backbones.spatial_extractor`, the pooled outputs of some blocks, or
    the extractor itself), on ``runtime``: a :class:`KerasRuntime` or an
    :class:`OpenVINORuntime` whose ``names`` are the outputs of
    :func:`~kad.features.backbones.extractor_outputs`. OpenVINO converts ``model`` once and
    keeps the conversion under a key that holds those names (see the module docstring);
    the weights are those of ``model``, already built and checked by the caller.
    ``extractor``: the extractor ``model`` was made from, where ``model`` has only maps.
    ``quantization`` (a :class:`~kad.features.int8.Quantization`): the int8 extractor with
    ``model``'s outputs, which must all be pooled ones, on OpenVINO. ``pixels`` as for
    :func:`build_runtime`."""
    from kad.features.backbones import Backbone, extractor_outputs, get_backbone

    bb = backbone if isinstance(backbone, Backbone) else get_backbone(backbone)
    names = extractor_outputs(model, extractor)
    choice = resolve_runtime("openvino" if quantization is not None else runtime)
    if choice.name == "keras":
        return KerasRuntime(model, names)
    folder = openvino_model_dir(bb, input_size, weights, cache_dir, outputs=names,
                                quantization=quantization)
    if quantization is not None:  # the extractor's blocks, for the int8 extractor
        source = extractor if extractor is not None else model
        blocks = [n.partition(":")[2] for n in extractor_outputs(source)]
        model = (source, blocks)
        _check_pooled(blocks, names)
    else:
        model = (model, names)
    return _openvino_runtime(bb, input_size, weights, folder, model, batch_size,
                             log_line, choice, quantization, names,
                             scaling=bb.input_scaling, pixels=pixels)


def _openvino_runtime(bb, input_size: int, weights, folder: Path, keras_model,
                      batch_size: int, log_line, choice: RuntimeChoice, quantization=None,
                      outputs: list[str] | None = None,
                      scaling: tuple[float, float] | None = None,
                      pixels: bool = False) -> OpenVINORuntime:
    """The conversion cached in ``folder`` (made from ``keras_model``, or from the
    extractor, when missing or damaged), compiled for the CPU. With ``quantization``,
    ``keras_model`` is the extractor and its block names, and the int8 network is that
    of the extractor (``outputs`` None) or the int8 extractor with ``outputs``."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingDependencyError(f"runtime 'openvino' could not import OpenVINO ({exc}); "
                                     f"{_OV_HINT}") from exc
    core = ov.Core()
    found = _found(folder, core)
    if found is None and quantization is not None:
        full, blocks = _quantized_extractor(bb, input_size, weights, quantization,
                                            folder.parent.parent, core, keras_model, log_line)
        found = (full, blocks) if outputs is None else _save(
            _select(full, blocks, outputs, folder.name), outputs, bb, input_size, folder,
            core, {"int8": quantization.record()})
    if found is None:
        if log_line:
            log_line(f"converting {bb.spec} @{input_size}px to OpenVINO, cached at {folder}")
        found = _convert(bb, input_size, weights, folder, core, keras_model)
    model, names = found
    # An int8 network keeps its float32 input (its inputs were calibrated as such).
    result = _compiled(core, model, names, input_size, batch_size, folder,
                       scaling if quantization is None else None, pixels,
                       "float32" if quantization is None else "int8")
    if log_line:
        log_line(f"runtime: {result.describe()} ({choice.reason})")
    return result


def _compiled(core, model, names: list[str], input_size: int, batch_size: int,
              folder: Path | None, scaling: tuple[float, float] | None = None,
              pixels: bool = False, precision: str = "float32") -> OpenVINORuntime:
    """``model`` (read by ``core``) compiled for the CPU in float32 with the throughput
    hint, its batch split into one equal slice per inference request. ``scaling``:
    ``(scale, offset)`` of images in [0, 1] (:attr:`Backbone.input_scaling`), with which
    it also takes 8-bit images (compiled first with ``pixels``)."""
    config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"}
    probe = core.compile_model(model, "CPU", config)
    requests = max(1, min(int(probe.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")),
                          int(batch_size)))
    del probe
    slice_size = math.ceil(int(batch_size) / requests)
    requests = math.ceil(int(batch_size) / slice_size)
    model.reshape({model.inputs[0]: [slice_size, input_size, input_size, 3]})
    return OpenVINORuntime(core, model, names, slice_size, requests, folder, scaling, config,
                           pixels, precision)


def _with_pixel_input(model, scaling: tuple[float, float]):
    """``model`` taking ``uint8`` images on the 0-255 scale: OpenVINO's preprocessing
    converts them to float32 and maps them to ``scale * x / 255 + offset``, inside the
    compiled model (the loader then fills batches a quarter the size, and no pass over
    them scales in Python)."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    scale, offset = (float(v) for v in scaling)
    divisor = 255.0 / scale  # scale * x / 255 + offset == (x - mean) / divisor
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8)
    ppp.input().preprocess().convert_element_type(ov.Type.f32).mean(-offset * divisor) \
        .scale(divisor)
    return ppp.build()


def converted_files(runtime: OpenVINORuntime) -> dict[str, tuple[Path, str]]:
    """The files of the conversion ``runtime`` was compiled from, checked against their
    checksums: ``{"xml": (path, sha256), "bin": (path, sha256)}``. Raises
    :class:`~kad.errors.KadError` when the runtime has no cached conversion or it no longer
    matches (removed or changed since)."""
    folder = runtime.model_dir
    if folder is None:
        raise KadError("this OpenVINO runtime was not compiled from a cached conversion")
    try:
        expected = json.loads((folder / _MANIFEST).read_text())["sha256"]
        found = {f: file_sha256(folder / f) for f in (_XML, _BIN)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KadError(f"the OpenVINO conversion in {folder} cannot be read ({exc}); run the "
                       "command again to convert it again") from exc
    if found != expected:
        raise KadError(f"the OpenVINO conversion in {folder} changed while kad used it; run "
                       "the command again")
    return {"xml": (folder / _XML, found[_XML]), "bin": (folder / _BIN, found[_BIN])}


def read_runtime(xml: str | Path, names: list[str], input_size: int,
                 batch_size: int = 64, scaling: tuple[float, float] | None = None,
                 pixels: bool = False) -> OpenVINORuntime:
    """The OpenVINO model saved at ``xml`` (its weights in the ``.bin`` file of the same
    name), whose outputs are named for ``names`` as :func:`model_runtime` names them,
    compiled as every OpenVINO runtime is. Needs OpenVINO alone: no Keras, no TensorFlow.
    The caller checks the files first (an exported model does,
    :mod:`kad.screening.export`). ``scaling`` and ``pixels``: see :class:`OpenVINORuntime`."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingDependencyError(f"an exported model runs on OpenVINO, which could not be "
                                     f"imported ({exc}); pip install 'kad[openvino]'") from exc
    core = ov.Core()
    model = core.read_model(str(xml))
    return _compiled(core, model, list(names), int(input_size), int(batch_size),
                     Path(xml).parent, scaling, pixels)
