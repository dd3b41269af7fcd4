"""Exercise (nnU-Net's method): measure a dataset, then plan its training from the measures.

What this script teaches: nnU-Net's first step is no network at all. It reads every training case
(tp4/planning/fingerprint.py: spacings, shapes, foreground intensities, class shares) and derives
the configuration from them (tp4/planning/plan.py: target spacing, patch and batch for a memory
budget, depth, normalization by modality). The plan is printed and written as plan.json.

    python plan.py DIR                    # DIR: imagesTr/ + labelsTr/ (NIfTI, NRRD, MHA, DICOM)
    python plan.py DIR --modality CT --output plan.json
"""

# First, before anything loads TensorFlow: its start-up notices filtered out (tp4/startup.py).
from tp4 import startup  # noqa: F401

# isort: split
import json
import sys

from tp4 import cli
from tp4.images.imagefiles import DataError
from tp4.planning import fingerprint, plan


def main(argv=None):
    parser = cli.argument_parser("plan.py", __doc__)
    add = parser.add_argument
    add("folder", help="the dataset: imagesTr/ + labelsTr/ volumes")
    add("--modality", default="other", help="CT (dataset-wide clip and z-score) or any other")
    add("--base-filters", type=cli.at_least(1), default=8, help="the U-Net's first level")
    add("--budget-mib", type=cli.at_least(1), default=2048, help="activation memory per step")
    add("--output", default="plan.json", help="where the plan is written (JSON)")
    args = parser.parse_args(argv)
    cli.setup()
    try:
        measured = fingerprint.measure(args.folder)
        planned = plan.make(measured, args.modality, args.base_filters, args.budget_mib * 2**20)
        with open(args.output, "w") as file:
            json.dump({"fingerprint": measured, "plan": planned}, file, indent=2)
    except (DataError, ValueError, OSError) as error:
        parser.exit(2, f"plan.py: error: {error}\n")
    print(f"{args.folder}: {measured['cases']} cases, class shares {measured['class_shares']}")
    for key, value in planned.items():
        print(f"{key:>22}: {value}")
    print(f"written: {args.output}")


if __name__ == "__main__":
    sys.exit(main())
