"""``kad export``: a folder that scores as the model file does, with OpenVINO alone.

The exported folder scores the same images within 1e-5 (relative) of the model file, in
this process and in a child process where importing TensorFlow or Keras fails (so it
cannot fall back on them); with ``KAD_CORE_PYTHON`` naming the interpreter of an
environment without TensorFlow, there too. Damaged folders are refused naming the file,
an existing folder is never replaced unasked, and never when it holds files kad did not
write."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import kad
from conftest import FAST
from kad.cli import app
from kad.data.datasets import FileSource, load_dataset
from kad.errors import ArtifactError, KadError
from kad.features.exported import MARKER, input_scaling
from kad.screening.export import export_pipeline
from kad.screening.fitting import fit_pipeline
from synthetic import screening_folder

pytestmark = pytest.mark.tf

REPO = Path(__file__).resolve().parents[1]
#: Makes ``import tensorflow`` and ``import keras`` fail in every process that has it on
#: its path (Python imports ``sitecustomize`` at start-up).
BLOCKER = '''
import sys

class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(f"{name} is blocked: an exported model scores without it")
        return None

sys.meta_path.insert(0, _NoTensorFlow())
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A pipeline fitted on OpenVINO features, its model file, its export, images and
    the pipeline's scores of them."""
    root = tmp_path_factory.mktemp("export")
    data = screening_folder(root / "data", n_normal=14, n_abnormal=4)
    dataset = load_dataset("folder", data, kind="natural")
    with pytest.MonkeyPatch.context() as patch:  # its own cache, as every test has
        patch.setenv("KAD_CACHE_DIR", str(root / "cache"))
        pipeline = fit_pipeline(dataset, detector="knn", runtime="openvino", **FAST)
        model = pipeline.save(root / "model.kad")
        run = export_pipeline(pipeline, root / "exported")
        files = [data / i for i in dataset.ids]
        scores = pipeline.score(FileSource(files)).scores
    return pipeline, model, run.path, files, scores


def _csv_scores(path: Path) -> dict[str, float]:
    with open(path, newline="") as fh:
        return {Path(r["file"]).name: float(r["score"]) for r in csv.DictReader(fh)
                if r["status"] == "scored"}


def test_the_export_scores_as_the_model_file(exported):
    pipeline, _, folder, files, expected = exported
    loaded = kad.load_pipeline(folder)
    assert loaded.exported is not None and not loaded.has_network
    got = loaded.score(FileSource(files)).scores
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert loaded.threshold.value == pipeline.threshold.value
    np.testing.assert_array_equal(loaded.flag(got), pipeline.flag(expected))


def test_an_export_draws_occlusion_heatmaps_and_refuses_what_needs_keras_or_rewriting(
        exported):
    from kad.screening.heatmaps import explain

    _, _, folder, files, expected = exported
    loaded = kad.load_pipeline(folder)
    found = explain(loaded, FileSource(files[:1]), grid=2)[0]
    assert found.method == "occlusion"  # auto: knn's gradient needs the Keras block maps
    assert found.score == pytest.approx(expected[0], rel=1e-5)
    with pytest.raises(KadError, match="exported model.*--heatmap-method occlusion"):
        explain(loaded, FileSource(files[:1]), method="gradient")
    with pytest.raises(KadError, match="--weights does not apply"):
        loaded.score(FileSource(files[:1]), weights="other.h5")
    with pytest.raises(KadError, match="export it again"):
        loaded.save(folder.parent / "again.kad")
    refused = CliRunner().invoke(app, ["threshold", str(folder), "--fpr", "0.1", "--out",
                                       str(folder.parent / "moved.kad")])
    assert refused.exit_code == 1 and "exported model" in refused.output
    assert not (folder.parent / "moved.kad").exists()


