"""Real data for train.py and conv3d.py: images + masks folders, the MSD layout, and mni-wm.

What this script teaches:
- two folder layouts, detected from the sub-folder names: `DIR/images/*` + `DIR/masks/*` (PNG, JPEG,
  TIFF), pairs matched by file stem (`a.jpg` with `a.png`); `DIR/imagesTr/*.nii.gz` +
  `DIR/labelsTr/*.nii.gz`, the Medical Segmentation Decathlon and nnU-Net layout, where
  `case_0000.nii.gz` (nnU-Net's channel suffix) pairs with `case.nii.gz`. Its volumes may also be
  `.nii`, NRRD, MetaImage files or DICOM series (a folder per case), read by volumes.py;
- everything is checked before anything starts (no MLflow run is left behind by a bad folder):
  missing masks, unreadable files or broken links, an image and its mask of different shapes or
  (volumes) grids, masks with more values than classes (`--num-classes`: 2 is binary, C takes
  label maps 0..C-1), NaN or inf, images of a few pixels: a `DataError` naming files. A training
  set without foreground is refused by the scripts (data.require_foreground);
- one preprocessing for training and prediction (predict.py does the same): intensities normalized
  once per file with data.normalize_intensity (0.5-99.5 percentiles to [0, 1]: robust to scanners
  and outliers; for a NIfTI, per volume before slicing, so the slices of one scan keep their
  relative contrast), then fitted to the network by geometry.fit (2D: shrink to fit, then pad) or
  cut into patches by geometry.tile (3D);
- every example keeps its name (file, case and slice or patch) and its voxel size, for the per-case
  test table and the surface distances: from the volume's header in mm (a slice: its in-plane size),
  1 px for PNG/JPEG/TIFF, and multiplied by the shrink factor when an image is shrunk to fit (its
  pixels grow);
- volumes are brought to the closest canonical RAS orientation first (volumes.py: axes transposed
  and flipped, never interpolated), whatever their format and stored orientation, then cut into
  axial slices (2D) or (D, H, W) patches (3D), blank ones skipped (examples.py);
- the split unit is never the slice. Neighbouring slices are nearly the same image: a random split
  of slices puts the twins of every test slice in the training set, and the test score measures
  memory. data.split is applied to groups: files (images/ + masks/), cases (MSD), and for mni-wm, a
  single volume, blocks of mni.SLICE_BLOCK consecutive slices (2D) or slabs of the patch depth (3D).

Built-in dataset `mni-wm` (mni.py): white matter in the MNI152 T1 template shipped inside nilearn,
offline; `load` takes its name where it takes a folder.

This module is the real-data counterpart of data.py's synthetic scans (kept apart to keep both
readable); train.py and conv3d.py import both, predict.py replays the same preprocessing.

    python -m tp4.images.datasets DIR --size 128  # check a folder, as MLflow logs it
    python -m tp4.images.datasets mni-wm --size 32 32 32  # the built-in volume, as 3D patches
"""

import os
import re

import numpy as np

import data
from tp4 import cli
from tp4.images import geometry, imagefiles, mni, volumes
from tp4.images.examples import Examples, percentiles, volume_examples
from tp4.images.imagefiles import DataError  # noqa: F401 (re-exported: callers catch datasets.DataError)

LAYOUTS = {
    "images+masks": ("images", "masks", imagefiles.IMAGE_SUFFIXES),
    "msd": ("imagesTr", "labelsTr", volumes.VOLUME_SUFFIXES),
}
_CHANNEL = re.compile(r"_(\d{4})$")  # nnU-Net's channel suffix: case_0000


def find_pairs(folder):
    """(layout, [(image path, mask path), ...]) of a dataset folder, or DataError naming what is
    missing."""
    if not os.path.isdir(folder):
        raise DataError(f"no such folder: {folder}")
    layout = next(
        (
            name
            for name, (i, m, _) in LAYOUTS.items()
            if os.path.isdir(os.path.join(folder, i)) and os.path.isdir(os.path.join(folder, m))
        ),
        None,
    )
    if layout is None:
        raise DataError(
            f"{folder} holds neither images/ + masks/ (PNG, JPEG, TIFF) nor imagesTr/ + labelsTr/ "
            "(NIfTI, NRRD, MHA/MHD or DICOM series folders: the Medical Segmentation Decathlon's)"
        )
    image_dir, mask_dir, suffixes = LAYOUTS[layout]
    if layout == "msd":  # files, and folders of DICOM series
        images, masks = (
            volumes.list_volumes(os.path.join(folder, d)) for d in (image_dir, mask_dir)
        )
    else:
        images, masks = (
            imagefiles.list_files(os.path.join(folder, d), suffixes) for d in (image_dir, mask_dir)
        )
    if not images:
        what = ", ".join(suffixes) + (", DICOM series folders" if layout == "msd" else "")
        raise DataError(f"{os.path.join(folder, image_dir)} holds no image file ({what})")
    image_by_key = _by_key(images, strip_channel=layout == "msd")
    mask_by_key = _by_key(masks, strip_channel=False)
    for paths, other, kind, missing in (
        (image_by_key, mask_by_key, "image", "mask"),
        (mask_by_key, image_by_key, "mask", "image"),
    ):
        alone = [os.path.basename(p) for key, p in paths.items() if key not in other]
        if alone:
            listed = ", ".join(alone[:5]) + (
                f" and {len(alone) - 5} more" if len(alone) > 5 else ""
            )
            what = f"1 {kind} has" if len(alone) == 1 else f"{len(alone)} {kind}s have"
            raise DataError(
                f"{what} no {missing} in {folder} (pairs are matched by file name): {listed}"
            )
    return layout, [(image_by_key[key], mask_by_key[key]) for key in sorted(image_by_key)]


