"""DeepGEO: anomaly detection with geometric transformations.

Reference: I. Golan, R. El-Yaniv. *Deep Anomaly Detection Using Geometric
Transformations.* NeurIPS 2018.

Method
    A classifier learns to tell which of 72 geometric transformations was applied to a
    normal image: horizontal flip (no/yes) x translation along x (0, -t, +t) x translation
    along y (0, -t, +t) x rotation by k·90° (k = 0..3), applied in that order (flip,
    translate, rotate), translations filling with the mirrored image (Golan et al.'s
    ``reflect`` mode). ``t`` is ``translation`` pixels (None: a quarter of the working size,
    Golan et al.'s 8 px at 32x32). At test time every transformed copy ``T_i(x)`` is
    classified, and the normality score combines the predicted probabilities
    ``y(T_i(x))``:

    * ``score_type="dirichlet"`` (Golan et al.'s main score): for every transformation a
      Dirichlet distribution is fitted (fixed-point maximum likelihood, Minka 2000) to the
      softmax outputs of the transformed normal training images; the normality is
      ``Σ_i Σ_j (α_ij - 1) log y(T_i(x))_j``.
    * ``score_type="simple"`` (the paper's simplified score): ``Σ_i log y(T_i(x))_i``.

    The anomaly score is the negated normality.

Architectures (working size ``image_size`` = 32; images of any size are resized to it)
    * ``arch="cnn"`` (default): a small CNN for CPUs -- conv 3x3 (``width``) -> BN -> ReLU,
      then three stride-2 conv 3x3 blocks (2·width, 4·width, 4·width) -> BN -> ReLU,
      global average pooling, dense softmax over the 72 transformations.
    * ``arch="wrn"``: Golan et al.'s Wide ResNet (Zagoruyko & Komodakis 2016) of depth
      ``depth`` = 10 and widening ``widen`` = 4 (pre-activation basic blocks, groups of
      16k, 32k and 64k filters), their setting.

Defaults and the original settings
    Golan et al. train WRN-10-4 with Adam (lr 1e-3), batches of 128, for
    ``ceil(200 / 72) = 3`` epochs of the 72-fold transformed training set. Here the
    defaults are ``arch="cnn", width=16, epochs=2`` (with the same Adam and batch size),
    since a pass over the 72-fold data is long on a CPU; ``arch="wrn", epochs=3`` is the
    original setting. Transformed batches are made on the fly (the 72-fold data set is
    never stored). Early stopping watches the transformation-classification loss on a
    held-out ``validation_fraction=0.1`` of the normal training images (all 72
    transformations of each).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.special import digamma

from kad.detectors.deep import DeepDetector, inference_copy, keras, seed_everything, tf

__all__ = ["DeepGeoDetector", "Transformations", "fit_dirichlet"]

_SCORES = ("dirichlet", "simple")
_ARCHS = ("cnn", "wrn")


class Transformations:
    """The 72 transformations of Golan et al. for square images of size ``size``.

    Every transformation moves pixels around, so each is stored as an index map from the
    output pixels to the input pixels; transforming a batch is one gather.
    """

    def __init__(self, size: int, translation: int):
        t = int(translation)
        self.size = int(size)
        self.translation = t
        self.params = list(itertools.product((False, True), (0, -t, t), (0, -t, t), range(4)))
        grid = np.arange(self.size * self.size).reshape(1, self.size, self.size, 1)
        self.index = np.stack([self._apply_params(grid, p).reshape(-1) for p in self.params])

    def __len__(self) -> int:
        return len(self.params)

    @staticmethod
    def _translate(x: np.ndarray, tx: int, ty: int) -> np.ndarray:
        """Shift a batch ``(n, h, w, c)`` by ``tx`` columns and ``ty`` rows, filling with the
        mirrored image (half-sample symmetric, scipy's ``reflect``)."""
        h, w = x.shape[1:3]
        px, py = abs(tx), abs(ty)
        padded = np.pad(x, ((0, 0), (py, py), (px, px), (0, 0)), mode="symmetric")
        return padded[:, py - ty:py - ty + h, px - tx:px - tx + w]

    @classmethod
    def _apply_params(cls, x, params):
        flip, tx, ty, k = params
        if flip:
            x = x[:, :, ::-1]
        if tx or ty:
            x = cls._translate(x, tx, ty)
        if k:
            x = np.rot90(x, k, axes=(1, 2))
        return x

    def apply(self, x: np.ndarray, index) -> np.ndarray:
        """Transformation ``index`` (an int, or one int per image) applied to the batch
        ``x`` of shape ``(n, size, size, c)``."""
        n, c = len(x), x.shape[-1]
        flat = x.reshape(n, -1, c)
        maps = self.index[index]
        if maps.ndim == 1:
            out = flat[:, maps]
        else:
            out = np.take_along_axis(flat, maps[:, :, None], axis=1)
        return out.reshape(x.shape).astype(np.float32, copy=False)


class _TransformedImages(keras.utils.PyDataset):
    """Batches of (transformed image, transformation index) pairs over all images and all
    transformations, reshuffled every epoch with its own seeded generator."""

    def __init__(self, x, transformations, batch_size, shuffle, seed):
        super().__init__()
        self.x = x
        self.transformations = transformations
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.n = len(x) * len(transformations)
        self.order = self.rng.permutation(self.n) if shuffle else np.arange(self.n)

    def __len__(self):
        return math.ceil(self.n / self.batch_size)

    def __getitem__(self, i):
        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        images, labels = np.divmod(idx, len(self.transformations))
        return self.transformations.apply(self.x[images], labels), labels.astype(np.int32)

    def on_epoch_end(self):
        if self.shuffle:
            self.order = self.rng.permutation(self.n)


def simple_cnn(size: int, n_classes: int, width: int = 16):
    layers = keras.layers
    inputs = keras.Input((size, size, 3))
    x = inputs
    for filters, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (4 * width, 2)):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(n_classes, activation="softmax")(x)
    return keras.Model(inputs, out, name="geo_cnn")


