"""An ONNX file run by onnxruntime, with the face of a Keras model that segment.py uses.

What this module teaches: an exported network (python -m tp4.serving.export) is the same function
as the Keras one, so the same preprocessing drives it: segment.py needs `input_shape`,
`output_shape`, `predict` and `predict_on_batch`, nothing else. onnxruntime runs it without
TensorFlow's kernels.
"""

import numpy as np
import onnxruntime


class OnnxNetwork:
    """The network of an .onnx file (float32 input (N, H, W, C) or (N, D, H, W, C)).

    Args:
        path: the .onnx file.
    """

    def __init__(self, path: str):
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
        self.session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        (self.input,), (output,) = self.session.get_inputs(), self.session.get_outputs()
        self.input_shape = _shape(self.input.shape)
        self.output_shape = _shape(output.shape)

    def predict_on_batch(self, batch) -> np.ndarray:
        return self.session.run(None, {self.input.name: np.asarray(batch, np.float32)})[0]

    def predict(self, inputs, batch_size=8, verbose=0) -> np.ndarray:
        """Keras' predict: the outputs of `inputs`, `batch_size` at a time."""
        parts = [
            self.predict_on_batch(inputs[i : i + batch_size])
            for i in range(0, len(inputs), batch_size)
        ]
        return np.concatenate(parts)


def _shape(dims) -> tuple:
    """Keras' form of an ONNX shape: a named (dynamic) dimension is None."""
    return tuple(d if isinstance(d, int) else None for d in dims)
