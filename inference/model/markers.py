"""The files that make a folder a model folder; no imports, so the configuration checks a route's folder at load
without loading numpy or torch."""

CARD_FILE = "model_card.json"  # a built-in checkpoint's card (inference.model.card)
UNIBIOMED_CONFIG = "config.json"  # a UniBiomed/Sa2VA folder's (inference.model.unibiomed)
MODEL_MARKERS = (CARD_FILE, UNIBIOMED_CONFIG)
