"""Feature extraction on Ray Data, for clusters and GPUs (``engine="ray"``).

The same entry as a local extraction, computed by a Ray Data pipeline:

* one row per batch of ``batch_size`` images (the batches of a local run, so every image
  is computed in the same batch, with the same padding);
* decoding and preprocessing run as Ray tasks, spread over the cluster's CPUs;
* inference runs in an actor pool, one network per actor: one GPU per actor where Ray sees
  GPUs, else a fraction of a CPU, so that decoding tasks are not starved. Each actor builds
  the runtime of the plan (:mod:`kad.features.runtime`), resolved once on the driver, so the
  entry is the one a local run would write and find;
* the driver writes each batch's rows into the cache entry as they arrive, at their own
  place (:meth:`kad.features.cache.EntryWriter.write_at`), and records them as done every few
  seconds. An interrupted run resumes with the batches that are missing; a rerun never
  writes a row twice, and a complete entry is returned as is.

A cluster named by ``address`` (or ``$RAY_ADDRESS``) must accept a TCP connection within
:data:`PROBE_SECONDS` (:func:`probe_address`), else the run stops at once with one line
saying how to start one; Ray's own connection attempts would wait for minutes.
Without ``address`` (or ``$RAY_ADDRESS``) a local Ray is started on this machine and shut
down at the end; a Ray that is already initialised in this process is used as it is. The
cache folder must be reachable from the driver only: workers send their rows back to it.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from kad.errors import KadError, MissingDependencyError
from kad.features.cache import (
    EntryWriter,
    EventCallback,
    FeatureSet,
    check_writable,
    entry_lock,
    missing_rows,
)
from kad.utils.progress import Progress, task

SYNC_SECONDS = 10.0
#: How long the head node of a cluster named by address may take to accept a connection
#: before kad gives up (Ray itself retries for minutes).
PROBE_SECONDS = 5.0
_RAY_HINT = "install it with: pip install 'kad[ray]'"


def import_ray():
    """``ray`` with Ray Data, or one clear error saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"--engine ray needs Ray Data ({exc}); {_RAY_HINT}") \
            from exc
    return ray


def _load(row: dict, source, ids, plan, batch_size: int) -> dict:
    """Ray task body: decode and preprocess one batch (the rows of a local run's batch)."""
    from kad.features.extraction import _load_batch, takes_pixels

    start = int(row["start"])
    stop = min(start + batch_size, len(source))
    # 8-bit images where the network scales them (as the local loader gives them)
    _, batch, failed = _load_batch(source, ids, plan, start, stop, pixels=takes_pixels(plan))
    if len(batch) < batch_size:  # padded as stream_features pads
        batch = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]),
                                                batch.dtype)])
    return {"start": start, "n": stop - start, "x": batch, "failed": json.dumps(failed)}


def _model_cache(plan) -> str | None:
    """Where an actor keeps converted models: the plan's cache folder where this node sees
    it, else a folder of the node's own (the cache need only be reachable from the driver)."""
    import tempfile
    from pathlib import Path

    folder = Path(plan.path).parent
    if folder.is_dir() and os.access(folder, os.W_OK):
        return str(folder)
    return tempfile.mkdtemp(prefix="kad-models-")


