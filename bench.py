"""Measured speed: how fast the networks train and infer here, and how far from the limit.

What this script teaches: a speed number means something only next to the machine's ceiling. A
convolution network is made of matrix multiplications, so the dense float32 matmul rate is the
roofline: FLOPs per image (counted from the layers) times images per second, divided by that rate,
is the fraction of the hardware used.

- FLOPs of a convolution: 2·k^d·C_in·C_out per output position (a multiply and an add per weight); a
  transposed convolution, per input position. Batch norm, ReLU, pooling and concatenation are not
  counted (memory-bound, few FLOPs). A training step is counted as 3x the forward pass: forward,
  gradient w.r.t. the activations, gradient w.r.t. the weights, each about one forward pass.
- Every timing is the median of repeats after a warm-up (tracing and allocation excluded); training
  steps are timed inside `fit` on the project's tf.data pipeline, as train.py runs them.
- train.py's overhead is its wall time over its own training steps, read from the epoch times it
  logs (the first epoch's at the median: its XLA compiles are overhead); next to it, over the same
  steps at the rate measured here, which also carries the machine's drift between the two
  measurements.

    python bench.py             # default U-Net, default Conv3D, end-to-end train.py
    python bench.py --quick     # CI-size shapes: seconds, checks that the benchmark still runs
"""

import os

# TensorFlow reads this once, when it loads: its INFO lines (CPU features, XLA) off, warnings kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time

import keras
import mlflow
import numpy as np
import tensorflow as tf

import cli
import data
import losses
import memory
import recipe
import unet

HERE = os.path.dirname(os.path.abspath(__file__))

FULL = dict(
    size=128,
    filters=32,
    depth=4,
    batch=8,
    volume=(32, 64, 64),
    filters3d=8,
    depth3d=3,
    batch3d=2,
    matmul=(1024, 2048, 4096),
    repeats=5,
    e2e_epochs=3,
    e2e_images=200,
)
QUICK = dict(
    size=32,
    filters=8,
    depth=3,
    batch=4,
    volume=(8, 16, 16),
    filters3d=4,
    depth3d=2,
    batch3d=2,
    matmul=(512,),
    repeats=2,
    e2e_epochs=1,
    e2e_images=24,
)