def test_an_existing_folder_is_replaced_only_when_asked_and_only_if_kad_wrote_it(
        exported, tmp_path, monkeypatch):
    pipeline, model, folder, _, _ = exported
    monkeypatch.setenv("KAD_CACHE_DIR", str(folder.parent / "cache"))  # its conversion
    runner = CliRunner()
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["export", str(model), "--out", str(out)])
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    refused = runner.invoke(app, ["export", str(model), "--out", str(out), "--overwrite"])
    assert refused.exit_code == 1 and "notes.txt" in refused.output
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]
    (out / "notes.txt").unlink()  # an empty folder is written into
    assert not export_pipeline(pipeline, out).replaced
    again = runner.invoke(app, ["export", str(model), "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert export_pipeline(pipeline, out, overwrite=True).replaced
    assert sorted(os.listdir(out)) == sorted([MARKER, "network.bin", "network.xml",
                                              "pipeline.kad"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # nothing left aside


@pytest.mark.parametrize("damage", ["missing bin", "altered pipeline", "altered xml",
                                    "no marker"])
def test_a_damaged_export_is_refused_naming_the_file(exported, tmp_path, damage):
    import shutil

    folder = exported[2]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    if damage == "missing bin":
        (copy / "network.bin").unlink()
        expected = r"network\.bin is missing"
    elif damage == "no marker":
        (copy / MARKER).unlink()
        expected = "not an exported kad model"
    else:
        name = "pipeline.kad" if damage == "altered pipeline" else "network.xml"
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / name).write_bytes(bytes(data))
        expected = rf"{name.replace('.', '[.]')} does not match its checksum"
    with pytest.raises(ArtifactError, match=expected):
        kad.load_pipeline(copy)


def _score_elsewhere(python: str, folder: Path, images: Path, out: Path,
                     pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run([python, "-m", "kad", "score", str(folder), str(images), "--out",
                           str(out)], capture_output=True, text=True, env=env, cwd=out.parent,
                          timeout=300)


def test_an_export_scores_without_tensorflow(exported, tmp_path):
    _, _, folder, files, scores = exported
    expected = dict(zip((f.name for f in files), scores, strict=True))
    blocker = tmp_path / "no-tensorflow"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    probe = subprocess.run([sys.executable, "-c", "import keras"], capture_output=True,
                           text=True, env=env)
    assert probe.returncode != 0 and "blocked" in probe.stderr  # the blocker works
    runs = {"blocked": (sys.executable, [blocker, REPO])}
    core = os.environ.get("KAD_CORE_PYTHON")
    if core:  # an environment without TensorFlow, e.g. kad[openvino,test] in a venv
        runs["core"] = (core, [REPO])
    for name, (python, path) in runs.items():
        out = tmp_path / f"scores-{name}"
        done = _score_elsewhere(python, folder, files[0].parent.parent, out, path)
        assert done.returncode == 0, f"{name}: {done.stdout}\n{done.stderr}"
        got = _csv_scores(out / "scores.csv")
        assert set(got) == set(expected)
        for image, score in got.items():  # scores.csv keeps 6 significant digits
            assert score == pytest.approx(expected[image], rel=1e-5), (name, image)


def test_input_scaling_is_measured_for_every_mode_and_refused_when_not_affine():
    from kad.features.backbones import get_backbone
    from kad.features.exported import ExportedInput

    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (2, 6, 5, 3)).astype(np.float32)
    for spec in ("mobilenet_v2:alpha=0.35", "keras:model=ResNet50",  # tf, caffe (BGR)
                 "keras:model=DenseNet121"):  # torch
        backbone = get_backbone(spec)
        matrix, offset = input_scaling(backbone)
        scaled = ExportedInput(matrix, offset, spec).preprocess(images)
        np.testing.assert_allclose(scaled, backbone.preprocess(images), rtol=1e-6, atol=1e-5)

    class Squares(type(get_backbone("mobilenet_v2"))):
        def preprocess_input(self, x):
            return x * x

    with pytest.raises(KadError, match="not a per-pixel affine map"):
        input_scaling(Squares())