def _by_key(paths, strip_channel):
    by_key = {}
    for path in paths:
        key = imagefiles.stem(path)
        if strip_channel and _CHANNEL.search(key):
            key = _CHANNEL.sub("", key)
        if key in by_key:
            raise DataError(
                f"two files for {key!r}: {os.path.basename(by_key[key])} and "
                f"{os.path.basename(path)}"
                + (
                    " (several channels: only single-channel images are read)"
                    if strip_channel
                    else ""
                )
            )
        by_key[key] = path
    return by_key


def load_folder(folder, shape, num_classes=2, prepare=percentiles):
    """Examples fitted to `shape` ((H, W): 2D, (D, H, W): 3D patches) from a dataset folder, checked
    first; masks hold num_classes classes (2: binary); each volume, mask and spacing go through
    `prepare` first (tp4/planning/auto.py's: resampled and normalized by a plan)."""
    layout, pairs = find_pairs(folder)
    if layout == "images+masks" and len(shape) == 3:
        raise DataError(
            f"{folder} holds 2D images (images/ + masks/): 3D training needs volumes "
            "(imagesTr/ + labelsTr/)"
        )
    parts, shapes, stored_axes = [], [], []
    for image_path, mask_path in pairs:
        case = imagefiles.stem(mask_path)  # the case name, without a _0000 channel
        if layout == "images+masks":
            image, labels = (
                imagefiles.read_image(image_path)[..., 0],
                imagefiles.read_mask(mask_path),
            )
        else:
            volume, label_volume = volumes.read(image_path), volumes.read(mask_path)
            image, labels = volume.array, label_volume.array
            stored_axes.append(volume.stored_axes)
        if image.shape != labels.shape:
            raise DataError(
                f"image {os.path.basename(image_path)} is {imagefiles.shape_text(image.shape)} but "
                f"its mask {os.path.basename(mask_path)} is {imagefiles.shape_text(labels.shape)}"
            )
        if layout == "msd":
            imagefiles.check_same_grid(
                image.shape, volume.affine, label_volume.affine, image_path, mask_path
            )
        mask = imagefiles.label_map(labels, mask_path, num_classes)
        shapes.append(image.shape)
        if layout == "images+masks":
            image = data.normalize_intensity(image.astype(np.float32))
            fitted, transform = geometry.fit(image, shape)
            fitted_mask = geometry.fit(mask, shape, order=0)[0]
            spacing = np.divide(transform.original, transform.scaled)  # 1 px, larger once shrunk
            parts.append((fitted[None, ..., None], fitted_mask[None, ..., None], [case], spacing))
        else:
            image, mask, spacing = prepare(image, mask, volume.spacing)
            found = volume_examples(image, mask, shape, image_path, spacing)
            images, masks, _, where, spacing = found
            parts.append((images, masks, [f"{case} {w}" for w in where], spacing))
    names = [imagefiles.stem(mask_path) for _, mask_path in pairs]
    groups = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(parts)])
    return Examples(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        groups,
        names,
        str(folder),
        layout,
        shapes,
        [name for p in parts for name in p[2]],
        np.concatenate([np.tile(p[3], (len(p[0]), 1)) for p in parts]),
        "px" if layout == "images+masks" else "mm",
        stored_axes or None,
    )


def load(source, shape, num_classes=2, prepare=percentiles):
    """Examples from `source`: a built-in name (mni.BUILTIN) or a dataset folder (write ./mni-wm for
    a folder of that name). `shape` is the network's spatial input: (H, W) or (D, H, W); masks hold
    num_classes classes, background included; volumes go through `prepare` (load_folder's)."""
    if source not in mni.BUILTIN:
        return load_folder(source, tuple(shape), num_classes, prepare)
    if num_classes != 2:
        raise DataError(
            f"{source} has two classes (background and one structure): no --num-classes"
        )
    return mni.BUILTIN[source](tuple(shape), prepare)


