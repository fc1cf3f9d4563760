"""Actor test fixtures live in actor_harness.py (one real vLLM engine for the whole directory)."""

from actor_harness import engine, fast_lease_retry, model_dir, peers, reference  # noqa: F401
