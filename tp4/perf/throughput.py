"""How fast a model trains and infers here, and the machine's ceiling: the timing bench.py and
speed.py share.

What this module teaches:
- a speed number means something only next to the machine's ceiling. A convolution network is made
  of matrix multiplications, so a dense matmul's rate at the same precision is the roofline: FLOPs
  per example (counted from the layers) times examples per second, divided by that rate, is the
  fraction of the hardware used. A 16-bit matmul measures the 16-bit ceiling (AMX, tensor cores);
- FLOPs of a convolution: 2·k^d·C_in·C_out per output position (a multiply and an add per weight);
  a transposed convolution, per input position. Batch norm, ReLU, pooling and concatenation are not
  counted (memory-bound, few FLOPs). A training step counts as 3x the forward pass: forward,
  gradient w.r.t. the activations, gradient w.r.t. the weights, each about one forward pass;
- every timing is a median of repeats after a warm-up (tracing, compiling, allocating excluded);
  training is timed inside `fit` on the project's tf.data pipeline with the project's loss and
  metrics, as train.py trains.
"""

import functools
import statistics
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

import data
import losses

_CONVOLUTIONS = (
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(sizes: tuple[int, ...], repeats: int, dtype: str = "float32") -> dict[str, float]:
    """Dense n x n matmul rate in `dtype`, best of `sizes`: TensorFlow's, and for float32 NumPy's
    BLAS too (so that a slow library does not lower the ceiling).

    Returns:
        GFLOP/s by library ("tensorflow", and "numpy" for float32).
    """
    best = {"tensorflow": 0.0, **({"numpy": 0.0} if dtype == "float32" else {})}
    for n in sizes:
        a, b = np.random.default_rng(0).random((2, n, n), dtype=np.float32)
        products = {
            "tensorflow": functools.partial(
                tf.linalg.matmul, tf.constant(a, dtype), tf.constant(b, dtype)
            ),
            "numpy": functools.partial(np.matmul, a, b),
        }
        for library in best:
            product = products[library]
            seconds = median_seconds(lambda product=product: np.asarray(product()), repeats)
            best[library] = max(best[library], 2 * n**3 / seconds / 1e9)
    return best


def convolution_gflops(dtype: str, repeats: int = 5) -> float:
    """GFLOP/s of one 3x3 convolution of the U-Net's first levels (8 images of 128x128, 32 to 32
    channels, 2.4 GFLOP) in `dtype`, the median of `repeats` calls after a warm-up: what 16-bit
    arithmetic gains on this machine, in under a second."""
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((8, 128, 128, 32), dtype=np.float32), dtype)
    kernel = tf.constant(rng.standard_normal((3, 3, 32, 32), dtype=np.float32), dtype)
    seconds = median_seconds(lambda: tf.nn.conv2d(images, kernel, 1, "SAME").numpy(), repeats)
    return 2 * 8 * 128 * 128 * 9 * 32 * 32 / seconds / 1e9


def forward_flops(model: keras.Model) -> int:
    """Forward FLOPs per example, counted from the convolution layers (see the module docstring)."""
    total = 0
    for layer in model.layers:
        if not isinstance(layer, _CONVOLUTIONS):
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


def _examples(model, count):
    rng = np.random.default_rng(0)
    x = rng.random((count, *model.input_shape[1:]), dtype=np.float32)
    return x, (x > 0.9).astype(np.float32)


def training_epoch(
    model: keras.Model, batch: int, jit_compile: bool, steps: int = 8, steps_per_execution: int = 1
) -> Callable[[], float]:
    """Compile `model` as train.py does (Adam, BCE + Dice, Dice/IoU metrics) and return a function
    that trains one epoch of `steps` batches (`fit` on data.make_dataset, a new iterator each time)
    and returns its examples per second. Its first call traces and compiles: a warm-up.

    Args:
        model: an uncompiled (or re-compilable) model; compiled here.
        batch: examples per step.
        jit_compile: XLA.
        steps: steps per epoch.
        steps_per_execution: training steps per compiled call.
    """
    x, y = _examples(model, batch * steps)
    model.compile(
        keras.optimizers.Adam(1e-3),
        losses.BCEDiceLoss(),
        metrics=losses.overlap_metrics(model),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    model.optimizer.build(model.trainable_variables)  # as train.py: fit traces its step once
    dataset, timer = data.make_dataset(x, y, batch), EpochTimer()

    def epoch():
        model.fit(dataset, epochs=1, callbacks=[timer], shuffle=False, verbose=0)
        return batch * steps / timer.seconds[-1]

    return epoch


def inference_calls(model: keras.Model, batch: int, calls: int = 1) -> Callable[[], float]:
    """A function that runs `calls` predict_on_batch of one batch (XLA if the model's jit_compile
    says so) and returns examples per second. Its first call traces and compiles: a warm-up."""
    x, _ = _examples(model, batch)

    def run():
        start = time.perf_counter()
        for _ in range(calls):
            model.predict_on_batch(x)
        return batch * calls / (time.perf_counter() - start)

    return run


def median_rate(run: Callable[[], float], repeats: int) -> float:
    """Median of `repeats` calls of `run` (a function above), after one call as a warm-up."""
    run()
    return statistics.median([run() for _ in range(repeats)])
