"""Feature extraction and its cache: shapes, reuse, unreadable images, resume, real data."""

from __future__ import annotations

import tarfile

import cv2
import numpy as np
import pytest

import kad.features.runtime
from conftest import CIFAR10_TAR, KAGGLE_DR, MNV2, MOBILENET_WEIGHTS, StopAt, need
from kad.data.datasets import load_dataset
from kad.errors import KadError
from kad.features.backbones import Backbone
from kad.features.cache import DamagedEntryError
from kad.features.extract import cached_features, extract_features, plan_extraction
from kad.utils.progress import Recorder

pytestmark = pytest.mark.tf


@pytest.fixture
def folder(tmp_path):
    """A small user folder: 14 normal, 5 abnormal images, one of them truncated."""
    rng = np.random.default_rng(0)
    for sub, n in (("normal", 14), ("abnormal", 5)):
        (tmp_path / "data" / sub).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            cv2.imwrite(str(tmp_path / "data" / sub / f"{i:02d}.jpg"), image)
    broken = tmp_path / "data" / "abnormal" / "03.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    return load_dataset("folder", tmp_path / "data", kind="natural")


def test_every_block_for_every_image(folder, tmp_path):
    features = extract_features(folder, MNV2, "none", 32, batch_size=4)
    assert len(features) == len(folder) == 19
    assert len(features.blocks) == 18 and features.dims["out_relu"] == 1280
    assert features.block("out_relu").shape == (19, 1280)
    concat = features.matrix("concat")
    assert concat.shape == (19, sum(features.dims.values()))
    np.testing.assert_array_equal(
        concat[:, -1280:], np.asarray(features.block("out_relu")))
    rows = np.array([5, 1, 7])
    two = features.matrix("block_2_add,out_relu", rows)
    np.testing.assert_array_equal(two[:, 8:], np.asarray(features.block("out_relu"))[rows])


def test_an_unreadable_image_is_reported_not_fatal(folder):
    features = extract_features(folder, MNV2, "none", 32, batch_size=4)
    assert list(features.failed) == ["abnormal/03.jpg"]
    assert "truncated" in features.failed["abnormal/03.jpg"]
    assert features.valid.sum() == 18 and not features.valid[list(features.ids).index(
        "abnormal/03.jpg")]


def test_a_second_run_reuses_the_cache_without_building_a_network(folder, monkeypatch):
    first = extract_features(folder, MNV2, "none", 32, batch_size=4)

    def no_build(*args, **kwargs):
        raise AssertionError("the network was built although the features were cached")

    monkeypatch.setattr(Backbone, "build_extractor", no_build)
    again = extract_features(folder, MNV2, "none", 32)
    assert again.path == first.path


def test_the_key_changes_with_what_changes_the_features(folder):
    base = plan_extraction(folder, MNV2, "none", 32)
    assert plan_extraction(folder, MNV2, "none", 48).key != base.key
    assert plan_extraction(folder, MNV2, "none", 32, "fundus").key != base.key
    assert plan_extraction(folder, "mobilenet_v2", "none", 32).key != base.key
    assert plan_extraction(folder.subset(np.arange(5)), MNV2, "none", 32).key != base.key
    assert plan_extraction(folder, MNV2, "none", 32).key == base.key


def test_an_interrupted_extraction_resumes_without_recomputing(folder, monkeypatch, tmp_path):
    reference = extract_features(folder, MNV2, "none", 32, batch_size=4,
                                 cache_dir=tmp_path / "reference")

    with pytest.raises(KeyboardInterrupt):
        extract_features(folder, MNV2, "none", 32, batch_size=4, progress=StopAt(8))
    plan = plan_extraction(folder, MNV2, "none", 32)
    assert not plan.path.exists(), "an incomplete entry must never look complete"
    assert plan.path.with_name(plan.path.name + ".partial").is_dir()

    seen = []
    original = kad.features.runtime.build_runtime

    def counting(*args, **kwargs):
        engine = original(*args, **kwargs)
        predict = engine.predict

        def counted(x):
            seen.append(len(x))
            return predict(x)

        engine.predict = counted
        return engine

    monkeypatch.setattr(kad.features.runtime, "build_runtime", counting)
    resumed = extract_features(folder, MNV2, "none", 32, batch_size=4)
    # 19 images in batches of 4: 2 of 5 batches were done, only the other 3 are run
    assert seen == [4, 4, 4]
    for block in reference.blocks:
        np.testing.assert_allclose(resumed.block(block), reference.block(block), atol=1e-5)
    assert resumed.failed == reference.failed


