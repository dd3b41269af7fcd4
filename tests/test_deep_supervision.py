"""Deep supervision and the residual encoder (unet.py, losses.py): nnU-Net's weights, the loss
against the levels computed by hand, the metrics on the main head, and that such a network
learns."""

import keras
import numpy as np
import pytest

import data
import losses
import unet


def test_nnunet_halving_weights_with_the_lowest_level_off():
    assert losses.deep_supervision_weights(1) == [1.0]
    assert losses.deep_supervision_weights(2) == [1.0, 0.0]
    assert losses.deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    # nnU-Net's 2D default (7 levels, 6 heads): 1, 1/2, ..., 1/16, 0 over their sum 31/16.
    six = losses.deep_supervision_weights(6)
    assert six == pytest.approx([16 / 31, 8 / 31, 4 / 31, 2 / 31, 1 / 31, 0.0])


def test_loss_is_the_weighted_sum_over_heads_with_masks_downsampled_to_match():
    rng = np.random.default_rng(0)
    truth = (rng.random((2, 8, 8, 1)) < 0.3).astype("float32")
    full, half, quarter = (
        rng.random((2, 8, 8, 1)),
        rng.random((2, 4, 4, 1)),
        rng.random((2, 2, 2, 1)),
    )

    def up(x, f):
        return np.repeat(np.repeat(x, f, 1), f, 2)

    packed = np.concatenate([full, up(half, 2), up(quarter, 4)], -1).astype("float32")
    base = losses.SoftDiceLoss()
    expected = 2 / 3 * float(base(truth, full.astype("float32"))) + 1 / 3 * float(
        base(truth[:, ::2, ::2], half.astype("float32"))
    )
    wrapped = losses.DeepSupervisionLoss(base, heads=3)
    assert float(wrapped(truth, packed)) == pytest.approx(expected, abs=1e-6)
    clone = keras.losses.deserialize(keras.losses.serialize(wrapped))
    assert isinstance(clone.loss, losses.SoftDiceLoss) and clone.heads == 3
    assert float(clone(truth, packed)) == pytest.approx(expected, abs=1e-6)


def test_metrics_read_the_full_resolution_head_only():
    truth = np.zeros((1, 4, 4, 1), "float32")
    truth[0, :2] = 1
    packed = np.concatenate([truth, 1 - truth], -1)  # a perfect head, then a wrong one
    model = unet.build_unet((32, 32, 1), base_filters=8, depth=3, deep_supervision=True)
    dice = losses.overlap_metrics(model, unet.heads(model))[0]
    assert dice.num_classes == 2
    dice.update_state(truth, packed)
    assert float(dice.result()) == 1.0


@pytest.mark.parametrize("encoder", ["plain", "residual"])
def test_deep_supervised_network_learns_and_sheds_its_heads(encoder, tmp_path):
    keras.utils.set_random_seed(0)
    images, masks = data.make_synthetic_2d(48, 32, seed=0, foreground=0.1, noise=0.02)
    prior = float(np.log(masks.mean() / (1 - masks.mean())))
    model = unet.build_unet(
        (32, 32, 1), 8, 3, encoder=encoder, deep_supervision=True, output_bias=prior
    )
    heads = unet.heads(model)
    model.compile(
        keras.optimizers.Adam(1e-2),
        losses.DeepSupervisionLoss(losses.BCEDiceLoss(), heads),
        metrics=losses.overlap_metrics(model, heads),
    )
    history = model.fit(images, masks, batch_size=8, epochs=4, verbose=0).history
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    assert history["dice"][-1] > 0.85
    inference = unet.inference_model(model)
    inference.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    assert len(reloaded.outputs) == 1 and reloaded.output_shape == (None, 32, 32, 1)
    np.testing.assert_allclose(
        reloaded.predict(images[:2], verbose=0),
        model.predict(images[:2], verbose=0)[..., :1],
        atol=1e-5,
    )
