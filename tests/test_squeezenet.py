"""SqueezeNet v1.1: its blocks and their strides, its weights file read array by array and
refused when it does not fit, and ImageNet features that know more than random ones."""

from __future__ import annotations

import shutil
import tarfile

import cv2
import numpy as np
import pytest

from conftest import CIFAR10_TAR, SHARED, need
from kad.errors import WeightsError
from kad.features.backbones import get_backbone, map_shapes
from kad.registry import BACKBONE, clear_cache, names
from kad_plugins.backbones import SqueezeNetBackbone
from plugin_env import install

pytestmark = pytest.mark.tf
SQUEEZENET_WEIGHTS = SHARED / "weights" / "squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5"
FIRES = [f"fire{i}" for i in range(2, 10)]
CHANNELS = [128, 128, 256, 256, 384, 384, 512, 512]


@pytest.fixture
def squeezenet(tmp_path, monkeypatch):
    """``get_backbone("squeezenet")`` through the entry point pyproject.toml declares, also
    where the installed kad predates it."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["entry-points"][BACKBONE.group]
    clear_cache()
    if "squeezenet" not in names(BACKBONE):
        install(tmp_path, "kad-squeezenet-entry", "1.0",
                {BACKBONE.group: {"squeezenet": declared["squeezenet"]}})
        monkeypatch.syspath_prepend(str(tmp_path))
        clear_cache()
    yield get_backbone("squeezenet")
    clear_cache()


# size -> the side of fire2-3, fire4-5 and fire6-9: unpadded 3x3/2 convolution and pools
@pytest.mark.parametrize("size, sides", [(32, (7, 3, 1)), (64, (15, 7, 3)),
                                         (227, (56, 27, 13))])
def test_blocks_are_the_fire_modules_at_their_strides(squeezenet, size, sides):
    assert isinstance(squeezenet, SqueezeNetBackbone)
    model, blocks = squeezenet.build_extractor(size, "none")
    assert blocks == FIRES
    expected = [sides[0]] * 2 + [sides[1]] * 2 + [sides[2]] * 4
    assert map_shapes(model, blocks) == {
        name: (side, side, channels)
        for name, side, channels in zip(FIRES, expected, CHANNELS, strict=True)}
    assert model.count_params() == 722_496


def test_the_stated_activation_size_is_the_networks_largest_layer():
    bb = SqueezeNetBackbone()
    model = bb.build_base(160, "none")
    largest = max(int(np.prod(layer.output.shape[1:])) for layer in model.layers)
    assert largest / 160 ** 2 == pytest.approx(bb.peak_elements_per_pixel, rel=0.05)


def test_caffe_preprocessing_is_bgr_less_the_mean_and_leaves_its_input():
    red = np.zeros((1, 2, 2, 3), np.float32)
    red[..., 0] = 1.0
    out = SqueezeNetBackbone().preprocess(red)
    assert out[0, 0, 0, 2] > 100 and out[0, 0, 0, 0] < -100  # red is last, blue empty
    assert red[..., 0].min() == 1.0 and red[..., 1:].max() == 0.0


def _write_release(path, model, drop=None, reshape=None, unnamed=None):
    """``model``'s convolutions in the layout of the public release (groups ``conv1``,
    ``fire2/squeeze1x1``, … listing ``uniformN`` and ``*_b``), each array plus one; a
    group ``drop`` left out, the kernel of group ``reshape`` one filter short, group
    ``unnamed`` listing a number instead of its arrays' names."""
    import h5py

    with h5py.File(path, "w") as file:
        for n, layer in enumerate(x for x in model.layers if x.weights):
            group = layer.name.replace("_", "/", 1)
            if group == drop:
                continue
            kernel, bias = (np.asarray(w) + 1.0 for w in layer.get_weights())
            if group == reshape:
                kernel = kernel[..., :-1]
            g = file.create_group(group)
            g.attrs["weight_names"] = 7 if group == unnamed else [f"uniform{n}".encode(),
                                                                  f"{group}_b".encode()]
            g[f"uniform{n}"] = kernel
            g[f"{group}_b"] = bias


