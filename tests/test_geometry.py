"""geometry.py: fitting images to the network and back (exact when only padded), 3D patches."""

import numpy as np

import geometry


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