@pytest.mark.shared
def test_imagenet_features_of_cifar10_and_fundus_images(tmp_path):
    need(MOBILENET_WEIGHTS)
    with tarfile.open(need(CIFAR10_TAR)) as tar:
        members, per_class = [], {}
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[2] in ("airplane", "frog"):
                key = (parts[1], parts[2])
                if per_class.get(key, 0) < 80:
                    per_class[key] = per_class.get(key, 0) + 1
                    members.append(member)
            if len(members) == 320:
                break
        tar.extractall(tmp_path, members=members, filter="data")
    cifar = load_dataset("cifar10", tmp_path / "cifar10-jpeg")
    assert len(cifar) == 320
    real = extract_features(cifar, MNV2, MOBILENET_WEIGHTS, 96)
    random = extract_features(cifar, MNV2, "none", 96)
    assert real.block("out_relu").shape == (320, 1280) and not real.failed
    assert not np.allclose(real.matrix("out_relu"), random.matrix("out_relu"))

    dr = load_dataset("dr", need(KAGGLE_DR))
    fundus = dr.subset(np.r_[np.flatnonzero(~dr.anomaly)[:24], np.flatnonzero(dr.anomaly)[:8]])
    features = extract_features(fundus, MNV2, MOBILENET_WEIGHTS, 96)
    assert features.meta["inputs"]["preprocessing"].startswith("fundus")
    assert features.matrix("concat").shape == (32, sum(features.dims.values()))
    assert np.isfinite(features.matrix("concat")).all() and not features.failed


def test_a_damaged_entry_is_extracted_again_never_served(folder, tmp_path):
    first = extract_features(folder, MNV2, "none", 32, batch_size=4)
    reference = {b: np.array(first.block(b)) for b in first.blocks}
    file = first.block_file("out_relu")
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x7F
    file.write_bytes(bytes(data))
    with pytest.raises(DamagedEntryError, match="does not match its checksum"):
        cached_features(plan_extraction(folder, MNV2, "none", 32))  # what the CLI asks first
    events = []
    again = extract_features(folder, MNV2, "none", 32, batch_size=4, on_event=events.append)
    assert [e.kind for e in events] == ["damaged"] and str(file) in events[0].message
    for block, values in reference.items():
        np.testing.assert_array_equal(again.block(block), values)


