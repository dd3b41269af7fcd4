"""ensemble.py: the averaged model against the mean of its members, loading several models, and
predict.py with an ensemble: its mask is the mean probability of the members, thresholded."""

import keras
import numpy as np
import pytest
from PIL import Image

import data
import predict
import unet
from tp4.images import geometry
from tp4.inference import ensemble


def _members(n, seed=0):
    keras.utils.set_random_seed(seed)
    return [unet.build_unet((32, 32, 1), 4, 2, output_bias=b) for b in np.linspace(-0.5, 0.5, n)]


def test_the_ensemble_is_the_mean_of_its_members_probabilities():
    members = _members(3)
    x = np.random.default_rng(0).random((2, 32, 32, 1)).astype("float32")
    expected = np.mean([m.predict(x, verbose=0) for m in members], axis=0)
    combined = ensemble.average_model(members)
    assert ensemble.size(combined) == 3 and combined.output_shape == (None, 32, 32, 1)
    np.testing.assert_allclose(combined.predict(x, verbose=0), expected, atol=1e-6)
    assert ensemble.average_model(members[:1]) is members[0] and ensemble.size(members[0]) == 1
    with pytest.raises(ValueError, match="one input and output shape"):
        ensemble.average_model([members[0], unet.build_unet((64, 64, 1), 4, 2)])


def test_predict_py_averages_comma_separated_models(tmp_path, capsys):
    paths = []
    for i, model in enumerate(_members(2, seed=1)):
        paths.append(str(tmp_path / f"fold{i}.keras"))
        model.save(paths[-1])
    image = np.random.default_rng(2).integers(0, 256, (32, 32)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "scan.png")
    predict.main([",".join(paths), str(tmp_path / "scan.png"), "--output", str(tmp_path / "out")])
    assert "ensemble of 2 models" in capsys.readouterr().out
    mask = np.array(Image.open(tmp_path / "out" / "scan_mask.png"))
    fitted, _ = geometry.fit(
        data.normalize_intensity(image.astype(np.float32))[..., None], (32, 32)
    )
    members = [keras.models.load_model(p) for p in paths]
    mean = np.mean([m.predict(fitted[None], verbose=0)[0, ..., 0] for m in members], axis=0)
    clear = np.abs(mean - 0.5) > 1e-4  # pixels within float noise of the threshold left out
    np.testing.assert_array_equal(mask[clear], np.where(mean >= 0.5, 255, 0)[clear])
    with pytest.raises(SystemExit):
        predict.main([paths[0] + ",nowhere.keras", str(tmp_path / "scan.png"), "--output", "x"])
