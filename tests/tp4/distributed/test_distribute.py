"""--strategy: 2 replicas take the step of one device; mirrored runs tracked; the flags checked.

The runs with 2 logical CPU devices are processes of their own: TensorFlow splits the CPU before it
starts its devices, which this test process has long done. Multi-worker: tests/test_multiworker.py.
"""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import REPO

import conv3d
import data
import train
from tp4.distributed import distribute, keras_multiworker, multiworker
from tp4.training import checkpoint, recipe


def _in_process(script, *argv):
    """A Python script of the checkout run in a process of its own; its standard output."""
    done = subprocess.run(
        [sys.executable, str(script), *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_two_replicas_take_the_step_of_one_device():
    report = json.loads(_in_process(REPO / "tests" / "tp4" / "distributed" / "replica_step.py"))
    assert report["replicas"] == 2
    for case in ("bce_dice synchronized", "generalized_dice synchronized"):
        one, two = report[case]["one"], report[case]["two"]
        # Before losses.py's reduction: loss 3.09 vs 1.54, weights 0.03 apart.
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-5), case
        assert report[case]["weights"] < 1e-5 < 1e-2 < report[case]["moved"], case
        # Validation over every example (the last batch partial): the counts of both replicas.
        for key in ("val_loss", "val_dice", "val_iou", "dice", "iou"):
            assert two[key] == pytest.approx(one[key], abs=1e-5), (case, key)
        assert one["val_dice"] == pytest.approx(report[case]["val_dice"], abs=1e-6)
        assert one["val_iou"] == pytest.approx(report[case]["val_iou"], abs=1e-6)
        assert 0.1 < one["val_dice"] < 0.9  # neither all nor nothing predicted: a real check
        assert report[case]["predict"] < 1e-5
    # Keras' batch norm unsynchronized: each replica normalizes by its own half-batch's statistics.
    assert report["bce_dice keras"]["weights"] > 1e-3


@pytest.mark.slow
def test_a_mirrored_run_of_train_py_is_tracked_with_its_replicas(store):
    argv = (
        "--n-images 40 --image-size 32 --base-filters 8 --depth 3 --epochs 4 --batch-size 4 "
        "--patience 5 --foreground 0.1 --noise 0.02 --lr 1e-2 --seed 1 --experiment mirrored "
        "--precision float32 --strategy mirrored --devices 2"
    ).split()
    output = _in_process(REPO / "train.py", *argv)
    assert "mirrored on 2 replicas, global batch 8" in output
    (run,) = store.search_runs([store.get_experiment_by_name("mirrored").experiment_id])
    assert run.info.status == "FINISHED"
    expected = {"strategy": "mirrored", "replicas": "2", "batch_norm": "synchronized"}
    expected.update(batch_size="4", global_batch_size="8", xla="False")
    assert {key: run.data.params[key] for key in expected} == expected
    loss = [m.value for m in store.get_metric_history(run.info.run_id, "loss")]
    assert len(loss) == 4 and loss[-1] < loss[0] - 0.1  # it learned
    # 28 training images in global batches of 8: 3 full batches, 24 images an epoch.
    assert store.get_metric_history(run.info.run_id, "images_per_second")
    assert "model_uri" in run.data.tags


def _argv(*flags):
    return ["--strategy", *flags]


@pytest.mark.parametrize(
    "script, argv, message",
    [
        (train, ["--devices", "2"], "--devices N (N >= 1) goes with --strategy mirrored"),
        (train, _argv("mirrored", "--devices", "0"), "--devices N (N >= 1)"),
        (train, _argv("mirrored", "--xla", "on"), "--xla on: XLA cannot compile"),
        (conv3d, _argv("multiworker", "--slice-xla", "on"), "--slice-xla on: XLA cannot"),
    ],
)
def test_what_a_strategy_cannot_take_is_refused(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


CLUSTER = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


@pytest.mark.parametrize(
    "cluster, task, chief",
    [
        (CLUSTER, {"type": "worker", "index": 0}, True),
        (CLUSTER, {"type": "worker", "index": 1}, False),
        ({**CLUSTER, "chief": ["127.0.0.1:3"]}, {"type": "worker", "index": 0}, False),
        ({**CLUSTER, "chief": ["127.0.0.1:3"]}, {"type": "chief", "index": 0}, True),
    ],
)
def test_the_chief_is_tensorflows(cluster, task, chief, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert multiworker.is_chief(train.parse_args(_argv("multiworker"))) is chief
    assert multiworker.is_chief(train.parse_args([]))  # without a strategy, always


@pytest.mark.parametrize(
    "tf_config, message",
    [
        (None, "takes its workers from TF_CONFIG, which is not set"),
        ("{not json", "TF_CONFIG is not a cluster and a task"),
        (json.dumps({"cluster": CLUSTER}), "TF_CONFIG is not a cluster and a task"),
        (
            json.dumps({"cluster": CLUSTER, "task": {"type": "worker", "index": 2}}),
            "task worker 2 is not a worker of its cluster",
        ),
    ],
)
def test_a_wrong_tf_config_is_one_clear_error(tf_config, message, monkeypatch, store, capsys):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(SystemExit) as exit_info:
        train.main(_argv("multiworker"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_epochs_are_made_of_full_global_batches():
    args = train.parse_args(["--batch-size", "8", "--precision", "float32", "--xla", "off"])
    one = recipe.choose_speed(args, None)  # no strategy: 1 replica
    assert one.replicas == 1 and recipe.epoch_size(140, one) == (18, 140)
    two = dataclasses.replace(one, replicas=2)
    assert distribute.global_batch(two) == 16
    assert recipe.epoch_size(140, two) == (8, 128)  # 140 = 8 x 16 + 12
    with pytest.raises(ValueError, match="--batch-size 8 x 2 replicas is larger than the 15"):
        recipe.epoch_size(15, two)
    assert distribute.params(two) == {"strategy": "none", "replicas": 2, "global_batch_size": 16}


def test_a_resumed_run_keeps_its_number_of_replicas():
    args = dataclasses.replace(train.parse_args([]), resume="abc", replicas=2)
    with pytest.raises(ValueError, match="run abc trained on 2 replicas and would continue on 1"):
        distribute.with_replicas(args)


def test_the_training_set_is_shared_out_by_examples():
    images = np.zeros((4, 8, 8, 1), "float32")
    dataset = data.make_dataset(images, images, 2, training=True)
    assert (
        dataset.options().experimental_distribute.auto_shard_policy
        == tf.data.experimental.AutoShardPolicy.DATA
    )


def test_without_a_multi_worker_strategy_the_chiefs_value_is_computed_here():
    assert multiworker.from_chief(tf.distribute.get_strategy(), lambda: [1, "a"]) == [1, "a"]


def test_a_follower_keeps_its_checkpoint_in_memory_and_reads_the_chiefs(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)
    chief, follower = (
        checkpoint.Checkpoint(str(tmp_path / "run"), []),
        checkpoint.Checkpoint(None, []),
    )
    for saved in (chief, follower):
        saved.set_model(model)
        saved.on_train_begin()
        saved.save(1, {"loss": 0.5})
    assert (
        os.listdir(tmp_path) == ["run"] and follower.epoch == 1
    )  # nothing written by the follower
    follower.remove()  # nothing to remove
    reader = checkpoint.Checkpoint(None, [])
    with open(chief.path, "rb") as file:
        reader.load(file.read())
    assert reader.history == [{"loss": 0.5}] and reader.epoch == 1
    for name, array in chief.arrays.items():
        np.testing.assert_array_equal(reader.arrays[name], array)


def test_the_keras_patch_is_for_the_versions_that_need_it():
    assert keras_multiworker.needed("3.15.1") and keras_multiworker.needed("3.10.0")
    assert not keras_multiworker.needed("3.16.0") and not keras_multiworker.needed("2.15.0")
