"""--resume: a run killed by kill -9 continues as the same MLflow run, ends as if never killed."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from helpers import LEARNS, REPO, TINY, crafted_run, refused_in_one_line, wait_for_line

import conv3d
import train
import unet
from tp4 import cli
from tp4.tracking import epochs, liveness
from tp4.training import checkpoint, resume


def _start(argv):
    """train.py in a subprocess, its output read line by line."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _only_run(client, experiment):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_as_the_same_run_and_ends_as_if_never_killed(
    store, capsys
):
    run_epochs = LEARNS + ["--epochs", "8", "--patience", "8"]
    process = _start(run_epochs + ["--experiment", "killed"])
    try:
        wait_for_line(process, "epoch   2/8")  # epoch 2 is checkpointed before it is printed
        process.kill()  # SIGKILL: no clean-up at all
    finally:
        process.kill()
        process.wait()
    killed = _only_run(store, "killed")
    assert killed.info.status == "RUNNING"
    # Epoch 2 is in the checkpoint; the store may lack it (its sender was killed): --resume logs it.
    steps_before = [m.step for m in store.get_metric_history(killed.info.run_id, "loss")]
    assert steps_before == list(range(1, len(steps_before) + 1)) and len(steps_before) < 8

    train.main(["--resume", "--experiment", "killed"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"run {killed.info.run_id} (UNet_CombinedLoss_Adam) ended without a word "
        f"(process {process.pid} is gone): marked KILLED; continue it with: "
        f"{cli.script('train.py')} --resume {killed.info.run_id}"
    ]
    train.main(run_epochs + ["--experiment", "uninterrupted"])

    resumed, reference = _only_run(store, "killed"), _only_run(store, "uninterrupted")
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    for key in ("loss", "val_dice", "lr"):
        history = store.get_metric_history(resumed.info.run_id, key)
        expected = store.get_metric_history(reference.info.run_id, key)
        assert [m.step for m in history] == list(range(1, 9)), key  # no gap, no duplicate
        assert [m.value for m in history] == pytest.approx([m.value for m in expected], rel=1e-5)
    assert reference.data.metrics["test_dice"] > 0.7  # a model that learned
    for key in ("test_dice", "test_iou", "test_loss", "best_epoch", "epochs_run"):
        assert resumed.data.metrics[key] == pytest.approx(reference.data.metrics[key], rel=1e-5)
    assert "model_uri" in resumed.data.tags
    assert not os.path.exists("checkpoints")  # a FINISHED run keeps nothing outside MLflow


@pytest.mark.slow
def test_sighup_marks_the_run_killed(store):
    process = _start(LEARNS + ["--epochs", "30", "--experiment", "hangup"])
    try:
        wait_for_line(process, "epoch   1/30")
        process.send_signal(signal.SIGHUP)  # the terminal closed
        assert process.wait(timeout=60) == 130
    finally:
        process.kill()
        process.wait()
    run = _only_run(store, "hangup")
    assert run.info.status == "KILLED"
    assert len(store.get_metric_history(run.info.run_id, "loss")) >= 1


def _configuration(argv):
    return resume.configuration(train.parse_args(argv), train.command_line(), argv)


def test_resume_alone_takes_the_newest_interrupted_run_and_its_configuration(store):
    old, _ = crafted_run("e", ["--lr", "0.1"], "KILLED")
    newest, config = crafted_run("e", ["--lr", "0.2", "--epochs", "3"], "FAILED")
    crafted_run("e", ["--lr", "0.3"], "FINISHED")
    crafted_run(
        "e", ["--lr", "0.4"], "FAILED", {"failure": "training diverged at epoch 1 (loss nan)"}
    )
    crafted_run("e", ["--lr", "0.5"], "RUNNING", liveness.process_tags())  # alive: this process
    resumed = _configuration(["--resume", "--experiment", "e"])
    assert vars(resumed) == {**config, "resume": newest}
    assert resumed.shard == (0, 1)  # a tuple again, as argparse gives it
    # The same values given again change nothing; so do --experiment and --checkpoint-dir.
    given = ["--resume", old, "--lr", "0.1", "--experiment", "other", "--checkpoint-dir", "c"]
    assert _configuration(given).lr == 0.1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "0.5"], "as it was configured: --lr 0.5 (the run has 0.1) would change it"),
        (["--epochs", "30"], "as it was configured: --epochs 30 (the run has 3) would change it"),
        (
            ["--loss", "dice"],
            "as it was configured: --loss dice (the run has bce_dice) would change it",
        ),
    ],
)
def test_a_flag_that_would_change_the_run_is_refused_in_one_line(store, capsys, argv, message):
    run_id, _ = crafted_run("e", ["--lr", "0.1", "--epochs", "3"], "KILLED")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", run_id, *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"train.py: error: --resume continues run {run_id} {message}\n"
    )


def test_the_grid_resumes_its_cells_not_one_run(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--grid", "--resume", "0123abcd"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(
        "train.py: error: --grid --resume finishes the grid's cells: it takes no run id\n"
    )


