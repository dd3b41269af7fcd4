"""predict.py under faults: a silent or absent tracking server, a bad --output, a broken model."""

import os
import socket
import sys
import time

import keras
import nibabel as nib
import numpy as np
import pytest
from helpers import run_predict
from PIL import Image

import unet
from tp4 import cli


@pytest.fixture()
def script_defaults(monkeypatch):
    """cli.setup()'s MLflow settings as a script gets them (none set beforehand), undone after."""
    for name in cli.MLFLOW_HTTP_DEFAULTS:
        monkeypatch.setenv(name, "")  # recorded, so that what setup() sets is removed at the end
        monkeypatch.delenv(name)


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(path)
    return str(path)


@pytest.fixture()
def silent_server():
    """The address of a server that never answers: its accept queue is full (listen(0) plus one
    connection), so the kernel drops every new connection attempt, like a blackholed address."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        with socket.create_connection(server.getsockname()):
            yield "http://{}:{}".format(*server.getsockname())


@pytest.fixture()
def refusing_server():
    """The address of a port where nothing listens (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    "server", [pytest.param("silent_server", marks=pytest.mark.slow), "refusing_server"]
)
def test_an_unreachable_tracking_server_fails_in_seconds(
    server, request, script_defaults, image, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", request.getfixturevalue(server))
    start = time.perf_counter()
    code, out, err = run_predict(["runs:/0123456789abcdef/model", image, "--output", "out"], capsys)
    elapsed = time.perf_counter() - start
    assert code == 2 and out == [] and len(err) == 1, err
    assert err[0].startswith("predict.py: error: cannot load the model runs:/0123456789abcdef")
    assert elapsed < 10, f"{elapsed:.0f} s"  # the whole command, TensorFlow's import included: < 15
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """A model of finite weights whose outputs are not finite: 1e30 x 1e30 overflows float32, so
    its logits are -inf where the input is not 0 (a sigmoid of exactly 0 there), saved as .keras."""
    inputs = keras.Input((32, 32, 1))
    hidden = keras.layers.Conv2D(1, 1)(inputs)
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(hidden))
    model.set_weights([np.full_like(w, -1e30 if w.ndim else 0) for w in model.get_weights()])
    path = tmp_path_factory.mktemp("models") / "diverged.keras"
    model.save(path)
    return str(path)


@pytest.mark.parametrize("broken", ["output bias -inf", "kernel +inf", "kernel NaN"])
def test_a_model_with_non_finite_weights_is_refused_when_loaded(broken, image, tmp_path, capsys):
    model = unet.build_unet((32, 32, 1), 8, 2)
    layer = model.get_layer("mask") if "bias" in broken else model.layers[1]
    variable = layer.bias if "bias" in broken else layer.kernel
    values = np.asarray(variable).copy()
    values.flat[0] = {"output bias -inf": -np.inf, "kernel +inf": np.inf}.get(broken, np.nan)
    variable.assign(values)
    model.save(tmp_path / "broken.keras")
    code, out, err = run_predict(
        [str(tmp_path / "broken.keras"), image, "--output", str(tmp_path / "out")], capsys
    )
    assert code == 2 and out == [] and len(err) == 1, err
    assert err[0].startswith(f"predict.py: error: {tmp_path / 'broken.keras'}: weights NaN or ")
    assert f"(1 in {variable.path})" in err[0]
    assert not (tmp_path / "out").exists()


def _output_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    return tmp_path / "notes.txt" / "masks", "notes.txt exists and is not a folder"


BAD_OUTPUTS = {
    "an existing file": lambda tmp_path: (tmp_path / "x.png", "x.png exists and is not a folder"),
    "a folder under a file": _output_under_a_file,
    "a read-only place": lambda tmp_path: ("/sys/tp4-masks", "cannot write in /sys"),
}


LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="/sys is Linux's")


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=[LINUX_ONLY] if "read-only" in case else []) for case in BAD_OUTPUTS],
)
def test_a_bad_output_is_refused_before_the_model_is_loaded(case, image, tmp_path, capsys):
    output, expected = BAD_OUTPUTS[case](tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, out, err = run_predict(["not-loaded.keras", image, "--output", str(output)], capsys)
    assert code == 2 and out == [] and len(err) == 1, err
    assert err[0].startswith(f"predict.py: error: --output {output}: ") and expected in err[0]
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("suffix", [".png", ".nii.gz"])
def test_a_model_with_non_finite_outputs_is_refused_and_writes_nothing(
    nan_model, suffix, tmp_path, capsys
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        array = np.random.default_rng(0).random((32, 32, 3 if suffix == ".nii.gz" else 1))
        if suffix == ".png":
            Image.fromarray((array[..., 0] * 255).astype(np.uint8)).save(inputs / f"{name}.png")
        else:
            nib.save(
                nib.Nifti1Image(array.astype(np.float32), np.eye(4)), inputs / f"{name}{suffix}"
            )
    code, out, err = run_predict(
        [nan_model, str(inputs), "--output", str(tmp_path / "out")], capsys
    )
    assert code == 2 and out == [] and len(err) == 1, (
        err
    )  # one line for the batch, not one per file
    assert err[0].startswith(f"predict.py: error: the model's output on {inputs / ('a' + suffix)}")
    assert "is not finite (" in err[0]
    assert os.listdir(tmp_path / "out") == []


def _folder_with_truth(tmp_path):
    """same/a.png and its ground truth same/a_mask.png (0/255), as a user keeps them."""
    folder = tmp_path / "same"
    folder.mkdir()
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(folder / "a.png")
    truth = np.zeros((32, 32), np.uint8)
    truth[8:20, 8:20] = 255
    Image.fromarray(truth).save(folder / "a_mask.png")
    return folder, (folder / "a_mask.png").read_bytes()


def test_an_output_into_the_input_folder_that_would_replace_its_ground_truth_is_refused(
    tmp_path, capsys
):
    folder, truth = _folder_with_truth(tmp_path)
    code, out, err = run_predict(["not-loaded.keras", str(folder), "--output", str(folder)], capsys)
    assert code == 2 and len(err) == 1, err  # before the model: it does not exist
    assert err[0].startswith(f"predict.py: error: --output {folder} is the folder of the input")
    assert f"{folder / 'a_mask.png'} is already there" in err[0]
    # a_mask.png is not an input either: the folder's listing leaves it out, and says so.
    assert out == [
        f"{folder}: left out 1 file(s) named like predict.py's outputs (a_mask.png); "
        "give them by name to segment them"
    ]
    assert sorted(os.listdir(folder)) == ["a.png", "a_mask.png"]
    assert (folder / "a_mask.png").read_bytes() == truth


def test_an_output_that_is_an_input_under_any_name_is_refused(tmp_path, capsys):
    folder, truth = _folder_with_truth(tmp_path)
    (tmp_path / "link").symlink_to(folder)
    (tmp_path / "out").mkdir()
    os.link(folder / "a_mask.png", tmp_path / "out" / "b_mask.png")  # one file, two names
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "b.png")
    cases = {  # inputs, --output: each would replace a_mask.png
        "given by name": ([folder / "a.png", folder / "a_mask.png"], folder),
        "through a link": ([folder / "a.png", folder / "a_mask.png"], tmp_path / "link"),
        "a hard link": ([tmp_path / "b.png", folder / "a_mask.png"], tmp_path / "out"),
    }
    for case, (inputs, output) in cases.items():
        args = ["not-loaded.keras", *map(str, inputs), "--output", str(output)]
        code, out, err = run_predict(args, capsys)
        assert code == 2 and out == [] and len(err) == 1, (case, err)
        assert "would replace the input" in err[0] and str(folder / "a_mask.png") in err[0], case
    assert (folder / "a_mask.png").read_bytes() == truth


def test_a_folder_of_outputs_only_has_nothing_to_segment(tmp_path, capsys):
    folder = tmp_path / "predictions"
    folder.mkdir()
    for name in ("a_mask.png", "a_overlay.png"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / name)
    code, out, err = run_predict(["not-loaded.keras", str(folder), "--output", "x"], capsys)
    assert code == 2 and len(out) == 1 and "left out 2 file(s)" in out[0]
    assert err == [
        f"predict.py: error: {folder} holds no PNG, JPEG, TIFF, NIfTI, NRRD, MHA/MHD file or "
        "DICOM series to segment"
    ]
