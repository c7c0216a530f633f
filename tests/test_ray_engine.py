"""--engine ray: a local Ray with 2 CPUs gives the single-process features, resumably."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import StopAt
from kad.errors import MissingDependencyError
from kad.features.extract import extract_features
from kad.utils.progress import Recorder

MNV2 = "mobilenet_v2:alpha=0.35"
# Ray Data's per-dataset log handlers leave their files for the garbage collector to close;
# when a collection happens to run inside a test, the ResourceWarning surfaces there.
pytestmark = [pytest.mark.filterwarnings("ignore::ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


def test_without_ray_the_engine_says_what_to_install(monkeypatch, tmp_path):
    from kad.data.datasets import load_dataset

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'kad\[ray\]'"):
        extract_features(load_dataset("digits"), MNV2, "none", 32, engine="ray",
                         cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown engine 'spark'"):
        extract_features(load_dataset("digits"), MNV2, "none", 32, engine="spark")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import cv2

    from kad.data.datasets import load_dataset

    root = tmp_path_factory.mktemp("ray") / "data"
    (root / "normal").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(100):
        cv2.imwrite(str(root / "normal" / f"{i:03d}.png"),
                    rng.integers(0, 255, (36, 36, 3), dtype=np.uint8))
    (root / "normal" / "042.png").write_bytes(b"\x89PNG broken")
    return load_dataset("folder", root, kind="natural")


@pytest.mark.tf
@pytest.mark.slow
def test_ray_gives_the_local_features_resumes_and_adds_no_rows(images, local_ray, tmp_path):
    # the actors build the runtime asked for; on the same one, the bytes are the same
    local = extract_features(images, MNV2, "none", 32, batch_size=16,
                             cache_dir=tmp_path / "local", runtime="keras")
    cache = tmp_path / "ray"

    with pytest.raises(KeyboardInterrupt):
        extract_features(images, MNV2, "none", 32, batch_size=16, cache_dir=cache,
                         engine="ray", progress=StopAt(32), runtime="keras")
    recorder = Recorder()
    ray_run = extract_features(images, MNV2, "none", 32, batch_size=16, cache_dir=cache,
                               engine="ray", progress=recorder, runtime="keras")
    seen = [done for hook, _, done, _ in recorder.events if hook == "update"]
    assert seen[0] >= 32, "the rerun starts from the batches that arrived before"
    assert len(ray_run) == 100 and list(ray_run.ids) == list(local.ids)
    assert ray_run.failed == local.failed == {"normal/042.png": ray_run.failed[
        "normal/042.png"]}
    for block in local.blocks:
        assert ray_run.block_file(block).read_bytes() == local.block_file(block).read_bytes()
    mtimes = [ray_run.block_file(b).stat().st_mtime_ns for b in ray_run.blocks]
    again = extract_features(images, MNV2, "none", 32, batch_size=16, cache_dir=cache,
                             engine="ray", runtime="keras")
    assert again.path == ray_run.path
    assert [again.block_file(b).stat().st_mtime_ns for b in again.blocks] == mtimes

    # kad score --engine ray: the same scores as scoring in this process
    from kad.features.ray_engine import score_with_ray
    from kad.screening.fitting import fit_pipeline

    pipeline = fit_pipeline(images, backbone=MNV2, weights="none", image_size=32,
                            representation="out_relu", batch_size=16,
                            cache_dir=tmp_path / "local", runtime="keras")
    source = images.source.take(np.arange(34, 74))
    ids = list(images.ids[34:74])
    here = pipeline.score(source, ids)
    there = score_with_ray(pipeline, source, ids)
    np.testing.assert_array_equal(there.scores, here.scores)
    assert there.failed == here.failed and list(there.failed) == ["normal/042.png"]


@pytest.mark.parametrize("runtime", ["auto", "keras"])
def test_every_engine_plans_the_entry_a_local_run_plans(monkeypatch, tmp_path, runtime):
    import kad.features.ray_engine as ray_engine
    import kad.features.shards as shards
    from kad.data.datasets import load_dataset
    from kad.features.extract import plan_extraction

    digits = load_dataset("digits")
    planned = []

    def capture(dataset, plan, *args, **kwargs):
        planned.append(plan)
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_engine, "extract_with_ray", capture)
    monkeypatch.setattr(shards, "extract_shard", capture)
    for how in ({"engine": "ray"}, {"shard": (0, 2)}):
        with pytest.raises(KeyboardInterrupt):
            extract_features(digits, MNV2, "none", 32, cache_dir=tmp_path, runtime=runtime,
                             **how)
    local = plan_extraction(digits, MNV2, "none", 32, cache_dir=tmp_path, runtime=runtime)
    assert [(p.key, p.path, p.runtime) for p in planned] == [
        (local.key, local.path, local.runtime)] * 2


@pytest.mark.tf
@pytest.mark.slow
def test_a_ray_entry_on_auto_is_found_by_a_local_run(images, local_ray, tmp_path, monkeypatch):
    import kad.features.extract as extract
    from kad.features.runtime import resolve_runtime

    small = images.subset(np.arange(24))
    ray_run = extract_features(small, MNV2, "none", 32, batch_size=8, cache_dir=tmp_path,
                               engine="ray")
    assert ray_run.meta["inputs"]["runtime"] == resolve_runtime("auto").name

    def no_extraction(*args, **kwargs):
        raise AssertionError("the local run extracted again what Ray had cached")

    monkeypatch.setattr(extract, "_extract", no_extraction)
    local = extract_features(small, MNV2, "none", 32, batch_size=8, cache_dir=tmp_path)
    assert local.path == ray_run.path and local.key == ray_run.key


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _NoInit:
    """A ray module whose init must not be reached."""

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        raise AssertionError(f"ray.init was called with {kwargs}: it waits for minutes")


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_unreachable_ray_address_fails_at_once_saying_how_to_start_a_cluster(form):
    import time

    from kad.errors import KadError
    from kad.features.ray_engine import _connect

    port = _free_loopback_port()  # nothing listens there
    address = form.format(port=port)
    began = time.monotonic()
    with pytest.raises(KadError) as refused:
        _connect(_NoInit(), address, None)
    assert time.monotonic() - began < 30
    text = str(refused.value)
    assert address in text and f"ray start --head --port={port}" in text
    assert "--ray-address" in text


def test_an_unreachable_ray_address_from_the_environment_says_where_it_came_from(monkeypatch):
    from kad.errors import KadError
    from kad.features.ray_engine import _connect

    port = _free_loopback_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(KadError, match=r"from \$RAY_ADDRESS"):
        _connect(_NoInit(), None, None)
    with pytest.raises(KadError, match="no valid port"):
        _connect(_NoInit(), "127.0.0.1:http", None)


@pytest.mark.tf
def test_an_unreachable_cluster_stops_the_run_within_seconds(tmp_path):
    import os
    import subprocess
    import time

    pytest.importorskip("ray")
    # in a fresh process: a Ray already initialised here (the fixtures') would be used as is
    address = f"127.0.0.1:{_free_loopback_port()}"
    code = ("from kad.data.datasets import load_dataset\n"
            "from kad.features.extract import extract_features\n"
            f"extract_features(load_dataset('digits'), {MNV2!r}, 'none', 32, engine='ray', "
            f"ray_address={address!r}, cache_dir={str(tmp_path)!r})\n")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              p for p in sys.path if p)})
    assert time.monotonic() - began < 60  # the interpreter and TensorFlow start included
    assert done.returncode != 0
    assert f"cannot reach a Ray cluster at {address}" in done.stderr
