"""Precision and XLA chosen for the machine it runs on: measured, not guessed, and remembered.

What this module teaches:
- mixed precision (Keras' `mixed_bfloat16`, `mixed_float16`) computes in 16 bits and keeps the
  variables, the output activation, the losses and the metrics in float32. It pays only where the
  hardware has 16-bit arithmetic: bfloat16 on CPUs with AMX or AVX512-BF16 and on GPUs of compute
  capability 8+, float16 on NVIDIA GPUs; elsewhere it is emulated, and slower;
- XLA (`jit_compile`) compiles a step into one program: faster on some CPUs, slower on others
  (PERFORMANCE.md). No table of CPU flags predicts it, so `auto` measures it;
- `choose("auto", "auto", build, batch)` trains a few steps of each candidate (each precision the
  hardware supports, XLA on and off) on the real model and batch, after a warm-up, and keeps the
  fastest. The measurements are cached per machine (CPU model, cores and flags, or GPU),
  TensorFlow and Keras versions, model and batch, in $XDG_CACHE_HOME/tp4-segmentation/speed.json
  (XDG_CACHE_HOME defaults to ~/.cache): delete that file to measure again.
"""

import contextlib
import functools
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import cpuinfo
import keras
import tensorflow as tf

from tp4.perf import throughput

Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS = get_args(Precision)
XlaSetting = Literal["auto", "on", "off"]
XLA_SETTINGS = get_args(XlaSetting)
Mode = Literal["train", "infer"]
# Keras' dtype policies: "mixed" keeps the variables in float32.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# CPU flags of bfloat16 arithmetic as py-cpuinfo names them: Intel AMX and AVX512-BF16, Arm's BF16.
CPU_BFLOAT16_FLAGS = {"amx_bf16", "avx512_bf16", "bf16"}
# The probe: per candidate, a warm-up (it compiles), then PROBE_REPEATS timed rounds of
# PROBE_STEPS training steps (an epoch) or PROBE_STEPS inference batches; the median round counts.
PROBE_STEPS, PROBE_REPEATS = 3, 2


class Choice(NamedTuple):
    """A precision and whether XLA compiles the steps."""

    precision: str
    xla: bool

    @property
    def label(self) -> str:
        return f"{self.precision}, XLA {'on' if self.xla else 'off'}"


def add_arguments(parser) -> None:
    """--precision and --xla, both `auto` by default (train.py, conv3d.py, predict.py)."""
    parser.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default="auto",
        help="compute precision (mixed: variables, output, losses and metrics in float32); auto: "
        "the fastest that this machine supports, measured once and cached (speed.py)",
    )
    parser.add_argument(
        "--xla",
        choices=XLA_SETTINGS,
        default="auto",
        help="compile the steps with XLA; auto: where it is faster here, measured with --precision",
    )


@functools.cache
def machine() -> dict[str, object]:
    """What a step's speed depends on besides the model: the device, TensorFlow and Keras.

    Returns:
        device (GPU name and compute capability, or CPU model and cores), kind ("gpu" or "cpu"),
        compute_capability (GPU) or flags (CPU), tensorflow, keras.
    """
    found = {"tensorflow": tf.__version__, "keras": keras.__version__}
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        capability = tuple(details.get("compute_capability") or (0, 0))
        name = details.get("device_name", "GPU")
        return {
            **found,
            "kind": "gpu",
            "device": f"{name} (compute capability {'.'.join(map(str, capability))})",
            "compute_capability": capability,
        }
    info = cpuinfo.get_cpu_info()
    return {
        **found,
        "kind": "cpu",
        "device": f"{info.get('brand_raw') or info.get('arch', 'CPU')}, {os.cpu_count()} cores",
        "flags": sorted(info.get("flags", [])),
    }


def supported_precisions(found: dict[str, object]) -> tuple[str, ...]:
    """The precisions with arithmetic of their own on `found` (a `machine()`), float32 first."""
    if found["kind"] == "gpu":
        bfloat16 = found["compute_capability"] >= (8, 0)
        return ("float32", *(("bfloat16",) if bfloat16 else ()), "float16")
    bfloat16 = bool(CPU_BFLOAT16_FLAGS & set(found["flags"]))
    return ("float32", *(("bfloat16",) if bfloat16 else ()))


