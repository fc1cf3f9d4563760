"""The random-init models of the demo architecture the benchmarks measure on (only the sizes
matter: no benchmark here depends on what a model knows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def model_sizes(hidden: int, layers: int, head_size: int) -> dict[str, int]:
    """Sizes of a demo-architecture model: `hidden // head_size` heads (at least one), half as
    many key/value heads, a 4x MLP."""
    heads = max(1, hidden // head_size)
    return dict(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // 2),
        intermediate_size=4 * hidden,
    )


def random_model(out: Path, hidden: int, layers: int) -> Path:
    """A random-init model of the demo architecture saved under `out` (head size 32 up to hidden
    128, else 64: sizes vLLM's CPU attention supports)."""
    from popo.common.demo_model import save_random_model

    return save_random_model(
        out, seed=0, **model_sizes(hidden, layers, 32 if hidden <= 128 else 64)
    )


def base_model(hidden: int, layers: int) -> tuple[Any, int]:
    """A random-init model of the demo architecture in memory (head size 64) and its vocabulary
    size."""
    from popo.common.demo_model import build_tokenizer, make_model

    tok = build_tokenizer()
    return make_model(tok, seed=0, **model_sizes(hidden, layers, 64)), len(tok)
