"""Batch normalization by TensorFlow's fused kernel: Keras' layer, in one pass, fast in 16 bits.

What this module teaches:
- batch normalization is y = γ·(x - μ)/√(σ² + ε) + β per channel, with μ and σ² the statistics of
  the batch in training, and moving averages of them (m ← momentum·m + (1 - momentum)·batch) in
  inference;
- Keras' BatchNormalization computes it with separate operations (moments, subtract, scale), in
  float32 around casts under mixed precision: memory-bound work that took about 60 % of a bfloat16
  training step of the U-Net on a CPU with AMX (PERFORMANCE.md). TensorFlow's fused kernel
  (FusedBatchNormV3: oneDNN on CPUs, cuDNN on GPUs, and XLA compiles it) does it in one pass and
  takes 16-bit activations with float32 γ, β and statistics;
- the same semantics as `keras.layers.BatchNormalization` (tests/test_batchnorm.py checks outputs,
  gradients and moving statistics): the kernel returns the batch variance with Bessel's correction
  (divided by n - 1), while Keras normalizes with and averages the biased one (divided by n), so the
  layer converts it before updating the moving variance.

The layer uses TensorFlow operations: Keras' TensorFlow backend only. It is registered as
serializable: a saved model reloads with keras.models.load_model once this module is imported.
"""

import functools
from collections.abc import Callable
from typing import Literal, get_args

import keras
import tensorflow as tf

_DATA_FORMATS = {4: "NHWC", 5: "NDHWC"}
# The choices of the command lines: TensorFlow's fused kernel (below), Keras' layer, Keras' layer
# with the statistics of the whole batch across the replicas of a tf.distribute strategy
# (tp4/distributed), or none.
Kind = Literal["fused", "keras", "synchronized", "none"]
KINDS = get_args(Kind)


@keras.saving.register_keras_serializable(package="tp4")
class FusedBatchNormalization(keras.layers.Layer):
    """Batch normalization over the last (channel) axis of (N, H, W, C) or (N, D, H, W, C) inputs.

    Args:
        momentum: of the moving mean and variance (Keras' meaning: the weight of the old value).
        epsilon: added to the variance before its square root.
        **kwargs: name, dtype and the other arguments of keras.layers.Layer.
    """

    def __init__(self, momentum: float = 0.99, epsilon: float = 1e-3, **kwargs):
        # No autocast: under mixed precision the variables are read in float32, as the kernel
        # wants them next to 16-bit activations.
        super().__init__(autocast=False, **kwargs)
        self.momentum, self.epsilon = momentum, epsilon

    def build(self, input_shape):
        if len(input_shape) not in _DATA_FORMATS:
            raise ValueError(f"expected (N, H, W, C) or (N, D, H, W, C), got {input_shape}")
        channels = (input_shape[-1],)
        # Keras' order and names: weights move between the two layers with set_weights.
        self.gamma = self.add_weight(shape=channels, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=channels, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(
            shape=channels, initializer="zeros", trainable=False, name="moving_mean"
        )
        self.moving_variance = self.add_weight(
            shape=channels, initializer="ones", trainable=False, name="moving_variance"
        )

    def call(self, inputs, training=False):
        options = dict(epsilon=self.epsilon, data_format=_DATA_FORMATS[len(inputs.shape)])
        gamma, beta = tf.cast(self.gamma, "float32"), tf.cast(self.beta, "float32")
        if not (training and self.trainable):
            mean, variance = (
                tf.cast(v, "float32") for v in (self.moving_mean, self.moving_variance)
            )
            return tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, mean, variance, is_training=False, **options
            )[0]
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, is_training=True, **options
        )
        # The kernel's variance is unbiased (n - 1); Keras averages the biased one (n).
        n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], "float32")
        variance = variance * (n - 1) / n
        for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
            moving.assign(
                moving * self.momentum + tf.cast(batch, moving.dtype) * (1 - self.momentum)
            )
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon}


def layer(kind: Kind) -> Callable[..., keras.layers.Layer] | None:
    """unet.build_unet's `batch_norm` for a command line's choice.

    Args:
        kind: one of KINDS.

    Returns:
        The layer class (called as `layer(momentum=..., name=...)`), or None for "none".
    """
    if kind not in KINDS:
        raise ValueError(f"batch norm must be one of {', '.join(KINDS)}, got {kind!r}")
    return {
        "fused": FusedBatchNormalization,
        "keras": keras.layers.BatchNormalization,
        "synchronized": functools.partial(keras.layers.BatchNormalization, synchronized=True),
        "none": None,
    }[kind]
