"""Every picture the scripts make: training curves, test contours, orthogonal slices, overlays.

Figures are built with `matplotlib.figure.Figure`, not pyplot: no global figure list to close, no
backend to choose (PNG rendering needs none), so importing this module changes nothing.
"""

import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure
from scipy import ndimage

import metrics

# Ground truth is filled, the prediction outlined, and what is predicted but not true is filled in
# a colour of its own: both masks stay visible where they overlap, and errors stand out.
TRUTH_COLOUR, PREDICTION_COLOUR, FALSE_POSITIVE_COLOUR = "lime", "red", "magenta"
# Several classes: class 1, 2, 3... in these colours (then again), filled and outlined alike.
CLASS_COLOURS = ("red", "dodgerblue", "gold", "cyan", "orange", "white")
LEGEND = "ground truth filled (green), prediction outlined (red), false positives (magenta)"
LEGEND_CLASSES = (
    "ground truth filled, prediction outlined, one colour a class; false positives magenta"
)


def class_colour(c):
    """The matplotlib colour name of class c >= 1."""
    return CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]


def _zoomed(ax, curves):
    """Y limits that show the differences: from a little below the lowest value after the first
    quarter of the epochs (the first epochs' low values would flatten the rest) up to 1."""
    start = len(curves[0]) // 4 if len(curves[0]) >= 4 else 0
    low = min(min(curve[start:]) for curve in curves)
    ax.set_ylim(max(0.0, low - 0.1 * (1 - low) - 0.01), 1.0)


def training_curves(logged: list[dict[str, float]], best_epoch: int) -> Figure:
    """Loss (log scale) and overlap metrics (zoomed on their range) per epoch, training vs
    validation, best epoch marked; `logged`: each epoch's metrics (the checkpoint's history)."""
    history = {key: [epoch[key] for epoch in logged] for key in logged[0]}
    epochs = np.arange(1, len(logged) + 1)
    fig = Figure(figsize=(11, 4), layout="tight")
    left, right = fig.subplots(1, 2)
    left.plot(epochs, history["loss"], label="train")
    left.plot(epochs, history["val_loss"], label="validation")
    left.set(title="loss", xlabel="epoch")
    if min(history["loss"] + history["val_loss"]) > 0:
        left.set_yscale("log")
    for key, style in (("dice", "-"), ("iou", "--")):
        right.plot(epochs, history[key], style, color="C0", label=f"train {key}")
        right.plot(epochs, history[f"val_{key}"], style, color="C1", label=f"validation {key}")
    right.set(title="Dice and IoU", xlabel="epoch")
    _zoomed(right, [history[key] for key in ("dice", "iou", "val_dice", "val_iou")])
    for ax in (left, right):
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.legend(fontsize=8)
    return fig


def contour_panel(ax, image, truth, predicted, title, num_classes=2):
    """A grey-level image with two label maps: the ground truth filled, the prediction outlined,
    and the false positives (predicted foreground the truth does not share) filled in magenta.
    Binary: truth green, prediction red; several classes: one colour a class."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    several = num_classes > 2
    tint = np.zeros((*truth.shape, 4))
    for c in range(1, num_classes):
        tint[truth == c] = (*colors.to_rgb(class_colour(c) if several else TRUTH_COLOUR), 0.35)
    tint[(predicted > 0) & (predicted != truth)] = (*colors.to_rgb(FALSE_POSITIVE_COLOUR), 0.6)
    ax.imshow(tint, interpolation="nearest")
    for c in range(1, num_classes):
        if (predicted == c).any():
            colour = class_colour(c) if several else PREDICTION_COLOUR
            ax.contour((predicted == c).astype(float), levels=[0.5], colors=colour, linewidths=1.2)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def prediction_figure(images, masks, probabilities, n=6) -> Figure:
    """The `n` test images with the most foreground, drawn by `contour_panel`, and their Dice (mean
    over the foreground classes).

    The most foreground, not the first: slices at the top of a brain hold almost no white matter.
    """
    n = min(n, len(images))
    shown = np.argsort(-(masks > 0).reshape(len(masks), -1).sum(axis=1), kind="stable")[:n]
    num_classes = max(2, probabilities.shape[-1])
    labels, classes = metrics.label_map(probabilities), range(1, num_classes)
    fig = Figure(figsize=(2.6 * n, 2.9))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, i in zip(axes, shown):
        truth = masks[i, ..., 0]
        dice = np.mean([metrics.dice_coefficient(truth == c, labels[i] == c) for c in classes])
        contour_panel(ax, images[i, ..., 0], truth, labels[i], f"Dice {dice:.3f}", num_classes)
    fig.suptitle(f"test images: {LEGEND if num_classes == 2 else LEGEND_CLASSES}")
    return fig


def orthogonal_slices_figure(volumes, masks, probabilities) -> Figure:
    """Axial, coronal and sagittal slices of the first test volume, through its lesions' centre."""
    volume, mask, probability = volumes[0][..., 0], masks[0][..., 0], probabilities[0][..., 0]
    predicted = (probability >= 0.5).astype(np.uint8)
    centre = [
        int(np.argmax(mask.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3)
    ]
    fig = Figure(figsize=(10, 3.6))
    for ax, axis, label in zip(fig.subplots(1, 3), range(3), ("axial", "coronal", "sagittal")):
        image, truth, prediction = (
            np.take(a, centre[axis], axis=axis) for a in (volume, mask, predicted)
        )
        contour_panel(ax, image, truth, prediction, f"{label} slice {centre[axis]}")
    dice = metrics.dice_coefficient(mask, probability)
    fig.suptitle(f"test volume, 3D Dice {dice:.3f}: {LEGEND}")
    return fig


def overlay(image, labels):
    """RGB uint8: a normalized image (H, W[, 3]) in grey levels, the outline of each class of a
    label map (or of a boolean mask) in its colour (CLASS_COLOURS: class 1 red)."""
    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey, 3, axis=-1) if grey.shape[-1] == 1 else grey[..., :3].copy()
    for c in range(1, int(labels.max()) + 1):
        region = labels == c
        rgb[region & ~ndimage.binary_erosion(region)] = np.round(
            np.multiply(colors.to_rgb(class_colour(c)), 255)
        )
    return rgb
