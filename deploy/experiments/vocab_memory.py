"""Learner memory as a function of the vocabulary, on the same tokens: model state apart from the
step's transient memory.

    .venv/bin/python deploy/experiments/vocab_memory.py [--vocab 258 151936] [--tie untied tied]
        [--chunk-mib 64] [--layers 2] [--hidden 896] [--groups 2] [--group-size 8]
        [--tokens 512] [--steps 2]

Each (logits_chunk_mib, tie, vocabulary) case runs in a fresh subprocess: a random-init Qwen2 of
the given shape (defaults: Qwen2.5-0.5B's widths, 14 heads, 2 KV heads, MLP 4864, 2 layers), a
`Trainer` with POPO and `steps` steps on the same batch of `groups` x `group-size` all-positive
completions of `tokens` tokens. A group of 8 x 512 tokens exceeds the default 4096-token
micro-batch budget, so each group is one micro-batch. Two figures per case:

- model state, from tensor sizes: the policy's parameters (tied matrices once), the EMA copy,
  the predictor, the gradients of everything trained and AdamW's two moments. It grows with the
  parameter count (the vocabulary matrices: 2 x V x H untied, V x H tied), not with the tokens.
  The RSS growth while building the trainer, and before the second step (AdamW's state, created
  by the first), is the same state measured.
- step transient: the process's peak RSS is reset before a step (/proc/self/clear_refs 5) and
  VmHWM read back twice: just before `optimizer.step` (forward and backward of every micro-batch,
  gradient clipping) and after the step (AdamW, EMA update). "Step peak" is the larger, minus the
  RSS before the step. Gradients are model state but are allocated inside the step (the trainer
  frees them after it), so the transient is the forward/backward peak minus the gradients: exact
  from the second micro-batch on, when every gradient exists before the micro-batch starts, which
  is why the default batch has two. The step after the first is the steady state (the first also
  creates AdamW's state).

`--chunk-mib 0` is the unchunked vocabulary projection (at V = 151,936 its fp32 [tokens x V]
logits take 2.3 GiB per copy for 4096 tokens: mind the machine's memory). On a 2-core machine a
V = 151,936 step of the default shape takes minutes; `--tokens 128 --micro-batch-tokens 1024`
keeps two micro-batches at a quarter of the cost. Method and figures: docs/benchmarks-notes.md,
"Learner memory against the vocabulary".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024**2  # kB -> GiB
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _gib(tensors) -> float:
    """Bytes of the distinct tensors among `tensors` (tied parameters count once), in GiB."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values()) / GIB


