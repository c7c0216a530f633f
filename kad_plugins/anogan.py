"""AnoGAN: anomaly detection with a GAN and a latent-space search.

Reference: T. Schlegl, P. Seeböck, S. M. Waldstein, U. Schmidt-Erfurth, G. Langs.
*Unsupervised Anomaly Detection with Generative Adversarial Networks to Guide Marker
Discovery.* IPMI 2017.

Method
    A DCGAN (Radford et al. 2016) is trained on normal images only. To score an image
    ``x``, a latent code ``z`` is searched by gradient descent (Adam on ``z``,
    ``n_search_steps`` steps, all images of a batch at once: each image's loss depends on
    its own ``z`` only and Adam is element-wise, so batching does not change the result)
    to minimise ``A(z) = (1 - λ) · R(z) + λ · D(z)`` with the residual loss
    ``R = Σ |x - G(z)|`` and the discrimination loss ``D = Σ |f(x) - f(G(z))|``, ``f``
    being an intermediate discriminator layer (feature matching), ``λ = 0.1``
    (``discrimination_weight``). The anomaly score is ``A`` at the last step.

    The search starts from a ``z`` drawn from a generator seeded by ``random_state`` and
    the image's own content (a CRC of its pixels): the score of an image does not depend
    on global random state, on the other images scored with it, or on how often it is
    scored.

Architecture (a DCGAN at a working size of ``image_size`` = 32, a power of two >= 8;
images of any size are resized to it and scaled to [-1, 1])
    * generator: ``z`` (``latent_dim`` = 100, standard normal) -> dense to 4x4x(F·2^(L-1))
      -> BN -> ReLU -> (L-1) blocks transposed conv 4x4 stride 2 (halving the filters) ->
      BN -> ReLU -> transposed conv 4x4 stride 2 to 3 channels -> tanh, with
      ``L = log2(image_size / 4)`` and ``F = filters``.
    * discriminator: L blocks conv 4x4 stride 2 (F, 2F, 4F, ...) -> leaky ReLU 0.2 ->
      flatten (the feature layer ``f``) -> dense to one logit. The discriminator has no
      batch normalisation (DCGAN has some), so that ``f`` is the same function in
      training and at scoring, where everything runs in inference mode.
    Non-saturating GAN losses, Adam (lr 2e-4, β1 = 0.5) for both networks, as in DCGAN.

Defaults and the original settings
    Schlegl et al. use 64x64 patches, a standard DCGAN (four strided up-sampling blocks),
    ``λ = 0.1`` and 500 back-propagation steps for the search. On a CPU the defaults
    are ``image_size=32``, ``filters=32``, ``epochs=20`` (``batch_size=64``) and
    ``n_search_steps=100`` with ``search_learning_rate=0.05``; ``image_size=64,
    filters=128, n_search_steps=500`` is the full-size setting. GAN training has no
    meaningful validation loss, so there is no early stopping.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from kad.detectors.deep import DeepDetector, inference_copy, keras, seed_everything, tf

__all__ = ["AnoGANDetector", "build_generator", "build_discriminator"]


def _n_blocks(size: int) -> int:
    blocks = math.log2(size / 4) if size >= 8 else 0
    if size < 8 or blocks != int(blocks):
        raise ValueError(f"image_size must be a power of two >= 8, got {size!r}")
    return int(blocks)


def build_generator(size: int, latent_dim: int, filters: int):
    layers = keras.layers
    n = _n_blocks(size)
    channels = filters * 2 ** (n - 1)
    z = keras.Input((latent_dim,), name="z")
    x = layers.Dense(4 * 4 * channels, use_bias=False)(z)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(x)
    x = layers.Reshape((4, 4, channels))(x)
    for _ in range(n - 1):
        channels //= 2
        x = layers.Conv2DTranspose(channels, 4, strides=2, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
    out = layers.Conv2DTranspose(3, 4, strides=2, padding="same", activation="tanh")(x)
    return keras.Model(z, out, name="generator")


def build_discriminator(size: int, filters: int):
    """Outputs ``[logit, features]`` (features: the flattened last conv block)."""
    layers = keras.layers
    n = _n_blocks(size)
    image = keras.Input((size, size, 3), name="image")
    x = image
    for i in range(n):
        x = layers.Conv2D(filters * 2**i, 4, strides=2, padding="same")(x)
        x = layers.LeakyReLU(negative_slope=0.2)(x)
    features = layers.Flatten(name="features")(x)
    logit = layers.Dense(1, name="logit")(features)
    return keras.Model(image, [logit, features], name="discriminator")


class _DCGAN(keras.Model):
    """The adversarial training loop (as in the keras.io DCGAN example). Only used while
    fitting; the detector keeps inference copies of the generator and discriminator."""

    def __init__(self, generator, discriminator, latent_dim, **kwargs):
        super().__init__(**kwargs)
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = int(latent_dim)
        self.seed_generator = keras.random.SeedGenerator()
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    @staticmethod
    def _bce(labels_are_one: bool, logits):
        labels = tf.ones_like(logits) if labels_are_one else tf.zeros_like(logits)
        return tf.reduce_mean(
            tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))

    def train_step(self, data):
        real = data[0] if isinstance(data, (tuple, list)) else data
        batch = tf.shape(real)[0]
        z = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            fake = self.generator(z, training=True)
            real_logit = self.discriminator(real, training=True)[0]
            fake_logit = self.discriminator(fake, training=True)[0]
            d_loss = self._bce(True, real_logit) + self._bce(False, fake_logit)
        weights = self.discriminator.trainable_weights
        self.d_optimizer.apply(tape.gradient(d_loss, weights), weights)

        z = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            fake_logit = self.discriminator(self.generator(z, training=True), training=True)[0]
            g_loss = self._bce(True, fake_logit)
        weights = self.generator.trainable_weights
        self.g_optimizer.apply(tape.gradient(g_loss, weights), weights)

        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {m.name: m.result() for m in self.metrics}


class AnoGANDetector(DeepDetector):
    """AnoGAN (Schlegl et al. 2017): a DCGAN of normal images, and a latent search at
    scoring time; score = (1 - λ) · residual + λ · discrimination loss.

    Parameters: ``image_size`` (working size, a power of two), ``latent_dim``,
    ``filters`` (base width of both networks), ``epochs``, ``batch_size``,
    ``learning_rate``, ``beta_1`` (GAN training), ``n_search_steps``,
    ``search_learning_rate``, ``discrimination_weight`` (λ), ``search_batch_size``,
    ``random_state``. ``validation_fraction`` and ``patience`` are accepted for
    a uniform interface; there is no early stopping for the GAN.
    """

    input_kind = "images"
    _display_name = "AnoGAN"
    quick_params = {
        "image_size": 16, "latent_dim": 16, "filters": 8, "epochs": 5, "batch_size": 32,
        "learning_rate": 1e-3, "n_search_steps": 10,
    }

    def __init__(self, image_size=32, latent_dim=100, filters=32, epochs=20, batch_size=64,
                 learning_rate=2e-4, beta_1=0.5, n_search_steps=100, search_learning_rate=0.05,
                 discrimination_weight=0.1, search_batch_size=256, validation_fraction=0.0,
                 patience=None, random_state=0, contamination=0.1):
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.filters = filters
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.beta_1 = beta_1
        self.n_search_steps = n_search_steps
        self.search_learning_rate = search_learning_rate
        self.discrimination_weight = discrimination_weight
        self.search_batch_size = search_batch_size
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state
        self.contamination = contamination

    def _prepare(self, X, fit=False):
        return super()._prepare(X, fit) * 2.0 - 1.0  # [0, 1] -> [-1, 1], the tanh range

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        if not 0.0 <= float(self.discrimination_weight) <= 1.0:
            raise ValueError(
                f"discrimination_weight must be in [0, 1], got {self.discrimination_weight!r}")
        size = int(self.image_size)
        _n_blocks(size)
        seed_everything(self.random_state)
        x = self._prepare(X, fit=True)
        generator = build_generator(size, int(self.latent_dim), int(self.filters))
        discriminator = build_discriminator(size, int(self.filters))
        gan = _DCGAN(generator, discriminator, self.latent_dim, name="dcgan")
        gan.compile(
            d_optimizer=keras.optimizers.Adam(float(self.learning_rate), beta_1=self.beta_1),
            g_optimizer=keras.optimizers.Adam(float(self.learning_rate), beta_1=self.beta_1),
        )
        self.history_ = self._fit_model(gan, x, description="AnoGAN (DCGAN)",
                                        early_stopping=False)
        self.generator_ = inference_copy(generator)
        self.discriminator_ = inference_copy(discriminator)

    # -- the latent search ---------------------------------------------------------
    def _initial_z(self, x: np.ndarray) -> np.ndarray:
        """One standard-normal start per image, seeded by ``random_state`` and the image."""
        base = 0 if self.random_state is None else int(self.random_state)
        z = np.empty((len(x), int(self.latent_dim)), dtype=np.float32)
        for i, image in enumerate(x):
            rng = np.random.default_rng([base, zlib.crc32(np.ascontiguousarray(image).data)])
            z[i] = rng.standard_normal(int(self.latent_dim))
        return z

    def _search_function(self):
        lam = float(self.discrimination_weight)
        steps = int(self.n_search_steps)
        lr = float(self.search_learning_rate)
        cached = getattr(self, "_tf_search", None)
        if cached is not None and cached[0] == (lam, steps, lr):
            return cached[1]
        generator, discriminator = self.generator_, self.discriminator_
        beta_1, beta_2, eps = 0.9, 0.999, 1e-7

        def losses(x, f_x, z):
            g = generator(z, training=False)
            residual = tf.reduce_sum(tf.abs(x - g), axis=[1, 2, 3])
            f_g = discriminator(g, training=False)[1]
            discrimination = tf.reduce_sum(tf.abs(f_x - f_g), axis=1)
            return (1.0 - lam) * residual + lam * discrimination

        @tf.function(reduce_retracing=True)
        def search(x, z0):
            f_x = discriminator(x, training=False)[1]

            def body(i, z, m, v):
                with tf.GradientTape() as tape:
                    tape.watch(z)
                    total = tf.reduce_sum(losses(x, f_x, z))
                grad = tape.gradient(total, z)
                m = beta_1 * m + (1.0 - beta_1) * grad
                v = beta_2 * v + (1.0 - beta_2) * tf.square(grad)
                t = tf.cast(i + 1, tf.float32)
                m_hat = m / (1.0 - tf.pow(beta_1, t))
                v_hat = v / (1.0 - tf.pow(beta_2, t))
                return i + 1, z - lr * m_hat / (tf.sqrt(v_hat) + eps), m, v

            zeros = tf.zeros_like(z0)
            _, z, _, _ = tf.while_loop(lambda i, *_: i < steps, body,
                                       (tf.constant(0), z0, zeros, zeros))
            return losses(x, f_x, z)

        self._tf_search = ((lam, steps, lr), search)
        return search

    def _score(self, X):
        x = self._prepare(X)
        z0 = self._initial_z(x)
        search = self._search_function()
        batch = int(self.search_batch_size)
        scores = [search(tf.constant(x[i:i + batch]), tf.constant(z0[i:i + batch])).numpy()
                  for i in range(0, len(x), batch)]
        return np.concatenate(scores).astype(np.float64)
