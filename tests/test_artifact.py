"""Model files hold plain data: loading one cannot run code.

The attack these tests replay: a model file whose payload is a pickle that calls
``os.system`` when unpickled, with its manifest checksum recomputed, optionally handing back
a real pipeline afterwards so that scoring goes on as if nothing happened. kad refuses it
unread, as it refuses crafted members of the current format that name code.
"""

from __future__ import annotations

import hashlib
import io
import json
import operator
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FAST
from kad import __version__
from kad.detectors.base import BaseDetector, load_detector
from kad.errors import ArtifactError, PluginError, UnstorableError
from kad.features.representation import Block, PooledVectors
from kad.registry import clear_cache, get_detector
from kad.screening.pipeline import Pipeline, load_pipeline
from kad.screening.thresholds import Threshold
from plugin_env import activate, install, install_example

runner = CliRunner()
X = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)


class _Touch:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _TouchThenReturn:
    """Unpickling this runs ``touch marker`` and then yields ``obj``, unharmed."""

    def __init__(self, marker: Path, obj):
        self.marker, self.obj = marker, obj

    def __reduce__(self):
        return operator.itemgetter(1), ((_Touch(self.marker), self.obj),)


def _legacy_file(path: Path, payload_obj, kind: str) -> Path:
    """A model file exactly as kad's format 1 wrote it: manifest and pickled payload, the
    payload's checksum in the manifest."""
    payload = pickle.dumps(payload_obj, protocol=pickle.HIGHEST_PROTOCOL)
    manifest = {
        "format": 1, "kind": kind, "class": "kad.screening.pipeline.Pipeline",
        "created": "2026-01-01T00:00:00+00:00",
        "versions": {"kad": __version__, "python": "3"},
        "sha256": hashlib.sha256(payload).hexdigest(), "info": {},
    }
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        zf.writestr("payload.pkl", payload)
    return path


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes | None] | None = None,
             tree=None) -> Path:
    """A copy of the artefact ``src`` with members replaced (None: removed) or added, and
    ``object.json`` replaced by ``tree``; the manifest's checksums are recomputed, as an
    attacker would."""
    with zipfile.ZipFile(src) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        members = {n: zf.read(n) for n in zf.namelist() if n != "manifest.json"}
    if tree is not None:
        members["object.json"] = json.dumps(tree).encode()
    for name, data in (replace or {}).items():
        if data is None:
            members.pop(name)
        else:
            members[name] = data
    manifest["members"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items()}
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def _tree(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("object.json"))


def _pipeline() -> Pipeline:
    """A real pipeline (no network is built until it scores images)."""
    det = get_detector("iforest", n_estimators=10).fit(X)
    return Pipeline(**FAST, weights_fingerprint="0" * 64,
                    representation=PooledVectors((Block("b1", X.shape[1], (1, 1)),),
                                                 ("b1",)),
                    all_blocks=["b1"], detector=det,
                    threshold=Threshold(det.threshold_, "contamination",
                                        {"contamination": 0.1}),
                    training={"scores": np.sort(det.anomaly_scores_).tolist()})


@pytest.fixture
def no_pickle(monkeypatch):
    """Any unpickling during the test fails it."""
    def refuse(*args, **kwargs):
        raise AssertionError("kad unpickled data")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


