"""bench.py's measurements made in processes of their own: train.py end to end, each speed lever in
a fresh bench.py, the same U-Net in PyTorch (bench_pytorch.py); and the paste of bench.py's printed
output into a Markdown file.

What this module teaches: some settings only take effect when a process starts (threads, oneDNN,
XLA flags), peak memory is a high-water mark of a whole process, and an end-to-end run includes what
a benchmark leaves out (validation, compiles, MLflow): each gets a fresh process, and the numbers
come back through a JSON file or MLflow.
"""

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import mlflow

import tp4
from tp4.perf import speed
from tp4.training import recipe


def train_py(epochs: int, n_images: int, quick: bool) -> dict[str, float]:
    """`python train.py` with its defaults (fewer epochs), in a process of its own with a throw-away
    MLflow store: where the wall time goes. MLflow's share is the run's own `tracking_seconds`."""
    command = [sys.executable, os.path.join(tp4.ROOT, "train.py"), "--experiment", "bench"]
    command += f"--epochs {epochs} --n-images {n_images} --patience {epochs}".split()
    if quick:
        command += "--image-size 32 --base-filters 8 --depth 3 --batch-size 4".split()
    with tempfile.TemporaryDirectory() as store:
        uri = f"sqlite:///{store}/mlflow.db"
        start = time.perf_counter()
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        with subprocess.Popen(
            command, env=env, cwd=store, stdout=subprocess.PIPE, text=True
        ) as process:
            # Its lines as they come, to the terminal only (bench.json records bench.py's own), up
            # to the run's id and next steps: they point into this store, deleted below.
            shown = True
            for line in process.stdout:
                shown = shown and not line.startswith("run ")
                if shown:
                    sys.__stdout__.write(line)
                    sys.__stdout__.flush()
        wall = time.perf_counter() - start
        if process.returncode:
            raise subprocess.CalledProcessError(process.returncode, command)
        print("(train.py's lines above; its run was in a temporary store, deleted now)")
        client = mlflow.MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name("bench").experiment_id])[0]
        history = {
            key: [
                m.value
                for m in sorted(
                    client.get_metric_history(run.info.run_id, key), key=lambda m: m.step
                )
            ]
            for key in ("epoch_seconds", "images_per_second")
        }
    results, logged = run.data.metrics, run.data.params
    settings = argparse.Namespace(
        batch_size=int(logged["batch_size"]),
        xla=logged["xla"] == "True",
        replicas=int(logged.get("replicas", 1)),
    )
    images = recipe.epoch_size(int(logged["data_split"].split("/")[0]), settings)[1]
    steps, validation, first_extra = split_epochs(
        history["epoch_seconds"], history["images_per_second"], images
    )
    return {
        "precision": logged["precision"],
        "xla": settings.xla,
        "epochs": int(results["epochs_run"]),
        "train_images_per_epoch": images,
        "wall_seconds": wall,
        "fit_seconds": results["fit_seconds"],
        "mlflow_seconds": results["tracking_seconds"],
        "wall_over_fit": wall / results["fit_seconds"],
        "run_steps_seconds": steps,
        "wall_over_run_steps": wall / steps,
        "validation_seconds": validation,
        "first_epoch_extra_seconds": first_extra,
    }


def split_epochs(epoch_seconds, images_per_second, images):
    """(training steps, validation, first epoch's extra) seconds of a train.py run, from its logged
    epoch metrics.

    EpochLogger's images/s counts the training part of an epoch only: it took images / rate, and the
    rest of the epoch is validation. The first epoch also compiles: its steps count at the median of
    the others' (the compiles are overhead, not steps), and its extra is how much longer it took
    than the median epoch.
    """
    training = [images / rate for rate in images_per_second]
    steps = statistics.median(training[1:] or training) + sum(training[1:])
    validation = sum(total - part for total, part in zip(epoch_seconds, training))
    return (
        steps,
        validation,
        epoch_seconds[0] - statistics.median(epoch_seconds[1:] or epoch_seconds),
    )


