"""Layers that the exercise modules take as arguments."""
