"""batchnorm.py: the fused layer against keras.layers.BatchNormalization; a saved model reloads."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import unet
from tp4.models import batchnorm
from tp4.perf import speed

SHAPES = [(4, 6, 6, 3), (2, 3, 4, 4, 3)]  # 2D (N, H, W, C) and 3D (N, D, H, W, C)


def _pair(shape, seed=0):
    """Keras' layer and the fused one, momentum 0.9 (unet.py's), with the same random weights and
    moving statistics."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=shape[-1]).astype(np.float32) for _ in range(3)]
    weights.append(rng.uniform(0.5, 2.0, shape[-1]).astype(np.float32))  # a variance: positive
    layers = keras.layers.BatchNormalization(momentum=0.9), batchnorm.FusedBatchNormalization(0.9)
    for layer in layers:
        layer.build(shape)
        layer.set_weights(weights)
    return layers


def _step(layer, x):
    """(training output, gradients of sum(y³) w.r.t. x, γ and β, moving statistics after the step,
    inference output after it)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, "float32") ** 3)  # not linear: every gradient term counts
    gradients = tape.gradient(loss, [x, layer.gamma, layer.beta])
    moving = [v.numpy() for v in (layer.moving_mean, layer.moving_variance)]
    return y.numpy(), [g.numpy() for g in gradients], moving, layer(x, training=False).numpy()


@pytest.mark.parametrize("shape", SHAPES)
def test_same_outputs_gradients_and_moving_statistics_as_keras_in_float32(shape):
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, shape).astype(np.float32))
    reference, fused = (_step(layer, x) for layer in _pair(shape))
    np.testing.assert_allclose(fused[0], reference[0], atol=1e-5)
    for ours, theirs in zip(fused[1], reference[1]):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)
    # The biased batch variance (divided by n, not n - 1) enters the moving average, as in Keras:
    # with n = 2*6*6 = 72 values per channel, Bessel's factor 72/71 would be 50x the tolerance.
    values = x.numpy().reshape(-1, shape[-1])
    start = _pair(shape)[0].get_weights()
    expected_mean = 0.9 * start[2] + 0.1 * values.mean(axis=0)
    expected_variance = 0.9 * start[3] + 0.1 * values.var(axis=0)
    np.testing.assert_allclose(fused[2][0], expected_mean, rtol=1e-5)
    np.testing.assert_allclose(fused[2][1], expected_variance, rtol=1e-5)
    np.testing.assert_allclose(fused[2], reference[2], rtol=1e-5)
    np.testing.assert_allclose(fused[3], reference[3], atol=1e-5)


def test_bfloat16_activations_with_float32_statistics_match_keras_within_bfloat16_rounding():
    shape = SHAPES[0]
    x = np.random.default_rng(2).normal(2.0, 3.0, shape).astype(np.float32)
    with speed.policy_scope("bfloat16"):
        reference, fused = _pair(shape)
    assert fused.compute_dtype == "bfloat16" and fused.gamma.dtype == "float32"
    y = fused(tf.constant(x, "bfloat16"), training=True)
    assert y.dtype == "bfloat16"
    expected = reference(tf.constant(x, "bfloat16"), training=True)
    # bfloat16 keeps 8 bits of mantissa: about 2-3 significant digits of outputs of order 1.
    np.testing.assert_allclose(np.float32(y), np.float32(expected), atol=0.05)
    assert fused.moving_mean.dtype == "float32"
    np.testing.assert_allclose(fused.moving_mean.numpy(), reference.moving_mean.numpy(), atol=0.01)


def test_inference_mode_and_frozen_layers_use_the_moving_statistics():
    shape = SHAPES[0]
    _, fused = _pair(shape)
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    gamma, beta, mean, variance = fused.get_weights()
    expected = gamma * (x - mean) / np.sqrt(variance + fused.epsilon) + beta
    np.testing.assert_allclose(fused(x, training=False).numpy(), expected, atol=1e-5)
    fused.trainable = False  # fine-tuning: a frozen batch norm stays in inference mode
    np.testing.assert_allclose(fused(x, training=True).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(fused.moving_mean.numpy(), mean)


@pytest.mark.parametrize("precision, atol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_unet_with_fused_batch_norm_saves_and_reloads(tmp_path, precision, atol):
    with speed.policy_scope(precision):
        model = unet.build_unet(
            (16, 16, 1), base_filters=4, depth=2, batch_norm=batchnorm.FusedBatchNormalization
        )
    assert unet.describe(model)["batch_norm"] == "fused"
    rng = np.random.default_rng(4)
    for layer in model.layers:  # moving statistics as after training, not their initial 0 and 1
        if isinstance(layer, batchnorm.FusedBatchNormalization):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    x = rng.random((2, 16, 16, 1), dtype=np.float32)
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    layer = reloaded.get_layer("enc1_bn1")
    assert isinstance(layer, batchnorm.FusedBatchNormalization)
    assert (layer.momentum, layer.compute_dtype, layer.moving_mean.dtype) == (
        0.9,
        precision,
        "float32",
    )
    np.testing.assert_array_equal(
        layer.moving_mean.numpy(), model.get_layer("enc1_bn1").moving_mean
    )
    # In bfloat16, TensorFlow's graph optimizer may fuse convolution and batch norm in one of the
    # two predict graphs and not in the other: equal within bfloat16 rounding.
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=atol
    )


def test_keras_synchronized_and_none_are_still_there():
    for kind in ("keras", "synchronized"):
        model = unet.build_unet((16, 16, 1), 4, 2, batch_norm=batchnorm.layer(kind))
        assert unet.describe(model)["batch_norm"] == kind
        assert model.get_layer("enc1_bn1").synchronized == (kind == "synchronized")
    plain = unet.build_unet((16, 16, 1), 4, 2, batch_norm=batchnorm.layer("none"))
    assert unet.describe(plain)["batch_norm"] == "none"
    with pytest.raises(ValueError, match="batch_norm must be a layer class or None"):
        unet.build_unet((16, 16, 1), 4, 2, batch_norm=True)
    with pytest.raises(ValueError, match="batch norm must be one of"):
        batchnorm.layer("batch")
