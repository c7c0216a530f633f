"""Heatmaps: complete where promised, pointing at what was planted, identical after reload."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import FAST
from kad.data.preprocessing import Fundus, Natural, crop_fundus
from kad.detectors.base import BaseDetector
from kad.errors import KadError
from kad.screening.heatmaps import (
    Heatmap,
    choose_method,
    overlay,
    pixel_auroc,
    pointing_game,
    to_image_resolution,
)
from kad_plugins.shallow import (
    IsolationForestDetector,
    KNNDetector,
    MahalanobisDetector,
    OneClassSVMDetector,
)

# Maps come from the Keras network: a pipeline on the same runtime scores bit-identically.
KERAS = {**FAST, "runtime": "keras"}
TWO_BLOCKS = "block_2_add,block_5_add"  # 8x8 and 4x4 maps at 32 px


# -- without TensorFlow --------------------------------------------------------------------


@pytest.mark.parametrize("detector", [
    KNNDetector(), KNNDetector(method="kth", n_neighbors=3), MahalanobisDetector(),
    OneClassSVMDetector(), OneClassSVMDetector(kernel="linear"),
], ids=["knn-mean", "knn-kth", "mahalanobis", "ocsvm-rbf", "ocsvm-linear"])
def test_score_gradient_matches_finite_differences(detector):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 5)).astype(np.float32)
    queries = (rng.normal(size=(4, 5)) * 2).astype(np.float64)
    detector.fit(X)
    gradient = detector.score_gradient(queries.astype(np.float32))
    eps = 1e-4
    numeric = np.stack([
        (detector._score(queries + eps * e) - detector._score(queries - eps * e)) / (2 * eps)
        for e in np.eye(5)], axis=1)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(detector.reference_, X.mean(axis=0), rtol=1e-6)


def test_isolation_forest_has_no_gradient_and_gets_occlusion():
    X = np.random.default_rng(0).normal(size=(50, 4))
    forest = IsolationForestDetector(n_estimators=10).fit(X)
    assert forest.score_gradient(X[:2]) is None
    assert choose_method(forest) == "occlusion"
    assert choose_method(KNNDetector().fit(X)) == "gradient"
    with pytest.raises(KadError, match="occlusion"):
        choose_method(forest, "gradient")
    with pytest.raises(KadError, match="unknown heatmap method"):
        choose_method(forest, "saliency")


def test_a_detector_fitted_without_a_reference_falls_back_to_occlusion():
    X = np.random.default_rng(0).normal(size=(50, 4))
    knn = KNNDetector().fit(X)
    del knn.reference_  # as in models fitted before heatmaps existed
    assert choose_method(knn) == "occlusion"
    with pytest.raises(KadError, match="refit"):
        choose_method(knn, "gradient")


def test_block_shares_brought_to_the_image_keep_their_sum():
    share = np.random.default_rng(1).normal(size=(7, 7))
    up = to_image_resolution(share, 224)
    assert up.shape == (224, 224)
    assert up.sum() == pytest.approx(share.sum(), rel=1e-9, abs=1e-9)
    # a single hot cell stays hottest where it was
    hot = np.zeros((4, 4))
    hot[1, 2] = 1.0
    row, col = np.unravel_index(np.argmax(to_image_resolution(hot, 32)), (32, 32))
    assert 8 <= row < 16 and 16 <= col < 24


def test_fundus_crop_box_is_the_square_crop_fundus_cuts():
    rgb = np.zeros((300, 420, 3), np.uint8)
    cv2.circle(rgb, (230, 150), 120, (180, 90, 40), -1)
    left, top, width, height = Fundus().crop_box(rgb)
    crop, _ = crop_fundus(rgb)
    assert width == height == crop.shape[0]
    np.testing.assert_array_equal(crop, rgb[top:top + height, left:left + width])
    assert Natural().crop_box(rgb) == (0, 0, 420, 300)


def test_a_map_goes_back_onto_the_photograph_through_the_crop():
    heat = np.zeros((32, 32), np.float32)
    heat[8, 24] = 5.0  # top right of the square the model saw
    found = Heatmap("x", 1.0, "gradient", heat, box=(100, 50, 128, 128),
                    original_shape=(300, 400))
    back = found.on_original()
    assert back.shape == (300, 400)
    row, col = np.unravel_index(np.argmax(back), back.shape)
    assert abs(row - (50 + 8.5 * 4)) <= 3 and abs(col - (100 + 24.5 * 4)) <= 3
    assert back.sum() == pytest.approx(heat.sum(), rel=1e-4)
    assert back[:50].sum() == 0 and back[:, :100].sum() == 0


def test_pointing_game_and_pixel_auroc():
    mask = np.zeros((20, 20), bool)
    mask[5:8, 5:8] = True
    heat = np.zeros((20, 20))
    heat[6, 6] = 1.0
    assert pointing_game(heat, mask)
    heat[15, 15] = 2.0
    assert not pointing_game(heat, mask)
    assert pointing_game(heat, mask, tolerance=11.5) and not pointing_game(heat, mask, 11.2)
    assert pixel_auroc(-np.ones((20, 20)) + mask, mask) == 1.0
    with pytest.raises(KadError):
        pixel_auroc(heat, np.zeros((20, 20), bool))


def test_overlay_colours_only_where_the_score_rises():
    image = np.full((16, 16, 3), 0.5, np.float32)
    heat = np.zeros((16, 16))
    heat[4, 4] = 1.0
    heat[10, 10] = -1.0
    out = overlay(image, heat)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert (out[10, 10] == 128).all() and not (out[4, 4] == 128).all()


# -- through the network ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from kad.data.datasets import load_dataset
    from synthetic import screening_folder

    root = screening_folder(tmp_path_factory.mktemp("heat"), n_normal=24, n_abnormal=4,
                            size=32)
    dataset = load_dataset("folder", root, kind="natural")
    normal = np.flatnonzero(~dataset.anomaly)
    return dataset, normal[:20], [root / i for i in dataset.ids]


def _fit(data, detector, representation):
    from kad.screening.fitting import fit_pipeline

    dataset, train, _ = data
    return fit_pipeline(dataset, train_rows=train, detector=detector,
                        representation=representation, **KERAS)


@pytest.mark.tf
@pytest.mark.parametrize("detector,steps,rtol", [
    ("mahalanobis", 1, 1e-5), ("knn", 64, 0.05), ("ocsvm", 64, 0.05)])
def test_gradient_attribution_sums_to_the_score_difference(data, detector, steps, rtol):
    from kad.data.datasets import FileSource
    from kad.screening.heatmaps import explain

    pipeline = _fit(data, detector, TWO_BLOCKS)
    maps = explain(pipeline, FileSource(data[2][-6:]), steps=steps)
    assert {m.method for m in maps} == {"gradient"}
    explained = np.array([m.explained for m in maps])
    assert np.abs(explained).max() > 1e-3  # there is a difference to explain
    totals = np.array([float(m.map.astype(np.float64).sum()) for m in maps])
    np.testing.assert_allclose(totals, explained, rtol=rtol, atol=1e-3 * np.abs(explained).max())
    blocks = maps[0].block_maps
    assert [b.shape for b in blocks.values()] == [(8, 8), (4, 4)]
    assert sum(float(b.sum()) for b in blocks.values()) == pytest.approx(totals[0], rel=1e-4)


@pytest.mark.tf
def test_heatmap_scores_are_the_pipeline_scores_and_survive_a_reload(data, tmp_path):
    from kad.data.datasets import FileSource
    from kad.screening.heatmaps import explain
    from kad.screening.pipeline import load_pipeline

    files = FileSource(data[2][-5:])
    for detector, method in (("knn", "gradient"), ("iforest", "occlusion")):
        pipeline = _fit(data, detector, "block_5_add")
        before = explain(pipeline, files, grid=4)
        assert [m.method for m in before] == [method] * 5
        np.testing.assert_array_equal([m.score for m in before], pipeline.score(files).scores)
        reloaded = load_pipeline(pipeline.save(tmp_path / f"{detector}.kad"))
        after = explain(reloaded, files, grid=4)
        for a, b in zip(before, after, strict=True):
            assert a.score == b.score
            np.testing.assert_array_equal(a.map, b.map)


def _blob(where, size=32, radius=3):
    image = np.repeat(np.repeat(np.linspace(60, 160, size, dtype=np.float32)[None, :, None],
                                size, axis=0), 3, axis=2)
    cv2.circle(image, where[::-1], radius, (255, 255, 255), -1)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.tf
def test_an_occlusion_map_peaks_on_a_planted_blob(data):
    from kad.data.datasets import ArraySource
    from kad.screening.heatmaps import explain

    pipeline = _fit(data, "iforest", "block_5_add")
    where = [(22, 8), (6, 6), (10, 26), (26, 20), (14, 14)]  # (row, column) of each blob
    found = explain(pipeline, ArraySource(np.stack([_blob(w) for w in where])), grid=4)
    assert {f.method for f in found} == {"occlusion"}
    assert {f.forward_passes for f in found} == {1 + 16}
    # the peak lies in the 8-pixel occlusion cell that holds the blob's centre
    assert [tuple(v // 8 for v in f.peak) for f in found] == [(r // 8, c // 8) for r, c in where]


@pytest.mark.tf
def test_a_detector_may_draw_its_own_map(data):
    from kad.data.datasets import FileSource
    from kad.screening.heatmaps import explain

    class Own(BaseDetector):  # a detector of block maps: its input is the stacked maps
        input_kind = "maps"

        def _fit(self, X, y):  # noqa: ARG002 - unsupervised
            self.mean_ = X.mean(axis=(0, 1, 2))

        def _score(self, X):
            return np.abs(X - self.mean_).sum(axis=-1).max(axis=(1, 2))

        def explain_maps(self, x):
            return np.abs(x - self.mean_).sum(axis=-1)

    pipeline = _fit(data, Own(), "block_5_add")
    source = FileSource(data[2][:2])
    found = explain(pipeline, source)
    assert [f.method for f in found] == ["detector"] * 2
    assert all(f.map.shape == (32, 32) for f in found)
    np.testing.assert_array_equal([f.score for f in found], pipeline.score(source).scores)


@pytest.mark.tf
def test_a_folder_gets_overlays_and_unreadable_images_are_named(data, tmp_path):
    from kad.data.datasets import FileSource
    from kad.screening.heatmaps import write_heatmaps
    from kad.screening.report import HeatmapSketches

    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    files = [*data[2][:3], broken]
    pipeline = _fit(data, "mahalanobis", "block_5_add")
    sketches = HeatmapSketches()
    run = write_heatmaps(pipeline, FileSource(files), [str(f) for f in files],
                         tmp_path / "heatmaps", on_heatmap=sketches)
    assert run.method == "gradient" and run.forward_passes == 3
    assert list(run.scores.failed) == [str(broken)]
    np.testing.assert_array_equal(run.scores.scores[:3],
                                  pipeline.score(FileSource(files[:3])).scores)
    assert len(run.files) == 3
    for written in run.files.values():
        seen = cv2.imread(str(written.seen))
        assert seen.shape == (32, 32, 3)
        assert cv2.imread(str(written.original)).shape == (32, 32, 3)

    from kad.screening.heatmaps import explain_file

    one = explain_file(pipeline, files[0], tmp_path / "one.png",
                       original=tmp_path / "one_photo.png")
    assert one.score == run.scores.scores[0] and one.method == "gradient"
    assert one.flagged == (one.score > pipeline.threshold.value)
    assert one.attributed == pytest.approx(one.explained, rel=1e-4)
    assert cv2.imread(str(one.seen_png)) is not None and one.original_png.is_file()
    with pytest.raises(KadError, match="broken.png"):
        explain_file(pipeline, broken, tmp_path / "never.png")
    assert not (tmp_path / "never.png").exists()

    from kad.screening.report import write_report
    from kad.screening.workflow import rank

    rows = rank(pipeline, files, run.scores)
    page, _ = write_report(tmp_path / "report.html", pipeline, rows, run.scores.failed, [],
                           "model.kad", heatmaps=sketches)
    text = page.read_text()
    assert text.count('"pics":"tmhp"') == 3  # every readable image, both heatmaps
    # the report keeps each map's maximum, and one colour bar for all of them
    assert set(sketches.sketches) == {str(f) for f in files[:3]}
    for f in files[:3]:
        assert f"{sketches.get(str(f)).peak:.3g}" in text
    assert text.count('class="colourbar"') == 1


@pytest.mark.tf
@pytest.mark.parametrize("name", ["deep_svdd", "dsebm"])
def test_deep_score_gradient_on_features_matches_finite_differences(name):
    from kad.registry import get_detector

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 6)).astype(np.float32)
    prototype = get_detector(name)
    detector = prototype.set_params(**type(prototype).quick_params).fit(X)
    queries = (rng.normal(size=(3, 6)) * 2).astype(np.float64)
    gradient = detector.score_gradient(queries.astype(np.float32))
    eps = 1e-2  # the network runs in float32
    numeric = np.stack([
        (detector._score((queries + eps * e).astype(np.float32))
         - detector._score((queries - eps * e).astype(np.float32))) / (2 * eps)
        for e in np.eye(6)], axis=1)
    np.testing.assert_allclose(gradient, numeric, rtol=0.05, atol=0.02 * np.abs(numeric).max())


def test_one_overlay_goes_to_the_path_asked_for(tmp_path):
    from kad.screening.heatmaps import write_overlay

    heat = np.zeros((16, 16), np.float32)
    heat[3, 3] = 1.0
    found = Heatmap("eye.png", 1.0, "gradient", heat, box=(0, 0, 40, 20),
                    original_shape=(20, 40), seen=np.full((16, 16, 3), 0.5, np.float32),
                    original=np.zeros((20, 40, 3), np.uint8))
    assert cv2.imread(str(write_overlay(found, tmp_path / "a.png"))).shape == (16, 16, 3)
    written = write_overlay(found, tmp_path / "sub" / "b.png", on="original")
    assert cv2.imread(str(written)).shape == (20, 40, 3)
    with pytest.raises(KadError, match="'seen' or 'original'"):
        write_overlay(found, tmp_path / "c.png", on="both")
    with pytest.raises(KadError, match="no heatmap"):
        write_overlay(Heatmap("x", float("nan"), "gradient", None, error="truncated"),
                      tmp_path / "d.png")


def test_the_overlay_on_a_huge_photograph_is_bounded(tmp_path):
    from kad.screening.heatmaps import OVERLAY_MAX_SIDE, write_overlay

    heat = np.zeros((16, 16), np.float32)
    heat[4:8, 4:8] = 1.0
    photo = np.zeros((2400, 3000, 3), np.uint8)
    found = Heatmap("eye.png", 1.0, "gradient", heat, box=(300, 0, 2400, 2400),
                    original_shape=(2400, 3000), seen=np.full((16, 16, 3), 0.5, np.float32),
                    original=photo)
    written = write_overlay(found, tmp_path / "b.png", on="original")
    assert OVERLAY_MAX_SIDE == 2048
    assert cv2.imread(str(written)).shape == (1638, 2048, 3)
    # mapped onto a smaller copy of the photograph, the map keeps its sum
    full, small = found.on_original(), found.on_original((1638, 2048))
    assert small.shape == (1638, 2048)
    assert float(small.sum()) == pytest.approx(float(full.sum()), rel=1e-3)
    assert float(full.sum()) == pytest.approx(16.0, rel=1e-3)


@pytest.mark.tf
def test_heatmaps_decode_as_scoring_does_and_keep_a_bounded_copy(data, tmp_path,
                                                                  monkeypatch):
    from kad.data.datasets import FileSource
    from kad.screening import heatmaps
    from kad.screening.heatmaps import iter_heatmaps

    rng = np.random.default_rng(0)
    big = tmp_path / "big.jpg"
    photo = cv2.resize(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), (800, 600))
    cv2.imwrite(str(big), photo)
    pipeline = _fit(data, "knn", "block_5_add")
    monkeypatch.setattr(heatmaps, "OVERLAY_MAX_SIDE", 40)
    files = [big, data[2][0]]
    maps = list(iter_heatmaps(pipeline, FileSource(files)))
    # a 800x600 JPEG is decoded at 1/8, as Pipeline.score decodes it, with the same score
    assert maps[0].original_shape == (75, 100)
    np.testing.assert_array_equal([m.score for m in maps],
                                  pipeline.score(FileSource(files)).scores)
    assert maps[0].original.shape == (30, 40, 3)  # only a bounded copy is kept
    assert maps[1].original.shape == (32, 32, 3)
    assert maps[0].on_original().shape == (75, 100)


@pytest.mark.tf
def test_heatmaps_run_on_the_runtime_asked_for_and_agree_across_runtimes(data, monkeypatch):
    pytest.importorskip("openvino")
    from kad.data.datasets import FileSource
    from kad.features import runtime
    from kad.screening.heatmaps import explain

    used = []
    for kind in (runtime.KerasRuntime, runtime.OpenVINORuntime):
        monkeypatch.setattr(kind, "predict", lambda self, batch, _p=kind.predict: (
            used.append(self.name), _p(self, batch))[1])
    files = FileSource(data[2][-3:])
    for detector, method in (("knn", "gradient"), ("iforest", "occlusion")):
        pipeline = _fit(data, detector, TWO_BLOCKS)
        used.clear()
        on_keras = explain(pipeline, files, grid=4)  # the pipeline's runtime: Keras
        assert set(used) == {"keras"}
        used.clear()
        on_openvino = explain(pipeline, files, grid=4, runtime="openvino")
        assert set(used) == {"openvino"}
        for a, b in zip(on_keras, on_openvino, strict=True):
            assert a.method == b.method == method
            assert b.score == pytest.approx(a.score, rel=1e-4, abs=1e-4)
            np.testing.assert_allclose(b.map, a.map, atol=1e-4 * np.abs(a.map).max())


def test_the_map_is_written_as_an_array_with_its_place_on_the_photograph(tmp_path):
    import json

    from kad.screening.heatmaps import save_overlays, write_map

    heat = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    found = Heatmap("a/eye.jpeg", 2.5, "gradient", heat, box=(10, -4, 24, 24),
                    original_shape=(20, 40), seen=np.full((16, 16, 3), 0.5, np.float32),
                    original=np.zeros((20, 40, 3), np.uint8))
    path = write_map(found, tmp_path / "eye.npy")
    loaded = np.load(path, allow_pickle=False)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, heat)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["box"] == {"left": 10, "top": -4, "width": 24, "height": 24}
    assert sidecar["box_fraction"]["left"] == pytest.approx(0.25)
    assert sidecar["decoded_shape"] == [20, 40] and sidecar["score"] == 2.5
    # the sidecar's box and the array give back the map on the photograph
    again = Heatmap("x", 0.0, "gradient", loaded,
                    box=tuple(sidecar["box"][k] for k in ("left", "top", "width", "height")),
                    original_shape=tuple(sidecar["decoded_shape"]))
    np.testing.assert_array_equal(again.on_original(), found.on_original())
    # two photographs of one name in different folders never share a file
    other = Heatmap("b/eye.jpeg", 1.0, "gradient", heat * 2, box=found.box,
                    original_shape=found.original_shape, seen=found.seen)
    first = save_overlays(found, tmp_path / "out")
    second = save_overlays(other, tmp_path / "out")
    assert first.map != second.map and first.map.name.startswith("eye")
    np.testing.assert_array_equal(np.load(second.map), heat * 2)
    with pytest.raises(KadError, match=".npy"):
        write_map(found, tmp_path / "eye.png")


@pytest.mark.tf
def test_heatmap_batches_are_not_padded_and_bounded_in_memory(data, monkeypatch):
    from kad.data.datasets import FileSource
    from kad.features import runtime
    from kad.features.backbones import get_backbone
    from kad.features.batching import BUDGET_VARIABLE, image_bytes
    from kad.screening import heatmaps
    from kad.screening.heatmaps import HEATMAP_BATCH_BYTES, explain

    sizes = []
    monkeypatch.setattr(runtime.KerasRuntime, "predict", lambda self, batch, _p=(
        runtime.KerasRuntime.predict): (sizes.append(len(batch)), _p(self, batch))[1])
    pipeline = _fit(data, "knn", "block_5_add")  # batch size 8
    files = FileSource(data[2][:3])
    sizes.clear()
    whole = explain(pipeline, files)
    assert sizes == [3]  # the network runs on the 3 images, not on 8 with 5 blank
    # a batch closes once the images it keeps reach the budget: here one image each
    monkeypatch.setattr(heatmaps, "HEATMAP_BATCH_BYTES", 1)
    sizes.clear()
    alone = explain(pipeline, files)
    assert sizes == [1, 1, 1]
    for a, b in zip(whole, alone, strict=True):
        assert a.score == b.score
        np.testing.assert_array_equal(a.map, b.map)
    np.testing.assert_array_equal([m.score for m in whole], pipeline.score(files).scores)
    # a batch lowered by the network's memory budget gives the same maps and scores
    monkeypatch.setattr(heatmaps, "HEATMAP_BATCH_BYTES", HEATMAP_BATCH_BYTES)
    monkeypatch.setenv(BUDGET_VARIABLE, str(
        2 * image_bytes(get_backbone(pipeline.backbone), pipeline.image_size)))
    sizes.clear()
    bounded = explain(pipeline, files)
    assert sizes == [2, 1]
    for a, b in zip(whole, bounded, strict=True):
        assert b.score == pytest.approx(a.score, rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(b.map, a.map, rtol=1e-4, atol=1e-6 * np.abs(a.map).max())
    sizes.clear()
    scores = pipeline.score(files).scores
    assert sizes == [2, 2]  # the last batch padded to the lowered size
    np.testing.assert_allclose(scores, [m.score for m in whole], rtol=1e-5)