def test_an_unwritable_cache_folder_stops_before_the_network_is_built(folder, tmp_path,
                                                                      monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the network was built although the cache cannot be written")

    monkeypatch.setattr(Backbone, "build_extractor", no_build)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(KadError, match=f"{blocker} is a file, not a folder"):
        extract_features(folder, MNV2, "none", 32, cache_dir=blocker / "cache")


def test_fit_can_keep_only_the_blocks_the_pipeline_uses(folder):
    from kad.screening.fitting import fit_pipeline

    pipeline = fit_pipeline(folder, backbone=MNV2, weights="none", image_size=32,
                            representation="out_relu", batch_size=4, keep_all_blocks=False)
    plan = plan_extraction(folder, MNV2, "none", 32)
    kept = extract_features(folder, MNV2, "none", 32, blocks=pipeline.blocks)
    assert kept.blocks == ["out_relu"] and len(kept.all_blocks) == 18
    assert pipeline.training["pruned"]["removed_blocks"] == 17
    assert sorted(p.name for p in (plan.path / "blocks").iterdir()) == ["out_relu.npy"]
    events = []
    full = extract_features(folder, MNV2, "none", 32, batch_size=4, on_event=events.append)
    assert [e.kind for e in events] == ["pruned"] and full.blocks == full.all_blocks
    np.testing.assert_array_equal(full.block("out_relu"), kept.block("out_relu"))

def test_progress_is_reported_from_before_the_network_is_built(folder, monkeypatch):
    recorder = Recorder()
    seen_at_build = []
    original = kad.features.runtime.build_runtime

    def building(*args, **kwargs):
        seen_at_build.extend(recorder.events)
        return original(*args, **kwargs)

    monkeypatch.setattr(kad.features.runtime, "build_runtime", building)
    extract_features(folder, MNV2, "none", 32, batch_size=8, progress=recorder)
    name = f"features of {folder.name}"
    # the bar is up while the model is built/converted
    assert seen_at_build == [("begin", name, None, 19), ("update", name, 0, 19)]
    updates = [(d, t) for hook, _, d, t in recorder.events if hook == "update"]
    assert [d for d, _ in updates] == [0, 0, 8, 16, 19]  # every batch, up to the total
    assert {t for _, t in updates} == {19} and recorder.events[-1] == ("end", name, None, None)
    again = Recorder()
    extract_features(folder, MNV2, "none", 32, batch_size=8, progress=again)
    assert again.events == [], "a cached entry reports nothing"


def test_images_load_while_the_network_is_built(folder, monkeypatch):
    import threading

    import kad.features.extraction as extraction

    loaded = threading.Event()
    original_load = extraction._decoded  # every image is decoded through it

    def load(*args, **kwargs):
        loaded.set()
        return original_load(*args, **kwargs)

    original_build = kad.features.runtime.build_runtime

    def building(*args, **kwargs):
        # Building a network takes seconds: the first images are read meanwhile.
        assert loaded.wait(timeout=10), "no image was loaded while the network was built"
        return original_build(*args, **kwargs)

    monkeypatch.setattr(extraction, "_decoded", load)
    monkeypatch.setattr(kad.features.runtime, "build_runtime", building)
    features = extract_features(folder, MNV2, "none", 32, batch_size=8)
    assert len(features) == 19 and list(features.failed) == ["abnormal/03.jpg"]


def test_the_loader_reuses_its_batches_padding_and_unreadable_rows_zeros(folder):
    from kad.features.extraction import AHEAD, Loader, _load_batch

    plan = plan_extraction(folder, MNV2, "none", 32, runtime="keras")
    buffers, starts = set(), []
    with Loader(folder.source, folder.ids, plan, 0, batch_size=4, workers=2) as loader:
        for start, batch, n, failed in loader:
            _, expected, expected_failed = _load_batch(folder.source, folder.ids, plan, start,
                                                       start + n)
            np.testing.assert_array_equal(batch[:n], expected)
            assert not batch[n:].any() and failed == expected_failed
            buffers.add(id(batch))
            starts.append(start)
    assert starts == [0, 4, 8, 12, 16]
    assert len(buffers) == AHEAD + 1  # allocated once, reused in turn


@pytest.mark.skipif(not kad.features.runtime.openvino_available(), reason="needs OpenVINO")
def test_openvino_extraction_hands_8_bit_images_to_the_network_same_features(folder,
                                                                              monkeypatch):
    from kad.features.extraction import stream_features

    runtime = kad.features.runtime
    seen = []
    original = runtime.OpenVINORuntime.predict

    def predict(self, batch):
        seen.append(batch.dtype)
        return original(self, batch)

    monkeypatch.setattr(runtime.OpenVINORuntime, "predict", predict)
    features = extract_features(folder, MNV2, "none", 32, batch_size=8, runtime="openvino")
    assert seen and set(seen) == {np.dtype(np.uint8)}
    # The network's float input scaled in Python, through a network that does not scale.
    plan = plan_extraction(folder, MNV2, "none", 32, runtime="openvino")
    built = runtime.build_runtime(MNV2, 32, "none", "openvino", 8, plan.path.parent)
    engine = runtime.read_runtime(built.model_dir / "model.xml", built.names, 32, 8)
    seen.clear()
    blocks = [np.concatenate(outputs, axis=1)
              for _, outputs, _ in stream_features(engine, folder.source, folder.ids, plan, 8)]
    assert set(seen) == {np.dtype(np.float32)}
    expected, got = np.concatenate(blocks), features.matrix("concat")
    valid = features.valid
    assert np.abs(got[valid] - expected[valid]).max() <= 1e-5 * np.abs(expected).max()
