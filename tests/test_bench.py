"""bench.py: FLOPs counted by hand; the quick benchmark runs end to end (timings unchecked)."""

import json

import keras
import pytest

import bench


def test_forward_flops_of_convolutions_by_hand():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)  # 16*16 outputs x 9*3*8 weights
    x = keras.layers.MaxPooling2D(2)(x)  # not counted
    x = keras.layers.Conv2DTranspose(4, 2, strides=2)(x)  # 8*8 inputs x 4*8*4 weights
    volume = keras.Input((4, 8, 8, 1))
    y = keras.layers.Conv3D(2, 3, padding="same")(volume)  # 4*8*8 outputs x 27*1*2 weights
    assert bench.forward_flops(keras.Model(inputs, x)) == 2 * (
        16 * 16 * 9 * 3 * 8 + 8 * 8 * 4 * 8 * 4
    )
    assert bench.forward_flops(keras.Model(volume, y)) == 2 * 4 * 8 * 8 * 27 * 2


def test_split_epochs_by_hand():
    # 4 epochs of 100 images: training took 25, 18, 19, 18 s (the first compiles), the rest of each
    # is validation.
    seconds, rates = [30, 20, 22, 21], [100 / 25, 100 / 18, 100 / 19, 100 / 18]
    steps, validation, first_extra = bench.split_epochs(seconds, rates, 100)
    assert steps == pytest.approx(
        18 + 18 + 19 + 18
    )  # the first epoch's steps at the median of the others
    assert validation == pytest.approx(5 + 2 + 3 + 3)
    assert first_extra == pytest.approx(30 - 21)
    assert bench.split_epochs([30], [4], 100) == pytest.approx(
        (25, 5, 0)
    )  # one epoch: nothing to compare with


@pytest.mark.slow
def test_quick_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--output", str(out)])
    report = json.loads(out.read_text())
    assert report["roofline_gflops"] == max(report["matmul_gflops"].values()) > 0
    for model in ("unet2d", "conv3d"):
        assert (
            report[model]["train_examples_per_s"] > 0 and report[model]["infer_examples_per_s"] > 0
        )
        assert report[model]["peak_rss_mb"] > 0
    e2e = report["train_py"]
    assert (
        e2e["wall_seconds"] >= e2e["fit_seconds"] > 0
        and 0 < e2e["mlflow_seconds"] < e2e["wall_seconds"]
    )
    assert (
        0 < e2e["validation_seconds"] < e2e["fit_seconds"] and e2e["first_epoch_extra_seconds"] == 0
    )  # 1 epoch
    assert 0 < e2e["run_steps_seconds"] < e2e["fit_seconds"]