@pytest.mark.parametrize(
    "status, tags, reason",
    [
        ("FINISHED", None, "it is FINISHED"),
        (
            "FAILED",
            {"failure": "training diverged at epoch 2 (loss nan); try a lower --lr"},
            "it diverged: start a new run, with a lower --lr",
        ),
    ],
)
def test_a_finished_or_diverged_run_is_not_resumed(store, capsys, status, tags, reason):
    run_id, _ = crafted_run("e", [], status, tags)
    with pytest.raises(SystemExit):
        train.main(["--resume", run_id])
    assert capsys.readouterr().err == f"train.py: error: run {run_id} cannot be resumed: {reason}\n"
    with pytest.raises(SystemExit):
        train.main(["--resume", "--experiment", "e"])
    assert "experiment 'e' has no interrupted run to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_conv3d_resumes_its_3d_run_and_its_2d_slices_run(store, monkeypatch):
    argv = "--n-volumes 12 --shape 8 32 32 --depth 2 --epochs 3 --seed 3 --no-peak-memory".split()
    log_epoch = epochs.EpochLogger.on_epoch_end

    def interrupt_after_one_epoch(self, epoch, logs=None):
        log_epoch(self, epoch, logs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(epochs.EpochLogger, "on_epoch_end", interrupt_after_one_epoch)
        for train_one in (conv3d.train3d, conv3d.train_on_slices):
            with pytest.raises(KeyboardInterrupt):
                train_one(conv3d.parse_args(argv))
    killed = store.search_runs([store.get_experiment_by_name("tp4-conv3d").experiment_id])
    assert sorted(r.info.status for r in killed) == ["KILLED", "KILLED"]
    for run in killed:
        conv3d.main(["--resume", run.info.run_id])
        resumed = store.get_run(run.info.run_id)
        assert resumed.info.status == "FINISHED"
        assert [m.step for m in store.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert {store.get_run(r.info.run_id).data.params["architecture"] for r in killed} == {
        "UNet3D",
        "UNet2D on slices",
    }


def _killed_after_epoch_2(store, monkeypatch):
    """A TINY train.py run interrupted once its second epoch is checkpointed and logged; its id."""
    log_epoch = epochs.EpochLogger.on_epoch_end

    def interrupt_after_two_epochs(self, epoch, logs=None):
        log_epoch(self, epoch, logs)
        if epoch + 1 == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(epochs.EpochLogger, "on_epoch_end", interrupt_after_two_epochs)
        train.main(TINY)
    run = _only_run(store, "tiny")
    assert run.info.status == "KILLED"
    return run.info.run_id


def test_a_truncated_checkpoint_resumes_from_the_one_before_and_logs_each_epoch_once(
    store, monkeypatch, capsys
):
    run_id = _killed_after_epoch_2(store, monkeypatch)
    newest = os.path.join("checkpoints", run_id, checkpoint.FILE)
    with open(newest, "r+b") as file:
        file.truncate(100)  # a copy cut short, a full disk
    capsys.readouterr()
    train.main(["--resume", run_id])
    assert capsys.readouterr().err == (
        f"{newest} is damaged (truncated, or not a zip archive): resuming from "
        f"{checkpoint.PREVIOUS}, after epoch 1\n"
    )
    assert store.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in store.get_metric_history(run_id, "loss")] == [1, 2, 3]


def test_a_damaged_checkpoint_without_an_older_one_is_one_line_and_the_run_stays_resumable(
    store, monkeypatch, capsys
):
    run_id = _killed_after_epoch_2(store, monkeypatch)
    for name in (checkpoint.FILE, checkpoint.PREVIOUS):
        with open(os.path.join("checkpoints", run_id, name), "wb") as file:
            file.write(os.urandom(1000))
    capsys.readouterr()
    line = refused_in_one_line(["--resume", run_id], capsys)
    assert line.endswith(
        "(not a checkpoint written by this project), and no older checkpoint can be read: "
        "restore it from a backup to resume, or start a new run"
    )
    assert "pickle" not in line
    assert store.get_run(run_id).info.status == "KILLED"  # a restored file resumes it


def test_resume_alone_passes_over_a_run_killed_before_its_configuration(store, capsys):
    usable, _ = crafted_run("e", ["--lr", "0.1"], "KILLED")
    time.sleep(0.01)  # a later start time
    with mlflow.start_run(run_name="early") as early:  # killed before it logged config.json
        pass
    store.set_terminated(early.info.run_id, "KILLED")
    assert _configuration(["--resume", "--experiment", "e"]).resume == usable
    assert refused_in_one_line(["--resume", early.info.run_id], capsys) == (
        f"train.py: error: run {early.info.run_id} cannot be resumed: it never logged its "
        "config.json (it stopped before training): start a new run"
    )


@pytest.mark.parametrize("started_by, resumed_by", [(train, conv3d), (conv3d, train)])
def test_a_run_of_the_other_script_is_refused_in_one_line_before_any_model(
    store, capsys, monkeypatch, started_by, resumed_by
):
    names = [{f.name for f in dataclasses.fields(s.Config)} for s in (started_by, resumed_by)]
    settings = ", ".join(f"--{n.replace('_', '-')}" for n in sorted(names[0] - names[1])[:3])
    script = f"{started_by.__name__}.py"
    tags = {"mlflow.source.name": f"/home/user/tp4/{script}"}
    run_id, _ = crafted_run("e", [], "KILLED", tags, script=started_by)
    for build in ("build_unet", "build_unet3d"):
        monkeypatch.setattr(unet, build, lambda *args, **kwargs: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        resumed_by.main(["--resume", run_id])
    assert exit_info.value.code == 2
    other = f"{resumed_by.__name__}.py"
    assert capsys.readouterr().err == (
        f"{other}: error: run {run_id} cannot be resumed: it is a run of {script}, not of "
        f"{other} (its settings {settings} are not {other}'s): resume it with "
        f"{cli.script(script)} --resume {run_id}\n"
    )
    assert store.get_run(run_id).info.status == "KILLED"
