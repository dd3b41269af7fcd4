"""Segment new images with a trained model: PNG, JPEG, TIFF or NIfTI in, masks of that geometry out.

What this script teaches:
- a model is only half of a prediction: the preprocessing of training is replayed exactly
  (datasets.py: per-file percentile normalization, then shrink to fit and pad) and undone on the
  output (geometry.unfit), so that the mask lies pixel for pixel over the input, whatever its size;
- medical geometry is more than a shape: a NIfTI mask is written with the input's affine and header,
  so that a viewer (ITK-SNAP, 3D Slicer, FSLeyes) lays it over the scan in millimetres, not just in
  voxels;
- a 2D model segments a volume slice by slice along its last axis; a 3D model (input of rank 5) goes
  through geometry.sliding_window_predict, a volume smaller than the patch being padded first and
  cropped back after;
- test-time mirroring (`--tta`, nnU-Net's): the probabilities are averaged over the flips of every
  combination of spatial axes (4 in 2D, 8 in 3D, each sliding window mirrored), each flip undone;
- the precision and XLA setting of inference are chosen for this machine (speed.py: `auto`, measured
  once and cached), whatever the precision the model was trained at: its layers are rebuilt at the
  chosen one with the same weights;
- a batch job leaves no half-written file: each output is written under a temporary name and renamed
  when complete. A bad input is one line on stderr (exit status 2 at the end); the other inputs are
  still done.

Outputs in --output: `<name>_mask.<ext>` (PNG/TIFF: uint8 of the input's size, 0/255 for a binary
model, the labels 0..C-1 themselves for a model of C classes; a JPEG input gives a PNG mask since
JPEG compression would blur it; NIfTI: uint8 labels 0/1 or 0..C-1 with the input's affine and
header) and `<name>_overlay.png` (the image, or the volume's slice with the most foreground, with
the predicted contour of each class in its colour: class 1 red).

    python predict.py model.keras scan.png --output predictions/
    python predict.py runs:/<run_id>/model images/ --output predictions/ --threshold 0.4
    python predict.py models:/tp4-unet/1 case_001_0000.nii.gz --output predictions/ --tta
"""

import os

# TensorFlow reads this once, when it loads: its INFO lines (CPU features, XLA) off, warnings kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import sys
import tempfile

import keras
import mlflow.keras
import numpy as np
from PIL import Image

import data
import losses  # noqa: F401 (registers the custom losses and metrics, so saved models deserialize)
import metrics
from tp4 import cli
from tp4.images import figures, geometry, imagefiles
from tp4.images.imagefiles import DataError
from tp4.models import batchnorm  # noqa: F401 (registers the fused batch-norm layer, so saved models deserialize)
from tp4.perf import speed

# Images per predict call (2D), patches per call (3D sliding windows): the batch the speed probe
# measures.
BATCH_2D, BATCH_3D = 8, 4


class ModelError(ValueError):
    """The model, not one input, is unusable: the batch stops."""


def parse_args(argv=None):
    parser = cli.argument_parser("predict.py", __doc__)
    add = parser.add_argument
    add(
        "model",
        help="a .keras file, or an MLflow model URI: runs:/<run_id>/model, "
        "models:/<name>/<version>, "
        "models:/<model_id>",
    )
    add("inputs", nargs="+", help="PNG, JPEG, TIFF or NIfTI files, or folders of them")
    add(
        "--output",
        default="predictions",
        help="folder for the masks and overlays (created if needed)",
    )
    add(
        "--threshold",
        type=float,
        default=0.5,
        help="binary models: foreground where the probability is >= threshold (a model of "
        "several classes gives each pixel its most probable class)",
    )
    add("--overlap", type=float, default=0.5, help="3D models: overlap of the sliding windows")
    add(
        "--tta",
        action="store_true",
        help="test-time mirroring: average over the flips of every combination of spatial axes",
    )
    speed.add_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 1:
        parser.error("--threshold must be between 0 and 1")
    if not 0 <= args.overlap < 1:
        parser.error("--overlap must be in [0, 1)")
    return args, parser


def load_model(location):
    """A Keras model from a .keras file (keras.models.load_model) or an MLflow URI
    (mlflow.keras.load_model)."""
    is_uri = location.startswith(("runs:/", "models:/")) or "://" in location
    if not is_uri and not os.path.exists(location):
        raise ValueError(f"no such model file: {location}")
    if not (is_uri or os.path.isdir(location) or location.endswith((".keras", ".h5"))):
        raise ValueError(
            f"{location} is not a model: give a .keras file, an MLflow model folder, or a runs:/ "
            "or models:/ URI (the model comes first, then the images)"
        )
    try:
        # A folder: an MLflow model saved locally (it holds an MLmodel file).
        if is_uri or os.path.isdir(location):
            model = mlflow.keras.load_model(location)
        else:
            model = keras.models.load_model(location)
    # MLflow and Keras raise many types (missing run, bad zip...): one line for all
    except Exception as error:
        raise ValueError(f"cannot load the model {location}: {cli.first_line(error)}") from None
    if len(model.input_shape) not in (4, 5) or None in model.input_shape[1:]:
        raise ValueError(
            f"{location}: expected a segmentation model with a fixed input (N, H, W, C) or "
            f"(N, D, H, W, C), got {model.input_shape} -> {model.output_shape}"
        )
    return model


