"""Precision and XLA chosen for the machine it runs on: by its hardware's rules, measured where
they cannot decide, and remembered.

What this module teaches:
- mixed precision (Keras' `mixed_bfloat16`, `mixed_float16`) computes in 16 bits and keeps the
  variables, the output activation, the losses and the metrics in float32. It pays only where the
  hardware has 16-bit arithmetic (hardware.py);
- XLA (`jit_compile`) compiles a step into one program: faster on some CPUs, slower on others
  (PERFORMANCE.md);
- a choice costs seconds, not a minute: what the hardware can do decides the candidates first
  (hardware.py). No XLA where it has never won on this kind of CPU (`xla_can_win`), no precision
  the hardware emulates, and on a CPU, bfloat16 only where a quick convolution (under a second)
  runs clearly faster in it than in float32 (`cpu_precision`). What remains (XLA on a CPU without
  AVX-512, the precisions of a GPU) is timed on the real model and batch, a few steps after a
  warm-up (`measure_candidates`). Every measurement is cached (hardware.py) with the model and
  batch where it was timed on a model;
- inference measures nothing (`for_inference`): a model predicts at the precision it was trained
  at where this hardware has it, in float32 otherwise.
"""

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import keras
import tensorflow as tf

from tp4.perf import hardware, throughput

Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS = get_args(Precision)
XlaSetting = Literal["auto", "on", "off"]
XLA_SETTINGS = get_args(XlaSetting)
# Keras' dtype policies: "mixed" keeps the variables in float32.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# The probe of a model: per candidate, a warm-up (it compiles), then PROBE_REPEATS timed rounds of
# PROBE_STEPS training steps (an epoch); the median round counts.
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
        "training, bfloat16 where this machine's convolutions are clearly faster in it (measured "
        "in a second, cached); predict.py, the model's own where this machine has it (speed.py)",
    )
    parser.add_argument(
        "--xla",
        choices=XLA_SETTINGS,
        default="auto",
        help="compile the steps with XLA; auto: training, off on CPUs with AVX-512 (it never won "
        "there), else measured with --precision; predict.py, off",
    )


def trained_precision(model: keras.Model) -> str:
    """The precision `model` computes at: its layers' dtype policy (a model saved by train.py or
    conv3d.py keeps the one it trained at)."""
    policies = {layer.dtype_policy.name for layer in model.layers}
    return next(
        (p for p, policy in POLICIES.items() if p != "float32" and policy in policies), "float32"
    )


def for_inference(trained: str, precision: str = "auto", xla: str | bool = "auto") -> Choice:
    """predict.py's precision and XLA, never measured: `auto` is the precision the model trained at
    (`trained`) where this hardware has it, float32 otherwise; XLA off unless asked (a compile per
    input size costs more than it saves on a few images). Printed.

    Args:
        trained: the model's precision (trained_precision).
        precision: "auto" or one of PRECISIONS.
        xla: "auto", "on", "off", or a bool.
    """
    choice = Choice(precision, xla in ("on", True))
    if precision == "auto":
        native = trained in hardware.supported_precisions(hardware.machine())
        choice = choice._replace(precision=trained if native else "float32")
        why = "the model's" if native else f"the model's {trained} is not native here"
        print(f"precision and XLA for this inference: {choice.label} ({why})")
    return choice


def probe_key(found: dict[str, object], model: keras.Model, batch: int) -> str:
    """The cache key of a probe: machine, versions, model (name, input shape, parameters, kinds of
    layers), batch. CPU flags and layer kinds enter as digests (they are long)."""
    flags = hardware.digest(" ".join(found.get("flags", [])))
    kinds = hardware.digest(" ".join(sorted(type(layer).__name__ for layer in model.layers)))
    shape = "x".join(map(str, model.input_shape[1:]))
    return (
        f"{found['device']} (flags {flags}); TensorFlow {found['tensorflow']}, Keras "
        f"{found['keras']}; {model.name} {shape}, {model.count_params()} parameters (layers "
        f"{kinds}); batch {batch}; train"
    )


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
    candidates: list[Choice], build: Callable[[], keras.Model], batch: int
) -> dict[Choice, float | None]:
    """Training examples per second of each candidate on the model `build()` makes.

    Every candidate is warmed up (traced, compiled), then timed in turns, PROBE_REPEATS rounds, each
    candidate once per round: a change of the machine's load hits them all alike. A candidate that
    TensorFlow cannot run here gets None.
    """
    runs, rates = {}, {}
    for choice in candidates:
        with policy_scope(choice.precision):
            model = build()
        run = throughput.training_epoch(model, batch, choice.xla, steps=PROBE_STEPS)
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


