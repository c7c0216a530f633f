"""The settings a fitted pipeline records, with each one's type and range: one schema for
the model file and the command line.

:func:`kad.screening.pipeline.load_pipeline` checks every setting of a loaded record here,
and the command line's options take their bounds from the same constants, so that a value
the command line refuses (a batch size of -5, a NaN threshold) is refused in a model file
too, in one line naming the file, the setting, the value and what is allowed.
"""

from __future__ import annotations

import math
import re
from typing import Any

from kad.errors import KadError

#: Images per batch.
MIN_BATCH_SIZE, MAX_BATCH_SIZE = 1, 4096
#: The memory a network call's images may take, in bytes, by default (activations and
#: inputs; ``$KAD_BATCH_MEMORY`` sets another): a batch is lowered to fit it
#: (:func:`kad.features.batching.network_batch`).
BATCH_MEMORY = 1 << 30
#: Network input side in px (a backbone has its own minimum, checked when it is built).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096
#: Fundus photographs go through the network at this size by default
#: (:func:`kad.features.extraction.default_input_size`): the best without labels in
#: ``benchmarks/evidence.py`` (MobileNetV2-0.35, ImageNet, Kaggle DR grade 0 vs 4): kNN
#: gains 4.3 AUROC points at 448 px over 224 px.
FUNDUS_INPUT_SIZE = 448
#: Scores kept in a record (training, calibration, assessment).
MAX_SCORES = 10_000_000
RUNTIMES = ("auto", "keras", "openvino")
THRESHOLD_METHODS = ("conformal", "sensitivity", "contamination")
#: How heatmaps are made (:mod:`kad.screening.heatmaps`), ``auto`` resolved.
HEATMAP_METHODS = ("gradient", "occlusion", "detector")
_SPEC = re.compile(r"^[A-Za-z0-9_.\-]+(:.{0,500})?$")
_TEXT = 4096


class SettingError(KadError, ValueError):
    """A setting outside its type or range."""


def _fail(name: str, value: Any, allowed: str) -> SettingError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return SettingError(f"{name} is {shown}; it must be {allowed}")


def integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(name, value, f"an integer in [{low}, {high}]")
    return value


def number(name: str, value: Any, low: float = -math.inf, high: float = math.inf,
           open_low: bool = False, open_high: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value)
          and (value > low if open_low else value >= low)
          and (value < high if open_high else value <= high))
    if not ok:
        bounds = (f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
                  if math.isfinite(low) or math.isfinite(high) else "")
        raise _fail(name, value, f"a finite number{' in ' + bounds if bounds else ''}")
    return float(value)


def text(name: str, value: Any, pattern: re.Pattern | None = None,
         allowed: str = "a string") -> str:
    if not isinstance(value, str) or not value or len(value) > _TEXT or (
            pattern is not None and not pattern.match(value)):
        raise _fail(name, value, allowed)
    return value


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(name, value, f"one of {', '.join(choices)}")
    return value


def scores(name: str, value: Any, *, empty: bool = False) -> list:
    if (not isinstance(value, list) or len(value) > MAX_SCORES
            or (not value and not empty)):
        raise _fail(name, value, f"a list of up to {MAX_SCORES} finite numbers")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(f"{name}[{i}]", v, "a finite number")
    return value


def _float_array(name: str, value: Any, shape: tuple[int, ...]) -> None:
    import numpy as np

    if (not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.shape != shape
            or not np.isfinite(value).all()):
        described = (f"an array of {value.dtype} {value.shape}"
                     if isinstance(value, np.ndarray) else value)
        raise _fail(name, described, f"a float array of shape {shape}, finite")


