"""Segment new images with a trained model: images or volumes in, masks of their geometry out.

What this script teaches:
- a model is only half of a prediction: the preprocessing of training is replayed and undone on the
  output (tp4/inference/segment.py), so that the mask lies pixel for pixel over the input, whatever
  its size; a volume (NIfTI, NRRD, MHA, a DICOM series folder) is segmented in RAS orientation, as
  in training, and its mask written back on the input's own grid, so that a viewer lays it over
  the scan in millimetres;
- a 2D model segments a volume slice by slice, a 3D model by overlapping sliding windows;
  `--tta` averages over the flips of every spatial axis (nnU-Net's test-time mirroring);
- the precision and XLA setting of inference are chosen for this machine (tp4/perf/speed.py),
  whatever the precision the model was trained at: its layers are rebuilt with the same weights;
- a batch job leaves no half-written file (tp4/inference/outputs.py). A bad input is one line on
  stderr (exit status 2 at the end); the other inputs are still done.

Outputs in --output: `<name>_mask.<ext>` (PNG/TIFF: uint8 of the input's size, 0/255 for a binary
model, the labels 0..C-1 themselves for a model of C classes; a JPEG input gives a PNG mask since
JPEG compression would blur it; a volume: uint8 labels 0/1 or 0..C-1 in its format and grid, a
NIfTI's affine and header, `.nrrd` for `.nhdr` and a DICOM series, `.mha` for `.mhd`) and
`<name>_overlay.png` (the image, or the volume's slice with the most foreground, with the
predicted contour of each class in its colour: class 1 red).

    python predict.py model.keras scan.png --output predictions/
    python predict.py runs:/<run_id>/model images/ --output predictions/ --threshold 0.4
    python predict.py models:/tp4-unet@champion case_001_0000.nii.gz --output predictions/ --tta
    python predict.py runs:/<parent run id> images/    # the folds of train.py --folds K, averaged
"""

# First, before anything loads TensorFlow: its start-up notices filtered out (tp4/startup.py).
from tp4 import startup  # noqa: F401

# isort: split
import os
import sys

import numpy as np
from PIL import Image

from tp4 import cli
from tp4.images import imagefiles
from tp4.inference import ensemble, frozen, outputs, segment
from tp4.perf import hardware, speed
from tp4.planning import auto


def parse_args(argv=None):
    parser = cli.argument_parser("predict.py", __doc__)
    add = parser.add_argument
    add(
        "model",
        help="a .keras or .onnx file (python -m tp4.serving.export), or an MLflow model URI: "
        "runs:/<run_id>/model, "
        "models:/<name>/<version>, models:/<name>@<alias>, "
        "models:/<model_id>; several, comma-separated, or the parent run of a cross-validation "
        "(runs:/<run_id>, train.py --folds K): their probabilities averaged (an ensemble)",
    )
    add(
        "inputs",
        nargs="+",
        help="PNG, JPEG, TIFF, NIfTI, NRRD or MHA/MHD files, DICOM series folders, or folders "
        "of them",
    )
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


def segment_file(model, path, output, threshold=0.5, overlap=0.5, tta=False, plan=None):
    """Segment one file and write its mask and overlay; returns the mask's foreground fraction.
    `plan`: the model's (--plan auto), replayed on the file and undone on its mask."""
    mask_path, overlay_path = outputs.output_paths(output, path)
    found = segment.segment(model, path, threshold, overlap, tta, plan)
    labels, picture, volume, overlay_shows = found
    # A binary mask image is 0/255, visible in any viewer; labels of several classes stay 0..C-1.
    binary_image = volume is None and model.output_shape[-1] == 1
    mask = labels * 255 if binary_image else labels
    outputs.write_outputs(
        {
            mask_path: lambda p: outputs.save_mask(p, mask, volume),
            overlay_path: lambda p: Image.fromarray(picture).save(p, format="PNG"),
        }
    )
    foreground = float(np.mean(labels > 0))
    shown = f" ({overlay_shows})" if overlay_shows else ""
    print(
        f"{path}: {imagefiles.shape_text(mask.shape)} -> {mask_path} and {overlay_path}{shown}, "
        f"foreground {foreground:.2%}",
        flush=True,
    )
    return foreground


def main(argv=None):
    args, parser = parse_args(argv)
    cli.setup()
    hardware.describe_cpu_in_background()  # its second passes while the model loads
    try:
        files = outputs.list_inputs(args.inputs)
        outputs.refuse_shared_outputs(files, args.output)
        outputs.check_output(args.output)  # before the model: loading it can take a while
        model = segment.at_speed(ensemble.load(args.model), args.precision, args.xla)
        plan = auto.model_plan(args.model)  # --plan auto: the training's resampling, replayed
    except (ValueError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if plan:
        print(auto.predicting_with(plan))
    if ensemble.size(model) > 1:
        print(f"ensemble of {ensemble.size(model)} models: their probabilities averaged")
    os.makedirs(args.output, exist_ok=True)
    failed = 0
    for path in files:
        try:
            segment_file(model, path, args.output, args.threshold, args.overlap, args.tta, plan)
        except (
            segment.ModelError
        ) as error:  # a broken model gives nothing useful on the other files either
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        # one bad file (or a full disk) does not stop the others
        except (ValueError, OSError) as error:
            failed += 1
            print(f"{parser.prog}: error: {error}", file=sys.stderr, flush=True)
    if failed:
        parser.exit(2)


if __name__ == "__main__":
    # A script run only predicts: its weights never change after the first call.
    frozen.inference_only_process()
    cli.run(main)
