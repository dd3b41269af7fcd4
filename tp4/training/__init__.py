"""Training: the recipe, the per-epoch checkpoint and --resume, the divergence guard, the test
evaluation."""
