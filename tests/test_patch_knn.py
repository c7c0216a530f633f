"""Patch kNN scores every location and finds a lesion that pooling averages away."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import FAST
from kad.errors import KadError
from kad.utils.progress import Recorder
from kad_plugins.patch_knn import PatchKNNDetector
from kad_plugins.shallow import KNNDetector


def _maps(n, rng, side=12, channels=8):
    """Smooth random textures: each location a mix of a few channel patterns."""
    base = rng.normal(size=(n, side // 3, side // 3, channels)).astype(np.float32)
    maps = np.repeat(np.repeat(base, 3, axis=1), 3, axis=2)
    return maps + rng.normal(0, 0.1, size=maps.shape).astype(np.float32)


def _with_lesion(maps, rng):
    """Each map with one location pushed off the normal texture; where it is."""
    out, where = maps.copy(), []
    for m in out:
        r, c = (int(v) for v in rng.integers(0, m.shape[0], size=2))
        m[r, c] += 6.0 * np.sign(rng.normal(size=m.shape[-1]))
        where.append((r, c))
    return out, where


def test_a_single_unusual_location_is_found_where_pooled_features_miss_it():
    rng = np.random.default_rng(0)
    train, normal = _maps(30, rng), _maps(20, rng)
    abnormal, where = _with_lesion(_maps(20, rng), rng)
    y = np.r_[np.zeros(20), np.ones(20)]
    patch = PatchKNNDetector(bank_size=1500).fit(train)
    test = np.concatenate([normal, abnormal])
    assert roc_auc_score(y, patch.anomaly_score(test)) > 0.95
    # the same images, pooled, then scored by kNN: one location in 144 is averaged away
    pooled = KNNDetector().fit(train.mean(axis=(1, 2)))
    assert roc_auc_score(y, pooled.anomaly_score(test.mean(axis=(1, 2)))) < 0.75
    peaks = [np.unravel_index(np.argmax(patch.explain_maps(m)), m.shape[:2])
             for m in abnormal]
    assert [tuple(int(v) for v in p) for p in peaks] == where


def test_the_map_maximum_is_the_score_and_ordinary_locations_are_near_zero():
    rng = np.random.default_rng(1)
    det = PatchKNNDetector(bank_size=2000).fit(_maps(20, rng))
    test = _maps(5, rng)
    maps = [det.explain_maps(m) for m in test]
    np.testing.assert_array_equal([m.max() for m in maps],
                                  det.anomaly_score(test).astype(np.float32))
    # distances are standardised by the training locations' median: half are below it
    assert 0.3 < np.mean([np.mean(m <= 0) for m in maps]) < 0.7


def test_each_block_counts_in_its_own_spread():
    """A lesion seen only in a block of small features is found when the blocks are
    standardised apart, and drowned by a block of wide features when they are not."""
    rng = np.random.default_rng(6)

    def two_blocks(n):
        return np.concatenate([10 * _maps(n, rng, channels=8), _maps(n, rng, channels=8)],
                              axis=3)

    train, normal, abnormal = two_blocks(30), two_blocks(20), two_blocks(20)
    for m in abnormal:
        r, c = (int(v) for v in rng.integers(0, 12, size=2))
        m[r, c, 8:] += 4.0 * np.sign(rng.normal(size=8))
    y = np.r_[np.zeros(20), np.ones(20)]
    test = np.concatenate([normal, abnormal])
    apart = PatchKNNDetector(bank_size=1500, block_channels=(8, 8)).fit(train)
    together = PatchKNNDetector(bank_size=1500).fit(train)
    assert roc_auc_score(y, apart.anomaly_score(test)) > 0.9
    assert roc_auc_score(y, together.anomaly_score(test)) < 0.75
    with pytest.raises(ValueError, match="add up to the maps' 16 channels"):
        PatchKNNDetector(block_channels=(8, 4)).fit(train)


def test_training_images_are_not_their_own_neighbours():
    rng = np.random.default_rng(2)
    train, fresh = _maps(40, rng), _maps(40, rng)
    det = PatchKNNDetector(bank_size=100_000).fit(train)  # every location in the bank
    # against a bank holding its own locations a training image would score 0
    assert det.anomaly_scores_.min() > 0
    ratio = np.median(det.anomaly_scores_) / np.median(det.anomaly_score(fresh))
    assert 0.8 < ratio < 1.25


def test_wide_blocks_are_projected_and_keep_their_distances():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(7)
    mixing = rng.normal(size=(8, 256)).astype(np.float32)  # 256 channels of 8 factors
    train = _maps(30, rng) @ mixing
    test, _ = _with_lesion(_maps(4, rng), rng)
    test = test @ mixing
    full = PatchKNNDetector(bank_size=3000, max_dims=256).fit(train)
    projected = PatchKNNDetector(bank_size=3000, max_dims=64).fit(train)
    assert full.projections_ == [None] and projected.bank_.shape == (3000, 64)
    assert projected.projections_[0].shape == (64, 256)
    for m in test:
        a, b = full.distances(m).ravel(), projected.distances(m).ravel()
        assert spearmanr(a, b).statistic > 0.8
        assert 0.85 < np.median(b / a) < 1.15


def test_bad_settings_are_refused():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="bank_size"):
        PatchKNNDetector(bank_size=0).fit(_maps(4, rng))
    with pytest.raises(ValueError, match="at least 2 training images"):
        PatchKNNDetector().fit(_maps(1, rng))


# -- in a pipeline ----------------------------------------------------------------------


# Maps come from the Keras network: a pipeline on the same runtime scores bit-identically.
KERAS = {**FAST, "runtime": "keras"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from kad.data.datasets import load_dataset
    from synthetic import screening_folder

    root = screening_folder(tmp_path_factory.mktemp("patch"), n_normal=24, n_abnormal=4,
                            size=32)
    dataset = load_dataset("folder", root, kind="natural")
    return dataset, np.flatnonzero(~dataset.anomaly)[:10], [root / i for i in dataset.ids]


@pytest.mark.tf
def test_a_pipeline_scores_block_maps_and_its_heatmap_is_the_detectors_own(folder, tmp_path,
                                                                          monkeypatch):
    from kad.data.datasets import FileSource
    from kad.screening.fitting import fit_pipeline
    from kad.screening.heatmaps import explain
    from kad.screening.pipeline import load_pipeline

    dataset, train, files = folder
    fitting = Recorder()
    pipeline = fit_pipeline(dataset, train_rows=train, detector="patchknn", progress=fitting,
                            **KERAS)
    # the maps of the training images, then the detector's pass over them, one by one
    assert fitting.tasks()[-2:] == ["detector inputs",
                                    "patch kNN: training images against the bank"]
    assert fitting.last("detector inputs") == (len(train), len(train))
    assert fitting.last("patch kNN: training images against the bank") == (len(train), len(train))
    # the deepest blocks of stride 8 and 16: block_5_add's 4x4 map and block_12_add's 2x2
    assert pipeline.blocks == ["block_5_add", "block_12_add"]
    assert pipeline.detector.block_channels == (16, 32) and pipeline.runtime == "keras"
    source = FileSource(files[-6:])
    scoring = Recorder()
    scores = pipeline.score(source, progress=scoring).scores
    assert scoring.tasks() == ["scoring"] and scoring.last("scoring") == (6, 6)
    drawing = Recorder()
    products = _counted_products(monkeypatch)
    found = explain(pipeline, source, progress=drawing)
    # the batch's scores and maps from one search: every location once per block
    side = pipeline.detector.input_shape_[:2]
    assert sum(products) == len(pipeline.detector.dims_) * len(source) * side[0] * side[1]
    assert drawing.tasks() == ["heatmaps"] and drawing.last("heatmaps") == (6, 6)
    assert {f.method for f in found} == {"detector"}
    np.testing.assert_array_equal([f.score for f in found], scores)
    reloaded = load_pipeline(pipeline.save(tmp_path / "patch.kad"))
    np.testing.assert_array_equal(reloaded.score(source).scores, scores)
    for a, b in zip(found, explain(reloaded, source), strict=True):
        np.testing.assert_array_equal(a.map, b.map)
    # the maps run on OpenVINO too (float32 rounding apart), heatmaps included
    on_openvino = pipeline.score(source, runtime="openvino").scores
    np.testing.assert_allclose(on_openvino, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    assert pipeline.runner().name == "keras"  # the recorded runtime stays the default
    drawn = explain(pipeline, source, runtime="openvino")
    np.testing.assert_allclose([f.score for f in drawn], on_openvino, rtol=1e-5)
    for a, b in zip(found, drawn, strict=True):
        np.testing.assert_allclose(b.map, a.map, atol=1e-4 * np.abs(a.map).max())
    # occlusion rescoring goes through the same representation as scoring
    occluded = explain(pipeline, source, method="occlusion", grid=2)
    np.testing.assert_array_equal([f.score for f in occluded], scores)
    assert all(np.isfinite(f.map).all() and f.map.std() > 0 for f in occluded)
    with pytest.raises(KadError, match="gradient|reference_"):
        explain(pipeline, source, method="gradient")


@pytest.mark.tf
def test_kad_fit_refuses_patchknn_among_pooled_detectors_before_any_work_and_scores_it(
        folder, tmp_path):
    from kad.screening.workflow import fit_model, screen

    dataset, train, files = folder
    with pytest.raises(KadError, match="cannot be chosen"):
        fit_model(dataset, tmp_path / "m.kad", detector="patchknn,knn",
                  cache_dir=tmp_path / "cache", **KERAS)
    assert not (tmp_path / "cache").exists()
    model = fit_model(dataset, tmp_path / "m.kad", detector="patchknn",
                      cache_dir=tmp_path / "cache", **KERAS).path
    run = screen(model, [files[-1], files[0]], tmp_path / "out", heatmaps=True)
    assert run.heatmaps.method == "detector" and len(run.rows) == 2
    # its own maps at fitting too: the report's scale is anchored on the calibration normals
    assert "anchored on the calibration normals" in run.report.read_text()


def test_fitting_and_scoring_report_their_passes_over_images(capsys):
    rng = np.random.default_rng(3)
    det = PatchKNNDetector(bank_size=500)
    fitting = Recorder()
    det.fit(_maps(6, rng), progress=fitting)
    name = "patch kNN: training images against the bank"
    assert fitting.tasks() == [name]
    assert [e[2:] for e in fitting.events if e[0] == "update"] == [(i, 6) for i in range(1, 7)]
    assert fitting.events[-1] == ("end", name, None, None)
    scoring = Recorder()
    scores = det.anomaly_score(_maps(3, rng), progress=scoring)
    assert scoring.tasks() == ["patch kNN: scoring images"]
    assert scoring.last("patch kNN: scoring images") == (3, 3) and len(scores) == 3
    assert "_progress" not in vars(det)
    PatchKNNDetector(bank_size=500).fit(_maps(6, rng)).anomaly_score(_maps(2, rng))
    assert capsys.readouterr() == ("", ""), "without a progress nothing is reported or drawn"
    assert "verbose" not in det.get_params()


def test_block_maps_are_stacked_on_the_finest_grid():
    import cv2

    from kad.features.representation import stack_maps

    rng = np.random.default_rng(5)
    fine = rng.normal(size=(40, 8, 8, 3)).astype(np.float32)
    coarse = rng.normal(size=(40, 4, 4, 30)).astype(np.float32)  # 1200 channels in all
    stacked = stack_maps([fine, coarse])
    assert stacked.shape == (40, 8, 8, 33)
    np.testing.assert_array_equal(stacked[..., :3], fine)
    for i in (0, 17, 39):
        np.testing.assert_allclose(stacked[i, ..., 3:], cv2.resize(
            coarse[i], (8, 8), interpolation=cv2.INTER_LINEAR), rtol=1e-6, atol=1e-6)


@pytest.mark.tf
def test_named_blocks_are_used_and_unknown_ones_named(folder):
    from kad.screening.fitting import fit_pipeline

    dataset, train, _ = folder
    pipeline = fit_pipeline(dataset, train_rows=train, representation="block_9_add",
                            detector="patchknn", **KERAS)
    assert pipeline.blocks == ["block_9_add"] and pipeline.detector.block_channels == (24,)
    with pytest.raises(KadError, match="no block block_99 in"):
        fit_pipeline(dataset, train_rows=train, representation="block_5_add,block_99",
                     detector="patchknn", **KERAS)


@pytest.mark.tf
def test_a_pipeline_of_block_maps_is_fitted_and_scored_on_openvino(folder, tmp_path):
    from kad.data.datasets import FileSource
    from kad.features.runtime import OpenVINORuntime
    from kad.screening.fitting import fit_pipeline
    from kad.screening.pipeline import load_pipeline

    dataset, train, files = folder
    fast = {**FAST, "runtime": "openvino", "cache_dir": tmp_path / "cache"}
    pipeline = fit_pipeline(dataset, train_rows=train, detector="patchknn", **fast)
    assert pipeline.runtime == "openvino"
    assert isinstance(pipeline.runner(), OpenVINORuntime)
    source = FileSource(files[-6:])
    scores = pipeline.score(source).scores
    reloaded = load_pipeline(pipeline.save(tmp_path / "patch.kad"))
    assert reloaded.runtime == "openvino"
    assert isinstance(reloaded.runner(), OpenVINORuntime)
    np.testing.assert_array_equal(reloaded.score(source).scores, scores)
    on_keras = reloaded.score(source, runtime="keras").scores
    np.testing.assert_allclose(on_keras, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())


# -- the search: exact, batched, linear in the number of images -------------------------


def _reference(queries, bank, k):
    """Brute force in float64: each query's mean distance to its k nearest bank rows."""
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64))
                 ** 2).sum(axis=-1))
    return np.sort(d, axis=1)[:, :k].mean(axis=1)


