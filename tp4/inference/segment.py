"""Inference: a saved model applied to one image or volume, the preprocessing of training replayed.

What this module teaches:
- a model is only half of a prediction: the preprocessing of training is replayed exactly (per-file
  percentile normalization, then shrink to fit and pad: tp4/images) and undone on the output
  (geometry.unfit), so that the mask lies pixel for pixel over the input, whatever its size;
- a 2D model segments a volume slice by slice along its last axis; a 3D model (input of rank 5) goes
  through geometry.sliding_window_predict, a volume smaller than the patch being padded first and
  cropped back after;
- test-time mirroring (`tta`, nnU-Net's): the probabilities are averaged over the flips of every
  combination of spatial axes (4 in 2D, 8 in 3D, each sliding window mirrored), each flip undone;
- a broken model is refused, not run: weights that are NaN or infinite at load time
  (`check_weights`: an output bias of -inf gives a sigmoid of exactly 0, an empty mask that looks
  like a result), logits that are not finite once computed (`guard_logits`), and probabilities
  that are not finite (`finite`): thresholding would turn them into background without a word.

predict.py runs it over files; the model's own serving (tp4/serving) shares it.
"""

import os
from typing import NamedTuple

import keras
import mlflow.keras
import numpy as np

import data
import losses  # noqa: F401 (registers the custom losses and metrics, so saved models deserialize)
import metrics
from tp4 import cli
from tp4.images import figures, geometry, imagefiles, volumes
from tp4.images.imagefiles import DataError
from tp4.inference import onnxnetwork
from tp4.models import (
    batchnorm,  # noqa: F401 (registers the fused batch norm, for saved models)
    folding,
)
from tp4.perf import speed
from tp4.planning import auto

# Images per predict call (2D), patches per call (3D sliding windows).
BATCH_2D, BATCH_3D = 8, 4


class ModelError(ValueError):
    """The model, not one input, is unusable: the batch stops."""


def load_model(location):
    """A Keras model from a .keras file (keras.models.load_model) or an MLflow URI
    (mlflow.keras.load_model)."""
    is_uri = location.startswith(("runs:/", "models:/")) or "://" in location
    if not is_uri and not os.path.exists(location):
        raise ValueError(f"no such model file: {location}")
    if not (is_uri or os.path.isdir(location) or location.endswith((".keras", ".h5", ".onnx"))):
        raise ValueError(
            f"{location} is not a model: give a .keras or .onnx file, an MLflow model folder, or a "
            "runs:/ or models:/ URI (the model comes first, then the images)"
        )
    try:
        # A folder: an MLflow model saved locally (it holds an MLmodel file).
        if is_uri or os.path.isdir(location):
            model = mlflow.keras.load_model(location)
        elif location.endswith(".onnx"):  # python -m tp4.serving.export's, run by onnxruntime
            model = onnxnetwork.OnnxNetwork(location)
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
    if not isinstance(model, onnxnetwork.OnnxNetwork):  # its export checked them
        check_weights(model, location)
    return model


def check_weights(model, location):
    """ModelError if any weight of `model` is NaN or infinite, naming the first such variable."""
    counts = {v.path: int(np.count_nonzero(~np.isfinite(np.asarray(v)))) for v in model.weights}
    bad = [f"{count} in {path}" for path, count in counts.items() if count]
    if bad:
        raise ModelError(
            f"{location}: weights NaN or infinite ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): a training that diverged? Train again or resume "
            "from an earlier checkpoint; no mask written"
        )


def guard_logits(model):
    """`model`, its output layer computing activation(logits) + 0·logits: bit for bit the same
    where the logits are finite, NaN where they are not (0·inf is NaN), which `finite` refuses.
    Without it, logits of -inf (weights that overflow float32) give a sigmoid of exactly 0."""
    for name in model.output_names:
        layer = model.get_layer(name)
        activation = getattr(layer, "activation", None)
        if activation is not None:
            layer.activation = lambda logits, activation=activation: activation(logits) + 0 * logits
    return model


