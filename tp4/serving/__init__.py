"""Models that leave the lab: the logged model served over HTTP by MLflow with its preprocessing
(pyfunc.py), exported to ONNX and SavedModel (export.py)."""