def wide_resnet(size: int, n_classes: int, depth: int = 10, widen: int = 4,
                weight_decay: float = 5e-4):
    """Pre-activation Wide ResNet WRN-depth-widen (Zagoruyko & Komodakis 2016)."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
    layers = keras.layers
    reg = keras.regularizers.L2(weight_decay) if weight_decay else None

    def conv(filters, kernel, stride=1):
        return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                             kernel_initializer="he_normal", kernel_regularizer=reg)

    n_blocks = (depth - 4) // 6
    inputs = keras.Input((size, size, 3))
    x = conv(16, 3)(inputs)
    for group, (filters, stride) in enumerate(((16 * widen, 1), (32 * widen, 2),
                                               (64 * widen, 2))):
        for block in range(n_blocks):
            s = stride if block == 0 else 1
            pre = layers.ReLU()(layers.BatchNormalization()(x))
            shortcut = x if (s == 1 and x.shape[-1] == filters) else conv(filters, 1, s)(pre)
            h = conv(filters, 3, s)(pre)
            h = layers.ReLU()(layers.BatchNormalization()(h))
            h = conv(filters, 3)(h)
            x = layers.Add(name=f"wrn_g{group}_b{block}")([shortcut, h])
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(n_classes, activation="softmax", kernel_regularizer=reg)(x)
    return keras.Model(inputs, out, name=f"wrn_{depth}_{widen}")


# -- the Dirichlet normality score -------------------------------------------------------
def _trigamma(x: np.ndarray) -> np.ndarray:
    """ψ'(x) for x > 0: six recurrence steps, then the asymptotic series (error < 1e-11);
    much faster than ``scipy.special.polygamma(1, x)``."""
    out = np.zeros_like(x)
    for _ in range(6):
        out += 1.0 / (x * x)
        x = x + 1.0
    inv = 1.0 / x
    inv2 = inv * inv
    return out + inv + inv2 * (0.5 + inv * (1.0 / 6.0 + inv2 * (-1.0 / 30.0 + inv2 * (
        1.0 / 42.0 - inv2 / 30.0))))


def _inverse_digamma(y: np.ndarray, iterations: int = 5) -> np.ndarray:
    """ψ⁻¹(y): Minka's initialisation and Newton steps."""
    x = np.where(y >= -2.22, np.exp(np.minimum(y, 700.0)) + 0.5, -1.0 / (y - digamma(1.0)))
    for _ in range(iterations):
        x = x - (digamma(x) - y) / _trigamma(x)
    return x


