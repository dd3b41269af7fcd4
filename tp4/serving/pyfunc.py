"""The logged model as a service: raw intensities of any size in, the mask of that size out.

What this module teaches:
- a model that leaves the lab must take its preprocessing with it (nnU-Net's maintainers refuse
  ONNX exports for that reason, nnU-Net #1730). The model train.py and conv3d.py log has two
  flavors: `keras`, the network (`mlflow.keras.load_model`, what predict.py loads), and
  `python_function`, whose loader is this module (`mlflow.pyfunc.load_model`, what
  `mlflow models serve` runs): the network behind tp4/inference/segment.py, the very code
  predict.py runs (normalization, fit to the network and back, threshold or argmax). That code is
  copied into the model's `code/` folder, so that a server needs the model and the requirements
  only;
- a request is checked before any work, and a bad one is an HTTP 400 with one line saying what is
  wrong (`RequestError`): not numbers, not an image or a volume, too large, NaN.

    mlflow models serve -m models:/tp4-unet@champion --env-manager local --port 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"inputs": [[0, 10, 20], [30, 40, 50], [60, 70, 80]], "params": {"tta": true}}'

A volume is posted in RAS voxel order (axes towards the patient's right, anterior, superior): the
order predict.py reorients a file's volume to before segmenting it, as in training. The signature
gives the parameters and the output; its input is left open on purpose: an MLflow
tensor spec has one rank, and a 2D model takes images (H, W) and volumes (X, Y, Z), as predict.py
does. The model checks the input itself: MLflow's own schema errors repeat the whole input.
"""

import importlib.metadata
import json
import os
import shutil

import numpy as np
import tensorflow as tf
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

import tp4
from tp4.inference import segment

# Values of one request: a 256x256x256 volume, or a 4096x4096 image; a server's operator sets
# another limit with TP4_SERVING_MAX_VALUES.
MAX_VALUES = 256**3
PARAMS = ParamSchema(
    [
        ParamSpec("threshold", "double", 0.5),
        ParamSpec("overlap", "double", 0.5),
        ParamSpec("tta", "boolean", False),
    ]
)
# What the served model runs: the package and the exercise modules, and their libraries.
CODE = ("tp4", "data.py", "metrics.py", "losses.py", "unet.py")
LIBRARIES = ("keras", "numpy", "scipy", "pillow", "nibabel", "matplotlib", "py-cpuinfo", "mlflow")


class RequestError(MlflowException):
    """A bad request: HTTP 400 with this one line. MLflow's server puts the whole input in front of
    an error's message ("Failed to predict data '...'"); the response keeps the message alone."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.reason = message

    def serialize_as_json(self):
        return json.dumps({"error_code": self.error_code, "message": self.reason})


def _kind(network) -> str:
    """What `network` takes, in words."""
    if len(network.input_shape) == 5:
        return "a volume (X, Y, Z)"
    channels = network.input_shape[-1]
    return (
        "an image (H, W) or a volume (X, Y, Z)" if channels == 1 else f"an image (H, W, {channels})"
    )


def check_request(values, network) -> tuple[np.ndarray, bool]:
    """(float32 array, is a volume) of a request's input, or RequestError saying what is wrong.

    Args:
        values: the posted `inputs`, as MLflow parsed them (numpy's types for JSON's).
        network: the Keras model, whose input says what it takes (rank, channels).
    """
    array = np.asarray(values)
    if array.dtype.kind not in "iuf":
        found = {"b": "true/false values", "U": "text", "O": "a mix of kinds or nulls"}
        kind = found.get(array.dtype.kind, array.dtype)
        raise RequestError(f"inputs must be numbers (raw intensities), got {kind}")
    channels, volume_model = network.input_shape[-1], len(network.input_shape) == 5
    image = array.ndim == 2 and channels == 1 or array.ndim == 3 and array.shape[-1] == channels > 1
    volume = array.ndim == 3 and channels == 1
    if not (volume if volume_model else image or volume):
        raise RequestError(f"inputs must be {_kind(network)}, got an array of shape {array.shape}")
    limit = int(os.environ.get("TP4_SERVING_MAX_VALUES", MAX_VALUES))
    if array.size > limit:
        raise RequestError(
            f"inputs hold {array.size:,} values, more than this server takes ({limit:,}): "
            "send smaller parts"
        )
    if min(array.shape) < 1:
        raise RequestError(f"inputs are empty: shape {array.shape}")
    if not np.isfinite(array).all():
        raise RequestError(
            f"inputs hold {np.count_nonzero(~np.isfinite(array))} NaN or infinite values"
        )
    return array.astype(np.float32), volume


def check_params(params) -> dict:
    """The parameters with their defaults, or RequestError."""
    values = {spec.name: spec.default for spec in PARAMS.params} | dict(params or {})
    if not 0 < values["threshold"] < 1:
        raise RequestError(f"threshold must be between 0 and 1, got {values['threshold']}")
    if not 0 <= values["overlap"] < 1:
        raise RequestError(f"overlap must be in [0, 1), got {values['overlap']}")
    return values


class Segmenter:
    """The python_function flavor's model: `predict` segments one image or volume."""

    def __init__(self, network):
        self.network = network

    def predict(self, model_input, params=None):
        """uint8 labels (0/1, or 0..C-1) of the input's shape, spatial axes only."""
        values, volume = check_request(model_input, self.network)
        params = check_params(params)
        threshold, tta = params["threshold"], params["tta"]
        if volume:
            return segment.segment_volume(self.network, values, threshold, params["overlap"], tta)[
                0
            ]
        image = values if values.ndim == 3 else values[..., None]
        return segment.segment_image(self.network, image, threshold, tta)[0]


