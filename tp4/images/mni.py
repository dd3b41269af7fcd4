"""The built-in dataset `mni-wm`: white matter in the MNI152 T1 template, offline.

What this module teaches:
- a real MRI with no download: the skull-stripped T1 MNI ICBM152 2009 template at 1 mm and its
  white-matter probability map (> 0.5 is the mask), both shipped inside nilearn;
- one volume still needs a split that measures generalization, not memory: its groups are blocks
  of SLICE_BLOCK consecutive slices (2D) or slabs one patch deep (3D), never single slices.

datasets.load takes its name (BUILTIN); tp4/planning reads the raw volume (mni_wm_volume).

    python -m tp4.images.datasets mni-wm --size 32 32 32  # the built-in volume, as 3D patches
"""

import numpy as np
from nilearn import datasets as nilearn_datasets

from tp4.images import imagefiles
from tp4.images.examples import Examples, percentiles, volume_examples

SLICE_BLOCK = 8  # 2D: consecutive slices (8 mm at 1 mm) that stay in the same split
MNI_RESOLUTION = 1  # mm: the template's native grid inside nilearn (any other is resampled, slower)


def mni_wm_volume():
    """The `mni-wm` volume as nilearn ships it: (T1 (X, Y, Z), white-matter mask, voxel size mm)."""
    t1 = nilearn_datasets.load_mni152_template(resolution=MNI_RESOLUTION)
    wm = nilearn_datasets.load_mni152_wm_template(resolution=MNI_RESOLUTION)
    mask = (wm.get_fdata(dtype=np.float32) > 0.5).astype(np.float32)
    return t1.get_fdata(dtype=np.float32), mask, imagefiles.voxel_size_mm(t1)


def mni_wm(shape, prepare=percentiles):
    """Built-in `mni-wm`: T1 MNI152 template -> white matter (probability > 0.5), as 2D slices or 3D
    patches (the volume through `prepare` first).

    Groups, the split unit: blocks of SLICE_BLOCK consecutive slices (2D) or slabs one patch deep
    (3D).
    """
    t1, mask, voxel_size = mni_wm_volume()
    volume, mask, voxel_size = prepare(t1, mask, voxel_size)
    images, masks, positions, where, spacing = volume_examples(
        volume, mask, shape, "mni-wm", voxel_size
    )
    block = SLICE_BLOCK if len(shape) == 2 else shape[0]
    groups = positions // block
    names = [f"slices {g * block}-{g * block + block - 1}" for g in range(int(groups.max()) + 1)]
    ids = [f"mni-wm {w}" for w in where]
    spacing = np.tile(spacing, (len(images), 1))
    return Examples(
        images, masks, groups, names, "mni-wm", "builtin", [t1.shape], ids, spacing, "mm"
    )


BUILTIN = {"mni-wm": mni_wm}
