"""Deep SVDD: One-Class Deep Support Vector Data Description.

Reference: L. Ruff, R. Vandermeulen, N. Görnitz, L. Deecke, S. A. Siddiqui, A. Binder,
E. Müller, M. Kloft. *Deep One-Class Classification.* ICML 2018 (the paper's DeepSVDD
baseline; its CIFAR-10 number, 64.8, is One-Class Deep SVDD's average in Ruff et al.).

Method
    A network φ without bias terms maps the normal training data into a hypersphere of
    minimum volume around a centre ``c``: the one-class objective
    ``mean ||φ(x) - c||²`` (plus weight decay) is minimised. ``c`` is fixed before training
    as the mean of an initial forward pass over the training data (after the optional
    autoencoder pretraining); coordinates of ``c`` closer to 0 than ``eps`` are pushed to
    ``±eps``, since a zero coordinate can be matched by zero weights. The anomaly score is
    ``||φ(x) - c||²``.

Architectures (all bias-free: no bias in convolutions or dense layers, and batch
normalisation without affine parameters, ``center=False, scale=False``, eps 1e-4, which
is what rules out the trivial "hypersphere collapse" solution)
    * images: Ruff's CIFAR-10 LeNet-type network at a working size of ``image_size``
      (32 by default, a multiple of 8): three blocks conv 5x5 (32, 64, 128 filters) ->
      BN -> leaky ReLU (slope 0.01, PyTorch's default as in Ruff's code) -> max-pool 2x2,
      then a dense layer to ``rep_dim`` = 128. The pretraining decoder mirrors it
      (BN on the code, reshape to (size/8, size/8, ·), leaky ReLU, three blocks
      transposed conv 5x5 (128, 64, 32) -> BN -> leaky ReLU -> 2x nearest upsampling,
      transposed conv 5x5 to 3 channels, sigmoid).
    * feature vectors: the MLP of Ruff et al.'s later Deep SAD code, blocks
      dense (no bias) -> BN -> leaky ReLU for ``hidden`` = (128, 64), then dense to
      ``rep_dim`` = 32; the decoder mirrors it with a linear output. Features are
      standardised with the training part's mean and standard deviation.

Defaults and the original settings
    Ruff et al.: Adam with a two-phase learning rate (1e-4, then 1e-5), weight decay 1e-6,
    batches of 200, 250 + 100 epochs of autoencoder pretraining and 150 + 100 epochs of
    Deep SVDD. Those take hours on a CPU; the defaults here are ``learning_rate=1e-4``,
    ``weight_decay=1e-6``, ``batch_size=200``, ``pretrain_epochs=10``, ``epochs=25`` (about
    5 minutes for 3000 images of 32x32 on two CPU cores), with early stopping
    (``patience=10``) on a held-out ``validation_fraction=0.1`` of the normal training
    data; pass ``pretrain_epochs=350, epochs=250, patience=None`` for the paper's number of
    epochs (without the second, lower learning-rate phase). Weight decay is Keras Adam's
    decoupled one rather than PyTorch's L2 term. Ruff's global contrast normalisation and
    per-class min-max scaling of CIFAR-10 are not applied: kad's images are in [0, 1].

Collapse guard
    After training, the training scores' standard deviation is compared with ``||c||²``;
    a (near) constant score raises a :class:`CollapseWarning` and sets ``collapsed_``.
    ``use_bias=True`` (biases in every layer, BN with affine parameters) exists only to
    reproduce the collapse Ruff et al. warn about.

Only the one-class objective is implemented (not the soft-boundary variant).
"""

from __future__ import annotations

import numpy as np

from kad.detectors.deep import (
    CollapseWarning,
    DeepDetector,
    check_collapse,
    inference_copy,
    keras,
    seed_everything,
    tf,
)

__all__ = ["DeepSVDDDetector", "CollapseWarning"]


def _bn(use_bias: bool):
    return keras.layers.BatchNormalization(
        epsilon=1e-4, momentum=0.9, center=use_bias, scale=use_bias
    )