def at_speed(model, precision="auto", xla="auto"):
    """`model` at the precision and XLA setting of inference on this machine (speed.for_inference:
    the model's own precision where the hardware has it, nothing measured); rebuilt with the same
    weights if that is another precision; its batch norms folded into the convolutions
    (folding.fold_batch_norm); its logits guarded (`guard_logits`). An ONNX network
    runs as exported: float32, by onnxruntime."""
    if isinstance(model, onnxnetwork.OnnxNetwork):
        return model
    trained = speed.trained_precision(model)
    choice = speed.for_inference(trained, precision, xla)
    if choice.precision != trained:
        with speed.policy_scope(choice.precision):
            model = speed.recast(model)
    model = folding.fold_batch_norm(model)  # same outputs, fewer passes over memory
    model.jit_compile = choice.xla
    return guard_logits(model)


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


def segment_image(model, image, threshold=0.5, tta=False, name="the image"):
    """(uint8 labels (H, W), normalized image) of an image (H, W, C) of raw intensities: normalized
    as in training, fitted to the network and back, thresholded (or argmax). predict.py (a file)
    and the served model (tp4/serving: an array posted over HTTP) both segment through here."""
    image = data.normalize_intensity(image)
    probabilities = finite(predict_images(model, [image], tta=tta)[0], name)
    return metrics.label_map(probabilities, threshold), image


def segment_volume(
    model, volume, threshold=0.5, overlap=0.5, tta=False, name="the volume", plan=None, spacing=None
):
    """(uint8 labels (X, Y, Z), normalized volume) of a volume (X, Y, Z) of raw intensities:
    normalized per volume as in training (datasets.py), then segment_image's steps, slice by slice
    (2D model) or by sliding windows (3D model). A model trained with a `plan` (--plan auto)
    predicts on the volume resampled and normalized by it (voxels of `spacing`), and its
    probabilities come back to the volume's grid (tp4/planning/auto.py)."""
    normalized = data.normalize_intensity(volume.astype(np.float32))
    if plan:
        probabilities = auto.predict_planned(
            lambda v: predict_volume(model, v, overlap, tta), volume, spacing, plan
        )
    else:
        probabilities = predict_volume(model, normalized, overlap, tta)
    return metrics.label_map(finite(probabilities, name), threshold), normalized


def overlay_slice(labels: np.ndarray) -> int:
    """The slice (along the last axis) a volume's overlay shows: the one with the most foreground,
    the middle one if there is none."""
    found = labels > 0
    return int(np.argmax(found.sum(axis=(0, 1)))) if found.any() else labels.shape[-1] // 2


class Segmentation(NamedTuple):
    """One input segmented: uint8 labels (0/1 for a binary model, 0..C-1) in the input's geometry
    (a volume's stored order), the overlay (RGB), the volumes.Volume read (None for an image), and
    which slice of a volume the overlay shows ("" for an image)."""

    labels: np.ndarray
    overlay: np.ndarray
    volume: object
    overlay_shows: str


def segment(model, path, threshold=0.5, overlap=0.5, tta=False, plan=None) -> Segmentation:
    """The Segmentation of one file or DICOM series folder (`plan`: the model's, if it has one)."""
    channels = model.input_shape[-1]
    if not imagefiles.suffix(path) and os.path.isfile(path):
        raise DataError(
            f"{path}: unsupported file type (PNG, JPEG, TIFF, NIfTI, NRRD, MHA/MHD, or a folder of "
            "one DICOM series)"
        )
    if not volumes.is_volume(path):
        if len(model.input_shape) == 5 or plan:
            kind = "a 3D model" if len(model.input_shape) == 5 else "a model planned on volumes"
            raise DataError(f"{path} is a 2D image: {kind} segments volumes")
        image = imagefiles.read_image(path, channels)
        labels, image = segment_image(model, image, threshold, tta, path)
        return Segmentation(labels, figures.overlay(image, labels), None, "")
    scan = volumes.read(path)  # in RAS, as in training (datasets.py)
    if channels != 1:
        raise DataError(f"{path} is a single-channel volume, the model takes {channels} channels")
    labels, volume = segment_volume(
        model, scan.array, threshold, overlap, tta, path, plan, scan.spacing
    )
    z = overlay_slice(labels)
    # rot90: array rows are X (towards the patient's right, RAS): anterior up, the patient's right
    # on the right
    picture = figures.overlay(np.rot90(volume[..., z])[..., None], np.rot90(labels[..., z]))
    shown = f"axial slice {z} of {labels.shape[-1]}, in RAS order"
    return Segmentation(scan.stored(labels), picture, scan, shown)
