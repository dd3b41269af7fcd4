"""Keras 3's `fit` under MultiWorkerMirroredStrategy: the smallest compatibility layer that makes it
work, until keras-team/keras#20585 is fixed upstream.

With TensorFlow's MultiWorkerMirroredStrategy across two or more processes, Keras 3 (3.15.1 checked,
the issue still open) fails at once in `fit`, in two places of its TensorFlow trainer
(keras/src/backend/tensorflow/trainer.py):
- `_maybe_symbolic_build` takes the first batch as a sample for building the metrics and the
  optimizer, and averages the replicas' batches with `strategy.reduce("MEAN", ...)`, which
  multi-worker collectives refuse for per-replica inputs: "Attempt to convert a value (PerReplica
  ...) ... to a Tensor". One replica's batch is as good a sample as their mean (only its shapes and
  dtypes count);
- `reduce_per_replica` reduces the step's outputs (scalar metric values) with
  `strategy.reduce("MEAN", value, axis=0)`, and a scalar has no axis 0: "Invalid reduction dimension
  0 for input with 0 dimensions". The mean over the replicas is `axis=None`. These step values only
  feed the progress bar and the batch callbacks: the epoch's metrics are read from the metric
  variables, summed over every replica.

`patch()` replaces those two functions with wrappers that change only the multi-worker case, for the
Keras versions up to the last one checked (KERAS_VERSIONS); a later Keras runs unpatched. The tests
of tests/test_multiworker.py tell what to do after an upgrade: the one that runs `fit` under the
strategy without the patch fails once Keras no longer needs it (then delete this module); the
2-worker trainings fail if a later Keras still needs it (then move the bound).
"""

import keras
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as tf_trainer

# Keras versions patched: [first, last) as (major, minor), up to 3.15, the last one checked.
KERAS_VERSIONS = ((3, 0), (3, 16))


def needed(version: str = keras.__version__) -> bool:
    """Whether Keras `version` is one that fails in `fit` under a multi-worker strategy."""
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    return KERAS_VERSIONS[0] <= major_minor < KERAS_VERSIONS[1]


def patch() -> bool:
    """Make Keras' `fit`, `evaluate` and `predict` work under MultiWorkerMirroredStrategy (every
    other case is left as it is). Idempotent.

    Returns:
        Whether the patch is in place: False for a Keras version that does not need it.
    """
    if not needed():
        return False
    trainer = tf_trainer.TensorFlowTrainer
    if getattr(trainer._maybe_symbolic_build, "patched", False):
        return True
    reduce_per_replica, symbolic_build = (
        tf_trainer.reduce_per_replica,
        trainer._maybe_symbolic_build,
    )

    def reduce_across_workers(values, strategy, reduction):
        if reduction in ("auto", "mean") and _multi_worker(strategy):
            return keras.tree.map_structure(
                lambda value: strategy.reduce("MEAN", value, axis=None), values
            )
        return reduce_per_replica(values, strategy, reduction)

    def build_from_one_replica(self, iterator=None, data_batch=None):
        strategy = self.distribute_strategy
        if iterator is not None and self._distribute_strategy and _multi_worker(strategy):
            for _, _, batches in iterator:  # the first batch, as Keras takes it
                data_batch = keras.tree.map_structure(
                    lambda value: strategy.experimental_local_results(value)[0], next(batches)
                )
                break
            iterator = None
        return symbolic_build(self, iterator=iterator, data_batch=data_batch)

    build_from_one_replica.patched = True
    tf_trainer.reduce_per_replica = reduce_across_workers  # looked up at call time by the trainer
    trainer._maybe_symbolic_build = build_from_one_replica
    return True


def _multi_worker(strategy):
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )
