"""Tables of results read from the MLflow store: the source of every number in README and REPORT.

What this script teaches: results are queried from the tracking store, never copied by hand. Each
table row is one finished run (a failed, killed or still running run has no result to show: --all
lists them too, with their status); the columns are its name, the data it trained on (its MLflow
dataset), the params that distinguish the runs and their final test metrics. Without arguments:
the experiments in the store and how many runs each holds.

    python report.py                                # the experiments and their run counts
    python report.py tp4-unet                       # the finished runs of train.py's experiment
    python report.py tp4-grid --params loss,optimizer   # the loss x optimizer comparison
    python report.py tp4-unet --all                 # every run, whatever its status
    python report.py --cases RUN_ID                 # one run's per-case test table
    python report.py tp4-unet --cv                  # cross-validations (train.py --folds K)
    python report.py --update README.md REPORT.md   # regenerate the tables marked in those files
    python report.py --promote RUN_ID tp4-unet@champion  # the alias names that run's model

A marked table in a Markdown file is a comment line with the arguments of this script, the table,
and an end mark:

    <!-- report.py tp4-grid --params loss,optimizer -->
    | run | loss | ... (replaced by --update)
    <!-- end report -->

A marked table of an experiment the store lacks (made from another store) is kept as it is.
"""

import re
import shlex
from collections import Counter

import mlflow
from mlflow import MlflowClient

from tp4 import cli
from tp4.tracking import registry, store

METRICS = (
    "test_dice",
    "test_iou",
    "test_dice_per_image",
    "best_epoch",
    "epochs_run",
    "fit_seconds",
)


# Run statuses counted for each experiment (MLflow's RunStatus names), in the columns' order.
STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING")


