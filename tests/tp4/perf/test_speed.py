"""speed.py: which precisions a machine supports, the choice among measured candidates, the cache
and its key, the rebuilt model at another precision. Fake measurements: no timing is asserted."""

import json

import keras
import numpy as np
import pytest

import unet
from tp4.perf import speed, throughput
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
    assert speed.supported_precisions(found) == expected


class FakeProbe:
    """Measures nothing: returns given rates, and records what it was asked."""

    def __init__(self, rates):
        self.rates, self.calls = rates, []

    def __call__(self, candidates, build, batch, mode):
        self.calls.append((list(candidates), batch, mode))
        return {c: self.rates[c] for c in candidates}


RATES = {
    Choice("float32", False): 15.0,
    Choice("float32", True): 10.0,
    Choice("bfloat16", False): 50.0,
    Choice("bfloat16", True): 11.0,
}


@pytest.fixture()
def xeon(monkeypatch, tmp_path):
    """A machine with bfloat16 arithmetic, and a cache of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(speed, "machine", lambda: XEON)


def _build():
    return unet.build_unet((16, 16, 1), base_filters=4, depth=2)


def test_explicit_values_are_taken_as_given_without_measuring(xeon, monkeypatch):
    def refuse(*args):
        raise AssertionError("measured")

    assert speed.choose("float16", "on", _build, 8, measure=refuse) == Choice("float16", True)
    assert speed.choose("bfloat16", False, _build, 8, measure=refuse) == Choice("bfloat16", False)
    # One candidate only (float32 on a machine without 16-bit arithmetic): nothing to measure.
    monkeypatch.setattr(speed, "machine", lambda: EPYC)
    assert speed.choose("auto", "off", _build, 8, measure=refuse) == Choice("float32", False)


def test_auto_measures_every_candidate_once_picks_the_fastest_and_caches(xeon, capsys):
    probe = FakeProbe(RATES)
    assert speed.choose("auto", "auto", _build, 8, measure=probe) == Choice("bfloat16", False)
    assert probe.calls == [(list(RATES), 8, "train")]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("choosing precision and XLA for this machine: Intel Xeon, 2 cores")
    for candidate, rate in RATES.items():
        assert f"  {candidate.label}: {rate:.2f} examples/s" in out
    assert out[-1].startswith("precision and XLA for this machine: bfloat16, XLA off (measured now")

    # Cached: the same machine, model and batch measure nothing again, a subset included.
    assert speed.choose("auto", "auto", _build, 8, measure=probe) == Choice("bfloat16", False)
    assert speed.choose("auto", "on", _build, 8, measure=probe) == Choice("bfloat16", True)
    assert speed.choose("float32", "auto", _build, 8, measure=probe) == Choice("float32", False)
    assert len(probe.calls) == 1
    assert "cached" in capsys.readouterr().out.splitlines()[-1]
    with open(speed.cache_path()) as f:
        cache = json.load(f)
    (entry,) = cache.values()
    assert entry["examples_per_second"] == {c.label: rate for c, rate in RATES.items()}


def test_another_batch_model_or_mode_is_measured_again(xeon):
    probe = FakeProbe(RATES)
    speed.choose("auto", "auto", _build, 8, measure=probe)
    speed.choose("auto", "auto", _build, 4, measure=probe)
    speed.choose("auto", "auto", _build, 8, "infer", measure=probe)
    speed.choose("auto", "auto", lambda: unet.build_unet((32, 32, 1), 4, 2), 8, measure=probe)
    assert [(batch, mode) for _, batch, mode in probe.calls] == [
        (8, "train"),
        (4, "train"),
        (8, "infer"),
        (8, "train"),
    ]


def test_a_candidate_that_cannot_run_is_never_chosen(xeon):
    rates = {**RATES, Choice("bfloat16", False): None}
    assert speed.choose("auto", "auto", _build, 8, measure=FakeProbe(rates)) == Choice(
        "float32", False
    )


def test_the_cache_key_names_machine_versions_model_batch_and_mode():
    model = _build()
    key = speed.probe_key(XEON, model, 8, "train")
    for part in ("Intel Xeon, 2 cores", "TensorFlow 2.21.0", "Keras 3.15.1", "UNet 16x16x1"):
        assert part in key
    assert f"{model.count_params()} parameters" in key and "batch 8" in key
    others = [
        speed.probe_key(EPYC, model, 8, "train"),
        speed.probe_key({**XEON, "flags": XEON["flags"][:-1]}, model, 8, "train"),
        speed.probe_key({**XEON, "tensorflow": "2.22.0"}, model, 8, "train"),
        speed.probe_key(XEON, model, 16, "train"),
        speed.probe_key(XEON, model, 8, "infer"),
    ]
    assert len({key, *others}) == 6


def test_the_cache_lives_under_xdg_cache_home_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert speed.cache_path() == str(tmp_path / "tp4-segmentation" / "speed.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert speed.cache_path() == str(
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
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_the_real_probe_times_each_candidate(mode):
    candidates = [Choice("float32", False), Choice("bfloat16", True)]
    rates = speed.measure_candidates(candidates, _build, 2, mode)
    assert set(rates) == set(candidates) and all(rate > 0 for rate in rates.values())


def test_the_probe_trains_a_several_class_model_with_its_own_metrics():
    # A softmax over 3 classes: the probe's Dice/IoU must count 3 classes, as train.py's do.
    model = unet.build_unet((16, 16, 1), 4, 1, num_classes=3)
    rate = throughput.training_epoch(model, batch=2, jit_compile=False, steps=1)()
    assert rate > 0
