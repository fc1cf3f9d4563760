"""`popo bench learn`: learner-step cost of POPO vs GRPO vs a plain NLL step on the same batch of
the same model, and POPO's saving from training on positives only as a function of the pass rate.

Every variant trains the same sequences from the same initial weights (POPO keeps only the
positives, as the verifier forwards them; GRPO takes the whole group). Variants run round-robin, so
slow phases of a shared machine hit all of them alike; the per-repetition times become paired
ratios. `make_batch` (synthetic scored groups) also feeds `popo bench default`'s standalone step,
`deploy/gpu_check.py` and the experiments under `deploy/experiments/`.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from popo.common.config import LearnerConfig, RunConfig, algorithm_config
from popo.common.messages import ScoredCompletion, ScoredGroup, pack_f32, pack_ids
from popo.deploy.bench.models import base_model
from popo.deploy.bench.plot import plot_ratios
from popo.deploy.bench.stats import BenchResult, Summary, alternate, paired_ratio, timed
from popo.learner import losses
from popo.learner.model import collate, policy_forward
from popo.learner.trainer import Trainer, flatten_groups, pack_micro_batches

PASS_RATES = (0.125, 0.25, 0.5, 0.75, 1.0)


def make_batch(
    n_groups: int,
    g: int,
    vocab: int,
    seed: int,
    pass_rate: float | None = None,
    completion_len: tuple[int, int] = (24, 64),
) -> list[ScoredGroup]:
    """Synthetic groups: prompts 16–32 tokens, completions `completion_len` (inclusive) tokens.

    pass_rate None: random rewards with at least one positive and one negative per group;
    otherwise exactly max(1, round(pass_rate * g)) positives per group. The token ids and lengths
    depend on `seed` only, so batches of different pass rates hold the same sequences.
    """
    rng = np.random.default_rng(seed)
    out = []
    for gi in range(n_groups):
        rewards = rng.integers(0, 2, g).astype(float)
        rewards[0], rewards[-1] = 1.0, 0.0
        if pass_rate is not None:
            rewards[:] = 0.0
            rewards[: max(1, round(pass_rate * g))] = 1.0
        comps = []
        for r in rewards:
            n = int(rng.integers(completion_len[0], completion_len[1] + 1))
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

    def train_step(self, groups: Sequence[ScoredGroup]) -> dict[str, float]:
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


StepFn = Callable[[], float]
"""One training step; returns the completion tokens it trained."""


def step_variants(
    base: torch.nn.Module, vocab: int, groups: int, g: int, micro_batch_tokens: int
) -> dict[str, tuple[object, list[ScoredGroup]]]:
    """name -> (trainer, batch): NLL, GRPO and three POPO settings, each on its own model copy."""
    lc = LearnerConfig(
        lr=1e-4, device="cpu", micro_batch_tokens=micro_batch_tokens, total_steps=10_000
    )
    mixed = make_batch(groups, g, vocab, 0)
    positive = make_batch(groups, g, vocab, 0, pass_rate=1.0)

    def trainer(**algo: object) -> Trainer:
        return Trainer(copy.deepcopy(base), lc, algorithm_config(**algo), max_completion_len=64)

    return {
        "plain NLL": (NLLStep(copy.deepcopy(base), lc), mixed),
        "GRPO (clip 0.2/0.28, no reference)": (trainer(name="grpo"), mixed),
        "POPO, alpha = 0 (no EMA forward)": (trainer(alpha=0.0, kl_monitor_every=0), positive),
        "POPO, KL monitor off": (trainer(kl_monitor_every=0), positive),
        "POPO, KL monitor every step (default)": (trainer(kl_monitor_every=1), positive),
    }


def pass_rate_variants(
    base: torch.nn.Module,
    vocab: int,
    groups: int,
    g: int,
    micro_batch_tokens: int,
    pass_rates: Sequence[float] = PASS_RATES,
) -> dict[str, tuple[object, list[ScoredGroup]]]:
    """GRPO on the full batch, and POPO on the batch of each pass rate (it trains its positives
    only: what the verifier forwards). Same sequences throughout (same seed)."""
    lc = LearnerConfig(
        lr=1e-4, device="cpu", micro_batch_tokens=micro_batch_tokens, total_steps=10_000
    )
    out: dict[str, tuple[object, list[ScoredGroup]]] = {
        "grpo": (
            Trainer(copy.deepcopy(base), lc, algorithm_config(name="grpo"), max_completion_len=64),
            make_batch(groups, g, vocab, 0),
        )
    }
    for p in pass_rates:
        out[f"popo@{p:g}"] = (
            Trainer(copy.deepcopy(base), lc, algorithm_config(), max_completion_len=64),
            make_batch(groups, g, vocab, 0, pass_rate=p),
        )
    return out


def as_step(
    trainer: object, batch: list[ScoredGroup], tokens: dict[str, float], name: str
) -> StepFn:
    """A step closure that records its trained tokens under `name`."""

    def step() -> float:
        m = trainer.train_step(batch)  # type: ignore[attr-defined]
        tokens[name] = m["tokens"]
        return m["tokens"]

    return step


def timer(fn: Callable[[], Any]) -> Callable[[], float]:
    """`fn` as a measurement: its seconds per call."""
    return lambda: timed(fn)


def measure(cfg: RunConfig, a: argparse.Namespace, out: Path) -> BenchResult:
    """`popo bench learn`: step cost per variant, and POPO's against GRPO's per pass rate."""
    torch.set_num_threads(a.threads)
    base, vocab = base_model(a.hidden, a.layers)
    tokens: dict[str, float] = {}

    def timers(variants: dict[str, tuple[object, list]]) -> dict[str, Callable[[], float]]:
        return {k: timer(as_step(t, b, tokens, k)) for k, (t, b) in variants.items()}

    steps = alternate(
        timers(step_variants(base, vocab, a.groups, a.group_size, a.micro_batch_tokens)), a.reps
    )
    rates = [float(x) for x in str(a.pass_rates).split(",")]
    curve = alternate(
        timers(
            pass_rate_variants(base, vocab, a.groups, a.group_size, a.micro_batch_tokens, rates)
        ),
        a.reps,
    )
    n_params = sum(p.numel() for p in base.parameters())
    res = BenchResult(
        "learn",
        f"learner step, Qwen2 hidden {a.hidden} x {a.layers} layers ({n_params / 1e6:.2f} M "
        f"params), {a.groups} groups x G={a.group_size}, torch threads {a.threads}, "
        f"{a.reps} round-robin repetitions",
        ["step", "completion tokens", "seconds median [min, max]", "tokens/s", "cost ratio"],
    )
    ref = "plain NLL"
    for name, ts in steps.items():
        r = paired_ratio(ts, steps[ref], a.max_spread)
        res.ratios[f"cost_over_nll/{name}"] = r
        s = Summary.of(ts)
        res.rows.append(
            [
                name,
                f"{tokens[name]:,.0f}",
                s.fmt(".3f"),
                f"{tokens[name] / s.median:,.0f}",
                f"{r.fmt()} (to NLL)",
            ]
        )
    grpo = curve["grpo"]
    s = Summary.of(grpo)
    res.rows.append(
        [
            "GRPO, full batch (pass-rate curve reference)",
            f"{tokens['grpo']:,.0f}",
            s.fmt(".3f"),
            f"{tokens['grpo'] / s.median:,.0f}",
            "1.00 (to GRPO)",
        ]
    )
    points = []
    for p in rates:
        name = f"popo@{p:g}"
        r = paired_ratio(curve[name], grpo, a.max_spread)
        res.ratios[f"popo_over_grpo/pass_rate={p:g}"] = r
        s = Summary.of(curve[name])
        res.rows.append(
            [
                f"POPO, pass rate {p:g} (positives only)",
                f"{tokens[name]:,.0f}",
                s.fmt(".3f"),
                f"{tokens[name] / s.median:,.0f}",
                f"{r.fmt()} (to GRPO)",
            ]
        )
        points.append(
            {
                "pass_rate": p,
                "tokens": tokens[name],
                "ratio": r.median,
                "min": r.min,
                "max": r.max,
                "refused": r.refused,
                "token_fraction": tokens[name] / tokens["grpo"],
            }
        )
    res.figures = {
        "step_seconds": steps,
        "pass_rate_seconds": curve,
        "tokens": tokens,
        "pass_rate_curve": points,
        "params": n_params,
    }
    res.notes.append(
        "POPO's saving at pass rate p = 1 - (cost ratio to GRPO); its token fraction "
        "of GRPO's batch is the ideal (a step costing exactly its tokens)."
    )
    plot_ratios(
        out / "learn.png",
        "POPO step cost vs GRPO on the full batch",
        "pass rate (positive fraction of each group)",
        "POPO step time / GRPO step time",
        {
            "POPO / GRPO (median, min-max)": points,
            "token fraction (ideal)": [
                {"pass_rate": q["pass_rate"], "ratio": q["token_fraction"]} for q in points
            ],
        },
        x="pass_rate",
    )
    return res