@pytest.mark.parametrize("returns_pipeline", [False, True])
def test_a_pickle_payload_is_refused_unread(tmp_path, returns_pipeline, no_pickle):
    marker = tmp_path / "pwned"
    pipeline = _pipeline()
    evil = _TouchThenReturn(marker, pipeline) if returns_pipeline else _Touch(marker)
    as_pipeline = _legacy_file(tmp_path / "evil.kad", evil, "pipeline")
    as_detector = _legacy_file(tmp_path / "evil-detector.kad",
                               _TouchThenReturn(marker, pipeline.detector)
                               if returns_pipeline else _Touch(marker), "detector")
    with pytest.raises(ArtifactError, match="format 1, which held a pickle.*could run code"):
        load_pipeline(as_pipeline)
    with pytest.raises(ArtifactError, match="format 1, which held a pickle"):
        load_detector(as_detector)
    # A manifest of the current format that lists the pickle is refused too.
    current = pipeline.save(tmp_path / "good.kad")
    payload = pickle.dumps(evil)
    for name, crafted in {
        "listed": _rewrite(current, tmp_path / "listed.kad", {"payload.pkl": payload}),
        "tagged": _rewrite(current, tmp_path / "tagged.kad", {"payload.pkl": payload},
                           tree={**_tree(current), "pipeline": {"$pickle": "payload.pkl"}}),
        "as an array": _rewrite(current, tmp_path / "array.kad", {"payload.pkl": payload},
                                tree={**_tree(current), "pipeline": {"$array": "payload.pkl"}}),
    }.items():
        with pytest.raises(ArtifactError) as caught:
            load_pipeline(crafted).score_features(X)
        assert "\n" not in str(caught.value), name
    with zipfile.ZipFile(tmp_path / "unlisted.kad", "w") as zf, zipfile.ZipFile(current) as ok:
        for member in ok.namelist():
            zf.writestr(member, ok.read(member))
        zf.writestr("payload.pkl", payload)
    with pytest.raises(ArtifactError, match="members its manifest does not list.*payload.pkl"):
        load_pipeline(tmp_path / "unlisted.kad")
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("returns_pipeline", [False, True])
def test_kad_score_and_threshold_refuse_a_pickle_payload(tmp_path, returns_pipeline, no_pickle):
    from kad.cli import app

    marker = tmp_path / "pwned"
    evil = _TouchThenReturn(marker, _pipeline()) if returns_pipeline else _Touch(marker)
    model = _legacy_file(tmp_path / "evil.kad", evil, "pipeline")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\n")
    for args in (["score", str(model), str(incoming), "--out", str(tmp_path / "out")],
                 ["threshold", str(model), "--labels", str(labels)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert "could run code" in result.output and "Traceback" not in result.output
    assert not marker.exists(), "the payload ran"


def test_a_new_process_scores_a_saved_detector_bit_identically(tmp_path):
    det = get_detector("ocsvm").fit(X)
    path = det.save(tmp_path / "ocsvm.kad")
    np.save(tmp_path / "x.npy", X)
    script = ("import json, sys, numpy as np; from kad.detectors.base import load_detector; "
              "d = load_detector(sys.argv[1]); "
              "print(json.dumps([float(s).hex() for s in d.anomaly_score(np.load(sys.argv[2]))]))")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, check=True)
    other = np.array([float.fromhex(s) for s in json.loads(done.stdout.splitlines()[-1])])
    np.testing.assert_array_equal(other, det.anomaly_score(X))


def test_a_skops_member_naming_a_type_outside_the_allow_list_is_refused(tmp_path):
    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    path = get_detector("iforest", n_estimators=5).fit(X).save(tmp_path / "d.kad")
    crafted = _rewrite(path, tmp_path / "crafted.kad", {
        "sklearn/detector.state.forest_.skops": sio.dumps(FunctionTransformer(func=os.system)),
    })
    with pytest.raises(ArtifactError, match="outside kad's allow-list.*posix.system"):
        load_detector(crafted)


def test_an_object_array_is_refused(tmp_path, no_pickle):
    marker = tmp_path / "pwned"
    path = get_detector("mahalanobis").fit(X).save(tmp_path / "d.kad")
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([_Touch(marker)], dtype=object),
                              allow_pickle=True)
    crafted = _rewrite(path, tmp_path / "crafted.kad",
                       {"arrays/detector.state.anomaly_scores_.npy": buffer.getvalue()})
    with pytest.raises(ArtifactError, match="cannot be read without unpickling"):
        load_detector(crafted)
    assert not marker.exists()


def test_the_class_comes_from_the_registry_not_from_the_file(tmp_path):
    path = get_detector("iforest", n_estimators=5).fit(X).save(tmp_path / "d.kad")
    tree = _tree(path)
    unknown = {**tree, "detector": {**tree["detector"], "name": "os:system"}}
    with pytest.raises(ArtifactError, match="'os:system'.*not installed here"):
        load_detector(_rewrite(path, tmp_path / "a.kad", tree=unknown))
    moved = {**tree, "detector": {**tree["detector"], "entry_point": "os:system"}}
    # the recorded entry point is shown, never imported: the class is the registry's
    assert type(load_detector(_rewrite(path, tmp_path / "b.kad", tree=moved))) is type(
        get_detector("iforest"))
    other = {**tree, "detector": {**tree["detector"], "entry_point": "os:system",
                                  "distribution": "evil"}}
    with pytest.raises(ArtifactError, match="saved from os:system \\(evil .*another plugin"):
        load_detector(_rewrite(path, tmp_path / "b2.kad", tree=other))
    tagged = {**tree, "detector": {**tree["detector"],
                                   "params": {"$class": "os.system", "args": ["id"]}}}
    with pytest.raises(ArtifactError, match=r"tagged '\$class', which kad does not read"):
        load_detector(_rewrite(path, tmp_path / "c.kad", tree=tagged))
    for attribute in ("__class__", "_score"):
        sneaky = {**tree, "detector": {**tree["detector"], "state": {
            **tree["detector"]["state"], attribute: "x"}}}
        with pytest.raises(ArtifactError, match=f"'{attribute}' is not the name of a learned"):
            load_detector(_rewrite(path, tmp_path / "d.kad", tree=sneaky))


