"""nnU-Net's method: a dataset's fingerprint, the plan made from it, its preprocessing."""
