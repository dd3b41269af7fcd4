"""Measured speed: how fast the networks train and infer on this machine, and how far from its limit.

What this script teaches: a speed number means something only next to the machine's ceiling. A convolution
network is made of matrix multiplications, so the dense float32 matmul rate is the roofline: FLOPs per image
(counted from the layers) times images per second, divided by that rate, is the fraction of the hardware used.

- FLOPs of a convolution: 2·k^d·C_in·C_out per output position (a multiply and an add per weight); a transposed
  convolution, per input position. Batch norm, ReLU, pooling and concatenation are not counted (memory-bound,
  few FLOPs). A training step is counted as 3x the forward pass: forward, gradient w.r.t. the activations,
  gradient w.r.t. the weights, each about one forward pass.
- Every timing is the median of repeats after a warm-up (tracing and allocation excluded); training steps are
  timed inside `fit` on the project's tf.data pipeline, as train.py runs them.
- train.py's overhead is its wall time over its own training steps, read from the epoch times it logs (the first
  epoch's at the median: its XLA compiles are overhead); next to it, over the same steps at the rate measured here,
  which also carries the machine's drift between the two measurements.

    python bench.py             # default U-Net (128x128, batch 8), default Conv3D, end-to-end train.py
    python bench.py --quick     # CI-size shapes: seconds, checks that the benchmark still runs
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import conv3d
import data
import memory
import metrics
import unet

FULL = dict(size=128, filters=32, depth=4, batch=8, volume=(32, 64, 64), filters3d=8, depth3d=3, batch3d=2,
            matmul=(1024, 2048, 4096), repeats=5, e2e_epochs=3, e2e_images=200)
QUICK = dict(size=32, filters=8, depth=3, batch=4, volume=(8, 16, 16), filters3d=4, depth3d=2, batch3d=2,
             matmul=(512,), repeats=2, e2e_epochs=1, e2e_images=24)


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
    """Dense float32 matmul rate: the ceiling a convolution network can reach on this machine. The best of
    TensorFlow's matmul and NumPy's BLAS over a few sizes, so that a slow library does not lower the ceiling."""
    import tensorflow as tf

    best = {"tensorflow": 0.0, "numpy": 0.0}
    for n in sizes:
        a, b = np.random.default_rng(0).random((2, n, n), dtype=np.float32)
        ta, tb = tf.constant(a), tf.constant(b)
        for backend, fn in (("tensorflow", lambda: tf.linalg.matmul(ta, tb).numpy()), ("numpy", lambda: a @ b)):
            best[backend] = max(best[backend], 2 * n**3 / median_seconds(fn, repeats) / 1e9)
    return best


def forward_flops(model):
    """Forward FLOPs per example, counted from the convolution layers (see the module docstring)."""
    convolutions = (keras.layers.Conv2D, keras.layers.Conv3D,
                    keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
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

    Training is timed as train.py trains: `fit` on data.make_dataset, epochs of `steps` batches, the median epoch
    after the first (compilation), so a new epoch's iterator is included. Inference: predict_on_batch, one batch.
    """
    rng = np.random.default_rng(0)
    x = rng.random((batch * steps, *model.input_shape[1:]), dtype=np.float32)
    y = (x > 0.9).astype(np.float32)
    model.compile(keras.optimizers.Adam(1e-3), metrics.BCEDiceLoss(),
                  metrics=[metrics.DiceMetric(), metrics.IoUMetric()], jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)
    timer = EpochTimer()
    model.fit(data.make_dataset(x, y, batch), epochs=1 + repeats, callbacks=[timer], shuffle=False, verbose=0)
    train_s = statistics.median(timer.seconds[1:]) / steps
    infer_s = median_seconds(lambda: model.predict_on_batch(x[:batch]), repeats)
    flops = forward_flops(model)
    return {"params": model.count_params(), "batch": batch, "gflop_forward_per_example": flops / 1e9,
            "train_examples_per_s": batch / train_s, "infer_examples_per_s": batch / infer_s,
            "train_gflops": 3 * flops * batch / train_s / 1e9, "infer_gflops": flops * batch / infer_s / 1e9}


