"""Batch normalization folded into the convolution before it: the network inference runs.

What this module teaches: in inference a batch norm is a fixed affine map per channel,
y = γ·(x - m)/√(v + ε) + β with the moving mean m and variance v, so after a convolution
x = W * u + b it is the convolution with W' = W·s and b' = (b - m)·s + β, s = γ/√(v + ε), per output
channel. The folded network computes the same function with one operation less per level, and
TensorFlow then runs convolution, bias and ReLU as one fused oneDNN kernel (_FusedConv2D), where
the batch norm was a pass over memory of its own. Under mixed precision the copy keeps its
variables in the 16-bit type it computes in (not float32 cast at every call): a network that only
infers needs no float32 master weights. The output layers keep their dtype (probabilities in
float32).
"""

import keras
import numpy as np

from tp4.models import batchnorm

_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.Conv3D)
_NORMS = (batchnorm.FusedBatchNormalization, keras.layers.BatchNormalization)


@keras.saving.register_keras_serializable(package="tp4")
class FoldedBatchNormalization(keras.layers.Layer):
    """Where a folded batch norm was: its input unchanged (the convolution before it does its work).
    Takes the batch norm's call arguments (`training`, `mask`), which a clone passes on."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _folded_pairs(model: keras.Model) -> dict[str, str]:
    """{convolution name: batch norm name} of each batch norm over the channels whose only input
    is a (not transposed) convolution that feeds nothing else."""
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, _NORMS) or len(layer._inbound_nodes) != 1:
            continue
        if isinstance(layer, keras.layers.BatchNormalization) and layer.axis not in (
            -1,
            len(layer.input.shape) - 1,
        ):
            continue
        (parent,) = layer._inbound_nodes[0].parent_nodes or [None]
        conv = getattr(parent, "operation", None)
        if (
            isinstance(conv, _CONVOLUTIONS)
            and not isinstance(conv, keras.layers.Conv2DTranspose | keras.layers.Conv3DTranspose)
            and len(conv._outbound_nodes) == 1
            and len(conv._inbound_nodes) == 1
        ):
            pairs[conv.name] = layer.name
    return pairs


def _scale_and_shift(norm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s, m, β) of a batch norm layer in inference: y = (x - m)·s + β."""
    channels = norm.moving_mean.shape
    gamma = (
        np.asarray(norm.gamma) if getattr(norm, "gamma", None) is not None else np.ones(channels)
    )
    beta = np.asarray(norm.beta) if getattr(norm, "beta", None) is not None else np.zeros(channels)
    scale = gamma / np.sqrt(np.asarray(norm.moving_variance) + norm.epsilon)
    return scale, np.asarray(norm.moving_mean), beta


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of `model` for inference: each batch norm after a convolution folded into it (the
    batch norm becomes a FoldedBatchNormalization of the same name), variables in the compute dtype.

    Args:
        model: a functional Keras model (unet.build_unet's, 2D or 3D, any batch norm kind).

    Returns:
        The copy (the same outputs up to rounding); `model` itself if it has nothing to fold.
    """
    pairs = _folded_pairs(model)
    if not pairs:
        return model
    norms, keep = set(pairs.values()), set(model.output_names)

    def clone(layer):
        config = layer.get_config()
        if layer.name in norms:  # at its convolution's dtype: no cast between them
            conv = model.get_layer(next(c for c, n in pairs.items() if n == layer.name))
            return FoldedBatchNormalization(name=layer.name, dtype=conv.dtype_policy.compute_dtype)
        if layer.name in pairs:
            config["use_bias"] = True
        if layer.name not in keep:
            config["dtype"] = layer.dtype_policy.compute_dtype  # "mixed_bfloat16" -> "bfloat16"
        return type(layer).from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name in norms:
            continue
        weights = layer.get_weights()
        if layer.name in pairs:
            scale, mean, beta = _scale_and_shift(model.get_layer(pairs[layer.name]))
            kernel = weights[0] * scale  # the last axis is the output channels
            bias = weights[1] if len(weights) > 1 else np.zeros_like(mean)
            weights = [kernel, (bias - mean) * scale + beta]
        copy.get_layer(layer.name).set_weights(weights)
    return copy
