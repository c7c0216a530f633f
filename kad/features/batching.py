"""How many images go through the network at once: one rule for every network call
(feature extraction on any runtime and engine, scoring, heatmaps, int8 calibration,
exports and the service).

A network's memory grows with the batch times the input's area: at 896 px one image of
MobileNetV2-0.35 holds about 190 MB of activations, so the 64 images that suit 224 px
would need 12 GB. The images per network call are therefore

    min(batch_size, max(1, budget // image_bytes(backbone, input_size)))

rounded down, when it is lowered to 8 images or more, to a multiple of
:data:`EVEN_SPLIT` (4): OpenVINO splits a batch into one equal slice per inference request
(1, 2 or 4 on most machines), so 17 images would run as two slices of 9, one image of them
padding. ``budget`` is :data:`~kad.utils.settings.BATCH_MEMORY` (1 GiB) unless
``$KAD_BATCH_MEMORY`` sets another (``512M``, ``2G``, ``2GiB`` or bytes; binary units).
``batch_size`` (``--batch-size``) is the most images per call, asked or by default: the
rule lowers it, never raises it, and says so once per process on the
``kad.features.batching`` logger (stderr when logging is not configured). Features do not
depend on the batch (an image's outputs are the same in any batch, within float
rounding), and no cache key holds it.

:func:`image_bytes` estimates one image's share: the largest layer output of the network
(:attr:`~kad.features.backbones.Backbone.peak_elements_per_pixel` times the input's
pixels) times :data:`LIVE_COPIES`, plus :data:`INPUT_COPIES` copies of the input image, in
float32.
"""

from __future__ import annotations

import logging
import os
import re

from kad.errors import KadError
from kad.utils.settings import BATCH_MEMORY

log = logging.getLogger(__name__)

#: The environment variable that sets the network's memory budget.
BUDGET_VARIABLE = "KAD_BATCH_MEMORY"
#: Bytes of one activation (float32).
FLOAT_BYTES = 4
#: Tensors the size of the largest layer output alive at once while the network runs one
#: image: measured with MobileNetV2-0.35 on Keras at 896 px (4.7 GB peak at 16 images,
#: 2.4 GB at 4: 190 MB per image, 4.9 times its largest layer output of 38.7 MB; a
#: convolution, its normalisation and its activation each make a new tensor).
LIVE_COPIES = 5
#: Copies of each input image while it waits and runs: the loader's batches
#: (:data:`kad.features.extraction.AHEAD` + 1), the network's float input and the
#: runtime's own copy of it.
INPUT_COPIES = 5

#: A lowered batch of at least twice this many images is a multiple of it (it splits
#: evenly into 1, 2 or 4 inference requests).
EVEN_SPLIT = 4

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_REPORTED: set[tuple] = set()


def batch_memory() -> int:
    """The budget in bytes: ``$KAD_BATCH_MEMORY`` when set, else :data:`BATCH_MEMORY`.
    A value that is not a positive size raises :class:`~kad.errors.KadError`."""
    text = os.environ.get(BUDGET_VARIABLE, "").strip()
    if not text:
        return BATCH_MEMORY
    match = _SIZE.match(text.replace("_", ""))
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()]) if match else 0
    if value < 1:
        raise KadError(f"{BUDGET_VARIABLE} is {text!r}; it must be a positive size such as "
                       "512M, 2G or a number of bytes")
    return value


def image_bytes(backbone, input_size: int) -> int:
    """The estimated memory of one image in a network call of ``backbone`` at
    ``input_size`` px (see the module docstring): activations grow with the input's
    area."""
    pixels = int(input_size) ** 2
    per_pixel = LIVE_COPIES * float(backbone.peak_elements_per_pixel) + INPUT_COPIES * 3
    return int(FLOAT_BYTES * per_pixel * pixels)


def network_batch(backbone, input_size: int, batch_size: int,
                  budget: int | None = None) -> int:
    """The images per network call: ``batch_size`` lowered to what ``budget`` bytes
    (default :func:`batch_memory`) hold at ``input_size`` px, at least one, and a multiple
    of :data:`EVEN_SPLIT` once lowered to twice that many or more. A lowered batch is reported
    once per process."""
    budget = batch_memory() if budget is None else int(budget)
    asked = int(batch_size)
    each = image_bytes(backbone, input_size)
    used = min(asked, max(1, budget // each))
    if used < asked:
        if used >= 2 * EVEN_SPLIT:
            used -= used % EVEN_SPLIT
        seen = (str(backbone.spec), int(input_size), asked, budget)
        if seen not in _REPORTED:
            _REPORTED.add(seen)
            log.warning(
                "batch size %d lowered to %d images per network call: %s at %d px needs about "
                "%s per image and the budget is %s (set %s, e.g. %s=4G, to change it)",
                asked, used, backbone.spec, input_size, _shown(each), _shown(budget),
                BUDGET_VARIABLE, BUDGET_VARIABLE)
    return used


def _shown(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
