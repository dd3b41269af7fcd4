"""Operator tools, run from the checkout as `python -m tools.NAME`: the benchmark, a lab's
tracking server."""
