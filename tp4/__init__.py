"""The machinery behind the TP's scripts, one sub-package per concern; the scripts at the root
attach it to their training as Keras callbacks and context managers.

- `training/`: the recipe (optimizers, schedule, output prior), the per-epoch checkpoint and
  `--resume`, the divergence guard, the test-set evaluation;
- `tracking/`: the MLflow run (status, signals, the model logged), the outbox that sends epoch
  metrics in the background, the heartbeat that tells a live run from a dead one, the store, the
  registry's aliases;
- `perf/`: precision and XLA chosen for the machine, throughput, memory of a step;
- `distributed/`: tf.distribute strategies, the chief and the other workers;
- `images/`: image and volume files, fitting images to the network and back, real datasets,
  figures;
- `models/`: layers the exercise modules take as arguments (the fused batch norm);
- `serving/`: the logged model served over HTTP with its preprocessing, exported to ONNX;
- `cli.py`: what every script's main() shares.

The exercise modules at the root (unet.py, metrics.py, losses.py, data.py) import nothing from here;
this package imports them.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: scripts, tools
