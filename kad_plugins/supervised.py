"""The supervised upper bound: an ImageNet network fine-tuned for normal vs abnormal.

Reference: the paper's supervised baseline (Ouardini et al. 2019, section 2.3):
Inception-ResNet-v2 (Szegedy et al. 2017) initialised with ImageNet weights and fine-tuned
for "normal" vs "abnormal" classification with labels of both classes. It is not an
anomaly detector in the paper's sense (it needs labelled anomalies): results are marked
as supervised (``supervised = True``, so ``fit(X, y)`` requires ``y``, 1 = anomaly).

Architecture
    The headless backbone from :func:`kad.features.backbones.get_backbone` (``backbone`` =
    "inception_resnet_v2", any kad backbone spec works, e.g. "mobilenet_v2:alpha=0.35"),
    global average pooling, dropout (``dropout`` = 0.5) and one logit; the score is the
    predicted probability of "abnormal", ``sigmoid(logit)`` computed in float64.
    Images of any size are resized to ``image_size`` (None: the backbone's native size, 299
    for Inception-ResNet-v2) batch by batch and mapped to the backbone's input range by its
    own ``preprocess``.

Training
    Binary cross-entropy weighted by class (``class_weight="balanced"``: each class
    weighs ``n / (2 n_class)``, for the rare abnormal class), Adam with
    ``learning_rate=1e-4``, ``batch_size=32``, ``epochs=10``, early stopping
    (``patience=3``) on the weighted validation loss of a stratified
    ``validation_fraction=0.1`` of the labelled training data.
    ``fine_tune`` chooses what is trained: ``"all"`` (default, the whole network),
    ``"head"`` (a frozen backbone: a linear probe on pooled features) or an integer ``N``
    (the last ``N`` layers of the backbone and the head). The backbone's batch
    normalisation always runs in inference mode (Keras' fine-tuning advice: small batches
    would otherwise wreck the ImageNet statistics). With random weights
    (``weights=None``, for tests), whose initial statistics make the network output
    vanishing features, the moving statistics are first set from the training images (one
    forward pass in training mode with momentum 0), and again after fine-tuning.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit

from kad.detectors.deep import (
    DeepDetector,
    inference_copy,
    keras,
    resize_images,
    seed_everything,
    tf,
)

__all__ = ["SupervisedDetector"]


class _Batches(keras.utils.PyDataset):
    """Resized, preprocessed image batches (with labels and weights when given), made on
    the fly so that large images never sit in memory at the network's size."""

    def __init__(self, x, size, preprocess, batch_size, y=None, weights=None, shuffle=False,
                 seed=0):
        super().__init__()
        self.x, self.y, self.weights = x, y, weights
        self.size, self.preprocess = size, preprocess
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x)) if shuffle else np.arange(len(x))

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, i):
        idx = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        batch = self.preprocess(resize_images(self.x[idx], self.size)).astype(np.float32)
        if self.y is None:
            return (batch,)
        return batch, self.y[idx], self.weights[idx]

    def on_epoch_end(self):
        if self.shuffle:
            self.order = self.rng.permutation(len(self.x))


