"""One network for many requests: uploads that arrive together are scored in one batch.

:class:`BatchScorer` owns the fitted pipeline and one worker thread, the only place the
network runs, so requests never run it concurrently and the event loop never waits on it.
The worker takes the first job in the queue, then gathers the jobs that arrive within
``max_wait`` seconds, as long as their images fit in ``max_batch`` (by default the model's
batch size), and scores them all with one :meth:`kad.screening.pipeline.Pipeline.score`:
the code path of ``kad score``. A batch always runs at the model's full batch size (the
rest padded), so an image's score never depends on the images that came with it: it is
the score ``kad score`` gives the same file, bit for bit.

Each image's answer is the record of its ``scores.csv`` row
(:func:`kad.screening.results.score_record`), built by the same functions as ``kad score``'s
rows. A job with heatmaps runs on its own through :func:`kad.screening.heatmaps.iter_heatmaps`
(a model's lesion maps model draws them, where it has one; the scores stay the model's).
"""

from __future__ import annotations

import base64
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kad.serve.uploads import Upload, UploadSource

__all__ = ["BatchScorer", "DEFAULT_MAX_WAIT"]

#: How long the worker waits for more requests to join a batch, in seconds.
DEFAULT_MAX_WAIT = 0.010

_STOP = object()


@dataclass
class _Job:
    uploads: list[Upload]
    heatmaps: bool
    future: Future = field(default_factory=Future)


class BatchScorer:
    """See the module docstring. :meth:`start` builds the network (once) and starts the
    worker; :meth:`submit` queues images and returns a future of their records, in the
    order given; :meth:`close` stops the worker after the queued jobs."""

    def __init__(self, pipeline, *, max_batch: int | None = None,
                 max_wait: float = DEFAULT_MAX_WAIT, weights: str | None = None,
                 runtime: str | None = None):
        self.pipeline = pipeline
        self.max_batch = int(max_batch or pipeline.batch_size)
        self.max_wait = float(max_wait)
        self.weights = weights
        self.runtime = runtime
        self.batches = 0  # network batches run, for /health
        self.images = 0   # images scored or refused as unreadable
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    # -- life ------------------------------------------------------------------------
    def start(self) -> BatchScorer:
        """Build the network on its runtime and run one batch through it (so the first
        request does not pay for it), then start the worker."""
        if self._thread is not None:
            return self
        self.pipeline.runner(self.weights, self.runtime)
        self._score_uploads([Upload("warm-up", _warm_up_image())])
        self.batches = self.images = 0
        self._thread = threading.Thread(target=self._work, name="kad-serve-batches",
                                         daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._jobs.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    @property
    def runtime_name(self) -> str:
        from kad.features.runtime import resolve_runtime

        return resolve_runtime(self.runtime or self.pipeline.runtime).name

    def submit(self, uploads: list[Upload], heatmaps: bool = False) -> Future:
        """A future of one record per upload, in order (``heatmap_png`` added to scored
        ones with ``heatmaps``). Cancelling it before the worker takes the job drops it."""
        if self._thread is None:
            raise RuntimeError("the scorer is not started")
        job = _Job(list(uploads), heatmaps)
        self._jobs.put(job)
        return job.future

    # -- the worker ------------------------------------------------------------------
    def _work(self) -> None:
        carried = None
        while True:
            job = carried if carried is not None else self._jobs.get()
            carried = None
            if job is _STOP:
                return
            if job.heatmaps:
                self._run([job], self._explain_uploads)
                continue
            group, n = [job], len(job.uploads)
            deadline = time.monotonic() + self.max_wait
            while n < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    more = self._jobs.get(timeout=left) if left > 0 else self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP or more.heatmaps or n + len(more.uploads) > self.max_batch:
                    carried = more
                    break
                group.append(more)
                n += len(more.uploads)
            self._run(group, self._score_uploads)

    def _run(self, group: list[_Job], how) -> None:
        live = [job for job in group if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            records = how([u for job in live for u in job.uploads])
        except BaseException as exc:  # the requests learn of it; the worker goes on
            for job in live:
                job.future.set_exception(exc)
            return
        start = 0
        for job in live:
            job.future.set_result(records[start:start + len(job.uploads)])
            start += len(job.uploads)

    def _score_uploads(self, uploads: list[Upload]) -> list[dict]:
        ids = [str(i) for i in range(len(uploads))]
        result = self.pipeline.score(UploadSource(uploads), ids=ids, weights=self.weights,
                                     runtime=self.runtime)
        self.batches += -(-len(uploads) // self.pipeline.network_batch)
        self.images += len(uploads)
        return [self._record(u.name, float(result.scores[i]), result.failed.get(ids[i]))
                for i, u in enumerate(uploads)]

    def _explain_uploads(self, uploads: list[Upload]) -> list[dict]:
        from kad.screening.heatmaps import iter_heatmaps, overlay

        records = []
        ids = [str(i) for i in range(len(uploads))]
        # a model with a lesion maps model: the score is the model's, the map that one's
        for upload, heat in zip(uploads, iter_heatmaps(
                self.pipeline, UploadSource(uploads), ids, weights=self.weights,
                runtime=self.runtime), strict=True):
            record = self._record(upload.name, heat.score, heat.error if heat.map is None
                                  else None)
            if heat.map is not None:
                record["heatmap_png"] = base64.b64encode(
                    _png(overlay(heat.seen, heat.map))).decode("ascii")
                record["heatmap_method"] = heat.method
            records.append(record)
        self.batches += -(-len(uploads) // self.pipeline.network_batch)
        self.images += len(uploads)
        return records

    def _record(self, name: str, score: float, failed: str | None) -> dict:
        """The ``scores.csv`` record of one image, made by ``kad score``'s own functions."""
        from kad.features.extraction import Scores
        from kad.screening.results import UNREADABLE, NotScored, rank, score_record

        if failed is not None or not np.isfinite(score):
            record = score_record(NotScored(name, UNREADABLE, failed or "no score"))
            del record["label"]
            return record
        rows = rank(self.pipeline, [Path(name)], Scores([name], np.array([score]), {}))
        record = score_record(rows[0])
        del record["label"]  # no label comes with an upload: scores.csv has none then either
        return record


def _png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("the heatmap could not be encoded as PNG")
    return buffer.tobytes()


def _warm_up_image() -> bytes:
    """A small PNG with something to screen in it (a gradient), for the first batch."""
    import cv2

    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    image = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)),
                      np.full((64, 64), 128, np.uint8)], axis=-1)
    return cv2.imencode(".png", image)[1].tobytes()