@pytest.mark.parametrize("k", [1, 3])
def test_distances_are_those_of_a_brute_force_search(k):
    """The bank is ranked in float32 and the chosen neighbours' distances recomputed in
    float64. Where float32 cannot tell two bank vectors apart the other may be chosen:
    the squared distance is then off by at most the float32 rounding of the ranking keys,
    ``|b|²/2 - x·b``, a few ulps of ``|x|² + |b|²``; elsewhere the distances are the
    reference's to float64 rounding."""
    rng = np.random.default_rng(8)
    train = rng.normal(size=(10, 6, 6, 12)).astype(np.float32)
    det = PatchKNNDetector(bank_size=300, block_channels=(4, 8), n_neighbors=k).fit(train)
    # near-ties: some bank vectors, a hair away, as queries
    test = rng.normal(size=(3, 6, 6, 12)).astype(np.float32)
    test[0, :3].reshape(-1, 12)[:] = det.bank_[:18] + 1e-6
    bound = 16 * np.finfo(np.float32).eps
    for m in test:
        ours = det.distances(m)
        for b, channels in enumerate(det._slices(det.dims_)):
            x, bank = m.reshape(-1, 12)[:, channels], det.bank_[:, channels]
            ref = _reference(x, bank, k)
            scale = (x.astype(np.float64) ** 2).sum(1) + (bank.astype(np.float64) ** 2
                                                          ).sum(1).max()
            got = ours[b].ravel()
            assert np.all(got >= ref * (1 - 1e-12))
            assert np.all(got ** 2 - ref ** 2 <= bound * scale)
            clear = got ** 2 - ref ** 2 <= 1e-12 * scale  # the same neighbours: rounding
            np.testing.assert_allclose(got[clear], ref[clear], rtol=1e-12)
            assert clear.mean() > 0.9