def fit_dirichlet(mean: np.ndarray, log_mean: np.ndarray, max_iter: int = 1000,
                  tol: float = 1e-9) -> np.ndarray:
    """Maximum-likelihood Dirichlet parameters from the sufficient statistics of a set of
    probability vectors: their mean and the mean of their logarithms (both ``(..., K)``;
    leading axes fit independent Dirichlets at once). Minka's fixed-point iteration
    ``α ← ψ⁻¹(ψ(Σα) + mean log p)``, started from a moment-matching guess, until the
    update is below ``tol`` relative to ``|α|``."""
    mean = np.asarray(mean, dtype=np.float64)
    log_mean = np.asarray(log_mean, dtype=np.float64)
    batch_shape = mean.shape[:-1]
    k = mean.shape[-1]
    mean, log_mean = mean.reshape(-1, k), log_mean.reshape(-1, k)
    # Minka's approximation of the concentration Σα from the two statistics.
    spread = np.sum(mean * (np.log(mean) - log_mean), axis=-1, keepdims=True)
    total = np.where(spread > 1e-12, (k - 1) / (2.0 * np.maximum(spread, 1e-12)), 1.0)
    alpha = mean * total
    active = np.arange(len(alpha))
    for _ in range(max_iter):
        a = alpha[active]
        new = _inverse_digamma(digamma(a.sum(axis=-1, keepdims=True)) + log_mean[active])
        new = np.where(np.isfinite(new) & (new > 0), new, a)
        delta = np.linalg.norm(new - a, axis=-1)
        alpha[active] = new
        active = active[delta >= tol * np.linalg.norm(new, axis=-1)]
        if not len(active):
            break
    return alpha.reshape(*batch_shape, k)


