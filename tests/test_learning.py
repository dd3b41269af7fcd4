"""A tiny U-Net learns an easy case; a model with the custom losses and metrics saves, reloads."""

import keras
import numpy as np
import pytest

import data
import losses
import metrics
import unet


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    images, masks = data.make_synthetic_2d(
        64, size=32, seed=1, foreground=0.1, noise=0.02, bias=0, distractors=0
    )
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


def test_training_lowers_the_loss_and_raises_dice(trained):
    history = trained[1]
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    assert history["dice"][-1] > history["dice"][0] + 0.2
    assert history["dice"][-1] > 0.7


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
