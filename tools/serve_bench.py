"""Inference speed three ways: the Keras model called directly, predict.py's path, and the server.

What this script teaches: what a request costs beyond the network. The same U-Net (the main job's:
128x128, 32 filters, depth 4, float32; its weights do not change its speed) is timed
- called directly: `model.predict` on batches already at the network's size, the floor;
- on predict.py's path (tp4/inference/segment.py: read the file, normalize, fit to the network,
  predict, undo the fit, threshold), one file at a time as predict.py does, writing aside; and
  the same with the network exported to ONNX (tp4/serving/export.py), run by onnxruntime;
- behind `mlflow models serve` (tp4/serving/pyfunc.py, the same code): one JSON request at a time
  from a client on 127.0.0.1, encoding and decoding included.
For each: images per second, 2D volumes (slice by slice) per second, and the latency of one image
request (median of the repeats). The machine's CPU and load are printed with the table: other work
on the machine slows every row.

    python -m tools.serve_bench            # the table of PERFORMANCE.md
    python -m tools.serve_bench --quick    # CI-size shapes: checks that the benchmark still runs
"""

# First, before anything loads TensorFlow: its start-up notices filtered out (tp4/startup.py).
from tp4 import startup  # noqa: F401

# isort: split
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cpuinfo
import keras
import mlflow
import numpy as np
import requests
from PIL import Image

import unet
from tp4 import cli
from tp4.inference import onnxnetwork, segment
from tp4.models import batchnorm
from tp4.perf import throughput
from tp4.serving import export
from tp4.tracking import registry

FULL = dict(size=128, filters=32, depth=4, images=32, volume=(128, 128, 16), volumes=3, repeats=9)
WAYS = (
    "Keras model, called directly",
    "predict.py's path (segment.py)",
    "predict.py's path, model.onnx (onnxruntime)",
    "server (mlflow models serve)",
)
QUICK = dict(size=32, filters=8, depth=2, images=4, volume=(32, 32, 4), volumes=1, repeats=2)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(model_uri: str, env: dict | None = None, log_path: str = "server.log", wait=180):
    """`mlflow models serve -m model_uri --env-manager local` on 127.0.0.1 and a free port, in a
    process group of its own, stopped on exit; yields its /invocations address.

    Args:
        model_uri: any MLflow model URI (models:/NAME@ALIAS...).
        env: variables set for the server on top of this process's.
        log_path: where its output goes (shown if it stops before answering).
        wait: seconds it may take to answer /ping.
    """
    port, bin = _free_port(), Path(sys.executable).parent  # this environment's mlflow, uvicorn
    command = [str(bin / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    environment = {**os.environ, "PATH": f"{bin}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment
        )
        try:
            deadline = time.monotonic() + wait
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server stopped: {Path(log_path).read_text()[-2000:]}")
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).ok:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer in {wait} s")
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/invocations"
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)


def post(address: str, values, **params) -> requests.Response:
    """One request: `values` (an image or a volume) as the server's `inputs`."""
    body = {"inputs": np.asarray(values).tolist(), "params": params}
    return requests.post(address, json=body, timeout=600)


def _rate(count, run, repeats=1) -> float:
    """`count` items per second of `run()`, the best of `repeats` timings."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return count / best


def measure(c: dict, folder: str) -> dict:
    """{row: (images/s, volumes/s, seconds per image request)} for the three ways."""
    keras.utils.set_random_seed(0)
    shape = (c["size"], c["size"], 1)
    model = unet.build_unet(
        shape, c["filters"], c["depth"], batch_norm=batchnorm.FusedBatchNormalization
    )
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (c["size"], c["size"])).astype(np.uint8) for _ in range(c["images"])
    ]
    paths = []
    for i, image in enumerate(images):
        paths.append(os.path.join(folder, f"scan{i}.png"))
        Image.fromarray(image).save(paths[-1])
    volumes = [(rng.random(c["volume"]) * 1000).astype(np.float32) for _ in range(c["volumes"])]
    batch = np.stack(images)[..., None].astype(np.float32) / 255
    slices = np.moveaxis(volumes[0], -1, 0)[..., None]
    n, r, v = len(images), c["repeats"], len(volumes)
    # Logged (the server's model) before at_speed, which guards the output layer in place.
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    artifacts = Path(folder, "mlruns").as_uri()
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("serve-bench", artifacts))
    with mlflow.start_run():
        info = registry.log_keras_model(model, (batch[:1], model.predict(batch[:1], verbose=0)))
    fast = keras.models.clone_model(model)
    fast.set_weights(model.get_weights())
    fast = segment.at_speed(fast)  # batch norms folded: a copy
    fast.predict(batch[:8], verbose=0)  # built and warmed up
    results = {
        WAYS[0]: (
            _rate(n, lambda: model.predict(batch, batch_size=8, verbose=0), 3),
            _rate(v, lambda: [model.predict(slices, batch_size=8, verbose=0) for _ in volumes], 3),
            throughput.median_seconds(lambda: model.predict_on_batch(batch[:1]), r, warmup=0),
        ),
        WAYS[1]: (
            _rate(n, lambda: [segment.segment(fast, path) for path in paths], 3),
            _rate(v, lambda: [segment.segment_volume(fast, volume) for volume in volumes], 3),
            throughput.median_seconds(lambda: segment.segment(fast, paths[0]), r, warmup=0),
        ),
    }
    export.export(model, os.path.join(folder, "exported"))
    exported = onnxnetwork.OnnxNetwork(os.path.join(folder, "exported", export.ONNX_FILE))
    results[WAYS[2]] = (
        _rate(n, lambda: [segment.segment(exported, path) for path in paths], 3),
        _rate(v, lambda: [segment.segment_volume(exported, volume) for volume in volumes], 3),
        throughput.median_seconds(lambda: segment.segment(exported, paths[0]), r, warmup=0),
    )
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    with serve(info.model_uri, env, os.path.join(folder, "server.log")) as address:
        post(address, images[0])  # warmed up
        results[WAYS[3]] = (
            _rate(n, lambda: [post(address, image) for image in images]),
            _rate(v, lambda: [post(address, volume) for volume in volumes]),
            throughput.median_seconds(lambda: post(address, images[0]), r, warmup=0),
        )
    return results


def table(c: dict, results: dict) -> str:
    size, volume = c["size"], "x".join(map(str, c["volume"]))
    lines = [
        f"| way | images/s ({size}x{size}) | volumes/s ({volume}, 2D slices) | one image request |",
        "|---|---|---|---|",
    ]
    for way, (images, volumes, seconds) in results.items():
        lines.append(f"| {way} | {images:.1f} | {volumes:.2f} | {seconds * 1000:.0f} ms |")
    return "\n".join(lines)


def main(argv=None):
    parser = cli.argument_parser("python -m tools.serve_bench", __doc__)
    parser.add_argument("--quick", action="store_true", help="CI-size shapes and repeats")
    args = parser.parse_args(argv)
    cli.setup()
    c = QUICK if args.quick else FULL
    cpu = cpuinfo.get_cpu_info()
    print(f"machine: {cpu.get('brand_raw')}, {os.cpu_count()} cores", flush=True)
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        try:
            results = measure(c, folder)
        finally:
            mlflow.set_tracking_uri(None)  # measure's store goes with its folder
    print(f"load average (1 min): {before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(table(c, results))


if __name__ == "__main__":
    sys.exit(main())