def cache_path() -> str:
    """$XDG_CACHE_HOME/tp4-segmentation/speed.json, ~/.cache/... if XDG_CACHE_HOME is unset."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "tp4-segmentation", "speed.json")


def probe_key(found: dict[str, object], model: keras.Model, batch: int, mode: Mode) -> str:
    """The cache key of a probe: machine, versions, model (name, input shape, parameters, kinds of
    layers), batch, mode. CPU flags and layer kinds enter as digests (they are long)."""
    flags = _digest(" ".join(found.get("flags", [])))
    kinds = _digest(" ".join(sorted(type(layer).__name__ for layer in model.layers)))
    shape = "x".join(map(str, model.input_shape[1:]))
    return (
        f"{found['device']} (flags {flags}); TensorFlow {found['tensorflow']}, Keras "
        f"{found['keras']}; {model.name} {shape}, {model.count_params()} parameters (layers "
        f"{kinds}); batch {batch}; {mode}"
    )


def _digest(text):
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def policy_scope(precision: Precision):
    """Keras' global dtype policy for `precision` inside the block (layers built there take it),
    the previous one after."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def recast(model: keras.Model) -> keras.Model:
    """A copy of `model` (same weights) whose layers compute at the global dtype policy, except the
    output layers, which keep theirs (float32: probabilities need the range)."""
    keep = set(model.output_names)
    policy = keras.mixed_precision.global_policy().name

    def clone(layer):
        config = layer.get_config()
        return type(layer).from_config(
            config if layer.name in keep else {**config, "dtype": policy}
        )

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def measure_candidates(
    candidates: list[Choice], build: Callable[[], keras.Model], batch: int, mode: Mode
) -> dict[Choice, float | None]:
    """Examples per second of each candidate on the model `build()` makes, training or inferring.

    Every candidate is warmed up (traced, compiled), then timed in turns, PROBE_REPEATS rounds, each
    candidate once per round: a change of the machine's load hits them all alike. A candidate that
    TensorFlow cannot run here gets None.
    """
    runs, rates = {}, {}
    for choice in candidates:
        with policy_scope(choice.precision):
            model = build()
        if mode == "train":
            run = throughput.training_epoch(model, batch, choice.xla, steps=PROBE_STEPS)
        else:
            model.jit_compile = choice.xla
            run = throughput.inference_calls(model, batch, calls=PROBE_STEPS)
        try:
            run()
            runs[choice] = run
        except tf.errors.OpError as error:
            rates[choice] = None
            print(f"  {choice.label}: failed ({str(error).strip().splitlines()[0][:120]})")
    timed = {choice: [] for choice in runs}
    for _ in range(PROBE_REPEATS):
        for choice, run in runs.items():
            timed[choice].append(run())
    return {**rates, **{choice: statistics.median(values) for choice, values in timed.items()}}


def _read_cache() -> dict:
    try:
        with open(cache_path()) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def _write_cache(cache: dict) -> None:
    path = cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"  # never a half-written cache: write, then rename
    with open(partial, "w") as f:
        json.dump(cache, f, indent=2)
    os.replace(partial, path)


def _warn_if_busy():
    """A probe on a busy machine can choose wrong, and its choice is cached: say so."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"  note: the machine is busy (load average {load:.1f} on {os.cpu_count()} cores): "
            f"the measurements may choose wrong; delete {cache_path()} to measure again"
        )


def choose(
    precision: str,
    xla: str | bool,
    build: Callable[[], keras.Model],
    batch: int,
    mode: Mode = "train",
    measure: Callable[[list[Choice], Callable, int, str], dict] | None = None,
) -> Choice:
    """Resolve `auto` in --precision and --xla for the model `build()` makes at `batch`.

    Explicit values are returned as given. Otherwise every candidate (the supported precisions if
    precision is "auto", XLA on and off if xla is "auto") is measured once on this machine (a few
    steps after a warm-up), printed, cached, and the fastest is returned. Call this before seeding:
    the probe builds models, which draws random weights.

    Args:
        precision: "auto" or one of PRECISIONS.
        xla: "auto", "on", "off", or a bool.
        build: makes the model at the global dtype policy (speed.policy_scope sets it).
        batch: examples per step.
        mode: "train" (training steps) or "infer" (predict_on_batch).
        measure: measures candidates in examples/s [default: measure_candidates].

    Returns:
        The Choice.
    """
    xla_options = (False, True) if xla == "auto" else (xla in ("on", True),)
    if precision != "auto" and len(xla_options) == 1:
        return Choice(precision, xla_options[0])
    found = machine()
    precisions = supported_precisions(found) if precision == "auto" else (precision,)
    candidates = [Choice(p, x) for p in precisions for x in xla_options]
    if len(candidates) == 1:
        return candidates[0]
    with policy_scope("float32"):
        key = probe_key(found, build(), batch, mode)
    cache = _read_cache()
    rates = cache.get(key, {}).get("examples_per_second", {})
    missing = [c for c in candidates if c.label not in rates]
    if missing:
        print(f"choosing precision and XLA for this machine: {key}")
        _warn_if_busy()
        measured = (measure or measure_candidates)(missing, build, batch, mode)
        for candidate in missing:
            rates[candidate.label] = measured[candidate]
            if measured[candidate] is not None:
                print(f"  {candidate.label}: {measured[candidate]:.2f} examples/s")
        cache[key] = {"measured": time.strftime("%Y-%m-%d %H:%M"), "examples_per_second": rates}
        _write_cache(cache)
    best = max(candidates, key=lambda c: rates[c.label] or 0.0)
    how = "measured now" if missing else f"measured {cache[key]['measured']}, cached"
    print(f"precision and XLA for this machine: {best.label} ({how} in {cache_path()})")
    return best