def bench_end_to_end(epochs, n_images, quick):
    """train.py with its defaults (fewer epochs) into a throw-away MLflow store: where the wall time goes."""
    import mlflow

    import tracking
    import train

    argv = ["--epochs", str(epochs), "--n-images", str(n_images), "--patience", str(epochs), "--experiment", "bench"]
    if quick:
        argv += ["--image-size", "32", "--base-filters", "8", "--depth", "3", "--batch-size", "4"]
    spent = {"mlflow": 0.0}

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["mlflow"] += time.perf_counter() - start
        return wrapper

    with tempfile.TemporaryDirectory() as store:
        mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
        originals = {name: getattr(tracking.mlflow, name) for name in ("log_metrics", "log_params", "set_experiment")}
        originals_results = tracking.log_results
        try:
            for name, fn in originals.items():
                setattr(tracking.mlflow, name, timed(fn))
            tracking.log_results = timed(originals_results)
            start = time.perf_counter()
            args = train.parse_args(argv)[0]
            results, _ = train.train(args)
            wall = time.perf_counter() - start
            epochs = _epoch_metrics(mlflow.MlflowClient(), "bench", ("epoch_seconds", "images_per_second"))
        finally:
            for name, fn in originals.items():
                setattr(tracking.mlflow, name, fn)
            tracking.log_results = originals_results
            mlflow.set_tracking_uri(None)
    n_train = len(data.split(np.arange(n_images), np.arange(n_images))["train"][0])
    images = train.epoch_size(n_train, args)[1]
    steps, validation, first_extra = split_epochs(epochs["epoch_seconds"], epochs["images_per_second"], images)
    return {"epochs": results["epochs_run"], "train_images_per_epoch": images,
            "wall_seconds": wall, "fit_seconds": results["fit_seconds"], "mlflow_seconds": spent["mlflow"],
            "wall_over_fit": wall / results["fit_seconds"], "run_steps_seconds": steps,
            "wall_over_run_steps": wall / steps, "validation_seconds": validation,
            "first_epoch_extra_seconds": first_extra}


def split_epochs(epoch_seconds, images_per_second, images):
    """(training steps, validation, first epoch's extra) seconds of a train.py run, from its logged epoch metrics.

    EpochLogger's images/s counts the training part of an epoch only: it took images / rate, and the rest of the
    epoch is validation. The first epoch also compiles: its steps count at the median of the others' (the XLA
    compiles are overhead, not steps), and its extra is how much longer it took than the median epoch.
    """
    training = [images / rate for rate in images_per_second]
    steps = statistics.median(training[1:] or training) + sum(training[1:])
    validation = sum(total - part for total, part in zip(epoch_seconds, training))
    return steps, validation, epoch_seconds[0] - statistics.median(epoch_seconds[1:] or epoch_seconds)


def _epoch_metrics(client, experiment, keys):
    """{key: values by epoch} of the only run of an experiment."""
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]
    return {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
            for key in keys}


