"""Slicing, the grounded model and the inference engine."""
