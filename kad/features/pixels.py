"""Preprocessed images as arrays: the input of raw-pixel baselines and image detectors.

``load_pixels`` decodes and preprocesses images in a thread pool and keeps the result in
the feature cache folder (one ``.npy`` per dataset, size and preprocessing), so a recipe
rerun does not decode again.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kad.data.preprocessing import get_preprocessing
from kad.errors import ImageReadError
from kad.features.cache import cache_key, cache_root
from kad.features.extraction import load_preprocessed


def load_pixels(dataset, size: int, preprocessing, cache_dir: str | Path | None = None,
                workers: int | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """``(images, failed)``: float32 ``(n, size, size, 3)`` in [0, 1], and the ids of images
    that could not be read (their rows are zeros) with the reason."""
    prep = get_preprocessing(preprocessing)
    key = cache_key({"pixels": dataset.fingerprint, "size": int(size), "prep": prep.key,
                     "revision": prep.revision})
    root = Path(cache_dir) if cache_dir else cache_root()
    path = root / f"{dataset.name}-pixels{size}-{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            failed = dict(zip(stored["failed_ids"].tolist(), stored["failed_why"].tolist(),
                              strict=True))
            return stored["images"], failed
    images = np.zeros((len(dataset), size, size, 3), dtype=np.float32)
    failed: dict[str, str] = {}

    def work(i: int) -> None:
        try:
            images[i] = load_preprocessed(dataset.source, i, prep, size)
        except ImageReadError as exc:
            failed[str(dataset.ids[i])] = exc.reason

    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 2)) as pool:
        list(pool.map(work, range(len(dataset))))
    root.mkdir(parents=True, exist_ok=True)
    from kad.utils.files import atomic_write

    with atomic_write(path, "wb") as fh:
        np.savez(fh, images=images, failed_ids=np.asarray(list(failed), dtype=str),
                 failed_why=np.asarray(list(failed.values()), dtype=str))
    return images, failed
