"""Learner test helpers: a tiny in-memory Qwen2 and synthetic ScoredGroups (imported by the
learner tests as a plain module: pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np
import torch

from popo.common.messages import ScoredCompletion, ScoredGroup, pack_f32, pack_ids

VOCAB = 40


def tiny_qwen2(seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).float()


def make_groups(
    n_groups: int = 3, g: int = 4, seed: int = 0, forwarded: str = "all", version: int = 0
) -> list[ScoredGroup]:
    """Random groups: prompt 3-6 tokens, completions 2-7 tokens, rewards mixed (group 0 has at
    least one positive and one negative), behaviour log-probs in [-4, -0.5]."""
    rng = np.random.default_rng(seed)
    out = []
    for gi in range(n_groups):
        prompt = rng.integers(1, VOCAB, rng.integers(3, 7))
        rewards = rng.integers(0, 2, g).astype(float)
        if gi == 0:
            rewards[0], rewards[1] = 1.0, 0.0
        comps = []
        for r in rewards:
            if forwarded == "positives" and r == 0:
                continue
            n = int(rng.integers(2, 8))
            comps.append(
                ScoredCompletion(
                    token_ids=pack_ids(rng.integers(1, VOCAB, n)),
                    logprobs=pack_f32(rng.uniform(-4, -0.5, n)),
                    reward=float(r),
                    verdict="positive" if r else "negative",
                )
            )
        out.append(
            ScoredGroup(
                lease_id=gi,
                prompt_id=f"p{gi}",
                prompt_token_ids=pack_ids(prompt),
                completions=comps,
                forwarded=forwarded,
                n_total=g,
                n_positive=int(rewards.sum()),
                verdicts={"positive": int(rewards.sum()), "negative": int(g - rewards.sum())},
                version_min=version,
                version_max=version,
                actor_id="a0",
                t_leased=0.0,
                t_generated=0.0,
                t_verified=0.0,
                verify_seconds=0.0,
            )
        )
    return out
