"""`train.py --grid --resume`: finish a grid that was interrupted, every cell of it.

A grid is many runs; a kill stops one of them and leaves the later cells without a run at all.
`--resume` of the grid looks up each cell of the shard in the experiment (by its loss and optimizer
params) and sorts them: FINISHED ones are kept (their metrics go into the table), an interrupted one
is resumed as the same run (resume.py), cells that never ran are run; running or diverged ones are
left alone. One line per kind says which cells are which, before anything trains. A flag of the
command line that differs from the settings the grid's runs logged is refused in one line: the
table compares cells of one recipe.
"""

import dataclasses

import mlflow
from mlflow import MlflowClient

from tp4.tracking import liveness
from tp4.training import resume

# What the grid's command line may say that its runs need not share: where, and the cell itself.
GRID_FLAGS = resume.PLACE_FLAGS | {"grid", "shard", "loss", "optimizer"}


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
