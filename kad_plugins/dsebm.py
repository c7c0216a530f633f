"""DSEBM: Deep Structured Energy-Based Model.

Reference: S. Zhai, Y. Cheng, W. Lu, Z. Zhang. *Deep Structured Energy Based Models for
Anomaly Detection.* ICML 2016.

Method
    The energy of an input is ``E(x) = ½ ||x - b'||² - Σ_j softplus(W_j · h(x) + b_j)``:
    a quadratic term around a learned bias ``b'`` (the Gaussian prior) minus the
    "free energy" of a top layer on a deep deterministic network ``h``. The model is trained
    by denoising score matching: with ``x̃ = x + ε``, ``ε ~ N(0, σ² I)``, the reconstruction
    ``f(x̃) = x̃ - ∂E/∂x̃`` should recover ``x``; the loss is ``mean ||x - f(x̃)||²`` (summed
    over input dimensions). The gradient with respect to the input is taken inside
    ``train_step`` with a nested ``tf.GradientTape``. Two scores are available (Zhai et
    al. evaluate both): the energy ``E(x)`` (``score_type="energy"``, default) and the
    reconstruction error ``||x - f(x)|| = ||∂E/∂x||`` (``score_type="reconstruction"``).

Architectures
    * images (working size ``image_size`` = 32, kept in [0, 1]): the convolutional
      DSEBM of the reference implementation used by the paper's authors (Zenati et al.'s
      ALAD code base): conv 3x3, ``filters`` = 64, stride 2, softplus -> max-pool 2x2 ->
      flatten, then the top layer ``W h + b`` with ``units`` = 128.
    * feature vectors (standardised with the training part's statistics): an MLP ``h``
      with ``hidden`` = (128,) softplus units and a top layer of ``units`` = 512 (the same
      reference code's KDD network).

Defaults and the original settings
    Zenati et al. use Adam, lr 3e-3 with batches of 32 on images (1e-4 and 100 on KDD),
    noise σ = 1 on their data, and early stopping on a validation loss with patience 25.
    Here: ``learning_rate=1e-3``, ``batch_size=64``, ``noise_std=0.5`` (images in [0, 1]
    and standardised features; σ = 1 drowns [0, 1] images), ``epochs=50``, early stopping
    (``patience=10``) on the score-matching loss of a held-out ``validation_fraction=0.1``
    of the normal training data.

The network is a subclassed ``keras.Model`` (``kad>DSEBMNet``) with its own
``train_step``/``test_step``; its ``predict`` returns both scores.
"""

from __future__ import annotations

import numpy as np

from kad.detectors.deep import DeepDetector, inference_copy, keras, seed_everything, tf

__all__ = ["DSEBMDetector", "DSEBMNet"]

_SCORES = ("energy", "reconstruction")


