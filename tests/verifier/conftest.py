"""Fixtures of the verifier tests (the helpers live in helpers.py)."""

from .helpers import peers, pool, quick_stop

__all__ = ["peers", "pool", "quick_stop"]