def experiments_table():
    """Markdown table of the experiments in the store (by name) with their run counts by status."""
    header = ["experiment", "runs", *(status.lower() for status in STATUSES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for experiment in mlflow.search_experiments(order_by=["name ASC"]):
        runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
        counts = Counter(run.info.status for run in runs)
        cells = [experiment.name, len(runs), *(counts[status] for status in STATUSES)]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def runs_table(experiment, params=(), metrics=METRICS, sort="test_dice", all_runs=False):
    """Markdown table of the FINISHED runs of `experiment` (every run, with a status column, if
    `all_runs`), best `sort` first; raises ValueError if none."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(
            f"no experiment {experiment!r} in the tracking store {mlflow.get_tracking_uri()}"
        )
    runs = client.search_runs(
        [found.experiment_id],
        "" if all_runs else "attributes.status = 'FINISHED'",
        order_by=[f"metrics.{sort} DESC"],
        max_results=1000,
    )
    if not runs:
        raise ValueError(
            f"experiment {experiment!r} has no "
            + ("run" if all_runs else "finished run (--all lists the others)")
        )
    header = ["run", "dataset", *(["status"] if all_runs else []), *params, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run.info.run_name, _datasets(run)] + ([run.info.status] if all_runs else [])
        cells += [run.data.params.get(p, "") for p in params]
        cells += [_format(name, run.data.metrics.get(name)) for name in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# A cross-validation's columns: (header, parent metric); a mean comes with its spread (`_std`).
CV_COLUMNS = (
    ("Dice", "test_dice_mean"),
    ("IoU", "test_iou_mean"),
    ("HD95", "test_hd95_mean"),
    ("NSD", "test_nsd_mean"),
    ("ensemble Dice (test split)", "ensemble_test_dice"),
    ("one fold's Dice (test split)", "single_test_dice_mean"),
)


def cv_table(experiment, params=()):
    """Markdown table of the FINISHED cross-validations of `experiment` (parent runs of train.py
    --folds K): the held-out folds' mean ± standard deviation, then on the test split outside the
    folds the folds' ensemble against one fold's model alone; raises ValueError if none."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no experiment {experiment!r} in {mlflow.get_tracking_uri()}")
    runs = [
        run
        for run in client.search_runs(
            [found.experiment_id],
            "attributes.status = 'FINISHED'",
            order_by=["metrics.test_dice_mean DESC"],
            max_results=1000,
        )
        if "cv_folds" in run.data.params and "mlflow.parentRunId" not in run.data.tags
    ]
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no finished cross-validation")
    header = ["run", "dataset", *params, "folds", *(label for label, _ in CV_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run.info.run_name, _datasets(run), *(run.data.params.get(p, "") for p in params)]
        cells.append(run.data.params["cv_folds"])
        for _, key in CV_COLUMNS:
            value, spread = (
                run.data.metrics.get(key),
                run.data.metrics.get(key.removesuffix("_mean") + "_std"),
            )
            text = _format(key, value)
            cells.append(f"{text} ± {spread:.3f}" if key.endswith("_mean") and text else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MARKED = re.compile(
    r"(<!-- report\.py (?P<args>.*?) -->\n)(?P<table>.*?)(<!-- end report -->)", re.S
)


def update_file(path):
    """Regenerate every marked table of a Markdown file in place.

    Returns:
        (how many tables it regenerated, the experiments whose tables it kept as they were: the
        store has no such experiment, so they came from another store).
    """
    with open(path) as f:
        text = f.read()
    count, kept = 0, []

    def regenerate(match):
        nonlocal count
        args = _parser().parse_args(shlex.split(match["args"]))
        if MlflowClient().get_experiment_by_name(args.experiment) is None:
            kept.append(args.experiment)
            return match.group(0)
        count += 1
        if args.cv:
            table = cv_table(args.experiment, _items(args.params))
        else:
            table = runs_table(
                args.experiment, _items(args.params), _items(args.metrics), args.sort, args.all
            )
        return f"{match.group(1)}{table}\n{match.group(4)}"

    text = MARKED.sub(regenerate, text)
    with open(path, "w") as f:
        f.write(text)
    return count, kept


def cases_table(run_id):
    """Markdown table of a run's per-case test results (its test_cases.json artifact: one row per
    case and class; an empty HD95 cell is infinite: exactly one of the two masks is empty)."""
    try:
        table = mlflow.artifacts.load_dict(f"runs:/{run_id}/test_cases.json")
    except Exception as error:  # MLflow raises several types for a missing run or artifact
        raise ValueError(f"run {run_id} has no per-case table: {cli.first_line(error)}") from None
    lines = ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    for row in table["data"]:
        cells = [
            f"{v:.3f}" if isinstance(v, float) else "inf" if v is None else str(v) for v in row
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _datasets(run):
    """The names of the datasets a run logged (mlflow.log_input): what it trained on."""
    return (
        ", ".join(entry.dataset.name for entry in run.inputs.dataset_inputs) if run.inputs else ""
    )


def _items(text):
    return [item for item in text.split(",") if item]


def _format(name, value):
    if value is None:
        return ""
    if (
        name in ("best_epoch", "epochs_run")
        or name.startswith("test_one_empty")
        or name.endswith("seconds")
    ):
        return f"{value:.0f}"
    return f"{value:.3f}"


def _parser():
    parser = cli.argument_parser("report.py", __doc__)
    parser.add_argument(
        "experiment", nargs="?", help="MLflow experiment name (none: list the experiments)"
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="every run, with its status (failed, killed, running), not only the finished ones",
    )
    parser.add_argument("--params", default="", help="comma-separated params to show as columns")
    parser.add_argument(
        "--metrics", default=",".join(METRICS), help="comma-separated metrics to show"
    )
    parser.add_argument(
        "--sort", default="test_dice", help="metric to sort by, best (highest) first"
    )
    parser.add_argument("--cases", metavar="RUN_ID", help="print a run's per-case test table")
    parser.add_argument(
        "--cv",
        action="store_true",
        help="the experiment's cross-validations (train.py --folds K): mean ± std over the folds, "
        "the folds' ensemble against one fold on the test split",
    )
    parser.add_argument(
        "--promote",
        nargs=2,
        metavar=("RUN_ID", "NAME@ALIAS"),
        help="point the alias of a registered model (train.py --register NAME) at the version run "
        "RUN_ID logged: predict.py and mlflow models serve take models:/NAME@ALIAS",
    )
    parser.add_argument(
        "--update",
        nargs="+",
        metavar="MARKDOWN",
        help="regenerate the marked tables of these files (a table of an experiment this store "
        "lacks is kept as it is, said in one line)",
    )
    return parser


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    cli.setup()
    try:
        store.open_store()  # also marks KILLED the runs whose process died
        if args.cases:
            print(cases_table(args.cases))
        elif args.promote:
            version, uri = registry.promote(*args.promote)
            print(f"{uri}: version {version}, from run {args.promote[0]}")
        elif args.update:
            for path in args.update:
                count, kept = update_file(path)
                print(f"{path}: {count} tables regenerated")
                if kept:  # tables made from another store (an earlier session's, a server's)
                    names = ", ".join(kept)
                    print(f"{path}: kept as they were (no such experiment here): {names}")
        elif args.experiment and args.cv:
            print(cv_table(args.experiment, _items(args.params)))
        elif args.experiment:
            print(
                runs_table(
                    args.experiment, _items(args.params), _items(args.metrics), args.sort, args.all
                )
            )
        else:
            print(experiments_table())
    except (ValueError, OSError) as error:
        parser.exit(2, f"report.py: error: {error}\n")
    except Exception as error:  # an unreachable server or unreadable store: one line
        parser.exit(
            2, f"report.py: error: cannot read the MLflow tracking store: {str(error)[:200]}\n"
        )


if __name__ == "__main__":
    cli.run(main)
