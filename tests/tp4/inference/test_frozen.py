"""tp4/inference/frozen.py: frozen weights are faster only where weights never change, so only an
inference-only process's entry point declares them; predict.py run as a script gives the masks of
predict.py called in-process."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
from helpers import run_predict
from PIL import Image

import predict  # noqa: F401 (imported: that alone must not freeze this process)
import tp4
import unet
from tp4.inference import frozen

# A process that declares its weights frozen, predicts, then changes them: what oneDNN computes.
STALE = textwrap.dedent(
    """
    from tp4 import startup
    import json, sys, numpy as np, keras
    from tp4.inference import frozen
    if sys.argv[1] == "frozen":
        frozen.inference_only_process()
    import unet
    keras.utils.set_random_seed(0)
    model = unet.build_unet((32, 32, 1), 8, 3, batch_norm=None)
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    before = model.predict_on_batch(x)
    halved = [w * 0.5 for w in model.get_weights()]
    model.set_weights(halved)
    after = model.predict_on_batch(x)
    fresh = keras.Model.from_config(model.get_config())
    fresh.set_weights(halved)
    print(json.dumps({"stale": float(np.abs(after - fresh.predict_on_batch(x)).max())}))
    """
)


def _stale(mode):
    done = subprocess.run(
        [sys.executable, "-c", STALE, mode],
        cwd=tp4.ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != frozen.VARIABLE},
    )
    return float(done.stdout.strip().splitlines()[-1].split(": ")[1].rstrip("}"))


def test_frozen_weights_are_kept_from_the_first_call_so_only_inference_processes_declare_them():
    # Why the flag is for inference-only processes: new weights after the first call are ignored.
    # `stale`: how far the model's output after set_weights is from a fresh model's with them.
    assert _stale("plain") == 0.0
    assert _stale("frozen") > 1e-3


def test_importing_predict_leaves_this_process_free_to_train():
    assert frozen.VARIABLE not in os.environ or not frozen.assumed()


def test_predict_py_as_a_script_writes_the_masks_of_predict_in_process(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    model = unet.build_unet((32, 32, 1), 8, 3)
    model.save(tmp_path / "m.keras")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):  # the second and third calls run on the weights kept at the first
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / f"{i}.png")
    common = [str(tmp_path / "m.keras"), str(folder), "--precision", "float32", "--xla", "off"]
    assert run_predict([*common, "--output", str(tmp_path / "in")], capsys)[0] == 0
    subprocess.run(
        [sys.executable, os.path.join(tp4.ROOT, "predict.py"), *common]
        + ["--output", str(tmp_path / "script")],
        check=True,
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != frozen.VARIABLE},
    )
    for i in range(3):
        expected = np.asarray(Image.open(tmp_path / "in" / f"{i}_mask.png"))
        found = np.asarray(Image.open(tmp_path / "script" / f"{i}_mask.png"))
        np.testing.assert_array_equal(found, expected)
