"""Models that leave the lab: the logged model served over HTTP by MLflow with its preprocessing
(pyfunc.py)."""