def check_output(folder):
    """ValueError if masks cannot be written in `folder` (created later, once the model is loaded):
    it names a file, lies under one, or its nearest existing folder cannot be written in (no
    permission, a read-only disk)."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output {folder}: {existing} exists and is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"--output {folder}: cannot write in {existing} ({error.strerror})"
        ) from None


def list_inputs(paths):
    """The files to segment: files as given, folders expanded to their image files (sorted)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = imagefiles.list_files(path)
            if not found:
                raise DataError(f"{path} holds no PNG, JPEG, TIFF or NIfTI file")
            files += found
        else:
            files.append(path)  # a missing or unreadable file is reported when its turn comes
    if not any(os.path.lexists(path) for path in files):  # a typo: say so before loading the model
        raise DataError(f"no such file: {', '.join(files)}")
    return files


def output_paths(output, path):
    """(mask path, overlay path) for one input: <name>_mask.<same format>, <name>_overlay.png."""
    ext = imagefiles.suffix(path)
    ext = ".png" if ext in (".jpg", ".jpeg") else ext
    name = imagefiles.stem(path)
    return os.path.join(output, f"{name}_mask{ext}"), os.path.join(output, f"{name}_overlay.png")


def refuse_shared_outputs(files, output):
    """Refuse, before writing anything, inputs that would write the same file: a.png and a.jpg
    (both a_mask.png), a.png and a.nii.gz (both a_overlay.png)."""
    writers = {}
    for path in files:
        for written in output_paths(output, path):
            if written in writers:
                raise DataError(
                    f"{writers[written]} and {path} would both write {written}: give them "
                    "different --output folders"
                )
            writers[written] = path


def at_speed(model, precision="auto", xla="auto"):
    """`model` rebuilt at the precision and XLA setting chosen for this machine (speed.choose, on
    inference at predict's batch), with the same weights."""
    batch = BATCH_2D if len(model.input_shape) == 4 else BATCH_3D
    choice = speed.choose(precision, xla, lambda: speed.recast(model), batch, mode="infer")
    with speed.policy_scope(choice.precision):
        fast = speed.recast(model)
    fast.jit_compile = choice.xla
    return fast


def predict_images(model, images, batch_size=BATCH_2D, tta=False):
    """Probabilities (H, W, classes) at each image's own size: each normalized (H, W, C) image is
    fitted to the network, predicted (mirrored with tta), and the fit undone on the probabilities
    (linear interpolation, thresholded later)."""
    fitted = [geometry.fit(image, model.input_shape[1:3]) for image in images]
    batch = np.stack([array for array, _ in fitted])

    def predict(inputs):
        return model.predict(inputs, batch_size=batch_size, verbose=0)

    probabilities = geometry.predict_mirrored(predict, batch) if tta else predict(batch)
    return [geometry.unfit(p, transform) for p, (_, transform) in zip(probabilities, fitted)]


def predict_volume(model, volume, overlap=0.5, tta=False):
    """Probabilities (X, Y, Z, classes) of a normalized (X, Y, Z) volume: slice by slice along Z for
    a 2D model, or by sliding windows over (D, H, W) = (Z, X, Y) for a 3D model, the volume padded
    to at least one patch; tta: test-time mirroring of each slice or window."""
    if len(model.input_shape) == 4:
        slices = [volume[..., z, None] for z in range(volume.shape[-1])]
        return np.stack(predict_images(model, slices, tta=tta), axis=2)
    padded, transform = geometry.fit(
        np.moveaxis(volume, -1, 0)[..., None], model.input_shape[1:4], shrink=False
    )
    probabilities = geometry.unfit(
        geometry.sliding_window_predict(model, padded, overlap, batch_size=BATCH_3D, tta=tta),
        transform,
    )
    return np.moveaxis(probabilities, 0, 2)


def finite(probabilities, path):
    """The probabilities, or ModelError if any is NaN or infinite: thresholding would turn them into
    background without a word (NaN >= 0.5 is False), an empty mask that looks like a result."""
    bad = int(np.count_nonzero(~np.isfinite(probabilities)))
    if bad:
        raise ModelError(
            f"the model's output on {path} is not finite ({bad} of {probabilities.size} values NaN "
            "or infinite): its weights are broken (a training that diverged?); no mask written"
        )
    return probabilities


