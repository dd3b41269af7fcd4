"""The built-in mni-wm: offline, real MRI, split in blocks of slices (or slabs) never in slices."""

import socket

import numpy as np
import pytest

from tp4.images import datasets, mni


@pytest.fixture()
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_mni_wm_loads_offline_as_slices_in_blocks(offline):
    examples = datasets.load("mni-wm", (32, 32))
    n = len(examples.images)
    assert examples.images.shape == (n, 32, 32, 1) and 100 < n < 189  # blank slices skipped
    assert set(np.unique(examples.masks)) == {0.0, 1.0} and 0.05 < examples.masks.mean() < 0.5
    assert (np.diff(examples.groups) >= 0).all() and np.bincount(
        examples.groups
    ).max() == mni.SLICE_BLOCK
    splits, description, cases = datasets.load_split("mni-wm", (32, 32), seed=0)
    assert description["data_source"] == "mni-wm" and description["data_test_groups"].startswith(
        "slices "
    )
    assert sum(len(splits[k][0]) for k in ("train", "val", "test")) == n
    # 1 mm voxels, slices of 197x233 shrunk to 27x32 to fit: 197/27 by 233/32 mm.
    assert description["data_spacing"] == "7.3x7.28 mm" and cases.ids[0].startswith("mni-wm slice ")


def test_mni_wm_loads_offline_as_3d_patches(offline):
    examples = datasets.load("mni-wm", (16, 64, 64))
    assert examples.images.shape[1:] == (16, 64, 64, 1) and len(examples.images) > 10
    assert 0.05 < examples.masks.mean() < 0.5
    assert datasets.describe(examples)["data_fit"] == "tiled into patches"
