"""kad's built-in backbones: ``keras.applications`` networks with every block tapped."""

from __future__ import annotations

import re

import numpy as np

from kad.errors import KadError, WeightsError
from kad.features.backbones import Backbone, keras_cache_dir
from kad.utils.deps import import_keras


def _tf_mode(x: np.ndarray) -> np.ndarray:
    """The Inception/MobileNet convention: [0, 255] -> [-1, 1]."""
    return x / 127.5 - 1.0


def _by_pattern(model, pattern: str) -> list[tuple[str, object]]:
    regex = re.compile(pattern)
    return [(layer.name, layer.output) for layer in model.layers if regex.match(layer.name)]


class InceptionResNetV2Backbone(Backbone):
    """Inception-ResNet-v2 (Szegedy et al. 2016), the paper's network: 44 blocks."""

    default_size = 299
    min_size = 75
    #: The stem's third convolution: 64 channels at about half the input's side.
    peak_elements_per_pixel = 16.0

    def application(self, input_shape, weights):
        keras = import_keras()
        return keras.applications.InceptionResNetV2(
            include_top=False, weights=weights, input_shape=input_shape
        )

    input_scaling = (2.0, -1.0)  # _tf_mode on [0, 1] images

    def preprocess_input(self, x):
        return _tf_mode(x)

    def imagenet_file(self, input_size):  # noqa: ARG002 - the Backbone hook's signature
        return ("inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "inception_resnet_v2")

    def block_outputs(self, model):
        taps = []
        for name, tensor in _by_pattern(
            model, r"^(mixed_5b|block35_\d+_ac|mixed_6a|block17_\d+_ac|mixed_7a|block8_\d+_ac)$"
        ):
            taps.append((name, tensor))
        # The 10th Inception-C block has no activation and an automatic layer name that
        # changes between builds; it is the input of the final 1x1 convolution.
        taps.append(("block8_10", model.get_layer("conv_7b").input))
        taps.append(("conv_7b_ac", model.get_layer("conv_7b_ac").output))
        return taps


class InceptionV3Backbone(Backbone):
    """Inception-v3 (Szegedy et al. 2016): blocks mixed0 … mixed10."""

    default_size = 299
    min_size = 75
    #: The stem's third convolution: 64 channels at about half the input's side.
    peak_elements_per_pixel = 16.0

    def application(self, input_shape, weights):
        keras = import_keras()
        return keras.applications.InceptionV3(
            include_top=False, weights=weights, input_shape=input_shape
        )

    input_scaling = (2.0, -1.0)  # _tf_mode on [0, 1] images

    def preprocess_input(self, x):
        return _tf_mode(x)

    def imagenet_file(self, input_size):  # noqa: ARG002 - the Backbone hook's signature
        return ("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "inception_v3")

    def block_outputs(self, model):
        # mixed9_0 and mixed9_1 are inner concatenations of block mixed9, not blocks.
        return _by_pattern(model, r"^mixed\d+$")


class MobileNetV2Backbone(Backbone):
    """MobileNetV2 (Sandler et al. 2018) with width multiplier ``alpha``: 18 blocks."""

    default_size = 224
    min_size = 32
    options = {"alpha": 1.0}
    _ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)

    def __init__(self, **options):
        super().__init__(**options)
        if self.config["alpha"] not in self._ALPHAS:
            raise KadError(
                f"mobilenet_v2 alpha must be one of {self._ALPHAS}, got {self.config['alpha']!r}"
            )

    def application(self, input_shape, weights):
        keras = import_keras()
        return keras.applications.MobileNetV2(
            include_top=False, weights=weights, input_shape=input_shape,
            alpha=self.config["alpha"],
        )

    #: Channels of block 0's output by width (Keras' rounding to a multiple of 8).
    _BLOCK0 = {0.35: 8, 0.5: 8, 0.75: 16, 1.0: 16, 1.3: 24, 1.4: 24}

    @property
    def peak_elements_per_pixel(self):  # type: ignore[override]
        # block 1 expands block 0's channels six times at half the input's side
        return 6 * self._BLOCK0[self.config["alpha"]] / 4

    input_scaling = (2.0, -1.0)  # _tf_mode on [0, 1] images

    def preprocess_input(self, x):
        return _tf_mode(x)

    def imagenet_file(self, input_size):  # noqa: ARG002 - the Backbone hook's signature
        rows = input_size if input_size in (96, 128, 160, 192, 224) else 224
        alpha = self.config["alpha"]
        alpha_text = {1.0: "1.0", 0.35: "0.35", 0.5: "0.5", 0.75: "0.75", 1.3: "1.3",
                      1.4: "1.4"}[alpha]
        return (f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha_text}_{rows}_no_top.h5",
                "mobilenet_v2")

    def block_outputs(self, model):
        # A block ends with its residual addition where it has one, else its projection.
        ends: dict[str, tuple[str, object]] = {}
        for layer in model.layers:
            match = re.match(r"^(expanded_conv|block_\d+)_(project_BN|add)$", layer.name)
            if match:
                block = "block_0" if match.group(1) == "expanded_conv" else match.group(1)
                ends[block] = (layer.name, layer.output)
        taps = [ends[f"block_{i}"] for i in range(len(ends))]
        taps.append(("out_relu", model.get_layer("out_relu").output))
        return taps


