"""kad's built-in backbones: ``keras.applications`` networks with every block tapped."""

from __future__ import annotations

import re

import numpy as np

from kad.errors import KadError
from kad.features.backbones import Backbone
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
