"""Memory of a training step: activations counted from the layers, peak process memory measured.

What this script teaches: the activations a network keeps for backpropagation can be counted exactly
from its layers' output shapes and dtypes, but what a process really holds (framework, workspaces,
gradients, optimizer state) is only known by measuring it. Peak resident memory is a high-water mark
of the whole process, so each configuration is measured in a fresh Python process: one training
step, then the peak. conv3d.py prints the tables made here: one Conv2D against one Conv3D layer, and
the memory levers of a 3D U-Net (kernel size, filters, slices, batch norm, mixed precision).

    python -m tp4.perf.memory '{"shape": [32, 64, 64], "filters": 8, "depth": 3, "kernel": 3,
                               "batch": 2, "policy": "float32"}'
"""

import json
import resource
import subprocess
import sys
import time

import keras
import numpy as np
import psutil
import tensorflow as tf

import losses
import tp4
import unet
from tp4.models import batchnorm


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
        batch_norm=batchnorm.layer(spec.get("batch_norm", "fused")),
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
    batch_norm: batchnorm.KINDS), in a fresh Python process."""
    command = [sys.executable, "-m", "tp4.perf.memory", json.dumps(spec)]
    done = subprocess.run(command, cwd=tp4.ROOT, capture_output=True, text=True)
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


# ------------------------------------------------------------------------------------------------
# Conv2D vs Conv3D, and the memory levers of a 3D U-Net (conv3d.py prints them).


def measure_levers(shape, filters=8, depth=3, batch=2, peak_memory=True):
    """One row per lever: parameters, activation bytes, and (in a subprocess each) peak RSS and step
    time."""
    baseline = dict(
        shape=list(shape), filters=filters, depth=depth, kernel=3, batch=batch, policy="float32"
    )
    fast_policy = "mixed_float16" if has_gpu() else "mixed_bfloat16"
    variants = {
        "baseline (k=3, all filters, all slices, fp32)": {},
        "kernel 2x2x2": dict(kernel=2),
        "half the filters": dict(filters=max(1, filters // 2)),
        "half the slices (D/2)": dict(shape=[shape[0] // 2, *shape[1:]]),
        "Keras' batch norm (unfused)": dict(batch_norm="keras"),
        f"mixed precision ({fast_policy})": dict(policy=fast_policy),
    }
    rows = []
    for label, change in variants.items():
        spec = {**baseline, **change}
        keras.mixed_precision.set_global_policy(spec["policy"])
        try:
            model = unet.build_unet3d(
                (*spec["shape"], 1),
                spec["filters"],
                spec["depth"],
                spec["kernel"],
                batch_norm=batchnorm.layer(spec.get("batch_norm", "fused")),
            )
        except ValueError:
            continue  # a lever the configuration cannot take: D/2 no longer divisible, say
        finally:
            keras.mixed_precision.set_global_policy("float32")
        activation_mb = activation_bytes(model, batch) / 2**20
        row = {"lever": label, "params": model.count_params(), "activation_mb": activation_mb}
        if peak_memory:
            row.update(measure_in_subprocess(spec))
        rows.append(row)
    return rows


def conv2d_vs_conv3d(c_in=16, c_out=32, size=64, depth_slices=32, kernel=3):
    """Parameters and output activations of one Conv2D and one Conv3D layer (real Keras layers)."""
    layer2d = keras.layers.Conv2D(c_out, kernel, padding="same")
    layer3d = keras.layers.Conv3D(c_out, kernel, padding="same")
    layer2d.build((None, size, size, c_in))
    layer3d.build((None, depth_slices, size, size, c_in))
    return {
        "weights per kernel and channel pair": (kernel**2, kernel**3),
        f"parameters of one layer {c_in}->{c_out}": (
            layer2d.count_params(),
            layer3d.count_params(),
        ),
        f"output activations (one {size}x{size} slice / {depth_slices} slices), MB": (
            size * size * c_out * 4 / 2**20,
            depth_slices * size * size * c_out * 4 / 2**20,
        ),
    }


def print_comparison(shape, filters, depth, kernel):
    """Print one Conv2D against one Conv3D layer, and the 2D against the 3D U-Net, for volumes of
    `shape` (D, H, W)."""
    print(f"\n{'Conv2D vs Conv3D (computed from Keras layers)':<58}{'Conv2D':>12}{'Conv3D':>12}")
    table = conv2d_vs_conv3d(size=shape[1], depth_slices=shape[0], kernel=kernel)
    net2d = unet.build_unet((shape[1], shape[2], 1), filters, depth, kernel_size=kernel)
    net3d = unet.build_unet3d((*shape, 1), filters, depth, kernel)
    table["parameters of the U-Net (same filters and depth)"] = (
        net2d.count_params(),
        net3d.count_params(),
    )
    table["activations per example (2D: one slice), MB"] = (
        activation_bytes(net2d) / 2**20,
        activation_bytes(net3d) / 2**20,
    )

    def cell(value):
        return f"{value:>12,.2f}" if isinstance(value, float) else f"{value:>12,}"

    for label, (two, three) in table.items():
        print(f"{label:<58}{cell(two)}{cell(three)}")


def print_levers(rows, batch):
    """Print measure_levers' rows, and how mixed precision (the last) compares with fp32."""
    print(
        f"\nmemory levers, batch of {batch}: activations counted from the layers; "
        "peak RSS of a fresh process and its growth during the first training step"
    )
    print(
        f"{'lever':<48}{'params':>10}{'activations MB':>16}{'peak RSS MB':>13}"
        f"{'step MB':>9}{'step s':>8}"
    )
    for row in rows:
        measured = "".join(
            f"{row[key]:>{width}.{digits}f}" if row.get(key) is not None else f"{'n/a':>{width}}"
            for key, width, digits in (
                ("peak_rss_mb", 13, 0),
                ("step_mb", 9, 0),
                ("step_seconds", 8, 2),
            )
        )
        print(f"{row['lever']:<48}{row['params']:>10,}{row['activation_mb']:>16.1f}{measured}")
    base, mixed = rows[0], rows[-1]
    if base.get("step_seconds") and mixed.get("step_seconds"):
        # Counted activations halve; the measured step memory need not follow (REPORT.md, Q5).
        ratio = mixed["step_seconds"] / base["step_seconds"]
        speed = f"{1 / ratio:.1f}x faster" if ratio < 1 else f"{ratio:.1f}x slower"
        extra = mixed["step_mb"] - base["step_mb"]
        memory_change = f"{abs(extra):.0f} MB {'less' if extra < 0 else 'more'}"
        print(
            f"note: {mixed['lever']} is {speed} than fp32 on this machine, and its step "
            f"measured {memory_change} memory for half the counted activations"
        )


def main():
    if len(sys.argv) != 2:
        example = __doc__.split("\n\n")[-1].rstrip()
        sys.exit(f"usage: python -m tp4.perf.memory SPEC_JSON, e.g.\n{example}")
    print(json.dumps(step_memory(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
