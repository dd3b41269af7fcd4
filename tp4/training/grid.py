"""`train.py --grid`: every loss x optimizer as a separate run, then a table of their results.

The cells come in a fixed order; `--shard I/N` runs every N-th from the I-th, so that N machines or
processes share one grid on one tracking server. The table (Markdown, best test Dice first) is what
report.py --params loss,optimizer also reads back from the store.

`--grid --resume` finishes a grid that was interrupted, every cell of it: a kill stops one run and
leaves the later cells without a run at all. It looks up each cell of the shard in the experiment
(by its loss and optimizer params) and sorts them: FINISHED ones are kept (their metrics go into the
table), an interrupted one is resumed as the same run (resume.py), cells that never ran are run;
running or diverged ones are left alone. One line per kind says which cells are which, before
anything trains. A flag of the command line that differs from the settings the grid's runs logged is
refused in one line: the table compares cells of one recipe.
"""

import argparse
import dataclasses
import itertools

import mlflow
from mlflow import MlflowClient

import losses
from tp4.tracking import liveness
from tp4.training import recipe, resume

# What the grid's command line may say that its runs need not share: where, and the cell itself.
GRID_FLAGS = resume.PLACE_FLAGS | {"grid", "shard", "loss", "optimizer"}


def parse_shard(text: str) -> tuple[int, int]:
    """--shard I/N as (I, N), with 0 <= I < N: the I-th of N shares of the grid, from 0."""
    try:
        index, count = (int(number) for number in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N, two whole numbers") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r}: I/N needs 0 <= I < N")
    return index, count


def cells(shard=(0, 1)):
    """The (loss, optimizer) cells of the grid in a fixed order, every N-th from the I-th for
    shard (I, N): N shards cover each cell once."""
    index, count = shard
    return list(itertools.product(losses.LOSSES, recipe.OPTIMIZERS))[index::count]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell of the grid and what `--resume` does with it.

    Attributes:
        config: the configuration to train (a resumed run's own), or None if nothing is trained.
        label: "loss x optimizer", for the lines printed.
        kind: "finished", "resume", "never ran" or "left" (running elsewhere, or diverged).
        metrics: a FINISHED run's metrics (the table's row), else None.
        why: for "left", the reason.
    """

    config: object
    label: str
    kind: str
    metrics: dict | None = None
    why: str = ""


def _newest_run(client, experiment_id, loss, optimizer):
    found = client.search_runs(
        [experiment_id],
        f"params.loss = '{loss}' and params.optimizer = '{optimizer}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def plan(cells, labels, command_line, argv):
    """What `--grid --resume` does with each cell.

    Args:
        cells: the configuration of each cell of the shard, from the command line.
        labels: (loss label, optimizer label) of each cell: the params its run logged.
        command_line: train.py's parser (resume.configuration reads it).
        argv: the command line, whose flags the cells' runs must agree with.

    Returns:
        One `Cell` per cell, in order.

    Raises:
        ValueError: a flag of `argv` differs from what a cell's run logged (one line).
    """
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cells[0].experiment)
    planned = []
    for config, (loss, optimizer) in zip(cells, labels):
        label = f"{loss} x {optimizer}"
        run = experiment and _newest_run(client, experiment.experiment_id, loss, optimizer)
        if not run:
            planned.append(Cell(dataclasses.replace(config, resume=None), label, "never ran"))
        elif run.info.status == "FINISHED":
            _refuse_changes(config, _logged(run), command_line, argv, label, run)
            planned.append(Cell(None, label, "finished", run.data.metrics))
        elif why := resume._not_resumable(run):
            planned.append(Cell(None, label, "left", why=f"{run.info.run_id} {why}"))
        else:  # the run's own configuration, which the command line's flags must agree with
            asked = dataclasses.replace(config, resume=run.info.run_id)
            resumed = resume.configuration(asked, command_line, [])
            _refuse_changes(config, resumed.to_json(), command_line, argv, label, run)
            planned.append(Cell(resumed, f"{label} (run {run.info.run_id})", "resume"))
    return planned


def _logged(run):
    """The configuration a run logged (its config.json), or {} (none to compare with)."""
    try:
        return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{liveness.CONFIGURATION}")
    except Exception:  # MLflow raises many types here (none logged, HTTP, JSON): nothing to check
        return {}


def _refuse_changes(config, logged, command_line, argv, label, run):
    changed = logged and resume.changes(config, logged, command_line, argv, GRID_FLAGS)
    if changed:
        raise ValueError(
            f"--grid --resume finishes the grid as it ran: {', '.join(changed)} for cell {label} "
            f"(run {run.info.run_id}); resume without changing them, or start a new --experiment"
        )


def summary(planned):
    """One line per kind of cell, naming them."""
    lines = []
    for kind in ("finished", "resume", "never ran", "left"):
        named = [c.label + (f": {c.why}" if c.why else "") for c in planned if c.kind == kind]
        if named:
            lines.append(f"grid --resume: {len(named)} {kind}: {'; '.join(named)}")
    return lines


def run(config, train, command_line, argv: list[str]) -> None:
    """Every loss x optimizer of the shard as a separate run of the same experiment, then a
    Markdown table of their results. With --resume: the FINISHED cells kept, the interrupted one
    resumed, those that never ran run (`plan`), refused if `argv` (the command line) changes the
    settings they ran with.

    Args:
        config: the script's configuration, with --grid (and --shard, --resume).
        train: the script's training of one configuration, returning its test metrics.
        command_line: the script's parser (`plan` reads it).
        argv: the command line.
    """
    configs = [
        dataclasses.replace(config, loss=loss, optimizer=optimizer, run_name=None, grid=False)
        for loss, optimizer in cells(config.shard)
    ]
    labels = [(losses.LOSSES[c.loss].label, recipe.OPTIMIZERS[c.optimizer].label) for c in configs]
    planned = [Cell(cell, "", "never ran") for cell in configs]
    if config.resume:
        planned = plan(configs, labels, command_line, argv)
        print("\n".join(summary(planned)), flush=True)
    rows = []
    for cell, (loss, optimizer) in zip(planned, labels):
        if cell.kind != "left":
            rows.append((loss, optimizer, cell.metrics or train(cell.config)))
    if config.shard != (0, 1):
        index, count = config.shard
        print(f"\nshard {index}/{count}: {len(rows)} of the {len(cells())} cells")
    print(
        "\n| loss | optimizer | test Dice | test IoU | per-image Dice | best epoch |"
        "\n|---|---|---|---|---|---|"
    )
    for loss, optimizer, r in sorted(rows, key=lambda row: -row[2]["test_dice"]):
        print(
            f"| {loss} | {optimizer} | {r['test_dice']:.3f} | {r['test_iou']:.3f} | "
            f"{r['test_dice_per_image']:.3f} | {int(r['best_epoch'])} |"
        )
