"""speed.py: which precisions a machine supports, the choice among measured candidates, the cache
and its key, the rebuilt model at another precision. Fake measurements: no timing is asserted."""

import json
import threading

import keras
import numpy as np
import pytest

import unet
from tp4.perf import hardware, speed, throughput
from tp4.perf.speed import Choice

XEON = {
    "kind": "cpu",
    "device": "Intel Xeon, 2 cores",
    "flags": ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"],
    "tensorflow": "2.21.0",
    "keras": "3.15.1",
}
EPYC = {**XEON, "device": "AMD EPYC, 2 cores", "flags": ["avx2", "fma"]}


def _gpu(capability):
    return {**XEON, "kind": "gpu", "device": "GPU", "compute_capability": capability}


@pytest.mark.parametrize(
    "found, expected",
    [
        (XEON, ("float32", "bfloat16")),
        ({**XEON, "flags": ["avx512_bf16"]}, ("float32", "bfloat16")),
        (EPYC, ("float32",)),
        ({**EPYC, "flags": ["fp", "asimd", "bf16"]}, ("float32", "bfloat16")),  # Arm with BF16
        (_gpu((7, 5)), ("float32", "float16")),
        (_gpu((8, 0)), ("float32", "bfloat16", "float16")),
    ],
)
def test_supported_precisions_follow_the_hardware(found, expected):
    assert hardware.supported_precisions(found) == expected


class FakeProbe:
    """Measures nothing: returns given rates, and records what it was asked."""

    def __init__(self, rates):
        self.rates, self.calls = rates, []

    def __call__(self, candidates, build, batch):
        self.calls.append((list(candidates), batch))
        return {c: self.rates[c] for c in candidates}


def refuse(*args):
    raise AssertionError("measured")


RATES = {
    Choice("float32", False): 15.0,
    Choice("float32", True): 10.0,
    Choice("bfloat16", False): 50.0,
    Choice("bfloat16", True): 11.0,
}
# A CPU with bfloat16 units and without AVX-512 (an Arm with BF16): XLA measured.
ARM = {**XEON, "device": "Arm Neoverse, 2 cores", "flags": ["asimd", "bf16"]}


