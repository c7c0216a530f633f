"""Lesion measures: AUPRO as MVTec AD defines it, pointing on masks, ``kad lesions``."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from kad.screening.lesions import LesionTally, LesionTruth, find_cases, measure_map
from kad.utils.metrics import aupro, pro_curve, wilson_interval


def test_aupro_of_a_hand_computable_case():
    # two one-pixel regions (not touching) and two normal pixels, in score order:
    # region A, normal, region B, normal -> PRO 0.5 at FPR 0, 1 at FPR 0.5
    heat = np.array([[4.0, 3.0, 2.0, 1.0]])
    mask = np.array([[True, False, True, False]])
    fpr, pro = pro_curve([heat], [mask])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    assert aupro([heat], [mask], fpr_limit=0.3) == pytest.approx(0.5)
    assert aupro([heat], [mask], fpr_limit=1.0) == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    # each region weighs the same whatever its size: a 2-pixel region found first gives
    # 0.25 then 0.5, the 1-pixel region the other 0.5; with 2 normal pixels in between
    heat = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    mask = np.array([[True, True, False, False, True]])
    fpr, pro = pro_curve([heat], [mask])
    np.testing.assert_allclose(pro, [0, 0.25, 0.5, 0.5, 0.5, 1])
    assert aupro([heat], [mask], fpr_limit=0.3) == pytest.approx(0.5)
    # 8-connectivity: diagonal neighbours are one region; pixels outside ``valid`` do not
    # count at all
    diagonal = np.array([[True, False], [False, True]])
    heat = np.array([[4.0, 1.0], [2.0, 3.0]])
    fpr, pro = pro_curve([heat], [diagonal])
    np.testing.assert_allclose(pro, [0, 0.5, 1, 1, 1])
    fpr, pro = pro_curve([heat], [diagonal], valid=[np.array([[True, True], [True, False]])])
    np.testing.assert_allclose(pro, [0, 1, 1, 1])  # one region of one pixel left
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])


def test_pro_curve_follows_the_definition_at_every_threshold():
    rng = np.random.default_rng(3)
    maps, masks = [], []
    for _ in range(3):
        mask = ndimage.binary_dilation(rng.uniform(size=(20, 24)) > 0.97, iterations=1)
        maps.append(np.round(rng.normal(size=mask.shape) + 1.5 * mask, 1))  # ties too
        masks.append(mask)
    fpr, pro = pro_curve(maps, masks)
    regions = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    normal = sum(int((~m).sum()) for m in masks)
    for k, t in enumerate(np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]):
        above = [h >= t for h in maps]
        expected_fpr = sum(int((a & ~m).sum()) for a, m in zip(above, masks, strict=True)) / normal
        overlaps = [float(a[lab == i].mean()) for a, lab in zip(above, regions, strict=True)
                    for i in range(1, lab.max() + 1)]
        assert fpr[k + 1] == pytest.approx(expected_fpr)
        assert pro[k + 1] == pytest.approx(np.mean(overlaps))
    assert 0.5 < aupro(maps, masks) < 1.0
    lowest = [(~m).astype(float) for m in masks]  # anomalies the lowest values
    assert aupro(lowest, masks) == pytest.approx(0.0)


def test_wilson_interval():
    low, high = wilson_interval(18, 27)
    assert low < 18 / 27 < high
    # (p + z²/2n ± z √(p(1-p)/n + z²/4n²)) / (1 + z²/n) with z = 1.96, by hand
    assert (round(low, 3), round(high, 3)) == (0.478, 0.814)
    assert np.isnan(wilson_interval(0, 0)[0])


def _truth(shape=(100, 150)):
    lesion = np.zeros(shape, bool)
    lesion[20:24, 30:34] = True  # an exudate
    ex = lesion.copy()
    he = np.zeros(shape, bool)
    he[70:73, 100:103] = True
    disc = np.zeros(shape, bool)
    disc[40:60, 110:130] = True
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    fundus = (yy - 50) ** 2 + (xx - 75) ** 2 < 70 ** 2  # clipped at top and bottom
    return LesionTruth(lesion | he, {"EX": ex, "HE": he}, disc, fundus)


def _peak(shape, row, col, spread=3.0):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * spread ** 2))


def test_pointing_on_masks_by_kind_and_misses_on_the_disc():
    truth = _truth()
    tally = LesionTally(near=0.05, disc_margin=0.05, eval_side=75)
    hit = tally.add("hit", _peak(truth.shape, 21, 31), truth, score=3.0)
    assert hit.hit and hit.kinds_hit == ["EX"] and hit.near
    assert hit.pixel_auroc > 0.6  # the exudate found, the haemorrhage tied with the rest
    close = tally.add("close", _peak(truth.shape, 21, 38), truth, score=2.0)  # 5 px off
    assert not close.hit and close.near and close.miss_on_disc is False
    disc = tally.add("disc", _peak(truth.shape, 50, 120), truth, score=1.0)
    assert not disc.hit and disc.miss_on_disc
    # outside the fundus the map does not count, however high
    outside = _peak(truth.shape, 71, 101)
    outside[0, 0] = 100.0
    assert tally.add("outside", outside, truth, score=2.5).kinds_hit == ["HE"]
    summary = tally.summary(normal_scores=[0.5, 1.5, 2.2])
    assert (summary.n, summary.hits, summary.near_hits) == (4, 2, 3)
    assert (summary.misses, summary.misses_on_disc, summary.misses_with_disc) == (2, 1, 2)
    assert summary.hits_by_kind == {"MA": 0, "HE": 1, "EX": 1, "SE": 0}
    # lesion scores 3, 2, 1, 2.5 against normal 0.5, 1.5, 2.2: 9 of 12 pairs ordered
    assert summary.image_auroc == pytest.approx(9 / 12)
    assert 0 < summary.chance < 0.02 and 0 < summary.aupro <= 1
    # both pixel AUROCs in the table: pooled over the photographs, and each photograph's own
    # averaged (maps whose scale differs between photographs differ on the two)
    own = np.mean([r.pixel_auroc for r in tally.results])
    assert summary.row()["pixel AUROC per photo"] == f"{own:.3f}" != f"{summary.pixel_auroc:.3f}"
    with pytest.raises(Exception, match="shape"):
        measure_map("bad", np.zeros((10, 10)), truth)


def test_photographs_without_masks_are_listed_with_the_reason(tmp_path):
    (tmp_path / "masks").mkdir()
    for name in ("a_EX.png", "a_OD.png", "b_OD.png", "notes.txt"):
        (tmp_path / "masks" / name).write_bytes(b"")
    cases, left = find_cases([tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"],
                             tmp_path / "masks")
    assert [c.image.name for c in cases] == ["a.jpg"]
    assert set(cases[0].masks) == {"EX", "OD"}
    assert [(r.id.rsplit("/", 1)[-1], r.status) for r in left] == [("b.jpg", "no mask"),
                                                                    ("c.jpg", "no mask")]
    assert "b_<MA|HE|EX|SE>.png" in left[0].reason
