"""A tiny U-Net learns an easy case; a model with the custom losses and metrics saves, reloads."""

import keras
import numpy as np
import pytest

import data
import losses
import metrics
import unet
from tp4.perf import speed


def _train(precision="float32"):
    keras.utils.set_random_seed(0)
    images, masks = data.make_synthetic_2d(
        64, size=32, seed=1, foreground=0.1, noise=0.02, bias=0, distractors=0
    )
    with speed.policy_scope(precision):
        model = unet.build_unet((32, 32, 1), base_filters=8, depth=3)
    model.compile(
        keras.optimizers.Adam(1e-2),
        losses.BCEDiceLoss(),
        metrics=[losses.DiceMetric(), losses.IoUMetric()],
    )
    history = model.fit(
        data.make_dataset(images, masks, 16, training=True), epochs=4, shuffle=False, verbose=0
    )
    return model, history.history, images, masks


@pytest.fixture(scope="module")
def trained():
    return _train()


def _assert_learned(history):
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    assert history["dice"][-1] > history["dice"][0] + 0.2
    assert history["dice"][-1] > 0.7


def test_training_lowers_the_loss_and_raises_dice(trained):
    _assert_learned(trained[1])


@pytest.mark.slow
def test_mixed_bfloat16_with_the_fused_batch_norm_learns_too():
    model, history, images, masks = _train("bfloat16")
    _assert_learned(history)
    assert model.get_layer("enc1_bn1").compute_dtype == "bfloat16"
    # Metrics on float32 outputs, as in float32: the epoch's Dice is the reference Dice.
    assert model.evaluate(images, masks, verbose=0, return_dict=True)["dice"] == pytest.approx(
        metrics.dice_coefficient(masks, model.predict(images, verbose=0)), abs=1e-6
    )


def test_saved_model_reloads_without_custom_objects(trained, tmp_path):
    model, _, images, masks = trained
    path = tmp_path / "unet.keras"
    model.save(path)
    reloaded = keras.models.load_model(
        path
    )  # no custom_objects: everything is registered as serializable
    np.testing.assert_allclose(
        reloaded.predict(images[:4], verbose=0), model.predict(images[:4], verbose=0), atol=1e-6
    )
    assert isinstance(reloaded.loss, losses.BCEDiceLoss)
    before = model.evaluate(images, masks, verbose=0, return_dict=True)
    after = reloaded.evaluate(images, masks, verbose=0, return_dict=True)
    assert set(after) == {"loss", "dice", "iou"}
    for key in after:
        assert after[key] == pytest.approx(before[key], abs=1e-5)
    assert after["dice"] == pytest.approx(
        metrics.dice_coefficient(masks, model.predict(images, verbose=0)), abs=1e-5
    )