# Each lever: extra bench.py arguments and environment, measured one at a time on the 2D U-Net (--levers).
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
    """Every lever in a fresh process (threads and oneDNN are fixed at start-up): 2D training and inference."""
    import subprocess

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, (extra, env) in LEVERS.items():
            out = os.path.join(folder, "lever.json")
            command = [sys.executable, os.path.abspath(__file__), "--only", "unet2d", "--skip-end-to-end",
                       "--no-peak-memory", "--output", out, *extra, *(["--quick"] if quick else [])]
            subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True)
            with open(out) as f:
                measured = json.load(f)
            rows[label] = {"args": " ".join(extra + [f"{k}={v}" for k, v in env.items()]), **measured["unet2d"]}
            print(f"{label:<40}{rows[label]['train_examples_per_s']:>9.2f} img/s train"
                  f"{rows[label]['infer_examples_per_s']:>9.2f} img/s inference", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-size shapes (seconds, not minutes)")
    parser.add_argument("--output", default="bench.json", help="where to write the measurements")
    parser.add_argument("--skip-end-to-end", action="store_true", help="skip the train.py run")
    parser.add_argument("--e2e-epochs", type=int, help="epochs of the end-to-end train.py run (default 3; 30 is "
                        "train.py's own default, about 10 minutes)")
    parser.add_argument("--only", choices=("unet2d", "conv3d"), help="benchmark one model only")
    parser.add_argument("--no-peak-memory", action="store_true", help="skip the subprocess memory measurement")
    parser.add_argument("--levers", action="store_true", help="measure each speed lever (LEVERS) in turn and stop")
    # Levers, to measure one change at a time against the defaults.
    parser.add_argument("--batch-size", type=int, help="2D batch size (default: train.py's, 8)")
    parser.add_argument("--xla2d", action=argparse.BooleanOptionalAction, default=True,
                        help="XLA for the 2D U-Net (train.py's default: on)")
    parser.add_argument("--xla3d", action=argparse.BooleanOptionalAction, default=False,
                        help="XLA for the Conv3D model (conv3d.py's default: off)")
    parser.add_argument("--upsampling", choices=unet.UPSAMPLING, default="transpose", help="U-Net decoder up-sampling")
    parser.add_argument("--steps-per-execution", type=int, default=1, help="training steps per compiled call")
    parser.add_argument("--inter-op-threads", type=int, help="TensorFlow inter-op threads (default: TF's)")
    parser.add_argument("--intra-op-threads", type=int, help="TensorFlow intra-op threads (default: TF's)")
    args = parser.parse_args(argv)
    if args.levers:
        rows = measure_levers(args.quick)
        with open(args.output, "w") as f:
            json.dump({"levers": rows}, f, indent=2)
        return print(f"wrote {args.output}")
    c = dict(QUICK if args.quick else FULL)
    c["batch"] = args.batch_size or c["batch"]
    import tensorflow as tf

    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    if args.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    tf.get_logger().setLevel("ERROR")  # several models in one process: retracing warnings are expected here
    keras.utils.set_random_seed(0)
    matmul = matmul_gflops(c["matmul"], c["repeats"])
    peak = max(matmul.values())
    report = {"config": c, "matmul_gflops": matmul, "roofline_gflops": peak}
    print(f"dense float32 matmul, best of sizes {c['matmul']}: TensorFlow {matmul['tensorflow']:.1f}, "
          f"NumPy {matmul['numpy']:.1f} GFLOP/s; roofline {peak:.1f} GFLOP/s")

    unet2d = unet.build_unet((c["size"], c["size"], 1), c["filters"], c["depth"], upsampling=args.upsampling)
    unet3d = conv3d.build_unet3d((*c["volume"], 1), c["filters3d"], c["depth3d"])
    tf_peak = matmul["tensorflow"]
    print("\nfraction of the limit: achieved GFLOP/s over TensorFlow's matmul rate (and over the best matmul)")
    print(f"{'model':<34}{'GFLOP/ex':>9}{'train ex/s':>11}{'of limit':>14}{'infer ex/s':>11}{'of limit':>14}"
          f"{'peak RSS MB':>12}")
    for name, model, batch, spec_shape, xla in (
            ("unet2d", unet2d, c["batch"], [c["size"], c["size"]], args.xla2d),
            ("conv3d", unet3d, c["batch3d"], list(c["volume"]), args.xla3d)):
        if args.only and name != args.only:
            continue
        row = bench_model(model, batch, c["repeats"], xla, steps_per_execution=args.steps_per_execution)
        spec = dict(shape=spec_shape, filters=model.get_layer("enc1_conv1").filters, kernel=3, batch=batch,
                    depth=sum(1 for layer in model.layers if layer.name.endswith("_pool")) + 1, policy="float32")
        if not args.no_peak_memory:
            row.update(memory.measure_in_subprocess(spec))
        report[name] = row
        label = f"{name} {'x'.join(map(str, model.input_shape[1:-1]))} batch {batch}{' XLA' if xla else ''}"
        fractions = []
        for step in ("train", "infer"):
            row[f"{step}_of_tf_matmul"] = row[f"{step}_gflops"] / tf_peak
            row[f"{step}_of_best_matmul"] = row[f"{step}_gflops"] / peak
            fractions.append(f"{row[f'{step}_of_tf_matmul']:.0%} ({row[f'{step}_of_best_matmul']:.0%})")
        print(f"{label:<34}{row['gflop_forward_per_example']:>9.2f}{row['train_examples_per_s']:>11.2f}"
              f"{fractions[0]:>14}{row['infer_examples_per_s']:>11.2f}{fractions[1]:>14}"
              f"{row.get('peak_rss_mb') or float('nan'):>12.0f}")

    if not args.skip_end_to_end and "unet2d" in report:
        e2e = bench_end_to_end(args.e2e_epochs or c["e2e_epochs"], c["e2e_images"], args.quick)
        # The same steps at the benchmarked training rate: every image of every epoch (the drift between the two
        # measurements included).
        e2e["train_steps_seconds"] = (e2e["epochs"] * e2e["train_images_per_epoch"]
                                      / report["unet2d"]["train_examples_per_s"])
        e2e["wall_over_train_steps"] = e2e["wall_seconds"] / e2e["train_steps_seconds"]
        report["train_py"] = e2e
        print(f"\ntrain.py defaults, {e2e['epochs']} epochs: wall {e2e['wall_seconds']:.1f} s = "
              f"{e2e['wall_over_run_steps']:.2f}x its own training steps ({e2e['run_steps_seconds']:.1f} s), "
              f"{e2e['wall_over_train_steps']:.2f}x the same steps at the rate above "
              f"({e2e['train_steps_seconds']:.1f} s)")
        print(f"beyond the steps: validation {e2e['validation_seconds']:.1f} s, first epoch (XLA compiles) "
              f"{e2e['first_epoch_extra_seconds']:.1f} s longer than the median epoch, MLflow "
              f"{e2e['mlflow_seconds']:.1f} s; fit {e2e['fit_seconds']:.1f} s (with validation)")
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