class _Infer:
    """Ray actor: one network, built once on the plan's runtime (resolved on the driver),
    run on whole batches."""

    def __init__(self, plan, ids, batch_size: int):
        from kad.features.extraction import takes_pixels
        from kad.features.runtime import build_runtime

        self.engine = build_runtime(plan.backbone, plan.input_size, plan.weights, plan.runtime,
                                    batch_size, _model_cache(plan), pixels=takes_pixels(plan))
        self.names = self.engine.names
        self.ids = ids

    def __call__(self, rows: dict) -> dict:
        out: dict[str, list] = {"start": [], "n": [], "failed": [], "names": []}
        outputs_per_row = []
        for x, start, n, failed in zip(rows["x"], rows["start"], rows["n"], rows["failed"],
                                       strict=True):
            n, start = int(n), int(start)
            outputs = [o[:n] for o in self.engine.predict(np.asarray(x))]
            bad = json.loads(str(failed))
            for row, ident in enumerate(self.ids[start:start + n]):
                if str(ident) in bad:
                    for block in outputs:
                        block[row] = 0.0
            pad = len(x) - n  # fixed shapes for Ray's tensor columns; cut on the driver
            outputs_per_row.append([np.pad(o, ((0, pad), (0, 0))) for o in outputs])
            out["start"].append(start)
            out["n"].append(n)
            out["failed"].append(str(failed))
            out["names"].append(json.dumps(self.names))
        result = {k: np.asarray(v) for k, v in out.items()}
        for b in range(len(self.names)):
            result[f"b{b}"] = np.stack([o[b] for o in outputs_per_row])
        return result


def _connect(ray, address: str | None, num_cpus: int | None) -> bool:
    """Connect to the cluster at ``address`` or ``$RAY_ADDRESS``, else start a local Ray;
    True if this call started or connected it (and should shut it down)."""
    if ray.is_initialized():
        return False
    named = "--ray-address" if address else "$RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        probe_address(address, named)
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=False)
    return True


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` a Ray address is reached at: ``HOST[:PORT]`` (the head node's
    GCS, port 6379 by default) or ``ray://HOST[:PORT]`` (Ray Client, 10001); None for
    ``auto`` and ``local``, which name no host."""
    text = address.strip()
    if text.lower() in ("auto", "local"):
        return None
    default = 6379
    if "://" in text:
        scheme, text = text.split("://", 1)
        default = 10001 if scheme.lower() == "ray" else default
    text = text.split("/", 1)[0]
    host, port = text, default
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":") and rest[1:]:
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        port = int(port)
    except ValueError as exc:
        raise KadError(f"the Ray address {address!r} has no valid port ({port!r}); give "
                       "HOST:PORT, e.g. 127.0.0.1:6379") from exc
    if not host or not 0 < port < 65536:
        raise KadError(f"the Ray address {address!r} names no host or port; give "
                       "HOST:PORT, e.g. 127.0.0.1:6379")
    return host, port


def probe_address(address: str, named: str = "--ray-address",
                  timeout: float = PROBE_SECONDS) -> None:
    """Raise one clear :class:`~kad.errors.KadError` when nothing accepts a TCP connection at
    the Ray ``address`` within ``timeout`` seconds, before ``ray.init`` would wait for
    minutes: it names the address, where it came from (``named``) and how to start a
    cluster."""
    import socket

    found = _host_port(address)
    if found is None:
        return
    host, port = found
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (
            exc.strerror or type(exc).__name__).lower()
        raise KadError(
            f"cannot reach a Ray cluster at {address} (from {named}): {why} on "
            f"{host}:{port} within {timeout:g} s. Start one there with `ray start --head "
            f"--port={port}` (other nodes: ray start --address={host}:{port}), or leave out "
            "--ray-address and $RAY_ADDRESS to run a local Ray on this machine") from exc


def _resources(ray, actors: int | None, gpus_per_actor: float | None):
    """``(actors, num_gpus, num_cpus)`` per actor from what the cluster has."""
    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 1))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if actors is None:
        actors = max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else \
            max(1, int(cpus // 4))
    # On CPUs, actors take at most half of them so that decoding tasks always get a CPU.
    cpus_per_actor = 1.0 if gpus_per_actor else max(0.1, min(1.0, cpus / 2 / actors))
    return actors, gpus_per_actor, cpus_per_actor


def extract_with_ray(dataset, plan, *, batch_size: int = 64, address: str | None = None,
                     actors: int | None = None, gpus_per_actor: float | None = None,
                     num_cpus: int | None = None, progress: Progress | None = None,
                     on_event: EventCallback | None = None) -> FeatureSet:
    """The entry of ``plan`` computed on Ray Data; see the module docstring.

    ``actors`` is the size of the inference pool (default: one per GPU, else one per 4
    CPUs); ``num_cpus`` limits a local Ray started here. ``progress`` (a
    :class:`~kad.utils.progress.Progress`) gets the task ``features of <dataset>``, updated
    as batches arrive.
    """
    from kad import __version__
    from kad.features.extraction import _usable

    ray = import_ray()
    found = _usable(plan, on_event)
    if found is not None:
        return found
    check_writable(plan.path.parent, what="feature cache folder")
    started_here = _connect(ray, address, num_cpus)
    try:
        with entry_lock(plan.path, on_event):
            found = _usable(plan, on_event, locked=True)
            if found is not None:
                return found
            n = len(dataset)
            ids = np.asarray([str(i) for i in dataset.ids])
            meta = {"key": plan.key, "inputs": plan.inputs, "dataset": dataset.name,
                    "ids": ids.tolist(), "kad": __version__}
            state: dict = {"writer": None}
            try:
                # The block layout comes with the first batch, so the driver never builds
                # the network; rows a resumed run already has are known from the record.
                recorded = EntryWriter.recorded(plan.path)
                missing = missing_rows(recorded, n)
                with task(progress, f"features of {dataset.name}", n) as update:
                    update(n - sum(b - a for a, b in missing))
                    for _ in range(2):  # twice if the record was for another layout
                        if not missing:
                            break
                        _run(ray, dataset, plan, ids, meta, state, missing, batch_size,
                             actors, gpus_per_actor, update)
                        missing = state["writer"].missing()
                if state["writer"] is None:  # every row was there: only the commit was left
                    state["writer"] = EntryWriter(plan.path, recorded["blocks"],
                                                  recorded["dims"], n, meta)
            except BaseException:
                if state["writer"] is not None:
                    try:
                        state["writer"].sync()  # what arrived is kept: a rerun resumes
                    finally:
                        state["writer"].close()
                raise
            return state["writer"].commit()
    finally:
        if started_here:
            ray.shutdown()


def _run(ray, dataset, plan, ids, meta: dict, state: dict,
         missing: list[tuple[int, int]], batch_size: int, actors, gpus, update) -> None:
    """Compute the batches that overlap ``missing`` into ``state["writer"]`` (created from
    the first batch's layout if None), calling ``update(done)`` as batches arrive."""
    n = len(ids)
    todo = [start for start in range(0, n, batch_size)
            if any(a < min(start + batch_size, n) and start < b for a, b in missing)]
    done = n - sum(min(start + batch_size, n) - start for start in todo)
    actors, gpus_per_actor, cpus_per_actor = _resources(ray, actors, gpus)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    rows = ray.data.from_items([{"start": s} for s in todo], override_num_blocks=len(todo))
    # Each decoding task reserves the memory of its batch (decoded images, the float batch
    # and its copy on the way out). This also keeps decoding in tasks of its own: Ray Data
    # fuses a task into the actors that follow it only when their resources are alike.
    pixels = batch_size * plan.input_size ** 2 * 3 * 4
    loaded = rows.map(_load, fn_kwargs={"source": dataset.source, "ids": ids, "plan": plan,
                                        "batch_size": batch_size},
                      num_cpus=1, memory=3 * pixels + (256 << 20))
    features = loaded.map_batches(
        _Infer, fn_constructor_args=(plan, ids, batch_size), batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor,
        num_cpus=cpus_per_actor)
    last_sync = time.monotonic()
    for batch in features.iter_batches(batch_size=1, batch_format="numpy"):
        for row, start in enumerate(batch["start"]):
            count = int(batch["n"][row])
            if state["writer"] is None:
                names = json.loads(str(batch["names"][row]))
                dims = [int(batch[f"b{b}"].shape[-1]) for b in range(len(names))]
                state["writer"] = EntryWriter(plan.path, names, dims, n, meta)
            writer = state["writer"]
            outputs = [batch[f"b{b}"][row][:count] for b in range(len(writer.blocks))]
            writer.write_at(int(start), outputs, json.loads(str(batch["failed"][row])))
            done += count
        if time.monotonic() - last_sync > SYNC_SECONDS:
            writer.sync()
            last_sync = time.monotonic()
        update(done)
    state["writer"].sync()


class _Score:
    """Ray actor: one fitted pipeline's network and detector, scoring whole batches as
    :meth:`kad.screening.pipeline.Pipeline.score` does."""

    def __init__(self, pipeline, ids, weights, runtime):
        self.pipeline, self.ids = pipeline, ids
        self.runner = pipeline.runner(weights, runtime)

    def __call__(self, rows: dict) -> dict:
        out: dict[str, list] = {"start": [], "n": [], "failed": [], "scores": []}
        for x, start, n, failed in zip(rows["x"], rows["start"], rows["n"], rows["failed"],
                                       strict=True):
            n, start = int(n), int(start)
            outputs = [o[:n] for o in self.runner.predict(np.asarray(x))]
            features = self.pipeline.representation.assemble(outputs)
            ok = ~np.isin(self.ids[start:start + n], list(json.loads(str(failed))))
            scores = np.full(len(x), np.nan)
            if ok.any():
                scores[:n][ok] = self.pipeline.detector.anomaly_score(features[ok])
            out["start"].append(start)
            out["n"].append(n)
            out["failed"].append(str(failed))
            out["scores"].append(scores)
        return {k: np.asarray(v) for k, v in out.items()}


def score_with_ray(pipeline, source, ids=None, *, address: str | None = None,
                   actors: int | None = None, gpus_per_actor: float | None = None,
                   num_cpus: int | None = None, weights: str | None = None,
                   runtime: str | None = None, progress: Progress | None = None):
    """:meth:`kad.screening.pipeline.Pipeline.score` on Ray Data (``kad score --engine ray``): the
    same batches and the same scores, decoded in Ray tasks and scored in an actor pool,
    one network per actor, on the pipeline's runtime unless ``runtime`` names another
    (resolved here, on the driver), reporting the task ``scoring`` to ``progress``. Returns
    :class:`kad.screening.pipeline.Scores`."""
    from kad.features.extraction import Scores
    from kad.features.runtime import resolve_runtime

    runtime = resolve_runtime(runtime or pipeline.runtime).name
    ray = import_ray()
    ids = np.asarray([str(i) for i in (ids if ids is not None else range(len(source)))])
    n, batch_size, plan = len(source), pipeline.network_batch, pipeline._plan()
    started_here = _connect(ray, address, num_cpus)
    try:
        actors, gpus_per_actor, cpus_per_actor = _resources(ray, actors, gpus_per_actor)
        ray.data.DataContext.get_current().enable_progress_bars = False
        starts = list(range(0, n, batch_size))
        rows = ray.data.from_items([{"start": s} for s in starts],
                                   override_num_blocks=max(1, len(starts)))
        pixels = batch_size * plan.input_size ** 2 * 3 * 4
        loaded = rows.map(_load, fn_kwargs={"source": source, "ids": ids, "plan": plan,
                                            "batch_size": batch_size},
                          num_cpus=1, memory=3 * pixels + (256 << 20))
        scored = loaded.map_batches(
            _Score, fn_constructor_args=(pipeline, ids, weights, runtime), batch_size=1,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor, num_cpus=cpus_per_actor)
        scores = np.full(n, np.nan)
        failed: dict[str, str] = {}
        done = 0
        with task(progress, "scoring", n) as update:
            for batch in scored.iter_batches(batch_size=1, batch_format="numpy"):
                for row, start in enumerate(batch["start"]):
                    count = int(batch["n"][row])
                    scores[int(start):int(start) + count] = batch["scores"][row][:count]
                    failed.update(json.loads(str(batch["failed"][row])))
                    done += count
                update(done)
    finally:
        if started_here:
            ray.shutdown()
    order = {ident: row for row, ident in enumerate(ids)}
    return Scores(list(ids), scores, dict(sorted(failed.items(), key=lambda kv: order[kv[0]])))


__all__ = ["extract_with_ray", "import_ray", "probe_address", "score_with_ray"]
