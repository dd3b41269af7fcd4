"""folding.py: a network with its batch norms folded computes what the original does in
inference."""

import numpy as np
import pytest

import unet
from tp4.models import batchnorm, folding
from tp4.perf import speed


def _with_statistics(model, seed=0):
    """`model` with random batch-norm weights and moving statistics (not the identity at init)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, folding._NORMS):
            channels = layer.moving_mean.shape[0]
            gamma, beta, mean = (rng.normal(size=channels) for _ in range(3))
            variance = rng.uniform(0.5, 2.0, channels)
            layer.set_weights([w.astype(np.float32) for w in (gamma, beta, mean, variance)])
    return model


@pytest.mark.parametrize(
    "shape, kind, encoder",
    [
        ((32, 32, 1), "fused", "plain"),
        ((32, 32, 2), "keras", "residual"),
        ((8, 16, 16, 1), "fused", "plain"),
    ],
)
def test_folded_network_gives_the_same_outputs_without_batch_norms(shape, kind, encoder):
    model = _with_statistics(
        unet.build_unet(shape, 4, 2, batch_norm=batchnorm.layer(kind), encoder=encoder)
    )
    folded = folding.fold_batch_norm(model)
    norms = [layer.name for layer in model.layers if isinstance(layer, folding._NORMS)]
    assert norms and all(
        isinstance(folded.get_layer(n), folding.FoldedBatchNormalization) for n in norms
    )
    assert folded.get_layer("dec1_conv1").use_bias and not model.get_layer("dec1_conv1").use_bias
    x = np.random.default_rng(1).random((2, *shape), dtype=np.float32)
    expected = model.predict_on_batch(x)
    np.testing.assert_allclose(folded.predict_on_batch(x), expected, atol=2e-5)
    assert folded.count_params() < model.count_params()  # γ, β, m, v replaced by one bias


def test_a_bfloat16_network_folds_into_bfloat16_variables_with_float32_outputs():
    with speed.policy_scope("bfloat16"):
        model = _with_statistics(
            unet.build_unet((32, 32, 1), 4, 2, batch_norm=batchnorm.layer("fused"))
        )
    folded = folding.fold_batch_norm(model)
    assert folded.get_layer("enc1_conv1").kernel.dtype == "bfloat16"
    assert folded.get_layer("mask").dtype_policy.name == "float32"
    x = np.random.default_rng(1).random((2, 32, 32, 1), dtype=np.float32)
    probabilities = folded.predict_on_batch(x)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, model.predict_on_batch(x), atol=0.03)


def test_a_network_without_batch_norm_is_returned_as_it_is():
    model = unet.build_unet((32, 32, 1), 4, 2, batch_norm=None)
    assert folding.fold_batch_norm(model) is model