@pytest.mark.parametrize("k", [1, 2])
def test_training_distances_leave_each_image_out_as_a_brute_force_search(k):
    rng = np.random.default_rng(9)
    train = _maps(8, rng, side=6, channels=6)
    det = PatchKNNDetector(bank_size=150, block_channels=(2, 4), n_neighbors=k).fit(train)
    n, h, w, c = train.shape
    ref = np.empty((n, 2, h * w))
    for i in range(n):
        others = det.bank_image_ != i
        for b, channels in enumerate(det._slices(det.dims_)):
            ref[i, b] = _reference(train[i].reshape(-1, c)[:, channels],
                                   det.bank_[others][:, channels], k)
    per_block = ref.transpose(1, 0, 2).reshape(2, -1)
    centre = np.median(per_block, axis=1)
    spread = np.median(np.abs(per_block - centre[:, None]), axis=1)
    np.testing.assert_allclose(det.centre_, centre, rtol=1e-12)
    np.testing.assert_allclose(det.spread_, spread, rtol=1e-12)
    scores = (((ref - centre[None, :, None]) / spread[None, :, None]).sum(axis=1)).max(axis=1)
    np.testing.assert_allclose(det.anomaly_scores_, scores, rtol=1e-12)


def test_a_score_is_the_same_bit_for_bit_whatever_images_come_with_it(monkeypatch):
    """Images are searched many at once, in tiles that cut across them; every location is
    ranked on its own row, so a score, and the training distances, do not depend on the
    tiling or on the other images."""
    from kad_plugins import patch_knn

    rng = np.random.default_rng(10)
    train, test = _maps(12, rng), _maps(7, rng)
    det = PatchKNNDetector(bank_size=700, block_channels=(3, 5), n_neighbors=2).fit(train)
    scores = det.anomaly_score(test)
    alone = [det.anomaly_score(test[i:i + 1])[0] for i in range(len(test))]
    np.testing.assert_array_equal(alone, scores)
    np.testing.assert_array_equal(det.anomaly_score(test[::-1]), scores[::-1])
    # tiles of 100 locations (images have 144) and 2 images per batch
    monkeypatch.setattr(patch_knn, "_MIN_ROWS", 100)
    monkeypatch.setattr(patch_knn, "_TILE", 100 * 700)
    monkeypatch.setattr(patch_knn, "_BATCH_ROWS", 300)
    assert det._tile_rows() == 100
    np.testing.assert_array_equal(det.anomaly_score(test), scores)
    again = PatchKNNDetector(bank_size=700, block_channels=(3, 5), n_neighbors=2).fit(train)
    np.testing.assert_array_equal(again.anomaly_scores_, det.anomaly_scores_)
    np.testing.assert_array_equal(again.centre_, det.centre_)


