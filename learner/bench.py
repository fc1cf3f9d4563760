"""Learner-step cost of POPO vs GRPO vs a plain NLL step on the same batch of the same model.

    python -m popo.learner.bench [--reps 7] [--groups 16] [--group-size 8] [--hidden 128] [--layers 4]

Every variant trains the same sequences (POPO sees them all as positives; GRPO gets mixed rewards,
which change no cost) from the same initial weights. Variants run round-robin, so slow phases of a
shared machine hit all of them alike; the table reports the median step time, its spread (min–max),
tokens/s, and the ratio to the plain NLL step of the same run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from popo.common.config import AlgorithmConfig, LearnerConfig
from popo.common.messages import ScoredCompletion, ScoredGroup, pack_f32, pack_ids
from popo.learner import losses
from popo.learner.model import collate, policy_forward
from popo.learner.trainer import Trainer, flatten_groups, pack_micro_batches


def make_batch(
    n_groups: int, g: int, vocab: int, seed: int, all_positive: bool
) -> list[ScoredGroup]:
    """Synthetic groups: prompts 16–32 tokens, completions 24–64 tokens, mixed rewards."""
    rng = np.random.default_rng(seed)
    out = []
    for gi in range(n_groups):
        rewards = rng.integers(0, 2, g).astype(float)
        rewards[0], rewards[-1] = 1.0, 0.0
        if all_positive:
            rewards[:] = 1.0
        comps = []
        for r in rewards:
            n = int(rng.integers(24, 65))
            comps.append(
                ScoredCompletion(
                    token_ids=pack_ids(rng.integers(4, vocab, n)),
                    logprobs=pack_f32(rng.uniform(-5, -1, n)),
                    reward=float(r),
                    verdict="positive" if r else "negative",
                )
            )
        out.append(
            ScoredGroup(
                lease_id=gi,
                prompt_id=str(gi),
                prompt_token_ids=pack_ids(rng.integers(4, vocab, int(rng.integers(16, 33)))),
                completions=comps,
                forwarded="all",
                n_total=g,
                n_positive=int(rewards.sum()),
                verdicts={},
                version_min=0,
                version_max=0,
                actor_id="bench",
                t_leased=0.0,
                t_generated=0.0,
                t_verified=0.0,
                verify_seconds=0.0,
            )
        )
    return out


class NLLStep:
    """The reference cost: same packing, one forward (no entropy, no EMA, no predictor), token-mean
    NLL, grad clip, AdamW."""

    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig):
        self.model, self.cfg = model.train(), cfg
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def train_step(self, groups: list[ScoredGroup]) -> dict[str, float]:
        seqs = flatten_groups(groups, "grpo")
        n_tok = float(sum(len(s.completion) for s in seqs))
        self.opt.zero_grad(set_to_none=True)
        for ix in pack_micro_batches(seqs, self.cfg.micro_batch_tokens):
            mb = [seqs[i] for i in ix]
            b = collate(
                [s.prompt for s in mb], [s.completion for s in mb], [s.behaviour_logp for s in mb]
            )
            out = policy_forward(self.model, b, need_entropy=False)
            loss, _ = losses.nll_loss(out.logp, b.mask, n_tok)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        return {"tokens": n_tok}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from popo.common.demo_model import build_tokenizer, make_model

    tok = build_tokenizer()
    base = make_model(
        tok,
        seed=0,
        hidden_size=args.hidden,
        num_layers=args.layers,
        intermediate_size=4 * args.hidden,
    )
    vocab = len(tok)
    lc = LearnerConfig(
        lr=1e-4, device="cpu", micro_batch_tokens=args.micro_batch_tokens, total_steps=10_000
    )
    mixed = make_batch(args.groups, args.group_size, vocab, 0, all_positive=False)
    positive = make_batch(args.groups, args.group_size, vocab, 0, all_positive=True)
    variants = {
        "nll": (NLLStep(copy.deepcopy(base), lc), mixed),
        "grpo": (
            Trainer(copy.deepcopy(base), lc, AlgorithmConfig(name="grpo"), max_completion_len=64),
            mixed,
        ),
        "popo, alpha=0 (no EMA forward)": (
            Trainer(
                copy.deepcopy(base),
                lc,
                AlgorithmConfig(alpha=0.0, kl_monitor_every=0),
                max_completion_len=64,
            ),
            positive,
        ),
        "popo (KL monitor off)": (
            Trainer(
                copy.deepcopy(base), lc, AlgorithmConfig(kl_monitor_every=0), max_completion_len=64
            ),
            positive,
        ),
        "popo (KL monitor every step)": (
            Trainer(
                copy.deepcopy(base), lc, AlgorithmConfig(kl_monitor_every=1), max_completion_len=64
            ),
            positive,
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    tokens = {}
    for rep in range(args.reps + 1):  # rep 0 warms up allocators and kernels
        for name, (trainer, batch) in variants.items():
            t0 = time.perf_counter()
            m = trainer.train_step(batch)
            dt = time.perf_counter() - t0
            tokens[name] = m["tokens"]
            if rep:
                times[name].append(dt)
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.2f} M params; "
        f"batch: {args.groups} groups x {args.group_size}, {tokens['nll']:.0f} completion tokens; "
        f"torch threads {torch.get_num_threads()}; {args.reps} reps"
    )
    ref = statistics.median(times["nll"])
    print("| step | median s | min–max s | tokens/s | ratio to NLL |")
    print("| --- | --- | --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {name} | {med:.3f} | {min(ts):.3f}–{max(ts):.3f} | "
            f"{tokens[name] / med:,.0f} | {med / ref:.2f} |"
        )


if __name__ == "__main__":
    main()
