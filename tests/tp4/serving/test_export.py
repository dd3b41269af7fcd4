"""python -m tp4.serving.export: ONNX and SavedModel files that compute what the Keras model does,
and predict.py on the .onnx file gives the .keras file's masks."""

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
from helpers import run_predict
from PIL import Image

import unet
from tp4.models import batchnorm
from tp4.serving import export


@pytest.fixture()
def fused_unet(tmp_path):
    """A tiny U-Net with the fused batch norm whose moving statistics are not the initial 0 and 1
    (a batch norm that does nothing would export wrong unnoticed), saved as a .keras file."""
    keras.utils.set_random_seed(0)
    model = unet.build_unet((32, 32, 1), 8, 3, batch_norm=batchnorm.FusedBatchNormalization)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, batchnorm.FusedBatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.2, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    model.save(tmp_path / "unet.keras")
    return model, str(tmp_path / "unet.keras")


@pytest.mark.slow
def test_the_exports_compute_what_keras_does_and_predict_takes_the_onnx_file(
    fused_unet, tmp_path, capsys
):
    model, path = fused_unet
    export.main([path, "--output", str(tmp_path / "exported")])
    out = capsys.readouterr().out
    assert "10 fused batch norm layers" in out and "0 BatchNormalization nodes left" in out
    onnx_file = str(tmp_path / "exported" / "model.onnx")
    onnx.checker.check_model(onnx_file)
    # Other inputs than the export's own check, another batch size, onnxruntime called directly.
    inputs = np.random.default_rng(7).random((3, 32, 32, 1), np.float32)
    expected = model.predict(inputs, verbose=0)
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: inputs})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    saved = tf.saved_model.load(str(tmp_path / "exported" / "saved_model"))
    np.testing.assert_allclose(saved.serve(inputs).numpy(), expected, atol=1e-5, rtol=0)

    image = np.random.default_rng(2).integers(0, 256, (45, 60)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "scan.png")
    masks = []
    for name, model_file in [("keras", path), ("onnx", onnx_file)]:
        output = tmp_path / name
        code, _, err = run_predict(
            [model_file, str(tmp_path / "scan.png"), "--output", str(output)], capsys
        )
        assert code == 0, err
        masks.append(np.asarray(Image.open(output / "scan_mask.png")))
    np.testing.assert_array_equal(masks[0], masks[1])


def test_an_export_never_replaces_files_and_says_so_in_one_line(fused_unet, tmp_path, capsys):
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "model.onnx").write_text("an earlier export")
    with pytest.raises(SystemExit) as exit_info:
        export.main([fused_unet[1], "--output", str(tmp_path / "exported")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds model.onnx" in err[0]
    assert (tmp_path / "exported" / "model.onnx").read_text() == "an earlier export"
