"""Export a trained model to ONNX and to a TensorFlow SavedModel, each checked against Keras.

What this module teaches:
- another runtime gets the same function or nothing: the exported network is run on random inputs
  beside the Keras model it came from (ONNX by onnxruntime, the SavedModel by TensorFlow), and the
  export is refused if any output differs by more than 1e-4 (float32);
- the converter: Keras 3's own `model.export(format="onnx")`. It traces the model as the SavedModel
  export does (one input signature, the batch dynamic) and converts that graph with tf2onnx, which
  it patches for NumPy 2. tf2onnx's `from_keras` alone does not take Keras 3 models (KeyError on
  its input tensors, tf2onnx 1.17 with TensorFlow 2.21);
- the fused batch norm (tp4/models/batchnorm.py) exports as it is: in inference it is one
  FusedBatchNormV3 operation, which tf2onnx turns into an ONNX BatchNormalization and folds into
  the convolution before it. A model trained in bfloat16 is exported from its float32 rebuild
  (same weights): ONNX runtimes on CPUs compute in float32;
- the preprocessing stays in this project's code: predict.py takes the .onnx file as it takes a
  .keras one (`python predict.py model.onnx scan.png`), and runs it with onnxruntime.

    python -m tp4.serving.export unet.keras --output exported/
    python -m tp4.serving.export models:/tp4-unet@champion --output exported/
    python predict.py exported/model.onnx scan.png --output predictions/
"""

import os
import shutil
import sys
import tempfile
import warnings

import keras
import numpy as np
import onnx
import tensorflow as tf

from tp4 import cli
from tp4.inference import onnxnetwork, segment
from tp4.models import batchnorm
from tp4.perf import speed

TOLERANCE = 1e-4  # largest |difference| of an output value allowed, in float32
ONNX_FILE, SAVED_MODEL = "model.onnx", "saved_model"


def float32(model) -> keras.Model:
    """`model` in float32 (rebuilt with the same weights if it was trained in 16 bits)."""
    if speed.trained_precision(model) == "float32":
        return model
    with speed.policy_scope("float32"):
        return speed.recast(model)


def largest_difference(run, model, inputs) -> float:
    """The largest |difference| between `run(inputs)` and the Keras model's outputs."""
    expected = model.predict(inputs, verbose=0)
    return float(np.max(np.abs(np.asarray(run(inputs)) - expected)))


def export(model, folder: str, examples: int = 4, seed: int = 0) -> dict:
    """Write `folder`/model.onnx and `folder`/saved_model/, each written whole (a temporary folder
    renamed) and checked on `examples` random inputs; ValueError if an output differs by more
    than TOLERANCE. Returns what was measured: the largest differences, the ONNX opset and size.

    Args:
        model: a Keras segmentation model (any precision; exported in float32).
        folder: where the two go; it must not hold them already.
    """
    targets = [os.path.join(folder, name) for name in (ONNX_FILE, SAVED_MODEL)]
    if any(os.path.lexists(path) for path in targets):
        raise ValueError(f"{folder} already holds {ONNX_FILE} or {SAVED_MODEL}: give another")
    os.makedirs(folder, exist_ok=True)
    model = float32(model)
    inputs = np.random.default_rng(seed).random((examples, *model.input_shape[1:]), np.float32)
    model.predict(inputs[:1], verbose=0)  # the export needs a model that has been called
    work = tempfile.mkdtemp(dir=folder, prefix=".partial-export-")
    try:
        onnx_path, saved_path = (os.path.join(work, name) for name in (ONNX_FILE, SAVED_MODEL))
        with warnings.catch_warnings():  # Keras' tf2onnx patch warns about np.object
            warnings.simplefilter("ignore", FutureWarning)
            model.export(onnx_path, format="onnx", verbose=False)
        model.export(saved_path, format="tf_saved_model", verbose=False)
        saved = tf.saved_model.load(saved_path)
        measured = {
            "onnx": largest_difference(onnxnetwork.OnnxNetwork(onnx_path).predict, model, inputs),
            "saved_model": largest_difference(saved.serve, model, inputs),
            "opset": onnx.load(onnx_path).opset_import[0].version,
            "batch_norm_nodes": sum(
                node.op_type == "BatchNormalization" for node in onnx.load(onnx_path).graph.node
            ),
            "onnx_bytes": os.path.getsize(onnx_path),
        }
        for name in ("onnx", "saved_model"):
            if not measured[name] <= TOLERANCE:
                raise ValueError(
                    f"the {name} export differs from the Keras model by {measured[name]:.2g} "
                    f"(more than {TOLERANCE:g}): nothing written"
                )
        for path, target in zip((onnx_path, saved_path), targets):
            os.replace(path, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return measured


def main(argv=None):
    parser = cli.argument_parser("python -m tp4.serving.export", __doc__)
    parser.add_argument(
        "model", help="a .keras file, an MLflow model folder, or a runs:/ or models:/ URI"
    )
    parser.add_argument(
        "--output", default="exported", help="folder for model.onnx and saved_model/"
    )
    parser.add_argument(
        "--examples",
        type=cli.at_least(1),
        default=4,
        help="random inputs the exports are checked on",
    )
    args = parser.parse_args(argv)
    cli.setup()
    with cli.command_line_errors(parser):
        model = segment.load_model(args.model)
        if isinstance(model, onnxnetwork.OnnxNetwork):
            raise ValueError(f"{args.model} is exported already")
        fused = sum(isinstance(layer, batchnorm.FusedBatchNormalization) for layer in model.layers)
        print(
            f"{args.model}: input {model.input_shape}, {speed.trained_precision(model)}, "
            f"{fused} fused batch norm layers",
            flush=True,
        )
        measured = export(model, args.output, args.examples)
        print(
            f"{os.path.join(args.output, ONNX_FILE)}: ONNX opset {measured['opset']}, "
            f"{measured['onnx_bytes'] / 1e6:.1f} MB (Keras 3 model.export, tf2onnx); onnxruntime "
            f"vs Keras on {args.examples} random inputs: largest difference "
            f"{measured['onnx']:.1e} (limit {TOLERANCE:g}); batch norm: "
            f"{measured['batch_norm_nodes']} BatchNormalization nodes left (tf2onnx folds them "
            "into the convolutions)"
        )
        print(
            f"{os.path.join(args.output, SAVED_MODEL)}/: SavedModel (serving endpoint `serve`); "
            f"vs Keras: largest difference {measured['saved_model']:.1e}"
        )
        print(f"next: python predict.py {os.path.join(args.output, ONNX_FILE)} IMAGES --output DIR")


if __name__ == "__main__":
    sys.exit(main())
