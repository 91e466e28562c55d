"""Training and evaluation on the same slicing pipeline as inference."""