def split(examples, seed=0, val_fraction=0.15, test_fraction=0.15):
    """data.split applied to groups, not examples. Returns (splits, group ids of each split)."""
    ids = np.unique(examples.groups)
    try:
        parts = data.split(ids, ids, seed, val_fraction, test_fraction)
    except ValueError:
        raise DataError(
            f"{examples.source}: {len(ids)} groups ({_unit(examples)}) are too few for a "
            "train/validation/test split: 3 at least"
        ) from None
    splits, assignment = {}, {}
    for name, (chosen, _) in parts.items():
        selected = np.isin(examples.groups, chosen)
        splits[name] = (examples.images[selected], examples.masks[selected])
        assignment[name] = np.sort(chosen)
    return splits, assignment


def _unit(examples):
    if examples.layout == "builtin":
        return "blocks of consecutive slices"
    return "cases" if examples.layout == "msd" else "files"


def describe(examples, splits=None, assignment=None):
    """data.describe plus where the data came from and how it was prepared: flat MLflow params."""
    description = data.describe(examples.images, examples.masks, examples.source, splits)
    shapes = sorted({tuple(s) for s in examples.original_shapes}, key=lambda s: (np.prod(s), s))
    shown = [imagefiles.shape_text(s) for s in shapes]
    description.update(
        {
            "data_layout": examples.layout,
            "data_files": len(examples.original_shapes),
            "data_original_shapes": ", ".join(shown)
            if len(shown) <= 4
            else f"{len(shown)} shapes, {shown[0]} to {shown[-1]}",
            "data_normalization": "per file (per volume): percentiles 0.5-99.5 to [0, 1]",
            "data_fit": "shrink to fit, then pad"
            if examples.images.ndim == 4
            else "tiled into patches",
            "data_split_unit": _unit(examples),
        }
    )
    if examples.images.ndim == 5:  # patches (D, H, W) of volumes stored (X, Y, Z)
        patch = examples.images.shape[1:4]
        small = [s for s in examples.original_shapes if any(np.less((s[2], s[0], s[1]), patch))]
        if small:
            sizes = ", ".join(sorted({imagefiles.shape_text(s) for s in small}))
            description["data_padded"] = (
                f"{len(small)} of {len(examples.original_shapes)} volumes ({sizes}) are smaller "
                "than the patch along an axis: zero-padded to it"
            )
    if examples.orientations:
        counts = {axes: examples.orientations.count(axes) for axes in sorted(examples.orientations)}
        stored = ", ".join(f"{n} {axes}" for axes, n in counts.items())
        description["data_orientation"] = f"RAS (closest canonical), stored {stored}"
    if examples.spacing is not None:
        description["data_spacing"] = data.spacing_text(examples.spacing, examples.spacing_unit)
    for name in ("val", "test") if assignment else ():
        names = [examples.group_names[i] for i in assignment[name]]
        description[f"data_{name}_groups"] = "; ".join(names[:20]) + (
            f"; ... ({len(names)} in all)" if len(names) > 20 else ""
        )
    return description


def split_cases(examples, assignment, name="test"):
    """data.Cases of one split's examples (test: the per-case table): their names and voxel sizes,
    in the order of the split."""
    selected = np.isin(examples.groups, assignment[name])
    ids = examples.case_ids or [examples.group_names[g] for g in examples.groups]
    spacing = examples.spacing
    spacing = np.ones((len(ids), examples.images.ndim - 2)) if spacing is None else spacing
    return data.Cases([ids[i] for i in np.flatnonzero(selected)], spacing[selected])


def load_split(source, shape, seed=0, num_classes=2, prepare=percentiles):
    """Load, check, split `source` for a network input of spatial `shape`, masks of num_classes
    classes, volumes through `prepare` (load_folder's): (splits, description, test cases)."""
    examples = load(source, shape, num_classes, prepare)
    splits, assignment = split(examples, seed)
    return splits, describe(examples, splits, assignment), split_cases(examples, assignment)


def main():
    parser = cli.argument_parser("datasets.py", __doc__)
    parser.add_argument(
        "source", help="a dataset folder, or a built-in name: " + ", ".join(mni.BUILTIN)
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[128],
        help="network input: S (2D, S x S, as train.py's --image-size), H W, or D H W (3D patches, "
        "as conv3d.py's --shape)",
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="seed of the split (train.py's: the split it logs)"
    )
    parser.add_argument("--num-classes", type=int, default=2, help="classes, background included")
    args = parser.parse_args()
    if len(args.size) not in (1, 2, 3):
        parser.error("--size takes S, H W or D H W")
    args.size = args.size * 2 if len(args.size) == 1 else args.size
    try:
        _, description, _ = load_split(args.source, args.size, args.seed, args.num_classes)
    except DataError as error:
        parser.exit(2, f"datasets.py: error: {error}\n")
    for key, value in description.items():
        print(f"{key:>26}: {value}")


if __name__ == "__main__":
    main()