@keras.saving.register_keras_serializable(package="kad")
class DSEBMNet(keras.Model):
    """The energy ``E(x)`` and its score-matching ``train_step``. ``call`` returns the
    energy of every input; ``predict`` returns ``{"energy", "reconstruction"}``."""

    def __init__(self, data_shape, hidden=(128,), filters=64, units=128, noise_std=0.5,
                 **kwargs):
        super().__init__(**kwargs)
        self.data_shape = tuple(int(s) for s in data_shape)
        self.hidden = tuple(int(h) for h in hidden)
        self.filters = int(filters)
        self.units = int(units)
        self.noise_std = float(noise_std)
        layers = keras.layers
        inputs = keras.Input(self.data_shape)
        if len(self.data_shape) == 3:
            x = layers.Conv2D(self.filters, 3, strides=2, padding="same",
                              activation="softplus")(inputs)
            x = layers.MaxPooling2D(2, padding="same")(x)
            x = layers.Flatten()(x)
        else:
            x = inputs
            for h in self.hidden:
                x = layers.Dense(h, activation="softplus")(x)
        self.features = keras.Model(inputs, x, name="features")
        self.top = layers.Dense(self.units, name="top")
        self.top.build(self.features.output.shape)
        self.b_prime = self.add_weight(shape=self.data_shape, initializer="zeros",
                                       name="b_prime")
        self.seed_generator = keras.random.SeedGenerator()
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def get_config(self):
        return {**super().get_config(), "data_shape": list(self.data_shape),
                "hidden": list(self.hidden), "filters": self.filters, "units": self.units,
                "noise_std": self.noise_std}

    def build(self, input_shape=None):  # noqa: ARG002 - Keras's build signature
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker]

    def energy(self, x, training=False):
        axes = list(range(1, len(self.data_shape) + 1))
        quadratic = 0.5 * tf.reduce_sum(tf.square(x - self.b_prime), axis=axes)
        free = tf.reduce_sum(tf.nn.softplus(self.top(self.features(x, training=training))),
                             axis=1)
        return quadratic - free

    def call(self, x, training=False):
        return self.energy(x, training=training)

    def energy_gradient(self, x, training=False):
        """``(E(x), ∂E/∂x)``."""
        with tf.GradientTape() as tape:
            tape.watch(x)
            e = self.energy(x, training=training)
            total = tf.reduce_sum(e)  # energies are per sample: one gradient per sample
        return e, tape.gradient(total, x)

    def _loss(self, x, training):
        # Training draws fresh noise; validation uses the same noise every epoch (a fixed
        # seed), so that early stopping compares like with like.
        seed = self.seed_generator if training else 20160601
        noise = keras.random.normal(tf.shape(x), stddev=self.noise_std, seed=seed)
        x_noisy = x + noise
        _, grad = self.energy_gradient(x_noisy, training=training)
        reconstruction = x_noisy - grad
        axes = list(range(1, len(self.data_shape) + 1))
        return tf.reduce_mean(tf.reduce_sum(tf.square(x - reconstruction), axis=axes))

    def train_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        with tf.GradientTape() as tape:  # outer tape: parameters; inner tape: the input
            loss = self._loss(x, training=True)
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply(grads, self.trainable_weights)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        self.loss_tracker.update_state(self._loss(x, training=False))
        return {"loss": self.loss_tracker.result()}

    def predict_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        e, grad = self.energy_gradient(x, training=False)
        flat = tf.reshape(grad, [tf.shape(x)[0], -1])
        return {"energy": e, "reconstruction": tf.norm(flat, axis=1)}


class DSEBMDetector(DeepDetector):
    """DSEBM (Zhai et al. 2016): an energy model trained by denoising score matching; the
    score is the energy (or the reconstruction error).

    Parameters: ``score_type`` ("energy" or "reconstruction"), ``noise_std`` (σ), ``hidden``
    (MLP for feature vectors), ``filters`` (conv layer for images), ``units`` (top layer),
    ``image_size``, ``epochs``, ``batch_size``, ``learning_rate``,
    ``validation_fraction``, ``patience``, ``random_state``.
    """

    input_kind = "both"
    _display_name = "DSEBM"
    quick_params = {
        "epochs": 5, "batch_size": 32, "image_size": 16, "filters": 16, "units": 32,
        "hidden": (32,),
    }

    def __init__(self, score_type="energy", noise_std=0.5, hidden=(128,), filters=64, units=None,
                 image_size=32, epochs=50, batch_size=64, learning_rate=1e-3,
                 validation_fraction=0.1, patience=10, random_state=0, contamination=0.1):
        self.score_type = score_type
        self.noise_std = noise_std
        self.hidden = hidden
        self.filters = filters
        self.units = units
        self.image_size = image_size
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state
        self.contamination = contamination

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        if self.score_type not in _SCORES:
            raise ValueError(f"score_type must be one of {_SCORES}, got {self.score_type!r}")
        seed_everything(self.random_state)
        train_idx, val_idx = self._split(len(X))
        x_train = self._prepare(X[train_idx], fit=True)
        x_val = self._prepare(X[val_idx]) if len(val_idx) else None
        units = self.units or (128 if x_train.ndim == 4 else 512)
        net = DSEBMNet(x_train.shape[1:], hidden=self.hidden, filters=self.filters,
                       units=units, noise_std=self.noise_std, name="dsebm")
        net.compile(optimizer=keras.optimizers.Adam(float(self.learning_rate)))
        self.history_ = self._fit_model(
            net, x_train, validation_data=None if x_val is None else (x_val,),
            description="DSEBM",
        )
        self.net_ = inference_copy(net)

    def _score(self, X):
        out = self._predict(self.net_, self._prepare(X))
        return np.asarray(out[self.score_type], dtype=np.float64)

    def _score_gradient(self, X):
        """With ``score_type="energy"``, on feature vectors: ``∂E/∂x`` from the network's own
        input gradient (float32), divided by the standardisation scale; otherwise None
        (the reconstruction score is the norm of that gradient: occlusion)."""
        if X.ndim != 2 or self.score_type != "energy":
            return None
        _, gradient = self.net_.energy_gradient(tf.constant(self._prepare(X)))
        return gradient.numpy().astype(np.float64) / self.feature_scale_.astype(np.float64)