def test_a_file_in_the_release_layout_loads_array_by_array(tmp_path):
    bb = SqueezeNetBackbone()
    random = bb.build_base(64, "none")
    _write_release(tmp_path / "w.h5", random)
    loaded = bb.build_base(64, tmp_path / "w.h5")
    for a, b in zip(random.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a) + 1.0, np.asarray(b))


@pytest.mark.parametrize("damage, named", [
    ({"reshape": "fire5/expand3x3"}, "'fire5/expand3x3' holds arrays of shapes"),
    ({"drop": "fire9/expand1x1"}, "no group 'fire9/expand1x1'"),
    ({"unnamed": "conv1"}, "'conv1' holds arrays ['7'], not a kernel and a bias"),
    (None, "not a readable HDF5 file"),
])
def test_a_file_that_does_not_fit_is_refused_in_one_line(tmp_path, damage, named):
    bb = SqueezeNetBackbone()
    path = tmp_path / "w.h5"
    if damage is None:
        path.write_bytes(b"not HDF5 at all\n")
    else:
        _write_release(path, bb.build_base(64, "none"), **damage)
    with pytest.raises(WeightsError) as info:
        bb.build_extractor(64, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and named in message
    assert "squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5" in message


def test_missing_imagenet_weights_say_where_the_release_is(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid: no network")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsError) as info:
        SqueezeNetBackbone().build_base(None, "imagenet")
    message = str(info.value)
    assert ("Download https://github.com/rcmalli/keras-squeezenet/releases/download/v1.0/"
            "squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5") in message
    assert str(tmp_path / "keras" / "models") in message


@pytest.mark.shared
def test_the_real_weights_load_from_a_path_and_from_the_keras_cache(tmp_path, monkeypatch):
    import h5py

    path = need(SQUEEZENET_WEIGHTS)
    bb = SqueezeNetBackbone()
    model = bb.build_base(64, path)
    with h5py.File(path, "r") as file:
        for layer in (x for x in model.layers if x.weights):
            group = file[layer.name.replace("_", "/", 1)]
            kernel, bias = (group[n.decode()][()] for n in group.attrs["weight_names"])
            np.testing.assert_array_equal(layer.get_weights()[0], kernel)
            np.testing.assert_array_equal(layer.get_weights()[1], bias)
    # "imagenet" finds the same file, md5 checked, in the Keras cache without a download
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    shutil.copy(path, tmp_path / "models" / path.name)
    cached = bb.build_base(64, "imagenet")
    for a, b in zip(model.weights, cached.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.shared
def test_imagenet_features_tell_cifar10_classes_apart_better_than_random_ones():
    """A ridge probe, 3-fold, on the first 30 test images of each CIFAR-10 class at 64 px:
    the ImageNet weights reach about 0.48, random ones about 0.34 (chance 0.10)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    weights = need(SQUEEZENET_WEIGHTS)
    images, labels, counts = [], [], {}
    with tarfile.open(need(CIFAR10_TAR)) as tar:  # the test split comes first
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or parts[1] != "test":
                continue
            if counts.get(parts[2], 0) < 30:
                counts[parts[2]] = counts.get(parts[2], 0) + 1
                data = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                bgr = cv2.resize(cv2.imdecode(data, cv2.IMREAD_COLOR), (64, 64))
                images.append(bgr[..., ::-1])
                labels.append(parts[2])
            if len(counts) == 10 and min(counts.values()) == 30:
                break
    assert len(images) == 300
    x = np.stack(images).astype(np.float32) / 255.0
    accuracy = {}
    for name, w in (("imagenet", weights), ("random", "none")):
        bb = SqueezeNetBackbone()
        model, _ = bb.build_extractor(64, w)
        features = np.concatenate(model.predict_on_batch(bb.preprocess(x)), axis=1)
        probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1000.0))
        accuracy[name] = cross_val_score(probe, features, np.array(labels), cv=3).mean()
    print(f"\nCIFAR-10 ridge probe accuracy: {accuracy}")
    assert accuracy["imagenet"] > accuracy["random"] + 0.08
