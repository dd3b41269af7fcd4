"""Every picture the scripts make: training curves, test contours, orthogonal slices, overlays.

Figures are built with `matplotlib.figure.Figure`, not pyplot: no global figure list to close, no
backend to choose (PNG rendering needs none), so importing this module changes nothing.
"""

import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure
from scipy import ndimage

import metrics

# Outline colours of classes 1, 2, 3... (then again): a binary mask is red, like predicted contours.
CLASS_COLOURS = ("red", "dodgerblue", "gold", "magenta", "cyan", "orange")


def class_colour(c):
    """The matplotlib colour name of class c >= 1."""
    return CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]


def training_curves(history: dict, best_epoch: int) -> Figure:
    """Loss and overlap metrics per epoch, training vs validation, best epoch marked."""
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig = Figure(figsize=(11, 4), layout="tight")
    left, right = fig.subplots(1, 2)
    left.plot(epochs, history["loss"], label="train")
    left.plot(epochs, history["val_loss"], label="validation")
    left.set(title="loss", xlabel="epoch")
    for key, style in (("dice", "-"), ("iou", "--")):
        right.plot(epochs, history[key], style, color="C0", label=f"train {key}")
        right.plot(epochs, history[f"val_{key}"], style, color="C1", label=f"validation {key}")
    right.set(title="Dice and IoU", xlabel="epoch", ylim=(0, 1))
    for ax in (left, right):
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.legend(fontsize=8)
    return fig


def contour_panel(ax, image, truth, predicted, title, num_classes=2):
    """A grey-level image with the true and predicted outlines of label maps: green and red for a
    binary task; with more classes, one colour per class, truth solid and prediction dashed."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    several = num_classes > 2
    for c in range(1, num_classes):
        outlines = [
            (truth, class_colour(c) if several else "lime", "solid"),
            (predicted, class_colour(c), "dashed" if several else "solid"),
        ]
        for labels, color, style in outlines:
            if (labels == c).any():
                ax.contour(
                    (labels == c).astype(float),
                    levels=[0.5],
                    colors=color,
                    linewidths=1,
                    linestyles=style,
                )
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def prediction_figure(images, masks, probabilities, n=6) -> Figure:
    """The `n` test images with the most foreground, ground-truth (green) and predicted (red)
    contours (several classes: one colour each, truth solid, prediction dashed), and their Dice
    (mean over the foreground classes).

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
    fig.suptitle("test images: ground truth (green or solid), prediction (red or dashed)")
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
    fig.suptitle(f"test volume: ground truth (green), prediction (red), 3D Dice {dice:.3f}")
    return fig


def samples_figure(images, masks, foreground) -> Figure:
    """The first four synthetic scans with their lesion contours (data.py --save)."""
    fig = Figure(figsize=(12, 3.4))
    for ax, image, mask in zip(
        fig.subplots(1, min(4, len(images)), squeeze=False)[0], images, masks
    ):
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
        ax.contour(mask[..., 0], levels=[0.5], colors="lime", linewidths=1)
        ax.set_axis_off()
    fig.suptitle(f"synthetic scans, lesion contours in green (foreground {foreground:.1%})")
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
