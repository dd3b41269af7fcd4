"""data.py: synthetic scans, the split and the tf.data pipeline."""

import numpy as np
import pytest

import data


def test_synthetic_2d_shapes_types_and_ranges():
    images, masks = data.make_synthetic_2d(6, size=32, seed=0)
    assert images.shape == masks.shape == (6, 32, 32, 1)
    assert images.dtype == masks.dtype == np.float32
    assert set(np.unique(masks)) == {0.0, 1.0}
    assert images.min() >= 0 and images.max() <= 1
    assert (masks.sum(axis=(1, 2, 3)) > 0).all()


def test_synthetic_3d_shapes():
    images, masks = data.make_synthetic_3d(2, shape=(8, 16, 24), seed=0)
    assert images.shape == masks.shape == (2, 8, 16, 24, 1)
    assert masks.any()


def test_same_seed_same_data_other_seed_other_data():
    a = data.make_synthetic_2d(3, size=32, seed=5)
    b = data.make_synthetic_2d(3, size=32, seed=5)
    c = data.make_synthetic_2d(3, size=32, seed=6)
    assert data.content_hash(*a) == data.content_hash(*b) != data.content_hash(*c)


@pytest.mark.parametrize("foreground", [0.015, 0.05, 0.15])
def test_foreground_fraction_is_controlled(foreground):
    _, masks = data.make_synthetic_2d(60, size=64, seed=1, foreground=foreground)
    assert masks.mean() == pytest.approx(foreground, rel=0.3)


def test_lesions_are_brighter_than_the_tissue_around_them():
    images, masks = data.make_synthetic_2d(20, size=64, seed=2)
    tissue = (images > 0.2) & (masks == 0)
    assert images[masks == 1].mean() > images[tissue].mean() + 0.1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="foreground"):
        data.make_synthetic_2d(2, size=32, foreground=0.9)
    with pytest.raises(ValueError, match="at least one"):
        data.make_synthetic_2d(0)
    with pytest.raises(ValueError, match="too few"):
        data.split(np.zeros((2, 4, 4, 1)), np.zeros((2, 4, 4, 1)))


def test_split_is_deterministic_disjoint_and_complete():
    images = np.arange(200, dtype=np.float32).reshape(200, 1, 1, 1)
    first, second = data.split(images, images, seed=3), data.split(images, images, seed=3)
    sizes = {k: len(v[0]) for k, v in first.items()}
    assert sizes == {"train": 140, "val": 30, "test": 30}
    ids = [set(first[k][0].ravel()) for k in ("train", "val", "test")]
    assert set.union(*ids) == set(range(200)) and sum(map(len, ids)) == 200
    for k in first:
        np.testing.assert_array_equal(first[k][0], second[k][0])
        np.testing.assert_array_equal(
            first[k][0], first[k][1]
        )  # images stay paired with their masks
    assert not np.array_equal(data.split(images, images, seed=4)["test"][0], first["test"][0])


def _first_epoch(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_augmentation_moves_image_and_mask_together_and_is_reproducible():
    rng = np.random.default_rng(0)
    masks = (rng.random((16, 8, 8, 1)) < 0.3).astype(np.float32)
    dataset = data.make_dataset(masks.copy(), masks, batch_size=4, training=True, seed=1)
    epoch1, epoch2 = _first_epoch(dataset), _first_epoch(dataset)
    for x, y in epoch1 + epoch2:
        np.testing.assert_array_equal(x, y)  # the image was the mask: any misalignment would show
    assert sum(len(x) for x, _ in epoch1) == 16
    originals = {m.tobytes() for m in masks}
    augmented = [m.tobytes() for x, _ in epoch1 for m in x]
    assert sum(m not in originals for m in augmented) >= 4, (
        "flips and rotations should change most examples"
    )
    again = _first_epoch(
        data.make_dataset(masks.copy(), masks, batch_size=4, training=True, seed=1)
    )
    for (x1, _), (x2, _) in zip(epoch1, again):
        np.testing.assert_array_equal(x1, x2)  # same seed, same batches
    assert any(
        not np.array_equal(a[0], b[0]) for a, b in zip(epoch1, epoch2)
    )  # new draw each epoch


def test_evaluation_pipeline_keeps_order_and_values():
    images, masks = data.make_synthetic_2d(5, size=32, seed=0)
    batches = _first_epoch(data.make_dataset(images, masks, batch_size=2))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), images)