class DeepGeoDetector(DeepDetector):
    """DeepGEO (Golan & El-Yaniv 2018): a classifier of 72 geometric transformations of
    normal images; anomaly score = minus the (Dirichlet or simple) normality score.

    Parameters: ``score_type`` ("dirichlet" or "simple"), ``arch`` ("cnn" or "wrn"), ``width``
    (CNN), ``depth`` / ``widen`` (WRN), ``translation`` (pixels; None: image_size // 4),
    ``image_size``, ``epochs`` (passes over the 72-fold data), ``batch_size``,
    ``learning_rate``, ``validation_fraction``, ``patience``, ``random_state``.
    """

    input_kind = "images"
    _display_name = "DeepGEO"
    quick_params = {"image_size": 16, "width": 8, "epochs": 1, "batch_size": 128}

    def __init__(self, score_type="dirichlet", arch="cnn", width=16, depth=10, widen=4,
                 translation=None, image_size=32, epochs=2, batch_size=128,
                 learning_rate=1e-3, validation_fraction=0.1, patience=2, random_state=0,
                 contamination=0.1):
        self.score_type = score_type
        self.arch = arch
        self.width = width
        self.depth = depth
        self.widen = widen
        self.translation = translation
        self.image_size = image_size
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state
        self.contamination = contamination

    def _transformations(self) -> Transformations:
        size = int(self.image_size)
        t = size // 4 if self.translation is None else int(self.translation)
        if not 0 <= t < size:
            raise ValueError(f"translation must be in [0, {size}), got {self.translation!r}")
        return Transformations(size, t)

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        if self.score_type not in _SCORES:
            raise ValueError(f"score_type must be one of {_SCORES}, got {self.score_type!r}")
        if self.arch not in _ARCHS:
            raise ValueError(f"arch must be one of {_ARCHS}, got {self.arch!r}")
        seed_everything(self.random_state)
        transformations = self._transformations()
        size, n_classes = int(self.image_size), len(transformations)
        train_idx, val_idx = self._split(len(X))
        x_train = self._prepare(X[train_idx])
        if self.arch == "cnn":
            model = simple_cnn(size, n_classes, int(self.width))
        else:
            model = wide_resnet(size, n_classes, int(self.depth), int(self.widen))
        model.compile(optimizer=keras.optimizers.Adam(float(self.learning_rate)),
                      loss="sparse_categorical_crossentropy")
        seed = 0 if self.random_state is None else int(self.random_state)
        train = _TransformedImages(x_train, transformations, self.batch_size, True, seed)
        val = None
        if len(val_idx):
            val = _TransformedImages(self._prepare(X[val_idx]), transformations,
                                     self.batch_size, False, seed)
        self.history_ = self._fit_model(model, train, validation_data=val,
                                        description="DeepGEO")
        self.classifier_ = inference_copy(model)

        # Dirichlet parameters per transformation, from all of the normal training images;
        # the training scores come out of the same pass.
        x_all = self._prepare(X)
        if self.score_type == "simple":
            self.alphas_ = None
            normality = np.zeros(len(X))
            for i in range(n_classes):
                normality += np.log(self._probabilities(x_all, transformations, i)[:, i])
        else:
            log_p = np.empty((len(X), n_classes, n_classes), dtype=np.float32)
            means = np.empty((n_classes, n_classes))
            for i in range(n_classes):
                p = self._probabilities(x_all, transformations, i)
                means[i] = p.mean(axis=0)
                log_p[:, i] = np.log(p)
            self.alphas_ = fit_dirichlet(means, log_p.mean(axis=0, dtype=np.float64))
            normality = np.zeros(len(X))
            for i in range(n_classes):
                normality += self._dirichlet_normality(log_p[:, i], i)
        self._training_cache = (X, -normality)

    def _forward(self):
        fn = getattr(self, "_tf_forward", None)
        if fn is None:
            model = self.classifier_
            fn = self._tf_forward = tf.function(lambda x: model(x, training=False),
                                                reduce_retracing=True)
        return fn

    def _probabilities(self, x, transformations, index, batch_size=256):
        forward = self._forward()
        xt = transformations.apply(x, index)
        p = np.concatenate([forward(xt[i:i + batch_size]).numpy()
                            for i in range(0, len(xt), batch_size)])
        p = np.clip(p.astype(np.float64), 1e-12, None)
        return p / p.sum(axis=1, keepdims=True)

    def _dirichlet_normality(self, log_p, index):
        """``Σ_j (α_ij - 1) log p_j`` for the float32 ``log_p`` of transformation ``index``
        (the same arithmetic at fit and at scoring time)."""
        return log_p.astype(np.float64) @ (self.alphas_[index] - 1.0)

    def _score(self, X):
        transformations = self._transformations()
        x = self._prepare(X)
        normality = np.zeros(len(x))
        for i in range(len(transformations)):
            p = self._probabilities(x, transformations, i)
            if self.score_type == "simple":
                normality += np.log(p[:, i])
            else:
                normality += self._dirichlet_normality(np.log(p).astype(np.float32), i)
        return -normality

    def _training_scores(self, X):
        cache = self.__dict__.pop("_training_cache", None)
        if cache is not None and cache[0] is X:
            return cache[1]
        return self._score(X)