def test_fitting_does_one_pass_of_the_training_locations_over_the_bank(monkeypatch):
    """Fitting's work is counted, not timed: every product ranks a tile of query
    locations against the whole bank, and fitting ranks each training location once per
    block. With the bank full, twice the images is twice the work, never four times."""
    from kad_plugins import patch_knn

    products = []

    def counted(queries, augmented, out):
        products.append((len(queries), augmented.shape[1]))
        return np.matmul(queries, augmented, out=out)

    monkeypatch.setattr(patch_knn, "_product", counted)
    rng = np.random.default_rng(11)
    work = {}
    for n in (10, 20):
        products.clear()
        det = PatchKNNDetector(bank_size=1000, block_channels=(3, 5)).fit(_maps(n, rng))
        rows = np.array(products)
        assert set(rows[:, 1]) == {1000}  # the whole bank, own image's vectors included
        assert rows[:, 0].sum() == 2 * n * 144  # each location once per block
        assert rows[:, 0].max() * 1000 * 4 <= 256 * 2 ** 20  # distance tiles stay small
        work[n] = int((rows[:, 0] * rows[:, 1]).sum())
        products.clear()
        det.anomaly_score(_maps(3, rng))
        assert np.array(products)[:, 0].sum() == 2 * 3 * 144
    assert work[20] == 2 * work[10]