def measure(a: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from popo.common.config import LearnerConfig, algorithm_config
    from popo.common.process import release_free_memory
    from popo.deploy.bench.learn import make_batch
    from popo.learner.trainer import Trainer, flatten_groups, pack_micro_batches

    torch.set_num_threads(a.threads)
    cfg = Qwen2Config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=max(2048, a.tokens + 64),
        tie_word_embeddings=a.tie == "tied",
    )
    release_free_memory()
    rss_start = _status("VmRSS")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).float()
    lc = LearnerConfig(
        device="cpu",
        total_steps=100,
        logits_chunk_mib=a.chunk_mib,
        micro_batch_tokens=a.micro_batch_tokens,
    )
    trainer = Trainer(model, lc, algorithm_config(), max_completion_len=a.tokens)
    release_free_memory()
    rss_built = _status("VmRSS")
    groups = make_batch(
        a.groups, a.group_size, a.vocab, 0, pass_rate=1.0, completion_len=(a.tokens, a.tokens)
    )
    seqs = flatten_groups(groups, trainer.algorithm)
    vocab_mats = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    trained = [p for p in trainer.params if p.requires_grad]
    out: dict[str, float] = {
        "params": sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values()),
        "tokens": float(sum(len(s.completion) for s in seqs)),
        "micro_batches": float(len(pack_micro_batches(seqs, lc.micro_batch_tokens))),
        "policy_gib": _gib(model.parameters()),
        "vocab_matrices_gib": _gib(vocab_mats),
        "ema_gib": _gib(trainer.ema.parameters()) if trainer.ema is not None else 0.0,
        "predictor_gib": _gib(trainer.predictor_params),
        "grads_gib": _gib(trained),
        "built_rss_gib": rss_built - rss_start,
    }

    fwd_bwd_peak = [0.0]

    def before_optimizer(*_):
        fwd_bwd_peak[0] = _status("VmHWM")
        _reset_peak()

    trainer.optimizer.register_step_pre_hook(before_optimizer)
    for step in range(1, a.steps + 1):
        release_free_memory()
        _reset_peak()
        before = _status("VmRSS")
        t0 = time.perf_counter()
        trainer.train_step(groups)
        seconds = time.perf_counter() - t0
        opt_peak = _status("VmHWM")
        s = f"step{step}_"
        out[s + "seconds"] = seconds
        out[s + "rss_before_gib"] = before - rss_start
        out[s + "fwd_bwd_peak_gib"] = fwd_bwd_peak[0] - before
        out[s + "optimizer_peak_gib"] = opt_peak - before
        out[s + "peak_gib"] = max(fwd_bwd_peak[0], opt_peak) - before
        out[s + "transient_gib"] = fwd_bwd_peak[0] - before - out["grads_gib"]
        if step == 1:
            adam = [t for st in trainer.optimizer.state.values() for t in st.values()]
            out["adam_gib"] = _gib(t for t in adam if t.dim() > 0)
    out["model_state_gib"] = sum(
        out[k] for k in ("policy_gib", "ema_gib", "predictor_gib", "grads_gib", "adam_gib")
    )
    if a.steps > 1:
        release_free_memory()
        out["adam_rss_gib"] = out["step2_rss_before_gib"] - out["step1_rss_before_gib"]
    out["process_peak_gib"] = max(
        out[f"step{k}_rss_before_gib"] + out[f"step{k}_peak_gib"] for k in range(1, a.steps + 1)
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[258, 151936])
    p.add_argument("--tie", nargs="+", choices=["untied", "tied"], default=["untied", "tied"])
    p.add_argument(
        "--chunk-mib", type=int, nargs="+", default=[64], help="learner.logits_chunk_mib values"
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512, help="completion tokens per sequence")
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--steps", type=int, default=2, help="steps measured (the first creates AdamW's state)"
    )
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.steps < 1:
        p.error("--steps must be at least 1")
    if a.one:
        a.vocab, a.chunk_mib, a.tie = a.vocab[0], a.chunk_mib[0], a.tie[0]
        print(json.dumps(measure(a)))
        return
    rows = []
    for chunk in a.chunk_mib:
        for tie in a.tie:
            for vocab in a.vocab:
                args = _without(sys.argv[1:], "--vocab", "--chunk-mib", "--tie", "--json")
                cmd = [sys.executable, __file__, *args, "--one"]
                cmd += ["--vocab", str(vocab), "--chunk-mib", str(chunk), "--tie", tie]
                res = subprocess.run(
                    cmd, check=True, capture_output=True, text=True, env=os.environ
                ).stdout
                rows.append(
                    {
                        "vocab": vocab,
                        "tie": tie,
                        "chunk_mib": chunk,
                        **json.loads(res.splitlines()[-1]),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    last = f"step{a.steps}_"
    print(
        "| chunk MiB | tie | vocabulary | model state GiB (vocab matrices) | step 1 peak GiB | "
        "steady peak GiB | steady transient GiB | optimizer peak GiB | steady s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['chunk_mib']} | {r['tie']} | {r['vocab']:,} | {r['model_state_gib']:.2f} "
            f"({r['vocab_matrices_gib']:.2f}) | {r['step1_peak_gib']:.2f} | "
            f"{r[last + 'peak_gib']:.2f} | {r[last + 'transient_gib']:.2f} | "
            f"{r[last + 'optimizer_peak_gib']:.2f} | {r[last + 'seconds']:.1f} |"
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