def lenet_encoder(size: int, rep_dim: int, slope: float = 0.01, use_bias: bool = False):
    """Ruff et al.'s CIFAR-10 LeNet-type encoder (bias-free unless ``use_bias``)."""
    layers = keras.layers
    inputs = keras.Input((size, size, 3), name="image")
    x = inputs
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 5, padding="same", use_bias=use_bias)(x)
        x = _bn(use_bias)(x)
        x = layers.LeakyReLU(negative_slope=slope)(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    out = layers.Dense(rep_dim, use_bias=use_bias, name="representation")(x)
    return keras.Model(inputs, out, name="deep_svdd_lenet")


def lenet_decoder(size: int, rep_dim: int, slope: float = 0.01, use_bias: bool = False):
    layers = keras.layers
    grid = size // 8
    inputs = keras.Input((rep_dim,), name="code")
    x = _bn(use_bias)(inputs)
    if rep_dim % (grid * grid) == 0:
        x = layers.Reshape((grid, grid, rep_dim // (grid * grid)))(x)
    else:  # the code cannot be laid out on the grid: a bias-free dense layer does it
        x = layers.Dense(grid * grid * 8, use_bias=use_bias)(x)
        x = layers.Reshape((grid, grid, 8))(x)
    x = layers.LeakyReLU(negative_slope=slope)(x)
    for filters in (128, 64, 32):
        x = layers.Conv2DTranspose(filters, 5, padding="same", use_bias=use_bias)(x)
        x = _bn(use_bias)(x)
        x = layers.LeakyReLU(negative_slope=slope)(x)
        x = layers.UpSampling2D(2)(x)
    x = layers.Conv2DTranspose(3, 5, padding="same", use_bias=use_bias)(x)
    out = layers.Activation("sigmoid")(x)
    return keras.Model(inputs, out, name="deep_svdd_lenet_decoder")


def mlp_encoder(dim: int, hidden, rep_dim: int, slope: float = 0.01, use_bias: bool = False):
    """Deep SAD's MLP: (dense without bias -> BN without affine -> leaky ReLU) blocks."""
    layers = keras.layers
    inputs = keras.Input((dim,), name="features")
    x = inputs
    for units in hidden:
        x = layers.Dense(int(units), use_bias=use_bias)(x)
        x = _bn(use_bias)(x)
        x = layers.LeakyReLU(negative_slope=slope)(x)
    out = layers.Dense(rep_dim, use_bias=use_bias, name="representation")(x)
    return keras.Model(inputs, out, name="deep_svdd_mlp")


def mlp_decoder(dim: int, hidden, rep_dim: int, slope: float = 0.01, use_bias: bool = False):
    layers = keras.layers
    inputs = keras.Input((rep_dim,), name="code")
    x = inputs
    for units in reversed(tuple(hidden)):
        x = layers.Dense(int(units), use_bias=use_bias)(x)
        x = _bn(use_bias)(x)
        x = layers.LeakyReLU(negative_slope=slope)(x)
    out = layers.Dense(dim, use_bias=use_bias)(x)
    return keras.Model(inputs, out, name="deep_svdd_mlp_decoder")


def fix_center(c: np.ndarray, eps: float) -> np.ndarray:
    """Ruff et al.'s fix: coordinates of ``c`` within ``eps`` of 0 are moved to ``±eps``
    (0 itself goes to +eps), so that zero weights cannot reach the centre."""
    c = np.asarray(c, dtype=np.float32).copy()
    small = np.abs(c) < eps
    c[small & (c < 0)] = -eps
    c[small & (c >= 0)] = eps
    return c


class DeepSVDDDetector(DeepDetector):
    """Deep SVDD (Ruff et al. 2018): one-class hypersphere around a fixed centre.

    Parameters: ``rep_dim`` (None: 128 for images, 32 for feature vectors), ``hidden``
    (MLP layers for feature vectors), ``image_size`` (working size for images, a multiple
    of 8), ``pretrain`` / ``pretrain_epochs`` (autoencoder pretraining), ``epochs``,
    ``batch_size``, ``learning_rate``, ``weight_decay``, ``eps`` (centre fix),
    ``validation_fraction`` / ``patience`` (early stopping), ``use_bias`` (only to
    reproduce collapse), ``collapse_tol``, ``random_state``. See the module
    docstring for the architectures and the original settings.
    """

    input_kind = "both"
    _display_name = "Deep SVDD"
    quick_params = {
        "epochs": 3, "pretrain_epochs": 2, "batch_size": 64, "learning_rate": 1e-3,
        "image_size": 16, "rep_dim": 32, "hidden": (32,),
    }

    def __init__(self, rep_dim=None, hidden=(128, 64), image_size=32, pretrain=True,
                 pretrain_epochs=10, epochs=25, batch_size=200, learning_rate=1e-4,
                 weight_decay=1e-6, eps=0.1, validation_fraction=0.1, patience=10,
                 use_bias=False, collapse_tol=1e-6, random_state=0, contamination=0.1):
        self.rep_dim = rep_dim
        self.hidden = hidden
        self.image_size = image_size
        self.pretrain = pretrain
        self.pretrain_epochs = pretrain_epochs
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.eps = eps
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.use_bias = use_bias
        self.collapse_tol = collapse_tol
        self.random_state = random_state
        self.contamination = contamination

    def _optimizer(self):
        return keras.optimizers.Adam(
            learning_rate=float(self.learning_rate),
            weight_decay=float(self.weight_decay) or None,
        )

    def _networks(self, X):
        bias = bool(self.use_bias)
        if X.ndim == 4:
            size = int(self.image_size)
            if size < 8 or size % 8:
                raise ValueError(f"image_size must be a multiple of 8, got {self.image_size!r}")
            rep = int(self.rep_dim or 128)
            return lenet_encoder(size, rep, use_bias=bias), lenet_decoder(size, rep, use_bias=bias)
        rep = int(self.rep_dim or 32)
        dim = X.shape[1]
        return (mlp_encoder(dim, self.hidden, rep, use_bias=bias),
                mlp_decoder(dim, self.hidden, rep, use_bias=bias))

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        seed_everything(self.random_state)
        train_idx, val_idx = self._split(len(X))
        x_train = self._prepare(X[train_idx], fit=True)
        x_val = self._prepare(X[val_idx]) if len(val_idx) else None
        encoder, decoder = self._networks(x_train)
        self.history_ = {}

        if self.pretrain and int(self.pretrain_epochs) > 0:
            inputs = keras.Input(x_train.shape[1:])
            autoencoder = keras.Model(inputs, decoder(encoder(inputs)), name="deep_svdd_ae")
            autoencoder.compile(optimizer=self._optimizer(), loss="mse")
            self.history_["pretrain"] = self._fit_model(
                autoencoder, x_train, x_train,
                validation_data=None if x_val is None else (x_val, x_val),
                epochs=self.pretrain_epochs, description="Deep SVDD pretraining",
            )

        # The centre: mean of an initial forward pass (inference mode), eps-fixed.
        reps = self._predict(encoder, x_train)
        self.c_ = fix_center(reps.mean(axis=0), float(self.eps))

        # One-class objective: mean ||phi(x) - c||^2, i.e. MSE against c times rep_dim
        # (a constant factor, which Adam does not see).
        encoder.compile(optimizer=self._optimizer(), loss="mse")
        target = np.broadcast_to(self.c_, (len(x_train), self.c_.size))
        val = None
        if x_val is not None:
            val = (x_val, np.broadcast_to(self.c_, (len(x_val), self.c_.size)))
        self.history_["svdd"] = self._fit_model(
            encoder, x_train, np.ascontiguousarray(target), validation_data=val,
            description="Deep SVDD",
        )
        self.encoder_ = inference_copy(encoder)

    def _score(self, X):
        reps = self._predict(self.encoder_, self._prepare(X)).astype(np.float64)
        return np.sum((reps - self.c_.astype(np.float64)) ** 2, axis=1)

    def _score_gradient(self, X):
        """On feature vectors, ``∇ ||φ((x - m) / σ) - c||²`` by automatic differentiation
        through the encoder in inference mode (float32); None on images."""
        if X.ndim != 2:
            return None
        x = tf.constant(self._prepare(X))
        centre = tf.constant(self.c_.astype(np.float32))
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.reduce_sum((self.encoder_(x, training=False) - centre) ** 2, axis=1)
        gradient = tape.gradient(score, x).numpy().astype(np.float64)
        return gradient / self.feature_scale_.astype(np.float64)

    def _training_scores(self, X):
        scores = self._score(X)
        self.collapsed_ = self.check_collapse(scores)
        return scores

    def check_collapse(self, scores) -> bool:
        """Warn (:class:`CollapseWarning`) and return True when ``scores`` (training
        scores) are constant relative to ``||c||²``."""
        scale = float(np.sum(self.c_.astype(np.float64) ** 2))
        return check_collapse(scores, scale, "Deep SVDD", tol=float(self.collapse_tol))
