"""bench.py: FLOPs counted by hand, the cells the flags ask for, the paste into Markdown; the quick
benchmark runs end to end (timings unchecked)."""

import argparse
import json
import subprocess
import sys

import keras
import pytest

import tp4
import unet
from tools import bench, bench_runs
from tp4.perf import hardware, speed, throughput


def test_forward_flops_of_convolutions_by_hand():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)  # 16*16 outputs x 9*3*8 weights
    x = keras.layers.MaxPooling2D(2)(x)  # not counted
    x = keras.layers.Conv2DTranspose(4, 2, strides=2)(x)  # 8*8 inputs x 4*8*4 weights
    volume = keras.Input((4, 8, 8, 1))
    y = keras.layers.Conv3D(2, 3, padding="same")(volume)  # 4*8*8 outputs x 27*1*2 weights
    assert throughput.forward_flops(keras.Model(inputs, x)) == 2 * (
        16 * 16 * 9 * 3 * 8 + 8 * 8 * 4 * 8 * 4
    )
    assert throughput.forward_flops(keras.Model(volume, y)) == 2 * 4 * 8 * 8 * 27 * 2


def test_split_epochs_by_hand():
    # 4 epochs of 100 images: training took 25, 18, 19, 18 s (the first compiles), the rest of each
    # is validation.
    seconds, rates = [30, 20, 22, 21], [100 / 25, 100 / 18, 100 / 19, 100 / 18]
    steps, validation, first_extra = bench_runs.split_epochs(seconds, rates, 100)
    assert steps == pytest.approx(
        18 + 18 + 19 + 18
    )  # the first epoch's steps at the median of the others
    assert validation == pytest.approx(5 + 2 + 3 + 3)
    assert first_extra == pytest.approx(30 - 21)
    assert bench_runs.split_epochs([30], [4], 100) == pytest.approx(
        (25, 5, 0)
    )  # one epoch: nothing to compare with


def test_the_matrix_cells_follow_the_flags():
    auto = speed.Choice("bfloat16", False)

    def cells(precision, xla, supported=("float32", "bfloat16")):
        flags = argparse.Namespace(precision=precision, xla=xla)
        return [(c.precision, c.xla) for c in bench.cells_to_measure(flags, supported, auto)]

    assert cells("all", "all") == [
        ("float32", False),
        ("float32", True),
        ("bfloat16", False),
        ("bfloat16", True),
    ]
    assert cells("all", "all", ("float32",)) == [("float32", False), ("float32", True)]
    assert cells("auto", "auto") == [("bfloat16", False)]
    assert cells("float32", "on") == [("float32", True)]


