"""Compute backends of the engine (see each module)."""