def _counted_products(monkeypatch) -> list[int]:
    """The query locations of every product of patch kNN's search, as they are made."""
    from kad_plugins import patch_knn

    rows = []

    def counted(queries, augmented, out):
        rows.append(len(queries))
        return np.matmul(queries, augmented, out=out)

    monkeypatch.setattr(patch_knn, "_product", counted)
    return rows


def test_a_batch_scores_and_maps_come_from_one_search(monkeypatch):
    """``score_maps`` gives ``anomaly_score``'s scores and ``explain_maps``' maps, the same
    numbers bit for bit, from one pass of the batch's locations over the bank: heatmaps
    do not search a second time for the maps."""
    from kad_plugins import patch_knn

    rng = np.random.default_rng(12)
    train, test = _maps(12, rng, channels=10), _maps(5, rng, channels=10)
    det = PatchKNNDetector(bank_size=600, block_channels=(4, 6), max_dims=5, n_neighbors=2,
                           aggregate=3, position=0.5).fit(train)
    monkeypatch.setattr(patch_knn, "_BATCH_ROWS", 300)  # 2 images searched at a time
    scores = det.anomaly_score(test)
    maps = [det.explain_maps(m) for m in test]
    products = _counted_products(monkeypatch)
    together, drawn = det.score_maps(test)
    assert sum(products) == len(det.dims_) * test[..., 0].size  # every location once per block
    np.testing.assert_array_equal(together, scores)
    assert together.dtype == np.float64
    for a, b in zip(drawn, maps, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal([m.max() for m in drawn], scores.astype(np.float32))


def test_the_approximate_index_is_close_to_the_exact_search_and_rebuilt_after_loading(
        tmp_path):
    pytest.importorskip("hnswlib")
    from kad.detectors.base import load_detector

    rng = np.random.default_rng(12)
    train, test = _maps(20, rng), _maps(6, rng)
    exact = PatchKNNDetector(bank_size=2000).fit(train)
    approx = PatchKNNDetector(bank_size=2000, index="hnsw").fit(train)
    # the training pass is exact either way
    np.testing.assert_array_equal(approx.anomaly_scores_, exact.anomaly_scores_)
    found = np.mean([np.isclose(approx.distances(m), exact.distances(m), rtol=1e-9)
                     for m in test])
    assert found > 0.95  # recall@1
    scores = approx.anomaly_score(test)
    np.testing.assert_allclose(scores, exact.anomaly_score(test), rtol=0.05)
    assert "_hnsw" in vars(approx)
    loaded = load_detector(approx.save(tmp_path / "hnsw.kad"))
    assert "_hnsw" not in vars(loaded)
    np.testing.assert_array_equal(loaded.anomaly_score(test), scores)


def test_the_approximate_index_names_its_package_when_it_is_missing(monkeypatch):
    import sys

    from kad.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "hnswlib", None)
    with pytest.raises(MissingDependencyError, match="pip install hnswlib"):
        PatchKNNDetector(index="hnsw").fit(_maps(4, np.random.default_rng(13)))
    with pytest.raises(ValueError, match="index must be one of"):
        PatchKNNDetector(index="faiss").fit(_maps(4, np.random.default_rng(13)))