def test_a_damaged_member_or_a_missing_one_is_refused(tmp_path):
    path = get_detector("iforest", n_estimators=5).fit(X).save(tmp_path / "d.kad")
    with zipfile.ZipFile(path) as zf:
        members = {n: bytearray(zf.read(n)) for n in zf.namelist()}
    members["arrays/detector.state.anomaly_scores_.npy"][-3] ^= 0xFF
    damaged = tmp_path / "damaged.kad"
    with zipfile.ZipFile(damaged, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, bytes(data))
    with pytest.raises(ArtifactError, match="corrupt: its member arrays/detector.state."
                                            "anomaly_scores_.npy does not match"):
        load_detector(damaged)
    with zipfile.ZipFile(path) as zf, zipfile.ZipFile(tmp_path / "missing.kad", "w") as out:
        for name in zf.namelist():
            if not name.startswith("sklearn/"):
                out.writestr(name, zf.read(name))
    with pytest.raises(ArtifactError, match="corrupt"):
        load_detector(tmp_path / "missing.kad")
    with pytest.raises(ArtifactError, match="holds a 'detector', not a 'pipeline'"):
        load_pipeline(path)
    (tmp_path / "junk.kad").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="not a kad model file or is corrupt"):
        load_detector(tmp_path / "junk.kad")


def test_a_saved_pipeline_keeps_its_record(tmp_path):
    pipeline = _pipeline()
    pipeline.threshold.details["n"] = np.int64(3)
    again = load_pipeline(pipeline.save(tmp_path / "p.kad"))
    for name in ("backbone", "weights", "weights_fingerprint", "image_size", "preprocessing",
                 "representation", "all_blocks", "training", "batch_size", "versions",
                 "calibration", "assessment", "runtime"):
        assert getattr(again, name) == getattr(pipeline, name), name
    assert again.threshold == pipeline.threshold
    assert type(again.threshold.details["n"]) is np.int64
    assert again.source == tmp_path / "p.kad"
    np.testing.assert_array_equal(again.detector.anomaly_score(X),
                                  pipeline.detector.anomaly_score(X))


