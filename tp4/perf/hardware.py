"""What this machine can do, told by its hardware and a measurement of under a second, remembered.

What this module teaches:
- a step's speed depends on the device (GPU, or CPU model, cores and flags) and on TensorFlow and
  Keras' versions: `machine()` describes them (py-cpuinfo for a CPU's flags), and every
  measurement is cached under that description, in $XDG_CACHE_HOME/tp4-segmentation/speed.json
  (XDG_CACHE_HOME defaults to ~/.cache): delete that file to measure again;
- 16-bit arithmetic pays only where the hardware has it: bfloat16 on CPUs with AMX or
  AVX512-BF16 and on GPUs of compute capability 8+, float16 on NVIDIA GPUs; elsewhere it is
  emulated, and slower (`supported_precisions`);
- rules from measurements decide what is worth timing on a model: XLA (`xla_can_win`), and on a
  CPU, bfloat16 where a convolution is clearly faster in it (`cpu_precision`). speed.py applies
  them.
"""

import concurrent.futures
import functools
import hashlib
import json
import os
import threading
import time

import cpuinfo
import keras
import tensorflow as tf

from tp4.perf import throughput

# CPU flags of bfloat16 arithmetic as py-cpuinfo names them: Intel AMX and AVX512-BF16, Arm's BF16.
CPU_BFLOAT16_FLAGS = {"amx_bf16", "avx512_bf16", "bf16"}
# bfloat16 on a CPU with bfloat16 units: chosen where a 3x3 convolution runs at least this many
# times faster in it than in float32 (throughput.convolution_gflops). A clear margin: activations
# lose precision, and a gain within noise is not worth it.
BFLOAT16_CLEAR_SPEEDUP = 1.5


@functools.cache
def _cpu_description() -> concurrent.futures.Future:
    """py-cpuinfo's description of this CPU, read by a thread of its own. It takes about a second
    (its child process times the clock for a second, a figure unused here): a script starts it
    early (`describe_cpu_in_background`) and does other work meanwhile. A daemon thread: a
    process that ends first does not wait for it."""
    described = concurrent.futures.Future()

    def read():
        try:
            described.set_result(cpuinfo.get_cpu_info())
        except Exception as error:  # handed to machine(), which raises it
            described.set_exception(error)

    threading.Thread(target=read, name="cpuinfo", daemon=True).start()
    return described


def describe_cpu_in_background() -> None:
    """Start reading this CPU's description now, so that `machine()` finds it ready: train.py,
    conv3d.py and predict.py call it first, and the second it takes passes while the tracking
    store and the data get ready."""
    _cpu_description()


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
    info = _cpu_description().result()
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


def xla_can_win(found: dict[str, object]) -> bool:
    """Whether XLA is worth measuring on `found` (a `machine()`): on a GPU, and on a CPU without
    AVX-512.

    The rule, from measurements of the U-Net's training step (PERFORMANCE.md): on both CPUs with
    AVX-512 measured, XLA never won. On an Intel Xeon (Sapphire Rapids, AMX) it was 1.45x slower in
    float32 (10.2 against 15.2 img/s) and 2.3x in bfloat16 (10.9 against 25); on an AMD EPYC (Zen 4,
    AVX512-BF16) 1.35x in float32 (8.7 against 11.7) and 2.5x in bfloat16 (8.1 against 19.9). There
    TensorFlow's own kernels are oneDNN's AVX-512 and AMX ones, which XLA's CPU code does not call.
    On an AMD EPYC with AVX2 only, XLA was 1.2x faster in float32: there it is measured.
    """
    return found["kind"] == "gpu" or "avx512f" not in found["flags"]


def cpu_precision(found: dict[str, object], speedup=None) -> tuple[str, str]:
    """(precision, why) on a CPU: float32 unless the CPU has bfloat16 units and a 3x3 convolution
    runs BFLOAT16_CLEAR_SPEEDUP times faster in bfloat16 here (measured in under a second, once
    per machine and TensorFlow version, cached).

    Args:
        found: a `machine()` of kind "cpu".
        speedup: measures bfloat16's speed over float32's [default: bfloat16_speedup].
    """
    if "bfloat16" not in supported_precisions(found):
        return "float32", "no bfloat16 arithmetic in this CPU"
    key = f"{found['device']} (flags {digest(' '.join(found['flags']))}); TensorFlow "
    key += f"{found['tensorflow']}; 3x3 convolution, bfloat16 over float32"
    cache = read_cache()
    if key not in cache:
        cache[key] = {
            "measured": time.strftime("%Y-%m-%d %H:%M"),
            "speedup": (speedup or bfloat16_speedup)(),
        }
        write_cache(cache)
        when = "measured now"
    else:
        when = f"measured {cache[key]['measured']}, cached"
    ratio = cache[key]["speedup"]
    clear = ratio >= BFLOAT16_CLEAR_SPEEDUP
    why = f"bfloat16 convolutions {ratio:.1f}x float32's here, {when}"
    return ("bfloat16" if clear else "float32"), why


def bfloat16_speedup() -> float:
    """bfloat16's convolution rate over float32's on this machine (throughput.py)."""
    rates = {dtype: throughput.convolution_gflops(dtype) for dtype in ("float32", "bfloat16")}
    return rates["bfloat16"] / rates["float32"]


def cache_path() -> str:
    """$XDG_CACHE_HOME/tp4-segmentation/speed.json, ~/.cache/... if XDG_CACHE_HOME is unset."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "tp4-segmentation", "speed.json")


def digest(text: str) -> str:
    """A short digest of a long part of a cache key (CPU flags, kinds of layers)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_cache() -> dict:
    """The measurements cached on this machine, {} if none or unreadable."""
    try:
        with open(cache_path()) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def write_cache(cache: dict) -> None:
    """Replace the cache with `cache`, whole (written under another name, then renamed)."""
    path = cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"  # never a half-written cache: write, then rename
    with open(partial, "w") as f:
        json.dump(cache, f, indent=2)
    os.replace(partial, path)
