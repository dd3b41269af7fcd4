"""Frozen weights: in a process that only predicts, oneDNN keeps each layer's weights in its layout.

What this module teaches: before a convolution, oneDNN (TensorFlow's CPU kernels) reorders the
weights from TensorFlow's layout (H, W, C_in, C_out) into the blocked one its matrix kernels read,
at every call, because the weights may have changed since the last one. The environment variable
TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1 tells it they never change: TensorFlow's fused convolution kernels
(a convolution with its bias and ReLU, what a folded network runs) reorder their weights once and
keep them, which made inference of the 2D U-Net 5-10 % faster on an Intel Xeon with AMX
(PERFORMANCE.md).

TensorFlow reads the variable once per process, at the first convolution, and from then on it holds
for every model of the process: a model trained (or given new weights by `set_weights`) after its
first call would go on computing with its old weights, without a word (tests/tp4/inference/
test_frozen.py shows it). So only the entry point of a process that never trains sets it: predict.py
run as a script (not its `main` called from elsewhere, a test, a notebook), and bench.py's inference
child processes (tools/bench_predict.py).
"""

import os

VARIABLE = "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS"


def inference_only_process() -> None:
    """Declare this process inference-only: its models' weights are fixed before their first call.
    The user's own setting of the variable wins (0 turns it off)."""
    os.environ.setdefault(VARIABLE, "1")


def assumed() -> bool:
    """Whether this process declared its weights frozen (the variable, as TensorFlow reads it)."""
    return os.environ.get(VARIABLE, "0").strip().lower() in ("1", "true")