class KerasApplicationBackbone(Backbone):
    """Any ``keras.applications`` model: ``keras:model=ResNet50``.

    Blocks are the outputs of its merge layers (residual additions, concatenations); for
    plain stacks such as VGG, its pooling layers; the last layer always closes the list.
    ``preprocess_input`` is the application's own.
    """

    options = {"model": "ResNet50", "size": 224}

    @property
    def default_size(self):  # type: ignore[override]
        return int(self.config["size"])

    def _constructor(self):
        keras = import_keras()
        name = self.config["model"]
        constructor = getattr(keras.applications, str(name), None)
        if not callable(constructor):
            available = [n for n in dir(keras.applications) if n[:1].isupper()]
            raise KadError(
                f"keras.applications has no model {name!r}; available: {', '.join(available)}"
            )
        return constructor

    def application(self, input_shape, weights):
        return self._constructor()(include_top=False, weights=weights, input_shape=input_shape)

    def preprocess_input(self, x):
        keras = import_keras()
        module = self._constructor().__module__.rsplit(".", 1)[-1]
        preprocess = getattr(getattr(keras.applications, module, None), "preprocess_input", None)
        if preprocess is None:
            raise KadError(f"no preprocess_input found for keras application {module!r}")
        return np.asarray(preprocess(x.copy()), dtype=np.float32)

    def imagenet_file(self, input_size):  # noqa: ARG002 - the Backbone hook's signature
        return (f"the ImageNet weights of keras.applications.{self.config['model']}", None)

    def block_outputs(self, model):
        keras = import_keras()
        four_d = [layer for layer in model.layers if len(getattr(layer.output, "shape", ())) == 4]
        merges = [layer for layer in four_d
                  if isinstance(layer, (keras.layers.Add, keras.layers.Concatenate))]
        chosen = merges or [layer for layer in four_d
                            if isinstance(layer, (keras.layers.MaxPooling2D,
                                                  keras.layers.AveragePooling2D))]
        if not chosen or chosen[-1] is not four_d[-1]:
            chosen.append(four_d[-1])
        return [(layer.name, layer.output) for layer in chosen]


#: SqueezeNet v1.1's fire modules: (number, squeeze filters, expand filters per branch, whether
#: a 3x3/2 max-pool follows), in network order.
_FIRES = ((2, 16, 64, False), (3, 16, 64, True), (4, 32, 128, False), (5, 32, 128, True),
          (6, 48, 192, False), (7, 48, 192, False), (8, 64, 256, False), (9, 64, 256, False))
_SQUEEZENET_URL = "https://github.com/rcmalli/keras-squeezenet/releases/download/v1.0"
_SQUEEZENET_FILE = "squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5"
_SQUEEZENET_MD5 = "80b66c92d79d4310e07fb60a297bf0d1"


