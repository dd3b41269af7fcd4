"""Tables of results read from the MLflow store: the source of every number in README and REPORT.

What this script teaches: results are queried from the tracking store, never copied by hand. Each
table row is one finished run; the columns are the params that distinguish the runs and their final
test metrics.

    python report.py tp4-unet                           # every finished run of train.py's
    experiment python report.py tp4-grid --params loss,optimizer   # the loss x optimizer comparison
    python report.py --update README.md REPORT.md       # regenerate the tables marked in those
    files

A marked table in a Markdown file is a comment line with the arguments of this script, the table,
and an end mark:

    <!-- report.py tp4-grid --params loss,optimizer -->
    | run | loss | ... (replaced by --update)
    <!-- end report -->
"""

import argparse
import re
import shlex

import mlflow
from mlflow import MlflowClient

import cli
import store

METRICS = (
    "test_dice",
    "test_iou",
    "test_dice_per_image",
    "best_epoch",
    "epochs_run",
    "fit_seconds",
)


def runs_table(experiment, params=(), metrics=METRICS, sort="test_dice"):
    """Markdown table of the FINISHED runs of `experiment`, best `sort` first; raises ValueError if
    none."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(
            f"no experiment {experiment!r} in the tracking store {mlflow.get_tracking_uri()}"
        )
    runs = client.search_runs(
        [found.experiment_id],
        "attributes.status = 'FINISHED'",
        order_by=[f"metrics.{sort} DESC"],
        max_results=1000,
    )
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no finished run")
    header = ["run", *params, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run.info.run_name] + [run.data.params.get(p, "") for p in params]
        cells += [_format(name, run.data.metrics.get(name)) for name in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MARKED = re.compile(
    r"(<!-- report\.py (?P<args>.*?) -->\n)(?P<table>.*?)(<!-- end report -->)", re.S
)


def update_file(path):
    """Regenerate every marked table of a Markdown file in place; returns how many it did."""
    with open(path) as f:
        text = f.read()
    count = 0

    def regenerate(match):
        nonlocal count
        args = _parser().parse_args(shlex.split(match["args"]))
        count += 1
        table = runs_table(args.experiment, _items(args.params), _items(args.metrics), args.sort)
        return f"{match.group(1)}{table}\n{match.group(4)}"

    text = MARKED.sub(regenerate, text)
    with open(path, "w") as f:
        f.write(text)
    return count


def _items(text):
    return [item for item in text.split(",") if item]


def _format(name, value):
    if value is None:
        return ""
    if name in ("best_epoch", "epochs_run") or name.endswith("seconds"):
        return f"{value:.0f}"
    return f"{value:.3f}"


def _parser():
    parser = argparse.ArgumentParser(
        prog="report.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("experiment", nargs="?", help="MLflow experiment name")
    parser.add_argument("--params", default="", help="comma-separated params to show as columns")
    parser.add_argument(
        "--metrics", default=",".join(METRICS), help="comma-separated metrics to show"
    )
    parser.add_argument(
        "--sort", default="test_dice", help="metric to sort by, best (highest) first"
    )
    parser.add_argument(
        "--update",
        nargs="+",
        metavar="MARKDOWN",
        help="regenerate the marked tables of these files",
    )
    return parser


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    cli.setup()
    if not args.update and not args.experiment:
        parser.error("give an experiment name, or --update FILE...")
    try:
        store.open_store()  # also marks KILLED the runs whose process died
        if args.update:
            for path in args.update:
                print(f"{path}: {update_file(path)} tables regenerated")
        else:
            print(runs_table(args.experiment, _items(args.params), _items(args.metrics), args.sort))
    except (ValueError, OSError) as error:
        parser.exit(2, f"report.py: error: {error}\n")
    except (
        Exception
    ) as error:  # an unreachable server or unreadable store: one line, not a traceback
        parser.exit(
            2, f"report.py: error: cannot read the MLflow tracking store: {str(error)[:200]}\n"
        )


if __name__ == "__main__":
    main()