def test_paste_replaces_the_marked_blocks_with_the_runs_printed_output(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text(json.dumps({"printed": "line 1\nline 2\n"}))
    (tmp_path / "b.json").write_text(json.dumps({"printed": "other"}))
    page = tmp_path / "PERFORMANCE.md"
    page.write_text(
        "# Title\n<!-- bench.py output: runs/a.json -->\nPASTE HERE\n<!-- end bench.py output -->\n"
        "text\n<!-- bench.py output: b.json -->\n```\nold\n```\n<!-- end bench.py output -->\n"
    )
    assert bench_runs.paste(str(page)) == (["runs/a.json", "b.json"], [])
    assert page.read_text() == (
        "# Title\n<!-- bench.py output: runs/a.json -->\n```\nline 1\nline 2\n```\n"
        "<!-- end bench.py output -->\ntext\n<!-- bench.py output: b.json -->\n```\nother\n```\n"
        "<!-- end bench.py output -->\n"
    )


def test_paste_keeps_the_blocks_of_runs_this_machine_does_not_have(tmp_path):
    (tmp_path / "here.json").write_text(json.dumps({"printed": "new"}))
    kept = "<!-- bench.py output: elsewhere.json -->\n```\nother machine\n```\n"
    kept += "<!-- end bench.py output -->\n"
    page = tmp_path / "PERFORMANCE.md"
    page.write_text(
        kept + "<!-- bench.py output: here.json -->\nold\n<!-- end bench.py output -->\n"
    )
    assert bench_runs.paste(str(page)) == (["here.json"], ["elsewhere.json"])
    assert page.read_text() == (
        kept + "<!-- bench.py output: here.json -->\n```\nnew\n```\n<!-- end bench.py output -->\n"
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--paste", "{tmp}/missing.md"],
            "[Errno 2] No such file or directory: '{tmp}/missing.md'",
        ),
        (["--output", "{tmp}"], "--output {tmp}: is a folder, not a file"),
        (["--output", "{tmp}/no/b.json"], "--output {tmp}/no/b.json: {tmp}/no is not a folder"),
    ],
)
def test_bad_paths_are_one_line_before_any_measuring(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([flag.format(tmp=tmp_path) for flag in flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"bench.py: error: {message.format(tmp=tmp_path)}")


@pytest.mark.slow
def test_quick_benchmark_writes_its_report(tmp_path, capsys, monkeypatch):
    # A fake probe picks float32 without XLA and caches it (the real probe: tests/test_speed.py):
    # the train.py run reads the same cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(
        speed,
        "measure_candidates",
        lambda candidates, *_: {c: 2.0 if c == ("float32", False) else 1.0 for c in candidates},
    )
    monkeypatch.setattr(hardware, "bfloat16_speedup", lambda: 1.0)  # bfloat16 not worth it
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--output", str(out)])
    report = json.loads(out.read_text())
    # train.py's lines reach the terminal only, its next steps (into the deleted store) nowhere.
    assert "temporary store, deleted now" in report["printed"]
    assert "val_loss" not in report["printed"] and "next:" not in report["printed"]
    supported = hardware.supported_precisions(hardware.machine())
    assert set(report["peak_gflops"]) == set(supported)
    assert (
        report["printed"].startswith("machine: ") and report["printed"] in capsys.readouterr().out
    )
    for model in ("unet2d", "conv3d"):
        cells = report[model]["cells"]
        assert [(c["precision"], c["xla"]) for c in cells] == [
            (p, x) for p in supported for x in (False, True)
        ]
        assert all(c["train_examples_per_s"] > 0 and c["infer_examples_per_s"] > 0 for c in cells)
        assert set(report[model]["auto"]) == {"train", "infer"}
        assert all(report[model]["peak_rss_mb"][p] > 0 for p in supported)
    e2e = report["train_py"]
    assert (
        e2e["wall_seconds"] >= e2e["fit_seconds"] > 0
        and 0 < e2e["mlflow_seconds"] < e2e["wall_seconds"]
    )
    assert (
        0 < e2e["validation_seconds"] < e2e["fit_seconds"] and e2e["first_epoch_extra_seconds"] == 0
    )  # 1 epoch
    assert 0 < e2e["run_steps_seconds"] < e2e["fit_seconds"]
    assert report["unet2d"]["auto"]["train"] == {"precision": "float32", "xla": False}
    assert (e2e["precision"], e2e["xla"]) == ("float32", False)


@pytest.mark.slow
def test_the_pytorch_unet_has_the_keras_unets_parameters_and_runs(tmp_path):
    torch = pytest.importorskip("torch")  # optional: not in requirements.txt
    bench_pytorch = pytest.importorskip("tools.bench_pytorch")
    model = bench_pytorch.UNet(8, 3)
    count = sum(p.numel() for p in model.parameters())
    count += sum(b.numel() for name, b in model.named_buffers() if name.endswith(("mean", "var")))
    assert count == unet.build_unet((32, 32, 1), 8, 3).count_params()
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    rates = bench_runs.pytorch(
        dict(size=32, filters=8, depth=3, batch=2, steps=1, repeats=1), ["float32"]
    )
    assert rates["rates"]["float32"]["train_examples_per_s"] > 0


def test_vs_pytorch_alternates_rounds_and_compares_medians_to_pytorchs_best_path(
    monkeypatch, capsys
):
    rounds = iter([(30.0, 40.0), (50.0, 60.0), (10.0, 20.0)])  # torch.compile's train, infer
    torch_paths = []

    def fake_pytorch(c, paths):
        torch_paths.append(paths)
        train, infer = next(rounds)
        rates = {path: {"train_examples_per_s": 1.0, "infer_examples_per_s": 1.0} for path in paths}
        rates["bfloat16-compiled"] = {"train_examples_per_s": train, "infer_examples_per_s": infer}
        return {"torch": "2.13.0", "rates": rates}

    keras_rates = iter([45.0, 33.0, 99.0])
    monkeypatch.setattr(bench_runs, "has_torch", lambda: True)
    monkeypatch.setattr(bench_runs, "pytorch", fake_pytorch)
    # Inference comes from predict.py's kind of process, not from the matrix's (1.0 here).
    monkeypatch.setattr(bench_runs, "predict_rate", lambda c, cell: 80.0)
    rate = lambda cell: {"train_examples_per_s": next(keras_rates), "infer_examples_per_s": 1.0}  # noqa: E731
    auto = {mode: {"precision": "bfloat16", "xla": False} for mode in ("train", "infer")}
    found = bench_runs.vs_pytorch({"batch": 8}, ("float32", "bfloat16"), auto, rate)
    assert torch_paths == [["float32", "bfloat16", "bfloat16-compiled"]] * 3
    assert found["rates"]["bfloat16-compiled"] == {
        "train_examples_per_s": 30.0,
        "infer_examples_per_s": 40.0,
    }
    assert found["ratios"] == {"train": 45.0 / 30.0, "infer": 80.0 / 40.0}  # medians
    out = capsys.readouterr().out
    assert "training: auto (bfloat16, XLA off) 45.00 ex/s = 1.50x PyTorch's best path" in out
    assert "inference (predict.py's process): auto (bfloat16, XLA off) 80.00 ex/s = 2.00x" in out


def test_bench_predict_times_inference_in_a_process_with_frozen_weights():
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench_predict", "--size", "32", "--filters", "8"]
        + ["--depth", "3", "--batch", "4", "--repeats", "2"],
        cwd=tp4.ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["infer_examples_per_s"] > 0 and found["TF_ONEDNN_ASSUME_FROZEN_WEIGHTS"] is True