# -- the options for lesions: neighbourhood, coreset, position -------------------------

def _with_patch_lesion(maps, rng, size=3):
    """Each map with a ``size`` x ``size`` patch pushed off the normal texture; its
    centre."""
    out, where = maps.copy(), []
    for m in out:
        r, c = (int(v) for v in rng.integers(1, m.shape[0] - size, size=2))
        m[r:r + size, c:c + size] += 4.0 * np.sign(rng.normal(size=m.shape[-1]))
        where.append((r + size // 2, c + size // 2))
    return out, where


@pytest.mark.parametrize("options", [{"aggregate": 3}, {"sampling": "coreset"},
                                     {"position": 1.0},
                                     {"aggregate": 3, "sampling": "coreset", "position": 0.5}])
def test_each_lesion_option_finds_planted_lesions(options):
    rng = np.random.default_rng(20)
    train, normal = _maps(20, rng), _maps(10, rng)
    abnormal, where = _with_patch_lesion(_maps(10, rng), rng)
    det = PatchKNNDetector(bank_size=600, **options).fit(train)
    y = np.r_[np.zeros(10), np.ones(10)]
    assert roc_auc_score(y, det.anomaly_score(np.concatenate([normal, abnormal]))) > 0.95
    peaks = [np.unravel_index(np.argmax(det.explain_maps(m)), m.shape[:2]) for m in abnormal]
    off = [max(abs(int(p[0]) - r), abs(int(p[1]) - c)) for p, (r, c) in zip(peaks, where,
                                                                           strict=True)]
    assert np.mean(np.array(off) <= 1) >= 0.9


def test_the_coreset_keeps_rare_normal_locations_that_a_uniform_draw_drops():
    rng = np.random.default_rng(21)
    train = _maps(30, rng)
    rare = 5.0 * np.sign(rng.normal(size=8)).astype(np.float32)
    for m in train[::10]:  # 3 locations of 4320
        m[5, 5] = rare
    test = _maps(8, rng)
    test[:, 5, 5] = rare
    uniform = PatchKNNDetector(bank_size=200).fit(train)
    coreset = PatchKNNDetector(bank_size=200, sampling="coreset").fit(train)
    assert np.linalg.norm(coreset.bank_ - rare, axis=1).min() < 1.0
    assert np.linalg.norm(uniform.bank_ - rare, axis=1).min() > 5.0
    at = np.array([[det.location_scores(m)[5, 5] for m in test] for det in (uniform, coreset)])
    assert (at[1] < at[0]).all()
    assert (np.diff(coreset.bank_image_) >= 0).all()  # in image order: own images set aside


def test_position_makes_a_normal_structure_out_of_its_place_anomalous():
    """A bright spot every normal image has at the left (as every fundus has its optic
    disc) is ordinary there; on the right it is anomalous only when positions count."""
    rng = np.random.default_rng(22)
    disc = 4.0 * np.sign(rng.normal(size=8)).astype(np.float32)

    def with_disc(n, col):
        maps = _maps(n, rng)
        maps[:, 5:7, col:col + 2] = disc
        return maps

    train, usual, moved = with_disc(30, 1), with_disc(10, 1), with_disc(10, 9)
    y = np.r_[np.zeros(10), np.ones(10)]
    test = np.concatenate([usual, moved])
    plain = PatchKNNDetector(bank_size=2000).fit(train)
    placed = PatchKNNDetector(bank_size=2000, position=1.0).fit(train)
    assert roc_auc_score(y, plain.anomaly_score(test)) < 0.75
    assert roc_auc_score(y, placed.anomaly_score(test)) > 0.95
    assert placed.bank_.shape[1] == 8 + 2 and placed.dims_ == (10,)


def test_lesion_options_are_deterministic_and_saved_models_score_as_in_memory(tmp_path):
    from kad.detectors.base import load_detector

    rng = np.random.default_rng(23)
    train, test = _maps(12, rng), _with_patch_lesion(_maps(4, rng), rng)[0]
    options = {"bank_size": 300, "aggregate": 3, "sampling": "coreset", "position": 0.5,
               "block_channels": (3, 5)}
    det = PatchKNNDetector(**options).fit(train)
    again = PatchKNNDetector(**options).fit(train)
    np.testing.assert_array_equal(det.bank_, again.bank_)
    scores = det.anomaly_score(test)
    np.testing.assert_array_equal(again.anomaly_score(test), scores)
    loaded = load_detector(det.save(tmp_path / "lesions.kad"))
    np.testing.assert_array_equal(loaded.anomaly_score(test), scores)
    np.testing.assert_array_equal(loaded.explain_maps(test[0]), det.explain_maps(test[0]))
    other = PatchKNNDetector(**{**options, "random_state": 1}).fit(train)
    assert not np.array_equal(other.bank_, det.bank_)


@pytest.mark.parametrize(("options", "message"), [
    ({"sampling": "kmeans"}, "sampling must be one of"),
    ({"aggregate": 2}, "aggregate must be an odd positive integer"),
    ({"position": -1.0}, "position must be a number >= 0")])
def test_bad_lesion_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        PatchKNNDetector(**options).fit(_maps(4, np.random.default_rng(24)))


# -- the coreset's greedy k-centre: in place, on one thread, the same rows ---------------

def _plain_greedy_coreset(locations, size, random_state):
    """The greedy k-centre loop as first written (fresh temporaries at every step, BLAS
    threads as configured): the reference that the in-place loop must reproduce."""
    from kad_plugins.patch_knn import _CORESET_DIMS, _CORESET_POOL

    rng = np.random.default_rng(random_state)
    pool = (np.arange(len(locations)) if len(locations) <= _CORESET_POOL
            else np.sort(rng.choice(len(locations), _CORESET_POOL, replace=False)))
    points = locations[pool]
    if points.shape[1] > _CORESET_DIMS:
        points = points @ (rng.normal(size=(points.shape[1], _CORESET_DIMS))
                           / np.sqrt(_CORESET_DIMS)).astype(np.float32)
    points = np.ascontiguousarray(points, dtype=np.float32)
    norms = np.einsum("ij,ij->i", points, points)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = int(rng.integers(len(points)))
    nearest = np.full(len(points), np.inf, dtype=np.float32)
    for i in range(size):
        if i:
            chosen[i] = int(np.argmax(nearest))
        centre = points[chosen[i]]
        np.minimum(nearest, norms - 2 * (points @ centre) + norms[chosen[i]], out=nearest)
        nearest[chosen[i]] = -np.inf
    return np.sort(pool[chosen])


def _coreset_locations(kind, rng):
    if kind == "textures":  # low intrinsic dimension, as block maps have
        return _maps(30, rng, channels=48).reshape(-1, 48)
    if kind == "far from the origin":  # float32 cancellation: the rounding decides
        return 300.0 + _maps(20, rng, channels=8).reshape(-1, 8)
    if kind == "duplicates":  # ties everywhere: the lowest row wins, as np.argmax takes it
        rows = rng.integers(0, 3, size=(2000, 6)).astype(np.float32)
        return np.concatenate([rows, np.zeros((500, 6), np.float32)])
    return rng.normal(size=(3000, 16)).astype(np.float32)  # no structure


@pytest.mark.parametrize("kind", ["textures", "far from the origin", "duplicates", "noise"])
def test_the_greedy_coreset_chooses_the_rows_of_the_plain_loop(kind):
    from kad_plugins.patch_knn import _greedy_coreset

    locations = _coreset_locations(kind, np.random.default_rng(25))
    for seed in (0, 1):
        reference = _plain_greedy_coreset(locations, 400, seed)
        calls = []
        chosen = _greedy_coreset(locations, 400, seed, calls.append)
        np.testing.assert_array_equal(chosen, reference)
        assert calls[-1] == 400
        np.testing.assert_array_equal(_greedy_coreset(locations, 400, seed, calls.append),
                                      chosen)


def test_a_coreset_larger_than_the_pool_chooses_distinct_rows(monkeypatch):
    """A bank asked larger than the pool of rows the greedy search runs on: the pool grows
    to the bank's size (drawing the same row twice would repeat it in the bank)."""
    from kad_plugins import patch_knn

    monkeypatch.setattr(patch_knn, "_CORESET_POOL", 100)
    locations = _maps(4, np.random.default_rng(26)).reshape(-1, 8)  # 576 rows
    for size in (150, 300):
        chosen = patch_knn._greedy_coreset(locations, size, 0, lambda _: None)
        assert len(np.unique(chosen)) == size


@pytest.mark.parametrize("k", [1, 2, 5, 40])
def test_the_nearest_columns_are_the_k_smallest_of_each_row(k):
    """Rounds of argmin (or argpartition beyond _ARGMIN_ROUNDS) find each row's k smallest
    entries, infinite ones (a training image's own vectors) last."""
    from kad_plugins.patch_knn import _ARGMIN_ROUNDS, _smallest

    rng = np.random.default_rng(k)
    tile = rng.normal(size=(50, 300)).astype(np.float32)
    tile[:, 100:150] = np.inf
    expected = np.sort(tile, axis=1)[:, :k]
    near = _smallest(tile.copy(), k)
    assert near.shape == (50, k)
    assert all(len(set(row)) == k for row in near)  # k different columns
    np.testing.assert_array_equal(np.sort(np.take_along_axis(tile, near, axis=1), axis=1),
                                  expected)
    assert (k > _ARGMIN_ROUNDS) == (k == 40)
