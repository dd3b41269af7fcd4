"""Data-parallel training on tf.distribute: strategies, the chief and the other workers."""