class SqueezeNetBackbone(Backbone):
    """SqueezeNet v1.1 (Iandola et al. 2016; v1.1 from the authors' release): 8 blocks,
    the fire modules ``fire2`` … ``fire9``.

    The architecture of the public Keras release (rcmalli/keras-squeezenet), whose ImageNet
    weights it loads: conv1 3x3/2 with 64 filters and max-pools 3x3/2 without padding
    (``valid``), so a side of ``s`` px gives maps of ``floor((s - 3) / 2) + 1`` px after
    conv1, and every max-pool again takes ``floor((m - 3) / 2) + 1`` of ``m``; inside a fire
    module only the 3x3 expansion pads (``same``). Blocks fire2-3 are at about 1/4 of the
    input's side, fire4-5 at 1/8, fire6-9 at 1/16. Caffe preprocessing: BGR, ImageNet mean
    subtracted, no scaling.

    Weights files are read with h5py, array by array (plain arrays only), and every group
    and shape is checked before any is assigned.
    """

    name = "squeezenet"
    default_size = 227
    #: 31 px is the least that leaves pool5 one pixel; 32 as the other backbones.
    min_size = 32
    #: conv1's output, the largest: 64 channels at about half the input's side.
    peak_elements_per_pixel = 16.0

    def application(self, input_shape, weights):
        keras = import_keras()
        layers = keras.layers
        inputs = keras.Input(shape=input_shape, name="input")
        x = layers.Conv2D(64, 3, strides=2, padding="valid", activation="relu",
                          name="conv1")(inputs)
        x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
        for number, squeeze, expand, pool in _FIRES:
            fire = f"fire{number}"
            x = layers.Conv2D(squeeze, 1, activation="relu", name=f"{fire}_squeeze1x1")(x)
            left = layers.Conv2D(expand, 1, activation="relu", name=f"{fire}_expand1x1")(x)
            right = layers.Conv2D(expand, 3, padding="same", activation="relu",
                                  name=f"{fire}_expand3x3")(x)
            x = layers.Concatenate(name=fire)([left, right])
            if pool:
                x = layers.MaxPooling2D(3, strides=2, name=f"pool{number}")(x)
        model = keras.Model(inputs, x, name="squeezenet_v1_1")
        if weights == "imagenet":
            # where kad's message says to put the file (Keras reads $KERAS_HOME once)
            weights = keras.utils.get_file(
                _SQUEEZENET_FILE, f"{_SQUEEZENET_URL}/{_SQUEEZENET_FILE}",
                cache_dir=str(keras_cache_dir().parent), cache_subdir="models",
                file_hash=_SQUEEZENET_MD5)
        if weights is not None:
            _load_squeezenet(model, weights)
        return model

    def preprocess_input(self, x):
        keras = import_keras()
        return np.asarray(
            keras.applications.imagenet_utils.preprocess_input(np.array(x, np.float32),
                                                               mode="caffe"),
            dtype=np.float32)

    def imagenet_file(self, input_size):  # noqa: ARG002 - the Backbone hook's signature
        return (_SQUEEZENET_FILE, _SQUEEZENET_URL)

    def block_outputs(self, model):
        return [(f"fire{number}", model.get_layer(f"fire{number}").output)
                for number, *_ in _FIRES]


def _squeezenet_arrays(model, path: str) -> list[tuple[object, list[np.ndarray]]]:
    """``(layer, [kernel, bias])`` for every convolution of ``model`` from the HDF5 file at
    ``path`` (groups ``conv1``, ``fire2/squeeze1x1`` …; each lists its arrays, kernel first,
    in the attribute ``weight_names``). Raises :class:`WeightsError` naming the first thing
    that does not fit, before anything is assigned."""
    import h5py

    def refuse(what: str) -> WeightsError:
        return WeightsError(
            f"weights file {path} does not fit backbone squeezenet: {what}; pass the "
            f"SqueezeNet v1.1 file {_SQUEEZENET_FILE} (md5 {_SQUEEZENET_MD5}) or "
            "--weights imagenet")

    convolutions = [layer for layer in model.layers if layer.name.startswith(("conv", "fire"))
                    and layer.weights]
    found = []
    try:
        with h5py.File(path, "r") as file:
            for layer in convolutions:
                group_name = layer.name.replace("_", "/", 1)
                group = file.get(group_name)
                if not isinstance(group, h5py.Group):
                    raise refuse(f"no group {group_name!r}")
                try:
                    names = [n.decode() if isinstance(n, bytes) else str(n)
                             for n in np.atleast_1d(group.attrs.get("weight_names", []))]
                    datasets = [group.get(n) for n in names]
                except (TypeError, ValueError) as exc:  # UnicodeDecodeError included
                    raise refuse(f"group {group_name!r} lists no readable array names "
                                 f"({type(exc).__name__})") from exc
                expected = [tuple(w.shape) for w in layer.weights]
                if len(names) != len(expected) or not all(
                        isinstance(d, h5py.Dataset) for d in datasets):
                    raise refuse(f"group {group_name!r} holds arrays {names}, not a kernel "
                                 "and a bias")
                shapes = [tuple(d.shape) for d in datasets]
                if shapes != expected or any(d.dtype.kind != "f" for d in datasets):
                    raise refuse(f"group {group_name!r} holds arrays of shapes {shapes} "
                                 f"({', '.join(str(d.dtype) for d in datasets)}), the "
                                 f"network needs float arrays of shapes {expected}")
                found.append((layer, [np.asarray(d[()], dtype=np.float32) for d in datasets]))
    except OSError as exc:
        raise refuse(f"not a readable HDF5 file ({str(exc).splitlines()[0][:200]})") from exc
    return found


def _load_squeezenet(model, path: str) -> None:
    for layer, arrays in _squeezenet_arrays(model, path):
        layer.set_weights(arrays)