@pytest.fixture()
def on(monkeypatch, tmp_path):
    """on(machine): that machine, and a cache of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return lambda found: monkeypatch.setattr(hardware, "machine", lambda: found)


def _build():
    return unet.build_unet((16, 16, 1), base_filters=4, depth=2)


def test_explicit_values_are_taken_as_given_without_measuring(on):
    on(XEON)
    assert speed.choose("float16", "on", _build, 8, refuse, refuse) == Choice("float16", True)
    assert speed.choose("bfloat16", False, _build, 8, refuse, refuse) == Choice("bfloat16", False)
    assert speed.decide("float32", "off", _build, 8)[1] == "float32, XLA off (as asked)"


@pytest.mark.parametrize(
    "speedup, expected", [(5.3, Choice("bfloat16", False)), (1.2, Choice("float32", False))]
)
def test_on_an_avx512_cpu_no_xla_and_bfloat16_only_if_clearly_faster_nothing_timed_on_the_model(
    on, capsys, speedup, expected
):
    on(XEON)
    asked = []

    def measured():
        asked.append(1)
        return speedup

    choice, why = speed.decide("auto", "auto", _build, 8, refuse, measured)
    assert choice == expected
    assert why == (
        f"{expected.label} (XLA never won on CPUs with "
        f"AVX-512; bfloat16 convolutions {speedup:.1f}x float32's here, measured now)"
    )
    assert capsys.readouterr().out.strip() == f"precision and XLA for this machine: {why}"
    # The convolution's speed is cached per machine: another model or batch does not time it again.
    build = lambda: unet.build_unet((32, 32, 1), 4, 2)  # noqa: E731
    assert speed.choose("auto", "auto", build, 4, refuse, refuse) == expected
    assert asked == [1] and "cached)" in capsys.readouterr().out
    assert speed.choose("auto", "on", _build, 8, refuse, refuse) == expected._replace(xla=True)


def test_a_cpu_without_bfloat16_units_trains_in_float32_and_measures_only_xla(on, capsys):
    on(EPYC)
    probe = FakeProbe(RATES)
    assert speed.choose("auto", "auto", _build, 8, probe, refuse) == Choice("float32", False)
    assert probe.calls == [([Choice("float32", False), Choice("float32", True)], 8)]
    assert speed.choose("auto", "off", _build, 8, refuse, refuse) == Choice("float32", False)
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (
        "precision and XLA for this machine: float32, XLA off (no bfloat16 arithmetic in this CPU)"
    )


def test_what_the_rules_leave_is_measured_once_printed_and_cached(on, capsys):
    on(ARM)
    probe = FakeProbe(RATES)
    assert speed.choose("auto", "auto", _build, 8, probe, lambda: 4.0) == Choice("bfloat16", False)
    assert probe.calls == [([Choice("bfloat16", False), Choice("bfloat16", True)], 8)]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("choosing precision and XLA for this machine: Arm Neoverse, 2 cores")
    assert "  bfloat16, XLA off: 50.00 examples/s" in out
    assert "  bfloat16, XLA on: 11.00 examples/s" in out
    assert out[-1].startswith(
        "precision and XLA for this machine: bfloat16, XLA off (bfloat16 convolutions 4.0x "
        "float32's here, measured now; the model's steps measured now in "
    )
    # Cached: the same machine, model and batch measure nothing again, a subset included.
    assert speed.choose("auto", "auto", _build, 8, refuse, refuse) == Choice("bfloat16", False)
    assert speed.choose("float32", "auto", _build, 8, probe, refuse) == Choice("float32", False)
    assert probe.calls[1] == ([Choice("float32", False), Choice("float32", True)], 8)
    assert speed.choose("bfloat16", "auto", _build, 8, refuse, refuse) == Choice("bfloat16", False)
    assert "cached" in capsys.readouterr().out.splitlines()[-1]
    with open(hardware.cache_path()) as f:
        cache = json.load(f)
    assert sorted(entry.get("speedup") for entry in cache.values() if "speedup" in entry) == [4.0]


def test_on_a_gpu_every_precision_it_has_and_xla_are_measured(on):
    on(_gpu((8, 0)))
    probe = FakeProbe({**RATES, **{Choice("float16", x): 30.0 for x in (False, True)}})
    assert speed.choose("auto", "auto", _build, 8, probe, refuse) == Choice("bfloat16", False)
    assert len(probe.calls[0][0]) == 6


def test_another_batch_or_model_is_measured_again(on):
    on(EPYC)
    probe = FakeProbe(RATES)
    speed.choose("auto", "auto", _build, 8, probe)
    speed.choose("auto", "auto", _build, 4, probe)
    speed.choose("auto", "auto", lambda: unet.build_unet((32, 32, 1), 4, 2), 8, probe)
    assert [batch for _, batch in probe.calls] == [8, 4, 8]


def test_a_candidate_that_cannot_run_is_never_chosen(on):
    on(ARM)
    rates = {**RATES, Choice("bfloat16", False): None}
    choice = speed.choose("auto", "auto", _build, 8, FakeProbe(rates), lambda: 4.0)
    assert choice == Choice("bfloat16", True)


@pytest.mark.parametrize(
    "found, trained, expected",
    [
        (XEON, "bfloat16", "bfloat16"),
        (XEON, "float32", "float32"),
        (EPYC, "bfloat16", "float32"),  # emulated here: float32
        (_gpu((7, 5)), "float16", "float16"),
    ],
)
def test_inference_takes_the_models_precision_where_the_hardware_has_it(
    on, found, trained, expected
):
    on(found)
    assert speed.for_inference(trained) == Choice(expected, False)
    assert speed.for_inference(trained, "float32", "on") == Choice("float32", True)


def test_the_trained_precision_is_read_from_the_models_layers():
    assert speed.trained_precision(_build()) == "float32"
    with speed.policy_scope("bfloat16"):
        assert speed.trained_precision(_build()) == "bfloat16"


def test_the_cache_key_names_machine_versions_model_and_batch():
    model = _build()
    key = speed.probe_key(XEON, model, 8)
    for part in ("Intel Xeon, 2 cores", "TensorFlow 2.21.0", "Keras 3.15.1", "UNet 16x16x1"):
        assert part in key
    assert f"{model.count_params()} parameters" in key and "batch 8" in key
    others = [
        speed.probe_key(EPYC, model, 8),
        speed.probe_key({**XEON, "flags": XEON["flags"][:-1]}, model, 8),
        speed.probe_key({**XEON, "tensorflow": "2.22.0"}, model, 8),
        speed.probe_key(XEON, model, 16),
    ]
    assert len({key, *others}) == 5


@pytest.fixture
def fresh_description(monkeypatch):
    """machine() and the CPU's description forgotten (a fake py-cpuinfo is set by the test), and
    forgotten again after it: later tests see the real machine."""
    monkeypatch.setattr(hardware.tf.config, "list_physical_devices", lambda kind: [])
    for cached in (hardware._cpu_description, hardware.machine):
        cached.cache_clear()
    yield
    for cached in (hardware._cpu_description, hardware.machine):
        cached.cache_clear()


def test_the_cpu_is_described_once_in_the_background_while_the_script_goes_on(
    fresh_description, monkeypatch
):
    started, go_on, calls = threading.Event(), threading.Event(), []

    def slow_cpuinfo():  # py-cpuinfo times the clock for a second
        calls.append(threading.current_thread().name)
        started.set()
        go_on.wait(10)
        return {"brand_raw": "Test CPU", "flags": ["avx2", "avx512f"]}

    monkeypatch.setattr(hardware.cpuinfo, "get_cpu_info", slow_cpuinfo)
    hardware.describe_cpu_in_background()  # returns at once
    assert started.wait(10) and not go_on.is_set()  # reading while the caller goes on
    go_on.set()
    found = hardware.machine()
    assert found["device"].startswith("Test CPU, ") and found["flags"] == ["avx2", "avx512f"]
    hardware.describe_cpu_in_background()  # already read: not again
    assert hardware.machine() is found and calls == ["cpuinfo"]


def test_a_cpu_description_that_fails_fails_machine(fresh_description, monkeypatch):
    def broken():
        raise OSError("cannot start the interpreter")

    monkeypatch.setattr(hardware.cpuinfo, "get_cpu_info", broken)
    with pytest.raises(OSError, match="cannot start the interpreter"):
        hardware.machine()


def test_the_cache_lives_under_xdg_cache_home_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hardware.cache_path() == str(tmp_path / "tp4-segmentation" / "speed.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hardware.cache_path() == str(
        tmp_path / "home" / ".cache" / "tp4-segmentation" / "speed.json"
    )


def test_policy_scope_sets_and_restores_the_global_policy():
    with speed.policy_scope("bfloat16"):
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        model = _build()
    assert keras.mixed_precision.global_policy().name == "float32"
    assert model.get_layer("enc1_conv1").compute_dtype == "bfloat16"
    assert model.get_layer("enc1_conv1").variable_dtype == "float32"
    assert model.get_layer("mask").compute_dtype == "float32"  # probabilities in float32


def test_recast_rebuilds_the_model_at_another_precision_with_the_same_weights():
    model = _build()
    x = np.random.default_rng(0).random((2, 16, 16, 1), dtype=np.float32)
    with speed.policy_scope("bfloat16"):
        fast = speed.recast(model)
    assert fast.get_layer("enc1_conv1").compute_dtype == "bfloat16"
    assert fast.get_layer("mask").compute_dtype == "float32" and fast.output.dtype == "float32"
    np.testing.assert_allclose(fast.predict(x, verbose=0), model.predict(x, verbose=0), atol=0.02)
    back = speed.recast(fast)  # at float32 again: exactly the original
    np.testing.assert_array_equal(back.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.slow
def test_the_real_probes_time_each_candidate_and_the_convolutions():
    candidates = [Choice("float32", False), Choice("bfloat16", True)]
    rates = speed.measure_candidates(candidates, _build, 2)
    assert set(rates) == set(candidates) and all(rate > 0 for rate in rates.values())
    assert hardware.bfloat16_speedup() > 0


def test_the_probe_trains_a_several_class_model_with_its_own_metrics():
    # A softmax over 3 classes: the probe's Dice/IoU must count 3 classes, as train.py's do.
    model = unet.build_unet((16, 16, 1), 4, 1, num_classes=3)
    rate = throughput.training_epoch(model, batch=2, jit_compile=False, steps=1)()
    assert rate > 0