class SupervisedDetector(DeepDetector):
    """Supervised upper bound: an ImageNet backbone fine-tuned on normal vs abnormal
    labels (needs ``fit(X, y)``); score = predicted probability of abnormal.

    Parameters: ``backbone`` (kad backbone spec), ``weights`` ("imagenet", None or a
    weights file), ``image_size`` (None: the backbone's default), ``fine_tune`` ("all",
    "head" or the number of trainable backbone layers), ``dropout``, ``class_weight``
    ("balanced" or None), ``epochs``, ``batch_size``, ``learning_rate``,
    ``validation_fraction``, ``patience``, ``random_state``.
    """

    input_kind = "images"
    supervised = True
    _display_name = "supervised"
    # Random weights (no download) and a frozen backbone: tracing the gradient of a whole
    # MobileNetV2 alone takes tens of seconds on a CPU.
    quick_params = {
        "backbone": "mobilenet_v2:alpha=0.35", "weights": None, "image_size": 32,
        "fine_tune": "head", "epochs": 5, "learning_rate": 1e-2,
    }

    def __init__(self, backbone="inception_resnet_v2", weights="imagenet", image_size=None,
                 fine_tune="all", dropout=0.5, class_weight="balanced", epochs=10,
                 batch_size=32, learning_rate=1e-4, validation_fraction=0.1, patience=3,
                 random_state=0, contamination=0.1):
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.fine_tune = fine_tune
        self.dropout = dropout
        self.class_weight = class_weight
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state
        self.contamination = contamination

    @staticmethod
    def _labels(y, n):
        y = np.asarray(y).ravel()
        if len(y) != n:
            raise ValueError(f"y has {len(y)} labels for {n} images")
        if not np.isin(y, (0, 1)).all():
            raise ValueError(
                f"y must hold 0 (normal) and 1 (anomaly) only, got values {np.unique(y)[:10]}"
            )
        if len(np.unique(y)) < 2:
            raise ValueError(
                "the supervised detector needs labelled examples of both classes "
                "(0 = normal, 1 = anomaly); y holds only one"
            )
        return y.astype(np.float32)

    def _weights(self, y):
        if self.class_weight is None:
            return np.ones_like(y)
        if self.class_weight != "balanced":
            raise ValueError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        n, n_pos = len(y), float(y.sum())
        return np.where(y == 1, n / (2.0 * n_pos), n / (2.0 * (n - n_pos))).astype(np.float32)

    def _set_trainable(self, base):
        fine_tune = self.fine_tune
        if fine_tune == "all":
            base.trainable = True
        elif fine_tune == "head":
            base.trainable = False
        elif isinstance(fine_tune, int) and not isinstance(fine_tune, bool) and fine_tune >= 0:
            base.trainable = True
            cut = max(len(base.layers) - fine_tune, 0)
            for layer in base.layers[:cut]:
                layer.trainable = False
        else:
            raise ValueError(
                f"fine_tune must be 'all', 'head' or a number of layers, got {fine_tune!r}")

    @staticmethod
    def _recalibrate(base, x, size, preprocess, n_max=256):
        """Set the moving statistics of every batch normalisation layer of ``base`` to the
        statistics of (up to ``n_max``) training images: one forward pass in training mode
        with momentum 0. Only for random weights, whose initial statistics (0 and 1) make
        the inference-mode network output vanishing features."""
        bns = [layer for layer in base._flatten_layers()
               if isinstance(layer, keras.layers.BatchNormalization)]
        saved = [(bn.momentum, bn.trainable) for bn in bns]
        try:
            for bn in bns:  # a frozen BN layer ignores training=True
                bn.momentum, bn.trainable = 0.0, True
            batch = preprocess(resize_images(x[:n_max], size)).astype(np.float32)
            base(batch, training=True)
        finally:
            for bn, (momentum, trainable) in zip(bns, saved, strict=True):
                bn.momentum, bn.trainable = momentum, trainable

    def _fit(self, X, y):
        from kad.features.backbones import get_backbone

        labels = self._labels(y, len(X))
        bb = get_backbone(self.backbone)
        size = int(self.image_size or bb.default_size)
        if size < bb.min_size:
            raise ValueError(
                f"image_size {size} is too small for backbone {self.backbone!r}: its minimum "
                f"is {bb.min_size} px"
            )
        base = bb.build_base(size, self.weights)  # (seeds globally for random weights)
        pretrained = not (self.weights is None
                          or str(self.weights).lower() in ("none", "random"))
        seed_everything(self.random_state)
        train_idx, val_idx = self._split(len(X), labels=labels)
        if not pretrained:
            self._recalibrate(base, X[train_idx], size, bb.preprocess)
        self._set_trainable(base)

        layers = keras.layers
        inputs = keras.Input((size, size, 3))
        h = base(inputs, training=False)
        h = layers.GlobalAveragePooling2D()(h)
        h = layers.Dropout(float(self.dropout))(h)
        logit = layers.Dense(1, name="abnormal_logit")(h)
        model = keras.Model(inputs, logit, name="supervised")
        model.compile(optimizer=keras.optimizers.Adam(float(self.learning_rate)),
                      loss=keras.losses.BinaryCrossentropy(from_logits=True))

        seed = 0 if self.random_state is None else int(self.random_state)
        y_train = labels[train_idx]
        train = _Batches(X[train_idx], size, bb.preprocess, self.batch_size, y_train,
                         self._weights(y_train), shuffle=True, seed=seed)
        val = None
        if len(val_idx):
            y_val = labels[val_idx]
            val = _Batches(X[val_idx], size, bb.preprocess, self.batch_size, y_val,
                           self._weights(y_val))
        self.history_ = self._fit_model(model, train, validation_data=val,
                                        description=f"supervised {self.backbone}")
        if not pretrained and self.fine_tune != "head" and self.history_:
            self._recalibrate(base, X[train_idx], size, bb.preprocess)
        self.classifier_ = inference_copy(model)
        self.input_size_ = size
        self.backbone_spec_ = str(self.backbone)
        self._tf_preprocess = bb.preprocess

    def _preprocess(self):
        fn = getattr(self, "_tf_preprocess", None)
        if fn is None:
            from kad.features.backbones import get_backbone

            fn = self._tf_preprocess = get_backbone(self.backbone_spec_).preprocess
        return fn

    def _forward(self):
        fn = getattr(self, "_tf_forward", None)
        if fn is None:
            model = self.classifier_
            fn = self._tf_forward = tf.function(lambda x: model(x, training=False),
                                                reduce_retracing=True)
        return fn

    def _score(self, X):
        batches = _Batches(X, self.input_size_, self._preprocess(), self.batch_size)
        forward = self._forward()
        logits = np.concatenate([forward(batches[i][0]).numpy().reshape(-1)
                                 for i in range(len(batches))])
        return expit(logits.astype(np.float64))