THIRD_PARTY = '''
import numpy as np
from sklearn.preprocessing import FunctionTransformer

from kad import BaseDetector


class Centre:
    """A learned value of a type of its own, which a model file cannot hold."""

    def __init__(self, value):
        self.value = value


class OpaqueDetector(BaseDetector):
    """Distance to the training mean, kept in a Centre."""

    def __init__(self, contamination=0.1):
        self.contamination = contamination

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        self.centre_ = Centre(X.mean(axis=0))

    def _score(self, X):
        return np.linalg.norm(X - self.centre_.value, axis=1)


class StatefulDetector(OpaqueDetector):
    """The same, saved through the documented state hooks."""

    def get_fitted_state(self):
        state = super().get_fitted_state()
        return {**state, "centre_": state["centre_"].value}

    def set_fitted_state(self, state):
        super().set_fitted_state({**state, "centre_": Centre(state["centre_"])})


def square(x):
    return x ** 2


class CallableDetector(BaseDetector):
    """Keeps a scikit-learn object that holds a function of its own."""

    def __init__(self, contamination=0.1):
        self.contamination = contamination

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        self.transform_ = FunctionTransformer(func=square).fit(X)

    def _score(self, X):
        return self.transform_.transform(X).sum(axis=1)
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    site.mkdir()
    install(site, "kad-state-examples", "1.0.0", {"kad.detectors": {
        "opaque": "kad_state_examples:OpaqueDetector",
        "stateful": "kad_state_examples:StatefulDetector",
        "callable": "kad_state_examples:CallableDetector",
    }}, {"kad_state_examples": THIRD_PARTY})
    activate(site, monkeypatch)
    yield site
    clear_cache()


def test_a_state_that_cannot_be_stored_is_refused_when_saving(third_party, tmp_path):
    with pytest.raises(UnstorableError, match="detector.state.centre_ is a "
                                              "kad_state_examples.Centre"):
        get_detector("opaque").fit(X).save(tmp_path / "o.kad")
    with pytest.raises(TypeError, match="detector.state.transform_ .*outside kad's allow-list"
                                        ".*kad_state_examples.square"):
        get_detector("callable").fit(X).save(tmp_path / "c.kad")
    assert not (tmp_path / "o.kad").exists() and not (tmp_path / "c.kad").exists()


def test_a_third_party_detector_saves_through_the_state_hooks(third_party, tmp_path):
    det = get_detector("stateful").fit(X)
    again = load_detector(det.save(tmp_path / "s.kad"))
    assert type(again).__name__ == "StatefulDetector"
    np.testing.assert_array_equal(again.anomaly_score(X), det.anomaly_score(X))


def test_another_plugin_version_loads_a_file_of_the_same_state_version(third_party, tmp_path,
                                                                      monkeypatch):
    det = get_detector("stateful").fit(X)
    path = det.save(tmp_path / "s.kad")
    metadata = next(third_party.glob("kad_state_examples-*.dist-info")) / "METADATA"
    metadata.write_text(metadata.read_text().replace("Version: 1.0.0", "Version: 2.0.0"))
    clear_cache()
    np.testing.assert_array_equal(load_detector(path).anomaly_score(X), det.anomaly_score(X))
    # a plugin release that changes its learned state raises state_version: refused
    monkeypatch.setattr(type(det), "state_version", 2)
    with pytest.raises(ArtifactError, match="'stateful' holds its learned state in version 1 "
                                            r".*reads version 2 of it: refit the model with "
                                            "`kad fit`.*install kad-state-examples==1.0.0"):
        load_detector(path)


def test_the_example_plugin_saves_its_learned_arrays(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    site.mkdir()
    install_example(site)
    activate(site, monkeypatch)
    try:
        # (that it scores identically after loading: tests/test_detector_contract.py)
        det = get_detector("zscore").fit(X)
        with zipfile.ZipFile(det.save(tmp_path / "z.kad")) as zf:
            assert {"arrays/detector.state.mean_.npy",
                    "arrays/detector.state.scale_.npy"} <= set(zf.namelist())
    finally:
        clear_cache()


class UnregisteredDetector(BaseDetector):
    def __init__(self, contamination=0.1):
        self.contamination = contamination

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        self.mean_ = X.mean(axis=0)

    def _score(self, X):
        return np.abs(X - self.mean_).sum(axis=1)


def test_an_unregistered_detector_says_so_when_saving(tmp_path):
    with pytest.raises(PluginError, match="UnregisteredDetector is not registered"):
        UnregisteredDetector().fit(X).save(tmp_path / "u.kad")


@pytest.mark.tf
@pytest.mark.slow
def test_a_subclassed_keras_network_scores_bit_identically_in_a_new_process(tmp_path):
    from kad.registry import DETECTORS, load

    cls = load(DETECTORS, "dagmm")
    det = cls(**{**cls.quick_params, "epochs": 1}).fit(X)
    path = det.save(tmp_path / "dagmm.kad")
    with zipfile.ZipFile(path) as zf:
        assert "keras/detector.state.net_.keras" in zf.namelist()
    np.save(tmp_path / "x.npy", X)
    script = ("import json, sys, numpy as np; from kad.detectors.base import load_detector; "
              "d = load_detector(sys.argv[1]); "
              "print(json.dumps([float(s).hex() for s in d.anomaly_score(np.load(sys.argv[2]))]))")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, check=True)
    other = np.array([float.fromhex(s) for s in json.loads(done.stdout.splitlines()[-1])])
    np.testing.assert_array_equal(other, det.anomaly_score(X))


@pytest.mark.tf
def test_a_keras_member_with_code_is_refused_in_safe_mode(tmp_path, no_pickle):
    from kad.utils.deps import import_keras

    keras = import_keras()
    marker = tmp_path / "pwned"
    det = get_detector("deep_svdd", epochs=0, pretrain=False, hidden=(8,), rep_dim=4).fit(X)
    path = det.save(tmp_path / "svdd.kad")
    np.testing.assert_array_equal(load_detector(path).anomaly_score(X), det.anomaly_score(X))

    inputs = keras.Input((5,))
    touch = f"touch {marker}"
    outputs = keras.layers.Lambda(lambda x: x[:, :4] + 0 * os.system(touch))(inputs)
    crafted_model = tmp_path / "evil.keras"
    keras.Model(inputs, outputs).save(crafted_model)
    marker.unlink()  # building the model ran the lambda once; loading must not
    crafted = _rewrite(path, tmp_path / "crafted.kad",
                       {"keras/detector.state.encoder_.keras": crafted_model.read_bytes()})
    with pytest.raises(ArtifactError, match="safe mode"):
        load_detector(crafted)
    assert not marker.exists(), "the Lambda layer ran"