def test_full_batches_only_keeps_one_batch_shape_and_reshuffles_what_waits():
    masks = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)  # each "mask" is its index
    dataset = data.make_dataset(
        masks, masks, 4, training=True, augment=False, seed=0, drop_remainder=True
    )
    epochs = [_first_epoch(dataset) for _ in range(4)]
    assert all([len(x) for x, _ in epoch] == [4, 4] for epoch in epochs)
    seen = [{int(i) for x, _ in epoch for i in x.ravel()} for epoch in epochs]
    assert len(set.union(*seen)) == 10 and len({frozenset(s) for s in seen}) > 1
    assert [len(x) for x, _ in _first_epoch(data.make_dataset(masks, masks, 4, training=True))] == [
        4,
        4,
        2,
    ]


def test_pipelines_run_without_the_autotuner():
    # Its background thread blocked each new epoch's iterator for ~20 s on 2 busy cores (README,
    # Performance).
    images, masks = data.make_synthetic_2d(4, size=32, seed=0)
    for training in (True, False):
        assert data.make_dataset(images, masks, 2, training).options().autotune.enabled is False


def test_a_volume_is_flipped_and_turned_as_a_whole_not_slice_by_slice():
    volumes = np.random.default_rng(0).random((8, 4, 8, 8, 1), dtype=np.float32)  # unique values

    def whole_volume_transforms(volume):  # the 8 flips and quarter turns of the (H, W) plane
        for flipped in (volume, volume[:, :, ::-1]):
            for k in range(4):
                yield np.rot90(flipped, k, axes=(1, 2))

    seen = []
    for x, y in _first_epoch(
        data.make_dataset(volumes.copy(), volumes, batch_size=2, training=True, seed=3)
    ):
        np.testing.assert_array_equal(x, y)
        for volume in x:
            found = [
                transform
                for original in volumes
                for transform, moved in enumerate(whole_volume_transforms(original))
                if np.array_equal(moved, volume)
            ]
            assert len(found) == 1, "a volume's slices were moved in different ways"
            seen += found
    assert len(set(seen)) > 1  # the transforms vary from volume to volume


def test_several_classes_give_kinds_of_lesion_with_their_own_brightness_and_shape():
    images, labels = data.make_synthetic_2d(40, size=64, seed=3, num_classes=3)
    assert set(np.unique(labels)) == {0.0, 1.0, 2.0} and labels.dtype == np.float32
    # Kind 1 is brighter than the tissue, kind 2 darker (CONTRAST_RATIO < 0) and ELONGATION times
    # longer along the first axis.
    tissue = images[(images > 0.2) & (labels == 0)].mean()
    assert images[labels == 1].mean() > tissue + 0.1 and images[labels == 2].mean() < tissue - 0.05
    extents = {1: [], 2: []}
    for image_labels in labels[..., 0]:
        for kind in (1, 2):
            rows, cols = np.nonzero(image_labels == kind)
            if len(rows) > 10:
                extents[kind].append(np.ptp(rows) / max(np.ptp(cols), 1))
    assert np.median(extents[2]) > 1.3 * np.median(extents[1])
    # Two classes: the binary scans, draw for draw.
    binary = data.make_synthetic_2d(4, size=32, seed=5)
    assert data.content_hash(*binary) == data.content_hash(
        *data.make_synthetic_2d(4, size=32, seed=5, num_classes=2)
    )
    with pytest.raises(ValueError, match="num_classes"):
        data.make_synthetic_2d(2, size=32, num_classes=1)


def test_spacing_text_names_the_voxel_sizes():
    assert data.spacing_text(np.ones((5, 2)), "px") == "1x1 px"
    assert data.spacing_text(np.array([[0.8, 0.8, 2.5]] * 3), "mm") == "0.8x0.8x2.5 mm"
    several = np.array([[s, s] for s in (1.0, 0.5, 2.0, 1.5)])
    assert data.spacing_text(several, "mm") == "4 spacings, 0.5x0.5 to 2x2 mm"
