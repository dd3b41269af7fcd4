"""geometry.py: fitting images to the network and back (exact when only padded), 3D patches."""

import keras
import numpy as np

from tp4.images import geometry


def test_padding_is_undone_exactly_on_a_non_square_mask():
    mask = (np.random.default_rng(0).random((20, 12)) > 0.5).astype(np.float32)
    fitted, transform = geometry.fit(mask, (32, 32), order=0)
    assert fitted.shape == (32, 32) and fitted.sum() == mask.sum()
    back = geometry.unfit(fitted, transform, order=0)
    assert back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)


def test_a_larger_image_is_shrunk_with_its_aspect_ratio_and_comes_back_to_its_shape():
    rng = np.random.default_rng(1)
    mask = geometry.resize((rng.random((10, 4)) > 0.5).astype(np.float32), (50, 20), order=0)
    fitted, transform = geometry.fit(mask, (32, 32), order=0)
    assert transform.scaled == (32, 13) and fitted.shape == (32, 32)  # 50x20 scaled by 32/50
    assert set(np.unique(fitted)) <= {0.0, 1.0}  # nearest neighbour: no value between 0 and 1
    back = geometry.unfit(fitted, transform, order=0)
    assert back.shape == (50, 20) and set(np.unique(back)) <= {0.0, 1.0}
    assert np.mean(back == mask) > 0.85
    image = rng.random((50, 20, 3)).astype(np.float32)  # channels ride along
    assert geometry.fit(image, (32, 32))[0].shape == (32, 32, 3)


def test_volumes_are_padded_not_shrunk_for_the_sliding_window_and_tiled_without_overlap():
    volume = np.random.default_rng(2).random((5, 20, 7)).astype(np.float32)
    padded, transform = geometry.fit(volume, (8, 16, 16), shrink=False)
    assert padded.shape == (8, 20, 16)
    np.testing.assert_array_equal(geometry.unfit(padded, transform), volume)
    patches, corners = geometry.tile(volume, (4, 8, 8))
    assert patches.shape == (2 * 3 * 1, 4, 8, 8) and len(set(corners)) == len(corners)
    rebuilt = np.zeros((8, 24, 8), np.float32)
    for patch, (d, h, w) in zip(patches, corners):
        rebuilt[d : d + 4, h : h + 8, w : w + 8] = patch
    np.testing.assert_array_equal(rebuilt[:5, :20, :7], volume)


# ------------------------------------------------------------------------------------------------
# Test-time mirroring.


def _shift_model(shape, axis):
    """A linear network whose output at each voxel is the input's neighbour at -1 along `axis`
    (zero at the edge): deliberately not symmetric under flips."""
    spatial = len(shape) - 1
    kernel = np.zeros((3,) * spatial + (1, 1), np.float32)
    kernel[tuple(0 if a == axis - 1 else 1 for a in range(spatial))] = 1.0
    conv = (keras.layers.Conv2D if spatial == 2 else keras.layers.Conv3D)(
        1, 3, padding="same", use_bias=False
    )
    model = keras.Sequential([keras.Input(shape), conv])
    conv.set_weights([kernel])
    return model


def _neighbour_mean(x, axis):
    """By hand: the mean of the two neighbours along `axis`, zero beyond the edge."""
    padded = np.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(x.ndim)])
    before = np.take(padded, range(0, x.shape[axis]), axis=axis)
    after = np.take(padded, range(2, x.shape[axis] + 2), axis=axis)
    return (before + after) / 2


def test_mirror_axes_are_every_combination_of_the_spatial_axes():
    assert geometry.mirror_axes(2) == [(), (1,), (2,), (1, 2)]
    assert len(geometry.mirror_axes(3)) == 8 and len(set(geometry.mirror_axes(3))) == 8


def test_mirroring_leaves_a_flip_equivariant_model_unchanged():
    keras.utils.set_random_seed(0)
    pointwise = keras.Sequential(
        [keras.Input((8, 12, 1)), keras.layers.Conv2D(2, 1, activation="sigmoid")]
    )
    x = np.random.default_rng(0).random((3, 8, 12, 1)).astype(np.float32)
    mirrored = geometry.predict_mirrored(lambda b: pointwise.predict(b, verbose=0), x)
    np.testing.assert_allclose(mirrored, pointwise.predict(x, verbose=0), atol=1e-6)


def test_mirroring_an_asymmetric_model_averages_its_flipped_outputs():
    x = np.random.default_rng(1).random((2, 6, 7, 1)).astype(np.float32)
    shifted = _shift_model((6, 7, 1), axis=2).predict(x, verbose=0)
    np.testing.assert_allclose(shifted[:, :, 1:], x[:, :, :-1], atol=1e-6)  # the model, checked
    for axis in (1, 2):  # the flip along the other axis changes nothing: the mean of both shifts
        model = _shift_model((6, 7, 1), axis)
        mirrored = geometry.predict_mirrored(lambda b, m=model: m.predict(b, verbose=0), x)
        np.testing.assert_allclose(mirrored, _neighbour_mean(x, axis), atol=1e-6)


def test_the_sliding_window_mirrors_each_window():
    volume = np.random.default_rng(2).random((4, 6, 6, 1)).astype(np.float32)
    model = _shift_model((4, 6, 6, 1), axis=1)  # along depth; one window: the whole volume
    plain = geometry.sliding_window_predict(model, volume, weighting="constant")
    np.testing.assert_allclose(plain[1:], volume[:-1], atol=1e-6)
    mirrored = geometry.sliding_window_predict(model, volume, weighting="constant", tta=True)
    np.testing.assert_allclose(mirrored, _neighbour_mean(volume, 0), atol=1e-6)
