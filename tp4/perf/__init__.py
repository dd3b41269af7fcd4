"""Speed and memory: precision and XLA for the machine, throughput, memory of a training step."""
