"""Inference: models applied to images and volumes, and the files written from them."""