def _load_pyfunc(path):
    """MLflow's entry point (the python_function flavor's loader_module): the Segmenter of the
    model at `path`, at the precision predict.py takes for it on this machine (segment.at_speed)."""
    return Segmenter(segment.at_speed(segment.load_model(path)))


def signature(network) -> ModelSignature:
    """The served model's signature: the parameters (threshold, overlap, tta) and the output,
    uint8 labels of the input's spatial shape; the input is left open (see the module docstring)."""
    rank = 3 if len(network.input_shape) == 5 else 2
    return ModelSignature(
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1,) * rank)]), params=PARAMS
    )


def input_example(network, examples) -> np.ndarray:
    """A request's input: the first of `examples` (a batch the network takes) as a client sends it,
    an image (H, W[, C]) or a volume (X, Y, Z)."""
    first = examples[0]
    if first.ndim == 4:  # (D, H, W, 1) patch -> (X, Y, Z) = (H, W, D)
        return np.moveaxis(first[..., 0], 0, -1)
    return first[..., 0] if first.shape[-1] == 1 else first


def description(network) -> dict:
    """The model's `metadata` in its MLmodel: what a request holds, in words."""
    return {
        "serving": f"POST /invocations {{'inputs': {_kind(network)} of raw intensities, any size "
        f"(at most {MAX_VALUES:,} values), 'params': {{'threshold': 0.5, 'overlap': 0.5, "
        "'tta': false}}: the uint8 mask of the input's size (0/1, or labels 0..C-1)"
    }


def requirements() -> list[str]:
    """The served model's pip requirements, at the versions installed here (TensorFlow by its
    generic name: tensorflow-cpu is a Linux build of it)."""
    versions = [f"{name}=={importlib.metadata.version(name)}" for name in LIBRARIES]
    return [f"tensorflow=={tf.__version__}", *versions]


def add_to(path, mlflow_model, network) -> None:
    """Make `network`, saved at `path` in the Keras flavor, servable: its python_function flavor
    loads through this module, from a copy of the code in `path`/code, with the service's
    signature (the Keras flavor requires one of the network's: batch, fixed size)."""
    code = os.path.join(path, "code")
    for name in CODE:
        source = os.path.join(tp4.ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(
                source, os.path.join(code, name), ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            os.makedirs(code, exist_ok=True)
            shutil.copy(source, code)
    mlflow_model.flavors["python_function"].update(loader_module=__name__, code="code")
    mlflow_model.signature = signature(network)
    mlflow_model.save(os.path.join(path, "MLmodel"))
