"""Peak memory of one learner step as a function of the vocabulary, on the same tokens.

    .venv/bin/python deploy/experiments/vocab_memory.py [--vocab 258 151936] [--chunk-mib 64 0]
        [--layers 2] [--hidden 896] [--tied] [--groups 4] [--group-size 8] [--tokens 512]
        [--steps 2]

Each (vocabulary, logits_chunk_mib) pair runs in a fresh subprocess: a random-init Qwen2 of the
given shape (Qwen2.5-0.5B's widths: 14 heads, 2 KV heads, MLP 4864), a `Trainer` with POPO, and `steps`
steps on the same batch of `groups` x `group-size` all-positive completions of `tokens` tokens (the
first step creates the AdamW state). Around each step the process's peak RSS is reset
(/proc/self/clear_refs 5) and VmHWM read back: "step peak" is VmHWM minus VmRSS before the step,
what the step adds on top of the model, EMA copy and optimizer state it starts from. Later steps
are the steady state; `logits_chunk_mib 0` is the unchunked vocabulary projection.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024**2  # GiB
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure(a: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from popo.common.config import LearnerConfig, algorithm_config
    from popo.common.process import release_free_memory
    from popo.deploy.bench.learn import make_batch
    from popo.learner.trainer import Trainer

    torch.set_num_threads(a.threads)
    cfg = Qwen2Config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=a.tied,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).float()
    lc = LearnerConfig(device="cpu", total_steps=100, logits_chunk_mib=a.chunk_mib)
    trainer = Trainer(model, lc, algorithm_config(), max_completion_len=a.tokens)
    groups = make_batch(
        a.groups, a.group_size, a.vocab, 0, pass_rate=1.0, completion_len=(a.tokens, a.tokens)
    )
    out: dict[str, float] = {"params_gib": sum(p.numel() for p in model.parameters()) * 4 / 2**30}
    for step in range(1, a.steps + 1):
        release_free_memory()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
        t0 = time.perf_counter()
        m = trainer.train_step(groups)
        out[f"step{step}_seconds"] = time.perf_counter() - t0
        out[f"step{step}_peak_gib"] = _status("VmHWM") - before
        out[f"step{step}_rss_before_gib"] = before
        out["tokens"] = m["tokens"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[258, 151936])
    p.add_argument("--chunk-mib", type=int, nargs="+", default=[64, 0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--tied", action="store_true", help="tie lm_head to the input embedding")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512, help="completion tokens per sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--steps", type=int, default=2, help="steps measured (the first creates AdamW's state)"
    )
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        a.vocab, a.chunk_mib = a.vocab[0], a.chunk_mib[0]
        print(json.dumps(measure(a)))
        return
    rows = []
    for chunk in a.chunk_mib:
        for vocab in a.vocab:
            args = [x for x in sys.argv[1:] if x]
            cmd = [
                sys.executable,
                __file__,
                *_without(args, "--vocab", "--chunk-mib"),
                "--vocab",
                str(vocab),
                "--chunk-mib",
                str(chunk),
                "--one",
            ]
            res = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            rows.append({"vocab": vocab, "chunk_mib": chunk, **res})
            print(json.dumps(rows[-1]), flush=True)
    print("| logits_chunk_mib | vocabulary | step 1 peak GiB | last step peak GiB | last step s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        last = f"step{a.steps}"
        print(
            f"| {r['chunk_mib']} | {r['vocab']:,} | {r['step1_peak_gib']:.2f} | "
            f"{r[last + '_peak_gib']:.2f} | {r[last + '_seconds']:.1f} |"
        )


def _without(args: list[str], *flags: str) -> list[str]:
    """`args` minus each of `flags` and the values that follow it."""
    out, skip = [], False
    for x in args:
        if x in flags:
            skip = True
            continue
        if skip and not x.startswith("--"):
            continue
        skip = False
        out.append(x)
    return out


if __name__ == "__main__":
    main()
