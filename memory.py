"""Memory of a training step: activations counted from the layers, peak process memory measured.

What this script teaches: the activations a network keeps for backpropagation can be counted exactly
from its layers' output shapes and dtypes, but what a process really holds (framework, workspaces,
gradients, optimizer state) is only known by measuring it. Peak resident memory is a high-water mark
of the whole process, so each configuration is measured in a fresh Python process: one training
step, then the peak.

    python memory.py '{"shape": [32, 64, 64], "filters": 8, "depth": 3, "kernel": 3, "batch": 2,
                       "policy": "float32"}'
"""

import json
import os
import resource
import subprocess
import sys
import time

import keras
import numpy as np
import psutil
import tensorflow as tf

import losses
import unet


def activation_bytes(model, batch_size=1):
    """Bytes of all layer outputs for one forward pass: what backpropagation keeps in memory."""
    total = 0
    for layer in model.layers:
        for output in keras.tree.flatten(layer.output):
            total += int(np.prod(output.shape[1:])) * batch_size * np.dtype(output.dtype).itemsize
    return total


def step_memory(spec):
    """In this (fresh) process: build `spec`'s U-Net, two training steps; peak resident memory
    (Linux/macOS)."""
    if spec["policy"] != "float32":
        keras.mixed_precision.set_global_policy(spec["policy"])
    model = unet.build_unet(
        (*spec["shape"], 1),
        spec["filters"],
        spec["depth"],
        kernel_size=spec["kernel"],
        batch_norm=spec.get("batch_norm", "fused"),
    )
    model.compile("adam", losses.SoftDiceLoss())
    x = np.random.default_rng(0).random((spec["batch"], *spec["shape"], 1), dtype=np.float32)
    y = (x > 0.9).astype(np.float32)
    before = psutil.Process().memory_info().rss
    model.train_on_batch(x, y)  # traces and allocates
    start = time.perf_counter()
    model.train_on_batch(x, y)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {"peak_rss_bytes": peak, "step_bytes": peak - before, "step_seconds": seconds}


def peak_rss_bytes():
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec; not
    ru_maxrss, which keeps the size of the process that forked this one (a child of a large
    bench.py would report bench.py's size). Elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_in_subprocess(spec):
    """Peak RSS, its growth during the first training step, and the second step's time, for a model
    `spec` (shape: 2 or 3 spatial sizes, filters, depth, kernel, batch, policy, and optionally
    batch_norm: unet.BatchNorm), in a fresh Python process."""
    command = [sys.executable, os.path.abspath(__file__), json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"peak_rss_mb": None, "step_mb": None, "step_seconds": None}
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mb": measured["peak_rss_bytes"] / 2**20,
        "step_mb": measured["step_bytes"] / 2**20,
        "step_seconds": measured["step_seconds"],
    }


def has_gpu():
    return bool(tf.config.list_physical_devices("GPU"))


def main():
    if len(sys.argv) != 2:
        example = __doc__.split("\n\n")[-1].rstrip()
        sys.exit(f"usage: python memory.py SPEC_JSON, e.g.\n{example}")
    print(json.dumps(step_memory(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
