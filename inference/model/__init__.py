"""Grounded interpretation models: the protocol, the built-in CPU model and the UniBiomed adapter."""
