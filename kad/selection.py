"""Picking a network block with a few labelled anomalies (the paper's Table 2).

:func:`pick_block` fits one detector per block on the training normals, scores labelled
validation images with it and keeps the block with the best validation AUROC (the first
one, in network order, on a tie). ``kad fit`` and ``kad recipe table2`` both call it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import KadError


@dataclass
class BlockChoice:
    """The picked block, every block's validation AUROC, and the fitted detectors."""

    block: str
    validation_auroc: dict[str, float]
    detectors: dict = field(default_factory=dict, repr=False)
    fit_seconds: dict[str, float] = field(default_factory=dict)


def pick_block(features, train_rows, rows, labels, prototype,
               blocks: list[str] | None = None, fit=None, progress=None) -> BlockChoice:
    """The block of ``features`` whose detector, fitted on ``train_rows``, ranks the
    labelled ``rows`` best (AUROC against ``labels``, 1 = anomaly).

    ``features`` needs ``blocks`` and ``matrix(blocks, rows)`` (a
    :class:`~kad.cache.FeatureSet`); ``prototype`` is an unfitted detector, cloned per
    block, unless ``fit(block, x_train)`` is given to build and fit one. ``progress(done,
    total)`` is called after each block.
    """
    from sklearn.base import clone

    from .metrics import evaluate

    rows = np.asarray(rows)
    labels = np.asarray(labels, dtype=int)
    train_rows = np.asarray(train_rows)
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise KadError("picking a block needs labelled normal (0) and anomalous (1) images")
    if np.intersect1d(rows, train_rows).size:
        raise KadError("the images that pick the block must not be among the training images")
    choice = BlockChoice("", {})
    todo = list(blocks or features.blocks)
    for done, block in enumerate(todo, start=1):
        x_train = features.matrix([block], train_rows)
        start = time.perf_counter()
        det = fit(block, x_train) if fit else clone(prototype).fit(x_train)
        choice.fit_seconds[block] = time.perf_counter() - start
        auroc = evaluate(labels, det.anomaly_score(features.matrix([block], rows)))["auroc"]
        choice.validation_auroc[block] = auroc
        choice.detectors[block] = det
        if not choice.block or auroc > choice.validation_auroc[choice.block]:
            choice.block = block
        if progress:
            progress(done, len(todo))
    return choice
