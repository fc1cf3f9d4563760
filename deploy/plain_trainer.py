"""The plain synchronous POPO loop, as a user would first write it: one process, Hugging Face
`generate` -> math-verify -> the POPO step, then again. `popo bench default` measures `popo train`
against it on the same model, task, hyper-parameters and evaluation.

    python -m popo.deploy.plain_trainer --out DIR [--threads 2] [--config C.toml] [--key value ...]

It uses the project's own `Trainer` (same loss, optimizer and schedule) and the verifier's scoring
function, so the two differ only in how generation, verification and training are arranged. Writes
`eval.jsonl` (step, accuracy, t) and `summary.json` under DIR.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from popo.common.config import RunConfig, load_config
from popo.common.data import Problem, encode_prompt, load_prompts, render_problems
from popo.common.messages import ScoredCompletion, ScoredGroup, pack_f32, pack_ids
from popo.common.process import process_start_time
from popo.common.run_dir import RunDir


def generate_groups(
    model: Any, tokenizer: Any, problems: list[Problem], cfg: RunConfig, first_id: int
) -> list[ScoredGroup]:
    """G samples per problem at the actors' temperature, with the sampling log-probs (mu), scored
    by the verifier's function; positives only are kept, as the verifier forwards them."""
    import torch

    from popo.verifier.scoring import score_text

    g, eos = cfg.actor.group_size, tokenizer.eos_token_id
    encoded = [encode_prompt(tokenizer, p.problem) for p in problems]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)  # equal lengths: no padding, exact positions
    groups: dict[int, ScoredGroup] = {}
    with torch.no_grad():
        for plen, idx in sorted(by_len.items()):
            prompt = torch.tensor([encoded[i] for i in idx]).repeat_interleave(g, 0)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=cfg.actor.temperature,
                top_k=0,
                top_p=cfg.actor.top_p,
                max_new_tokens=cfg.actor.max_tokens,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
            seqs = out.sequences[:, plen:]
            logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
            logp = logp.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
            for row, i in enumerate(j for j in idx for _ in range(g)):
                ids = seqs[row].tolist()
                n = ids.index(eos) + 1 if eos in ids else len(ids)
                text = tokenizer.decode(ids[:n], skip_special_tokens=True)
                ok = score_text(problems[i].gold, text) == "positive"
                comp = ScoredCompletion(
                    token_ids=pack_ids(ids[:n]),
                    logprobs=pack_f32(logp[row, :n].numpy()),
                    reward=1.0,
                    verdict="positive",
                )
                prev = groups.get(i)
                comps = ([*prev.completions] if prev else []) + ([comp] if ok else [])
                groups[i] = ScoredGroup(
                    lease_id=first_id + i,
                    prompt_id=problems[i].prompt_id,
                    prompt_token_ids=pack_ids(encoded[i]),
                    completions=comps,
                    forwarded="positives",
                    n_total=g,
                    n_positive=len(comps),
                    verdicts={"positive": len(comps), "negative": g - len(comps)},
                    version_min=0,
                    version_max=0,
                    actor_id="plain",
                    t_leased=0.0,
                    t_generated=0.0,
                    t_verified=0.0,
                    verify_seconds=0.0,
                )
    return [groups[i] for i in range(len(problems))]


def run(cfg: RunConfig, out: Path, threads: int) -> dict[str, Any]:
    import torch

    from popo.common.demo_model import resolve_model_dir, sample_and_score
    from popo.learner.ops import build_trainer
    from popo.verifier.scoring import score_text

    t0 = process_start_time()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.learner.seed)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(cfg)
    trainer, tokenizer = build_trainer(cfg, out, model_dir, "cpu")

    def prompts(split: str) -> list[Problem]:
        return render_problems(load_prompts(cfg.data, split), cfg.data, tokenizer)  # type: ignore[arg-type]

    train, evals = prompts("train"), prompts("test")[: cfg.data.eval_size]
    order = list(range(len(train)))
    random.Random(cfg.learner.seed).shuffle(order)
    lc, g = cfg.learner, cfg.actor.group_size

    def evaluate(step: int) -> None:
        correct = sample_and_score(
            trainer.policy,
            tokenizer,
            evals,
            n_samples=g,
            seed=step,
            score=lambda gold, text: score_text(gold, text) == "positive",
            max_new_tokens=cfg.actor.max_tokens,
        )
        acc = sum(map(sum, correct)) / (len(evals) * g)
        rec = {"step": step, "accuracy": acc, "t": time.time()}
        with open(RunDir(out).evals, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(
            f"eval at step {step}: held-out accuracy {100 * acc:.1f}% "
            f"({time.time() - t0:.1f}s from start)",
            flush=True,
        )

    evaluate(0)
    t_train = time.time()
    for step in range(1, lc.total_steps + 1):
        k = (step - 1) * lc.prompts_per_step
        batch = [train[order[(k + j) % len(order)]] for j in range(lc.prompts_per_step)]
        trainer.train_step(
            [
                x
                for x in generate_groups(trainer.policy, tokenizer, batch, cfg, k)
                if x.n_positive > 0
            ]
        )
        if (lc.eval_every and step % lc.eval_every == 0) or step == lc.total_steps:
            evaluate(step)
    summary = {
        "steps": lc.total_steps,
        "threads": threads,
        "start_to_first_step": t_train - t0,
        "wall_seconds": time.time() - t0,
    }
    RunDir(out).summary.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m popo.deploy.plain_trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--config", type=Path, help="TOML config (the same tree as `popo train`)")
    a, rest = p.parse_known_args(argv)
    cfg = load_config(a.config, rest)
    s = run(cfg, a.out, a.threads)
    print(f"done: {s['steps']} steps in {s['wall_seconds']:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
