"""Fixtures of the verifier tests (the helpers live in helpers.py)."""

from .helpers import peers, pool

__all__ = ["peers", "pool"]