def _heatmap_record(record: Any) -> None:
    """The calibration normals' heatmaps (:mod:`kad.screening.heatmap_scale`): a record
    saying why they were not made, or their method, settings and arrays."""
    import numpy as np

    name = "calibration.heatmaps"
    if not isinstance(record, dict):
        raise _fail(name, record, "a record")
    if "skipped" in record:
        text(f"{name}.skipped", record["skipped"])
        return
    keys = {"method", "grid", "steps", "n", "peaks", "levels", "quantiles", "unreadable",
            "measured_on"}
    if set(record) != keys:
        raise _fail(name, sorted(record), f"a record of {', '.join(sorted(keys))}")
    choice(f"{name}.method", record["method"], HEATMAP_METHODS)
    integer(f"{name}.grid", record["grid"], 1, MAX_IMAGE_SIZE)
    integer(f"{name}.steps", record["steps"], 1, 100_000)
    n = integer(f"{name}.n", record["n"], 1, 100_000)
    integer(f"{name}.unreadable", record["unreadable"], 0, 100_000)
    text(f"{name}.measured_on", record["measured_on"])
    levels = record["levels"]
    n_levels = len(levels) if isinstance(levels, np.ndarray) and levels.ndim == 1 else 0
    _float_array(f"{name}.levels", levels, (n_levels,))
    if not 1 <= n_levels <= 100 or not ((levels > 0) & (levels <= 1)).all():
        raise _fail(f"{name}.levels", levels.tolist(), "1 to 100 quantile levels in (0, 1]")
    _float_array(f"{name}.peaks", record["peaks"], (n,))
    _float_array(f"{name}.quantiles", record["quantiles"], (n, n_levels))


def batch_size(value: Any) -> int:
    return integer("batch_size", value, MIN_BATCH_SIZE, MAX_BATCH_SIZE)


def image_size(value: Any) -> int:
    return integer("image_size", value, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)


def check_pipeline_record(fields: dict) -> None:
    """Check the settings of a pipeline record (see :mod:`kad.screening.pipeline`); raise
    :class:`SettingError` for the first one out of range."""
    text("backbone", fields["backbone"], _SPEC, "a backbone spec NAME[:key=value,...]")
    text("weights", fields["weights"])
    text("weights_fingerprint", fields["weights_fingerprint"], re.compile(r"^[0-9a-f]{64}$"),
         "64 hexadecimal digits")
    image_size(fields["image_size"])
    text("preprocessing", fields["preprocessing"], _SPEC,
         "a preprocessing spec NAME[:key=value,...]")
    blocks = fields["all_blocks"]
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 1000 or not all(
            isinstance(b, str) and b for b in blocks):
        raise _fail("all_blocks", blocks, "a list of 1 to 1000 block names")
    batch_size(fields["batch_size"])
    choice("runtime", fields["runtime"], RUNTIMES)
    quantization = fields.get("quantization")
    if quantization is not None:
        if not isinstance(quantization, dict) or set(quantization) != {
                "precision", "calibration", "images", "nncf"}:
            raise _fail("quantization", quantization,
                        "None or a record of precision, calibration, images and nncf")
        choice("quantization.precision", quantization["precision"], ("int8",))
        text("quantization.calibration", quantization["calibration"],
             re.compile(r"^[0-9a-f]{24}$"), "24 hexadecimal digits")
        integer("quantization.images", quantization["images"], 1, MAX_SCORES)
        text("quantization.nncf", quantization["nncf"])
    threshold = fields["threshold"]
    if not isinstance(threshold, dict) or set(threshold) != {"value", "method", "details"}:
        raise _fail("threshold", threshold, "a record of value, method and details")
    number("threshold.value", threshold["value"])
    choice("threshold.method", threshold["method"], THRESHOLD_METHODS)
    if not isinstance(threshold["details"], dict):
        raise _fail("threshold.details", threshold["details"], "a dict")
    training = fields["training"]
    if not isinstance(training, dict) or "scores" not in training:
        raise _fail("training", training, "a record with the training scores")
    scores("training.scores", training["scores"])
    calibration = fields["calibration"]
    if calibration is not None:
        if not isinstance(calibration, dict):
            raise _fail("calibration", calibration, "None or a record")
        if "scores" in calibration:
            scores("calibration.scores", calibration["scores"], empty=True)
        if "n" in calibration:
            integer("calibration.n", calibration["n"], 0, MAX_SCORES)
        if "heatmaps" in calibration:
            _heatmap_record(calibration["heatmaps"])
    assessment = fields["assessment"]
    if assessment is not None:
        if not isinstance(assessment, dict) or not {"scores", "labels", "measured_on"} <= set(
                assessment):
            raise _fail("assessment", assessment,
                        "None or a record of scores, labels and measured_on")
        held = scores("assessment.scores", assessment["scores"])
        labels = assessment["labels"]
        if not isinstance(labels, list) or len(labels) != len(held) or not all(
                v in (0, 1) and not isinstance(v, float) for v in labels):
            raise _fail("assessment.labels", labels,
                        f"a list of {len(held)} labels, each 0 or 1")
        text("assessment.measured_on", assessment["measured_on"])