def _warn_if_busy():
    """A probe on a busy machine can choose wrong, and its choice is cached: say so."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"  note: the machine is busy (load average {load:.1f} on {os.cpu_count()} cores): "
            f"the measurements may choose wrong; delete {hardware.cache_path()} to measure again"
        )


def decide(
    precision: str,
    xla: str | bool,
    build: Callable[[], keras.Model],
    batch: int,
    measure: Callable[[list[Choice], Callable, int], dict] | None = None,
    speedup: Callable[[], float] | None = None,
) -> tuple[Choice, str]:
    """Resolve `auto` in --precision and --xla for training the model `build()` makes at `batch`.

    Explicit values are returned as given. Otherwise the hardware's rules decide first: XLA is a
    candidate only where it can win (xla_can_win), and on a CPU the precision is cpu_precision's
    (a quick convolution, cached). The candidates left, if several, are measured once on this
    machine (a few training steps each after a warm-up), printed, cached, and the fastest is
    returned. The choice is printed with why. Call this before seeding: a probe builds models,
    which draws random weights.

    Args:
        precision: "auto" or one of PRECISIONS.
        xla: "auto", "on", "off", or a bool.
        build: makes the model at the global dtype policy (speed.policy_scope sets it).
        batch: examples per step.
        measure: measures candidates in examples/s [default: measure_candidates].
        speedup: bfloat16's convolution speed over float32's [default: bfloat16_speedup].

    Returns:
        The Choice, and why: its label with the reasons, the printed line's (runs log it).
    """
    xla_options = (False, True) if xla == "auto" else (xla in ("on", True),)
    if precision != "auto" and len(xla_options) == 1:
        choice = Choice(precision, xla_options[0])
        return choice, f"{choice.label} (as asked)"
    found, why = hardware.machine(), []
    if len(xla_options) == 2 and not hardware.xla_can_win(found):
        xla_options = (False,)
        why.append("XLA never won on CPUs with AVX-512")
    precisions = (precision,)
    if precision == "auto" and found["kind"] == "cpu":
        precisions, reason = hardware.cpu_precision(found, speedup)
        precisions = (precisions,)
        why.append(reason)
    elif precision == "auto":
        precisions = hardware.supported_precisions(found)
    candidates = [Choice(p, x) for p in precisions for x in xla_options]
    if len(candidates) > 1:
        best, measured = _probe(found, candidates, build, batch, measure)
        why.append(measured)
    else:
        best = candidates[0]
    line = f"{best.label} ({'; '.join(why)})"
    print(f"precision and XLA for this machine: {line}")
    return best, line


def choose(*args, **kwargs) -> Choice:
    """decide's Choice alone (same arguments)."""
    return decide(*args, **kwargs)[0]


def _probe(found, candidates, build, batch, measure):
    """(the fastest candidate, when it was measured) on the model, from the cache or measured."""
    with policy_scope("float32"):
        key = probe_key(found, build(), batch)
    cache = hardware.read_cache()
    rates = cache.get(key, {}).get("examples_per_second", {})
    missing = [c for c in candidates if c.label not in rates]
    if missing:
        print(f"choosing precision and XLA for this machine: {key}")
        _warn_if_busy()
        measured = (measure or measure_candidates)(missing, build, batch)
        for candidate in missing:
            rates[candidate.label] = measured[candidate]
            if measured[candidate] is not None:
                print(f"  {candidate.label}: {measured[candidate]:.2f} examples/s")
        cache[key] = {"measured": time.strftime("%Y-%m-%d %H:%M"), "examples_per_second": rates}
        hardware.write_cache(cache)
    best = max(candidates, key=lambda c: rates[c.label] or 0.0)
    how = "measured now" if missing else f"measured {cache[key]['measured']}, cached"
    return best, f"the model's steps {how} in {hardware.cache_path()}"