def median_seconds(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(sizes, repeats):
    """Dense float32 matmul rate: the ceiling a convolution network can reach on this machine. The
    best of TensorFlow's matmul and NumPy's BLAS over a few sizes, so that a slow library does not
    lower the ceiling."""
    best = {"tensorflow": 0.0, "numpy": 0.0}
    for n in sizes:
        a, b = np.random.default_rng(0).random((2, n, n), dtype=np.float32)
        products = {
            "tensorflow": functools.partial(tf.linalg.matmul, tf.constant(a), tf.constant(b)),
            "numpy": functools.partial(np.matmul, a, b),
        }
        for backend, product in products.items():
            seconds = median_seconds(lambda product=product: np.asarray(product()), repeats)
            best[backend] = max(best[backend], 2 * n**3 / seconds / 1e9)
    return best


def forward_flops(model):
    """Forward FLOPs per example, counted from the convolution layers (see the module docstring)."""
    convolutions = (
        keras.layers.Conv2D,
        keras.layers.Conv3D,
        keras.layers.Conv2DTranspose,
        keras.layers.Conv3DTranspose,
    )
    total = 0
    for layer in model.layers:
        if not isinstance(layer, convolutions):
            continue
        transposed = isinstance(layer, keras.layers.Conv2DTranspose | keras.layers.Conv3DTranspose)
        positions = np.prod((layer.input if transposed else layer.output).shape[1:-1])
        weights = np.prod(layer.kernel_size) * layer.input.shape[-1] * layer.filters
        total += 2 * int(positions) * int(weights)
    return total


class EpochTimer(keras.callbacks.Callback):
    """Seconds of each epoch of a fit."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def bench_model(model, batch, repeats, jit_compile=False, steps=8, steps_per_execution=1):
    """Median training-step and inference time; throughput and fraction of the roofline.

    Training is timed as train.py trains: `fit` on data.make_dataset, epochs of `steps` batches, the
    median epoch after the first (compilation), so a new epoch's iterator is included. Inference:
    predict_on_batch, one batch.
    """
    rng = np.random.default_rng(0)
    x = rng.random((batch * steps, *model.input_shape[1:]), dtype=np.float32)
    y = (x > 0.9).astype(np.float32)
    model.compile(
        keras.optimizers.Adam(1e-3),
        losses.BCEDiceLoss(),
        metrics=[losses.DiceMetric(), losses.IoUMetric()],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    timer = EpochTimer()
    model.fit(
        data.make_dataset(x, y, batch),
        epochs=1 + repeats,
        callbacks=[timer],
        shuffle=False,
        verbose=0,
    )
    train_s = statistics.median(timer.seconds[1:]) / steps
    infer_s = median_seconds(lambda: model.predict_on_batch(x[:batch]), repeats)
    flops = forward_flops(model)
    return {
        "params": model.count_params(),
        "batch": batch,
        "gflop_forward_per_example": flops / 1e9,
        "train_examples_per_s": batch / train_s,
        "infer_examples_per_s": batch / infer_s,
        "train_gflops": 3 * flops * batch / train_s / 1e9,
        "infer_gflops": flops * batch / infer_s / 1e9,
    }


def bench_end_to_end(epochs, n_images, quick):
    """`python train.py` with its defaults (fewer epochs), in a process of its own with a throw-away
    MLflow store: where the wall time goes. MLflow's share is the run's own `tracking_seconds`."""
    command = [
        sys.executable,
        os.path.join(HERE, "train.py"),
        "--epochs",
        str(epochs),
        "--n-images",
        str(n_images),
        "--patience",
        str(epochs),
        "--experiment",
        "bench",
    ]
    if quick:
        command += "--image-size 32 --base-filters 8 --depth 3 --batch-size 4".split()
    with tempfile.TemporaryDirectory() as store:
        uri = f"sqlite:///{store}/mlflow.db"
        start = time.perf_counter()
        subprocess.run(
            command, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, cwd=store, check=True
        )
        wall = time.perf_counter() - start
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
    settings = argparse.Namespace(batch_size=int(logged["batch_size"]), xla=logged["xla"] == "True")
    images = recipe.epoch_size(int(logged["data_split"].split("/")[0]), settings)[1]
    steps, validation, first_extra = split_epochs(
        history["epoch_seconds"], history["images_per_second"], images
    )
    return {
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
    the others' (the XLA compiles are overhead, not steps), and its extra is how much longer it took
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


# Each lever: extra bench.py arguments and environment, measured one at a time on the 2D U-Net
# (--levers).
LEVERS = {
    "defaults (XLA on, batch 8, oneDNN on)": ([], {}),
    "XLA off (Keras' default on a CPU)": (["--no-xla2d"], {}),
    "batch 4": (["--batch-size", "4"], {}),
    "batch 16": (["--batch-size", "16"], {}),
    "oneDNN off": ([], {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "oneDNN off, XLA off": (["--no-xla2d"], {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "1 inter-op thread": (["--inter-op-threads", "1"], {}),
    "4 steps per execution": (["--steps-per-execution", "4"], {}),
    "XLA: oneDNN for convolutions": ([], {"XLA_FLAGS": "--xla_cpu_use_onednn=true"}),
    "XLA: XNNPACK off": ([], {"XLA_FLAGS": "--xla_cpu_use_xnnpack=false"}),
    "XLA: fast math": ([], {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}),
    "bilinear up-sampling (more FLOPs)": (["--upsampling", "bilinear"], {}),
}


def measure_levers(quick):
    """Each lever in a fresh process (threads, oneDNN are set at start-up): 2D train, inference."""
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, (extra, env) in LEVERS.items():
            out = os.path.join(folder, "lever.json")
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--only",
                "unet2d",
                "--skip-end-to-end",
                "--no-peak-memory",
                "--output",
                out,
                *extra,
                *(["--quick"] if quick else []),
            ]
            subprocess.run(
                command, env={**os.environ, **env}, capture_output=True, text=True, check=True
            )
            with open(out) as f:
                measured = json.load(f)
            rows[label] = {
                "args": " ".join(extra + [f"{k}={v}" for k, v in env.items()]),
                **measured["unet2d"],
            }
            print(
                f"{label:<40}{rows[label]['train_examples_per_s']:>9.2f} img/s train"
                f"{rows[label]['infer_examples_per_s']:>9.2f} img/s inference",
                flush=True,
            )
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="CI-size shapes (seconds, not minutes)")
    add("--output", default="bench.json", help="where to write the measurements")
    add("--skip-end-to-end", action="store_true", help="skip the train.py run")
    add(
        "--e2e-epochs",
        type=int,
        help="epochs of the end-to-end train.py run [default: 3; train.py's own default is 30]",
    )
    add("--only", choices=("unet2d", "conv3d"), help="benchmark one model only")
    add(
        "--no-peak-memory",
        action="store_true",
        help="skip the subprocess measurement of peak memory",
    )
    add(
        "--levers",
        action="store_true",
        help="measure each speed lever in turn, each in a fresh process, and stop: "
        + "; ".join(LEVERS),
    )
    # Levers, to measure one change at a time against the defaults.
    add("--batch-size", type=int, help="2D batch size [default: train.py's, 8]")
    add(
        "--xla2d",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="XLA for the 2D U-Net (train.py's default: on)",
    )
    add(
        "--xla3d",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="XLA for the Conv3D model (conv3d.py's default: off)",
    )
    add(
        "--upsampling",
        choices=unet.UPSAMPLING,
        default="transpose",
        help="U-Net decoder up-sampling",
    )
    add("--steps-per-execution", type=int, default=1, help="training steps per compiled call")
    add("--inter-op-threads", type=int, help="TensorFlow inter-op threads [default: TensorFlow's]")
    add("--intra-op-threads", type=int, help="TensorFlow intra-op threads [default: TensorFlow's]")
    return parser.parse_args(argv)


def bench_models(c, args, matmul):
    """The 2D U-Net and the Conv3D model: a printed row each, with fractions of the ceilings."""
    peak, rows = max(matmul.values()), {}
    models = {
        "unet2d": (
            unet.build_unet(
                (c["size"], c["size"], 1), c["filters"], c["depth"], upsampling=args.upsampling
            ),
            c["batch"],
            args.xla2d,
        ),
        "conv3d": (
            unet.build_unet3d((*c["volume"], 1), c["filters3d"], c["depth3d"]),
            c["batch3d"],
            args.xla3d,
        ),
    }
    print(
        "\nfraction of the limit: achieved GFLOP/s over TensorFlow's matmul rate "
        "(and over the best matmul)"
    )
    print(
        f"{'model':<34}{'GFLOP/ex':>9}{'train ex/s':>11}{'of limit':>14}"
        f"{'infer ex/s':>11}{'of limit':>14}"
        f"{'peak RSS MB':>12}"
    )
    for name, (model, batch, xla) in models.items():
        if args.only and name != args.only:
            continue
        row = bench_model(
            model, batch, c["repeats"], xla, steps_per_execution=args.steps_per_execution
        )
        if not args.no_peak_memory:
            shape = unet.describe(model)
            spec = dict(
                shape=list(model.input_shape[1:-1]),
                filters=shape["base_filters"],
                depth=shape["depth"],
                kernel=shape["kernel_size"],
                batch=batch,
                policy="float32",
            )
            row.update(memory.measure_in_subprocess(spec))
        fractions = []
        for step in ("train", "infer"):
            row[f"{step}_of_tf_matmul"] = row[f"{step}_gflops"] / matmul["tensorflow"]
            row[f"{step}_of_best_matmul"] = row[f"{step}_gflops"] / peak
            fractions.append(
                f"{row[f'{step}_of_tf_matmul']:.0%} ({row[f'{step}_of_best_matmul']:.0%})"
            )
        shape = "x".join(map(str, model.input_shape[1:-1]))
        label = f"{name} {shape} batch {batch}{' XLA' if xla else ''}"
        print(
            f"{label:<34}{row['gflop_forward_per_example']:>9.2f}{row['train_examples_per_s']:>11.2f}"
            f"{fractions[0]:>14}{row['infer_examples_per_s']:>11.2f}{fractions[1]:>14}"
            f"{row.get('peak_rss_mb') or float('nan'):>12.0f}"
        )
        rows[name] = row
    return rows


def print_end_to_end(e2e):
    print(
        f"\ntrain.py defaults, {e2e['epochs']} epochs: wall {e2e['wall_seconds']:.1f} s = "
        f"{e2e['wall_over_run_steps']:.2f}x its own training steps "
        f"({e2e['run_steps_seconds']:.1f} s), {e2e['wall_over_train_steps']:.2f}x the same steps "
        f"at the rate above ({e2e['train_steps_seconds']:.1f} s)"
    )
    print(
        f"beyond the steps: validation {e2e['validation_seconds']:.1f} s, first epoch (compiles) "
        f"{e2e['first_epoch_extra_seconds']:.1f} s longer than the median epoch, MLflow "
        f"{e2e['mlflow_seconds']:.1f} s; fit {e2e['fit_seconds']:.1f} s (with validation)"
    )


def main(argv=None):
    args = parse_args(argv)
    cli.setup()
    if args.levers:
        with open(args.output, "w") as f:
            json.dump({"levers": measure_levers(args.quick)}, f, indent=2)
        return print(f"wrote {args.output}")
    c = dict(QUICK if args.quick else FULL)
    c["batch"] = args.batch_size or c["batch"]
    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    if args.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    tf.get_logger().setLevel(
        "ERROR"
    )  # several models in one process: retracing warnings are expected here
    keras.utils.set_random_seed(0)
    matmul = matmul_gflops(c["matmul"], c["repeats"])
    report = {"config": c, "matmul_gflops": matmul, "roofline_gflops": max(matmul.values())}
    print(
        f"dense float32 matmul, best of sizes {c['matmul']}: "
        f"TensorFlow {matmul['tensorflow']:.1f}, "
        f"NumPy {matmul['numpy']:.1f} GFLOP/s; roofline {report['roofline_gflops']:.1f} GFLOP/s"
    )
    report.update(bench_models(c, args, matmul))
    if not args.skip_end_to_end and "unet2d" in report:
        e2e = bench_end_to_end(args.e2e_epochs or c["e2e_epochs"], c["e2e_images"], args.quick)
        # The same steps at the benchmarked rate: every image of every epoch (the drift between the
        # two measurements included).
        e2e["train_steps_seconds"] = (
            e2e["epochs"] * e2e["train_images_per_epoch"] / report["unet2d"]["train_examples_per_s"]
        )
        e2e["wall_over_train_steps"] = e2e["wall_seconds"] / e2e["train_steps_seconds"]
        report["train_py"] = e2e
        print_end_to_end(e2e)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