def segment(model, path, threshold=0.5, overlap=0.5, tta=False):
    """(labels, overlay RGB, nibabel image or None) of one file: uint8 labels (0/1 for a binary
    model, 0..C-1) in the input's geometry."""
    channels = model.input_shape[-1]
    if not imagefiles.suffix(path) and os.path.isfile(path):
        raise DataError(f"{path}: unsupported file type (PNG, JPEG, TIFF or NIfTI)")
    if not imagefiles.is_nifti(path):
        if len(model.input_shape) == 5:
            raise DataError(f"{path} is a 2D image: a 3D model segments NIfTI volumes")
        image = data.normalize_intensity(imagefiles.read_image(path, channels))
        probabilities = finite(predict_images(model, [image], tta=tta)[0], path)
        labels = metrics.label_map(probabilities, threshold)
        return labels, figures.overlay(image, labels), None
    volume, nifti = imagefiles.read_volume(path)
    if channels != 1:
        raise DataError(f"{path} is a single-channel volume, the model takes {channels} channels")
    volume = data.normalize_intensity(
        volume.astype(np.float32)
    )  # per volume, as in training (datasets.py)
    probabilities = finite(predict_volume(model, volume, overlap, tta), path)
    labels = metrics.label_map(probabilities, threshold)
    found = labels > 0
    z = int(np.argmax(found.sum(axis=(0, 1)))) if found.any() else volume.shape[-1] // 2
    # rot90: array rows are X; in RAS storage this shows anterior up and the patient's right on the
    # right
    picture = figures.overlay(np.rot90(volume[..., z])[..., None], np.rot90(labels[..., z]))
    return labels, picture, nifti


def write_outputs(writers):
    """Run each writer(path) on a temporary name in the same folder, then rename them all: never a
    partial file."""
    done = []
    try:
        for path, write in writers.items():
            partial = os.path.join(os.path.dirname(path), f".partial-{os.path.basename(path)}")
            done.append((partial, path))
            write(partial)
        for partial, path in done:
            os.replace(partial, path)
    finally:
        for partial, _ in done:
            if os.path.exists(partial):
                os.remove(partial)


def save_mask(path, mask, nifti):
    """Write uint8 mask values: an image file (PNG, TIFF), or a NIfTI over the input's voxels."""
    if nifti is None:
        Image.fromarray(mask.astype(np.uint8)).save(path)
        return
    # The input's class (NIfTI-1 or -2), affine and header: the mask lands on the same voxels in
    # millimetres. A new data array resets the header's intensity scaling, and uint8 keeps the
    # labels exact.
    out = type(nifti)(mask.astype(np.uint8).reshape(nifti.shape), nifti.affine, nifti.header)
    out.set_data_dtype(np.uint8)
    out.header["cal_min"], out.header["cal_max"] = 0, max(1, int(mask.max()))
    out.to_filename(path)


def segment_file(model, path, output, threshold=0.5, overlap=0.5, tta=False):
    """Segment one file and write its mask and overlay; returns the mask's foreground fraction."""
    mask_path, overlay_path = output_paths(output, path)
    labels, picture, nifti = segment(model, path, threshold, overlap, tta)
    # A binary mask image is 0/255, visible in any viewer; labels of several classes stay 0..C-1.
    binary_image = nifti is None and model.output_shape[-1] == 1
    mask = labels * 255 if binary_image else labels
    write_outputs(
        {
            mask_path: lambda p: save_mask(p, mask, nifti),
            overlay_path: lambda p: Image.fromarray(picture).save(p, format="PNG"),
        }
    )
    foreground = float(np.mean(labels > 0))
    print(
        f"{path}: {imagefiles.shape_text(mask.shape)} -> {mask_path}, foreground {foreground:.2%}",
        flush=True,
    )
    return foreground


def main(argv=None):
    args, parser = parse_args(argv)
    cli.setup()
    try:
        files = list_inputs(args.inputs)
        refuse_shared_outputs(files, args.output)
        check_output(args.output)  # before the model: loading it can take a while
        model = at_speed(load_model(args.model), args.precision, args.xla)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    os.makedirs(args.output, exist_ok=True)
    failed = 0
    for path in files:
        try:
            segment_file(model, path, args.output, args.threshold, args.overlap, args.tta)
        except ModelError as error:  # a broken model gives nothing useful on the other files either
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        # one bad file (or a full disk) does not stop the others
        except (ValueError, OSError) as error:
            failed += 1
            print(f"{parser.prog}: error: {error}", file=sys.stderr, flush=True)
    if failed:
        parser.exit(2)


if __name__ == "__main__":
    sys.exit(main())