# Each lever: extra bench.py arguments and environment, measured one at a time on the 2D U-Net at
# the precision and XLA setting `auto` picks for training (bench.py --levers). Precision and XLA
# themselves are the matrix of a plain bench.py.
LEVERS = {
    "defaults (auto's cell, batch 8, fused batch norm)": ([], {}),
    "Keras' BatchNormalization": (["--batch-norm", "keras"], {}),
    "batch 4": (["--batch-size", "4"], {}),
    "batch 16": (["--batch-size", "16"], {}),
    "oneDNN off": ([], {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "1 inter-op thread": (["--inter-op-threads", "1"], {}),
    "4 steps per execution": (["--steps-per-execution", "4"], {}),
    "bilinear up-sampling (more FLOPs)": (["--upsampling", "bilinear"], {}),
}


def levers(quick: bool) -> dict[str, dict]:
    """Each lever in a fresh bench.py (threads and oneDNN are set at start-up): training and
    inference images/s of the 2D U-Net, all in the cell `auto` picks for the defaults."""
    rows, cell = {}, ["--precision", "auto", "--xla", "auto"]
    with tempfile.TemporaryDirectory() as folder:
        for label, (extra, env) in LEVERS.items():
            out = os.path.join(folder, "lever.json")
            command = [sys.executable, "-m", "tools.bench", "--output", out, *cell]
            command += ["--only", "unet2d", "--skip-end-to-end", "--no-peak-memory", *extra]
            command += ["--quick"] if quick else []
            subprocess.run(
                command,
                env={**os.environ, **env},
                cwd=tp4.ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            with open(out) as f:
                (measured,) = json.load(f)["unet2d"]["cells"]
            # One change at a time: the other levers in the defaults' cell, whatever auto would
            # pick for them.
            cell = [
                "--precision",
                measured["precision"],
                "--xla",
                "on" if measured["xla"] else "off",
            ]
            rows[label] = {
                "args": " ".join(extra + [f"{k}={v}" for k, v in env.items()]),
                **measured,
            }
            print(
                f"{label:<50}{cell[1]:>9} {cell[3]:>3} XLA"
                f"{measured['train_examples_per_s']:>9.2f} img/s train"
                f"{measured['infer_examples_per_s']:>9.2f} img/s inference",
                flush=True,
            )
    return rows


def has_torch() -> bool:
    """Whether PyTorch is installed (optional: comparisons only)."""
    return importlib.util.find_spec("torch") is not None


def pytorch(c: dict, precisions: list[str]) -> dict:
    """The same U-Net in PyTorch (bench_pytorch.py, in a process of its own) at bench.py's 2D shape,
    on each of its `precisions` paths (bench_pytorch.PATHS)."""
    command = [sys.executable, "-m", "tools.bench_pytorch", "--precisions", *precisions]
    command += f"--size {c['size']} --filters {c['filters']} --depth {c['depth']}".split()
    command += f"--batch {c['batch']} --steps {c['steps']} --repeats {c['repeats']}".split()
    done = subprocess.run(command, cwd=tp4.ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict_rate(c: dict, cell: speed.Choice) -> float:
    """Inference examples/s of the U-Net as predict.py runs it (bench_predict.py, in a process of
    its own: weights frozen, which the matrix's process, training too, cannot have)."""
    command = [sys.executable, "-m", "tools.bench_predict", "--precision", cell.precision]
    command += ["--xla", "on" if cell.xla else "off"]
    command += f"--size {c['size']} --filters {c['filters']} --depth {c['depth']}".split()
    command += f"--batch {c['batch']} --repeats {c['repeats']}".split()
    done = subprocess.run(command, cwd=tp4.ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["infer_examples_per_s"]


# --vs-pytorch: Keras' auto cells and PyTorch's paths measured in turns, this many rounds; the
# median round counts (a change of the machine's load hits both sides alike).
ROUNDS = 3
PYTORCH_PATHS = {
    "float32": "float32",
    "float32-compiled": "float32, torch.compile",
    "bfloat16": "bf16 autocast",
    "bfloat16-compiled": "bf16 autocast, torch.compile",
}


def vs_pytorch(c, supported, auto, measure_cell):
    """PyTorch's rates at bench.py's 2D shape (eager and torch.compile, bf16 autocast where the CPU
    has it), and train.py's and predict.py's defaults against its best path: training (in this
    process, as the matrix) and inference (predict_rate: predict.py's process), the median of
    ROUNDS rounds alternated with Keras.

    Args:
        c: bench.py's sizes.
        supported: the precisions of this machine.
        auto: the auto cells, {"train": ..., "infer": ...} as Choice dicts.
        measure_cell: a Choice -> bench.py's row of that cell (its train examples/s count).
    """
    if not has_torch():
        print("\n--vs-pytorch: torch is not installed here (pip install torch): skipped")
        return None
    paths = ["float32", "float32-compiled"]
    if "bfloat16" in supported:
        paths = ["float32", "bfloat16", "bfloat16-compiled"]
    auto = {mode: speed.Choice(**auto[mode]) for mode in ("train", "infer")}
    theirs, ours = [], []
    for _ in range(ROUNDS):
        found = pytorch(c, paths)
        theirs.append(found["rates"])
        ours.append(
            {
                "train": measure_cell(auto["train"])["train_examples_per_s"],
                "infer": predict_rate(c, auto["infer"]),
            }
        )
    print(
        f"\nthe same U-Net in PyTorch {found['torch']} (channels_last), batch {c['batch']}, "
        f"median of {ROUNDS} rounds alternated with Keras"
    )
    medians = {
        path: {key: statistics.median(r[path][key] for r in theirs) for key in theirs[0][path]}
        for path in paths
    }
    for path, rates in medians.items():
        print(
            f"{PYTORCH_PATHS[path]:<30}{rates['train_examples_per_s']:>10.2f} train ex/s"
            f"{rates['infer_examples_per_s']:>10.2f} infer ex/s"
        )
    ratios = {}
    for mode, label in (("train", "training"), ("infer", "inference (predict.py's process)")):
        key = f"{mode}_examples_per_s"
        best = max(paths, key=lambda path: medians[path][key])
        mine = statistics.median(r[mode] for r in ours)
        ratios[mode] = mine / medians[best][key]
        print(
            f"{label}: auto ({auto[mode].label}) {mine:.2f} ex/s = {ratios[mode]:.2f}x PyTorch's "
            f"best path ({PYTORCH_PATHS[best]}, {medians[best][key]:.2f})"
        )
    return {"torch": found["torch"], "rates": medians, "keras_auto": ours, "ratios": ratios}


# A pasted block: `<!-- bench.py output: FILE -->`, the output of the run that wrote FILE (a
# bench.json, relative to the Markdown file), `<!-- end bench.py output -->`.
_PASTE = re.compile(r"(<!-- bench\.py output: (\S+) -->\n).*?(<!-- end bench\.py output -->)", re.S)


def paste(markdown: str) -> tuple[list[str], list[str]]:
    """Replace each marked block of `markdown` by the printed output stored in the bench.json it
    names; a block whose file is not on this machine (another machine's run) is kept as it is.

    Returns:
        The files pasted, and the files absent (their blocks kept).
    """
    with open(markdown) as f:
        text = f.read()
    pasted, absent = [], []

    def block(match):
        path = os.path.join(os.path.dirname(os.path.abspath(markdown)), match.group(2))
        if not os.path.exists(path):
            absent.append(match.group(2))
            return match.group(0)
        with open(path) as f:
            printed = json.load(f)["printed"]
        pasted.append(match.group(2))
        return f"{match.group(1)}```\n{printed.rstrip()}\n```\n{match.group(3)}"

    text = _PASTE.sub(block, text)
    with open(markdown, "w") as f:
        f.write(text)
    return pasted, absent
