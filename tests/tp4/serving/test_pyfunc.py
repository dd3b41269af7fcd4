"""The logged model as a service: `mlflow models serve` answers with predict.py's masks; a bad
request is a 400 with one line."""

import mlflow
import nibabel as nib
import numpy as np
import pytest
from helpers import log_tiny_model, run_predict
from PIL import Image

from tools import serve_bench
from tp4.serving import pyfunc
from tp4.tracking import registry

BAD_REQUESTS = [
    (np.zeros((2, 3, 4, 5)), "inputs must be an image (H, W) or a volume (X, Y, Z), got an array"),
    (np.array([["a", "b"]]), "inputs must be numbers (raw intensities), got text"),
    (np.array([[True, False]]), "got true/false values"),
    (np.zeros((0, 5)), "inputs are empty"),
    (np.full((4, 4), np.nan), "inputs hold 16 NaN or infinite values"),
    (np.zeros((40, 40)), "inputs hold 1,600 values, more than this server takes (1,000)"),
]


def test_a_bad_request_is_refused_with_one_line(store, monkeypatch):
    monkeypatch.setenv("TP4_SERVING_MAX_VALUES", "1000")
    served = mlflow.pyfunc.load_model(log_tiny_model()[2].model_uri)
    for values, message in BAD_REQUESTS:
        with pytest.raises(pyfunc.RequestError) as error:
            served.predict(values)
        assert message in error.value.reason and "\n" not in error.value.reason
        assert error.value.get_http_status_code() == 400
    with pytest.raises(pyfunc.RequestError, match="overlap must be in"):
        served.predict(np.zeros((8, 8)), params={"overlap": 1.0})


def test_the_signature_says_what_the_service_takes_and_gives(store):
    metadata = mlflow.pyfunc.load_model(log_tiny_model()[2].model_uri).metadata
    assert metadata.get_input_schema() is None  # an image or a volume: pyfunc.py says why
    assert metadata.get_output_schema().inputs[0].shape == (-1, -1)
    assert metadata.get_output_schema().inputs[0].type == np.dtype(np.uint8)
    assert {p.name: p.default for p in metadata.get_params_schema().params} == {
        "threshold": 0.5,
        "overlap": 0.5,
        "tta": False,
    }
    assert "raw intensities" in metadata.metadata["serving"]


@pytest.mark.slow
def test_the_server_answers_with_predict_pys_masks(store, tmp_path, capsys):
    network, run_id, _ = log_tiny_model("served", seed=3)
    registry.promote(run_id, "served@champion")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 45)).astype(np.uint8)  # a PNG's 8-bit grey levels
    Image.fromarray(image).save(tmp_path / "scan.png")
    volume = (rng.random((20, 16, 5)) * 500).astype(np.float32)
    # Stored in RAS (an identity affine): the order predict.py reorients volumes to, and the one a
    # client sends.
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.5, 1.0])), tmp_path / "case.nii.gz")
    # A threshold at the median probability: masks half foreground, whatever the random weights.
    threshold = float(np.median(network.predict(image[None, :32, :32, None] / 255, verbose=0)))
    code, _, err = run_predict(
        ["models:/served@champion", str(tmp_path / "scan.png"), str(tmp_path / "case.nii.gz")]
        + ["--output", str(tmp_path / "out"), "--threshold", str(threshold)],
        capsys,
    )
    assert code == 0, err
    expected_image = np.asarray(Image.open(tmp_path / "out" / "scan_mask.png")) // 255
    expected_volume = np.asarray(nib.load(tmp_path / "out" / "case_mask.nii.gz").dataobj)
    assert 0 < expected_image.mean() < 1

    limit = {"TP4_SERVING_MAX_VALUES": "100000"}
    with serve_bench.serve("models:/served@champion", limit) as address:
        answer = serve_bench.post(address, image, threshold=threshold)
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(np.array(answer.json()["predictions"]), expected_image)
        answer = serve_bench.post(address, volume, threshold=threshold)
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(np.array(answer.json()["predictions"]), expected_volume)
        for values, message in [*BAD_REQUESTS[:2], (np.zeros((400, 400)), "more than this")]:
            answer = serve_bench.post(address, values)
            assert answer.status_code == 400
            assert message in answer.json()["message"]
            assert "\n" not in answer.json()["message"]
        answer = serve_bench.post(address, image, threshold=2)
        assert (answer.status_code, answer.json()["message"]) == (
            400,
            "threshold must be between 0 and 1, got 2.0",
        )
