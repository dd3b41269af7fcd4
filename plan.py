"""Exercise (nnU-Net's method): measure a dataset, then plan its training from the measures.

What this script teaches: nnU-Net's first step is no network at all. It reads every training case
(tp4/planning/fingerprint.py: spacings, shapes, foreground intensities, class shares) and derives
the configuration from them (tp4/planning/plan.py: target spacing, patch and batch for a memory
budget, depth, normalization by modality). The plan is printed and written as plan.json.

    python plan.py DIR                    # DIR: imagesTr/ + labelsTr/ (NIfTI, NRRD, MHA, DICOM)
    python plan.py DIR --modality CT --output plan.json
    python plan.py mni-wm --write DIR --spacing 1 1 3   # the MNI volume at 1x1x3 mm, as 8 cases

train.py and conv3d.py make the same plan with --plan auto, and train on it.
"""

# First, before anything loads TensorFlow: its start-up notices filtered out (tp4/startup.py).
from tp4 import startup  # noqa: F401

# isort: split
import json

from tp4 import cli
from tp4.images.imagefiles import DataError
from tp4.planning import anisotropic, auto, fingerprint, plan


def main(argv=None):
    parser = cli.argument_parser("plan.py", __doc__)
    add = parser.add_argument
    add("folder", help="the dataset: imagesTr/ + labelsTr/ volumes, or mni-wm (built in)")
    add(
        "--modality",
        help="CT (dataset-wide clip and z-score) or any other [default: the "
        "dataset.json's, else other]",
    )
    add("--dims", type=int, choices=(2, 3), default=3, help="3D patches or 2D slices (train.py)")
    add("--base-filters", type=cli.at_least(1), default=8, help="the U-Net's first level")
    add("--budget-mib", type=cli.at_least(1), default=2048, help="activation memory per step")
    add("--output", default="plan.json", help="where the plan is written (JSON)")
    add(
        "--write",
        metavar="DIR",
        help="with mni-wm: first write it resampled to --spacing, cut "
        f"into {anisotropic.BLOCKS[0] * anisotropic.BLOCKS[1]} cases, as NIfTI in DIR; plan that",
    )
    add(
        "--spacing",
        type=cli.positive,
        nargs=3,
        default=(1.0, 1.0, 3.0),
        metavar=("X", "Y", "Z"),
        help="--write: the voxel size, mm",
    )
    args = parser.parse_args(argv)
    if args.write and args.folder != "mni-wm":
        parser.error("--write takes the built-in mni-wm")
    cli.setup()
    try:
        if args.write:
            names = anisotropic.write_mni(args.write, args.spacing)
            print(f"written: {len(names)} cases in {args.write}")
            args.folder = args.write
        modality = args.modality or auto.dataset_modality(args.folder) or "other"
        measured = fingerprint.measure_cases(auto.cases(args.folder))
        budget = args.budget_mib * 2**20
        planned = plan.make(measured, modality, args.base_filters, budget, args.dims)
        with open(args.output, "w") as file:
            json.dump({"fingerprint": measured, "plan": planned}, file, indent=2)
    except (DataError, ValueError, OSError) as error:
        parser.exit(2, f"plan.py: error: {error}\n")
    print(f"{args.folder}: {measured['cases']} cases, class shares {measured['class_shares']}")
    for key, value in planned.items():
        print(f"{key:>22}: {value}")
    print(f"written: {args.output}")


if __name__ == "__main__":
    cli.run(main)
