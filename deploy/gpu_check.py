"""The learner on one GPU: POPO steps of Qwen2.5-Math-shaped models through the project's Trainer.

    python deploy/gpu_check.py [--json-out PATH] [--models 1.5b,7b] [--steps 5]
    python deploy/gpu_check.py --dry          # tiny shapes on CPU (the test suite runs this)

Made for a bare GPU machine with torch, transformers and safetensors but no package registry and
without this project installed: it imports the learner from this checkout by path (the `popo.*`
names map one to one onto the repository's top-level folders), and installs the few pure-Python
and small binary wheels the project's config and message code needs (pydantic, pydantic-settings,
msgspec, ...) from `.whl/` at the repository root, which `deploy/gpu_check_wheels.sh` fills on a
machine that has a registry. Nothing is downloaded: the models are random-init from their configs.

What it does, per model (Qwen2.5-Math-1.5B-shaped, then 7B-shaped with as many of its 28 layers as
the GPU's memory holds next to the fp32 master weights, gradients, AdamW state and EMA copy):
build the model, hand it to `Trainer` (fp32 masters, bf16 autocast: the learner's GPU path), run
one warm-up and `--steps` timed POPO steps on 64 completions x 1,024 tokens (8 groups of 8, every
completion positive, as the verifier forwards them), and report tokens/s, model FLOP utilisation
(MFU) and peak memory, and the seconds to take a bfloat16 version of the trained policy to the
host as a publish does, rounded to nearest and dithered. Then the first step's loss of the 1.5B
shape in bf16 and in fp32 on a smaller batch, from the same initial weights.

MFU counts the matmul FLOPs the step really needs, from the config (no profiler):
  policy, forward + backward:  6 * N_body * T_seq + 6 * N_head * T_comp + 3 * A
  EMA, forward (features):     2 * N_body * T_seq + A
  EMA lm_head (KL-monitor steps only): 2 * N_head * T_comp
where N_body = parameters of the decoder layers (attention + MLP projections; embeddings and
norms do no matmul), N_head = vocab * hidden (the lm_head is applied at completion positions
only), T_seq = real prompt + completion tokens, T_comp = completion tokens, and A = the forward
FLOPs of the causal attention products, 2 * layers * hidden * sum over sequences of s^2 (QK^T and
AV, half of each s x s product under the causal mask; the backward costs twice the forward).
Padding and the predictor (a 2-layer MLP on one vector per sequence) are not counted.
MFU = FLOPs / step seconds / the GPU's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s;
`--peak-tflops` for another GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
SITE = Path("/tmp/popo-gpu-check-site")
NEEDED = ("pydantic", "pydantic_settings", "msgspec")
"""Modules the learner's config and messages import that a bare torch image may lack."""


def qwen2(
    hidden: int, mlp: int, layers: int, heads: int, kv: int, vocab: int, tied: bool, pos: int = 4096
) -> dict[str, Any]:
    """The shape fields of a Qwen2 config.json: hidden and MLP sizes, layers, attention and
    key/value heads, vocabulary, tied embeddings, positions."""
    return dict(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=pos,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
    )


# Published config.json values of the two models (random-init here: only the shapes matter).
SHAPES: dict[str, dict[str, Any]] = {
    "1.5b": qwen2(1536, 8960, layers=28, heads=12, kv=2, vocab=151936, tied=True),
    "7b": qwen2(3584, 18944, layers=28, heads=28, kv=4, vocab=152064, tied=False),
    "dry": qwen2(64, 128, layers=2, heads=4, kv=2, vocab=512, tied=True, pos=256),
}
NAMES = {"1.5b": "Qwen2.5-Math-1.5B", "7b": "Qwen2.5-Math-7B", "dry": "tiny Qwen2 (dry run)"}

PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 SXM", 989.4),
    ("H100 80GB HBM3", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 756.0),
    ("A100", 312.0),
)
"""Dense bf16 tensor-core peaks by device-name substring, first match wins."""

BYTES_PER_PARAM = 20
"""Trainer state per policy parameter on the GPU: fp32 weight, gradient, two AdamW moments and
the fp32 EMA copy."""


def bootstrap() -> None:
    """Make `popo.*` importable from this checkout, installing `.whl/*` when a dependency of the
    project's config / message code is missing."""
    here = Path(__file__).resolve().parent
    # `python deploy/gpu_check.py` puts deploy/ first on sys.path, where modules such as
    # `evaluate.py` or `train.py` would shadow packages of the same name
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            raise SystemExit(
                f"gpu_check: missing {', '.join(missing)} and no wheels in {WHEELS}; run "
                "deploy/gpu_check_wheels.sh on a machine with a package registry first"
            )
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(SITE),
            *map(str, wheels),
        ]
        subprocess.run(cmd, check=True)
        sys.path.insert(0, str(SITE))
        importlib.invalidate_caches()
    if "popo" not in sys.modules:
        # The installed layout maps popo.<x> to the repository's folder <x> (pyproject.toml), so
        # a namespace package rooted at the checkout imports the same modules.
        pkg = types.ModuleType("popo")
        pkg.__path__ = [str(REPO)]
        sys.modules["popo"] = pkg


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """Dense bf16 peak of the GPU in TFLOP/s, or None when unknown (MFU is then not reported)."""
    if override is not None:
        return override
    for key, tf in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tf
    return None


def body_params(shape: dict[str, Any], layers: int) -> int:
    """Matmul parameters of `layers` decoder layers (q, k, v, o, gate, up, down; biases too)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    attn = h * h + 2 * h * kv + h * h + (h + 2 * kv)  # q, k, v (+ biases), o
    return layers * (attn + 3 * h * i)


def step_flops(
    shape: dict[str, Any], layers: int, seq_lens: list[int], comp_tokens: int, kl_step: bool
) -> float:
    """Matmul FLOPs of one POPO step (module docstring): policy fwd+bwd, EMA forward, and the EMA
    lm_head on KL-monitor steps. seq_lens: real prompt + completion length of each sequence."""
    h = shape["hidden_size"]
    n_body = body_params(shape, layers)
    n_head = shape["vocab_size"] * h
    t_seq = sum(seq_lens)
    attn = 2.0 * layers * h * sum(s * s for s in seq_lens)
    policy = 6.0 * n_body * t_seq + 6.0 * n_head * comp_tokens + 3.0 * attn
    ema = 2.0 * n_body * t_seq + attn + (2.0 * n_head * comp_tokens if kl_step else 0.0)
    return policy + ema


def total_params(shape: dict[str, Any], layers: int) -> int:
    h, v = shape["hidden_size"], shape["vocab_size"]
    embed = v * h * (1 if shape["tie_word_embeddings"] else 2)
    return embed + body_params(shape, layers) + (2 * layers + 1) * h


def layers_that_fit(shape: dict[str, Any], free_bytes: int, micro_tokens: int) -> int:
    """Decoder layers whose trainer state and bf16 activations fit in `free_bytes` (an estimate:
    ~(10 h + 4 i) bf16 values and 4 h fp32 values kept per token and layer for the backward, and
    three fp32 [tokens, vocab] copies for the log-softmax)."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    budget = 0.85 * free_bytes - BYTES_PER_PARAM * total_params(shape, 0) - 12.0 * micro_tokens * v
    per_layer = BYTES_PER_PARAM * body_params(shape, 1) + micro_tokens * (
        2 * (10 * h + 4 * i) + 16 * h
    )
    return max(1, min(shape["num_hidden_layers"], int(budget // per_layer)))


def build_model(shape: dict[str, Any], layers: int, device: Any, seed: int) -> Any:
    """A random-init Qwen2 causal LM of `shape` with `layers` layers, fp32, on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**{**shape, "num_hidden_layers": layers}, use_sliding_window=False)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU: a CPU init of billions of values is slow
        model = AutoModelForCausalLM.from_config(cfg)
    return model.float().to(device)


def default_algorithm() -> Any:
    """The run config's default algorithm section: POPO with its default settings."""
    from popo.common.config import RunConfig

    algo = RunConfig().algorithm
    if algo.name != "popo":
        raise SystemExit(f"gpu_check: the default algorithm is {algo.name!r}, not popo")
    return algo


def learner_config(a: argparse.Namespace, device: Any) -> Any:
    """The learner section of both checks: a small constant learning rate on `device`."""
    from popo.common.config import LearnerConfig

    return LearnerConfig(
        device=str(device),
        lr=1e-6,
        total_steps=1000,
        warmup_ratio=0.0,
        micro_batch_tokens=a.micro_batch_tokens,
    )


def positive_batch(a: argparse.Namespace, groups: int, vocab: int, seed: int) -> list:
    """`groups` groups of `a.group_size` all-positive completions of `a.completion_tokens` tokens
    each (what the verifier forwards to a POPO learner)."""
    from popo.deploy.bench.learn import make_batch

    return make_batch(
        groups,
        a.group_size,
        vocab,
        seed,
        pass_rate=1.0,
        completion_len=(a.completion_tokens, a.completion_tokens),
    )


def set_precision(trainer: Any, precision: str) -> None:
    """Force the step's compute precision. The Trainer's own choice is bf16 autocast on CUDA and
    fp32 on CPU; the agreement check needs both on the same device."""
    import torch

    if precision == "fp32":
        trainer._autocast = contextlib.nullcontext
    elif trainer.device.type != "cuda":
        trainer._autocast = lambda: torch.autocast(trainer.device.type, dtype=torch.bfloat16)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_model(
    key: str, a: argparse.Namespace, device: Any, batch: list, peak: float | None
) -> dict:
    """Warm-up + `a.steps` timed POPO steps of the `key` shape; -> its row of the report."""
    import torch

    from popo.learner.trainer import Trainer, flatten_groups, pack_micro_batches

    shape = SHAPES[key]
    lc = learner_config(a, device)
    ac = default_algorithm()
    seqs = flatten_groups(batch, ac.name)
    micro = pack_micro_batches(seqs, lc.micro_batch_tokens)
    micro_tokens = max(
        len(ix) * max(len(seqs[j].prompt) + len(seqs[j].completion) for j in ix) for ix in micro
    )
    layers = shape["num_hidden_layers"]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        layers = layers_that_fit(shape, free, micro_tokens)
    row: dict[str, Any] = {
        "model": key,
        "name": NAMES[key],
        "layers": layers,
        "of_layers": shape["num_hidden_layers"],
    }
    while True:
        trainer = model = None
        oom = False
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            model = build_model(shape, layers, device, a.seed)
            trainer = Trainer(model, lc, ac, max_completion_len=a.completion_tokens, device=device)
            model = None
            row["build_s"] = time.perf_counter() - t0
            steps = []
            for s in range(a.steps + 1):
                every = getattr(ac, "kl_monitor_every", 0)
                kl_step = every > 0 and trainer.step % every == 0
                sync(device)
                t0 = time.perf_counter()
                m = trainer.train_step(batch)
                sync(device)
                dt = time.perf_counter() - t0
                steps.append(
                    {
                        "seconds": dt,
                        "loss": m["loss"],
                        "grad_norm": m["grad_norm"],
                        "tokens": m["tokens"],
                        "kl_step": kl_step,
                    }
                )
                print(
                    f"  {NAMES[key]} ({layers} layers) step {s}: {dt:.2f} s, loss {m['loss']:.4f}",
                    flush=True,
                )
        except torch.OutOfMemoryError:
            if layers == 1:
                raise
            oom = True
        if not oom:
            break
        # outside the except block, so that its traceback no longer holds the step's tensors
        trainer = model = None
        free_memory(device)
        layers = max(1, layers * 2 // 3)
        print(f"  out of memory: retrying with {layers} layers", flush=True)
        row["layers"] = layers
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    row["version_to_host_s"] = version_to_host_seconds(trainer.policy, device)
    del trainer
    free_memory(device)
    seq_lens = [len(q.prompt) + len(q.completion) for q in seqs]
    comp = sum(len(q.completion) for q in seqs)
    timed = steps[1:]  # step 0 is the warm-up (allocator, kernels' autotuning)
    secs = [x["seconds"] for x in timed]
    flops = [step_flops(shape, layers, seq_lens, comp, x["kl_step"]) for x in timed]
    med = statistics.median(secs)
    tflops = statistics.median(f / s for f, s in zip(flops, secs, strict=True)) / 1e12
    row.update(
        params=total_params(shape, layers),
        sequences=len(seqs),
        completion_tokens=comp,
        sequence_tokens=sum(seq_lens),
        micro_batches=len(micro),
        step_s={"median": med, "min": min(secs), "max": max(secs), "values": secs},
        warmup_s=steps[0]["seconds"],
        tokens_per_s=comp / med,
        sequence_tokens_per_s=sum(seq_lens) / med,
        achieved_tflops=tflops,
        mfu=tflops / peak if peak else None,
        peak_memory_gib=peak_mem / 2**30 if peak_mem is not None else None,
        steps=steps,
    )
    return row


def version_to_host_seconds(policy: Any, device: Any) -> dict[str, float]:
    """Seconds from the policy to a bfloat16 version's tensors on the host, as a publish takes
    them (`hf_state_dict`: the cast on the device, then the copy), rounded to nearest and
    dithered (`learner.publish_rounding`); the second of two calls each."""
    import torch

    from popo.learner.publish import hf_state_dict

    out = {}
    for rounding in ("nearest", "dither"):
        for _ in range(2):  # the first allocates (and builds the dither table on the device)
            sync(device)
            t0 = time.perf_counter()
            tensors = hf_state_dict(policy, torch.bfloat16, rounding)
            sync(device)
            out[rounding] = time.perf_counter() - t0
            del tensors
    return out


def loss_agreement(a: argparse.Namespace, device: Any, batch: list) -> dict:
    """The first step's loss and gradient norm from the same initial weights, bf16 vs fp32."""
    import torch

    from popo.learner.trainer import Trainer

    key = "dry" if a.dry else "1.5b"
    shape = SHAPES[key]
    lc = learner_config(a, device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    out: dict[str, Any] = {"model": key, "name": NAMES[key]}
    for precision in ("bf16", "fp32"):
        model = build_model(shape, shape["num_hidden_layers"], device, a.seed)  # same seed
        trainer = Trainer(
            model, lc, default_algorithm(), max_completion_len=a.completion_tokens, device=device
        )
        del model
        set_precision(trainer, precision)
        m = trainer.train_step(batch)
        out[precision] = {"loss": m["loss"], "grad_norm": m["grad_norm"]}
        print(f"  {precision}: loss {m['loss']:.6f}, grad norm {m['grad_norm']:.4f}", flush=True)
        del trainer
        free_memory(device)
    for k in ("loss", "grad_norm"):
        b, f = out["bf16"][k], out["fp32"][k]
        out[f"{k}_rel_diff"] = abs(b - f) / max(abs(f), 1e-12)
    return out


def report(res: dict) -> str:
    """The Markdown tables of a result."""
    from popo.deploy.bench.stats import markdown_table

    rows = []
    for r in res["models"]:
        s = r["step_s"]
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a (peak unknown)"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        rows.append(
            [
                f"{r['name']}-shaped, {r['layers']} of {r['of_layers']} layers",
                f"{r['params'] / 1e9:.3f} B" if r["params"] >= 1e8 else f"{r['params']:,}",
                f"{r['completion_tokens']:,}",
                f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['achieved_tflops']:,.1f}",
                mfu,
                mem,
                "{nearest:.2f} / {dither:.2f}".format(**r["version_to_host_s"]),
            ]
        )
    text = markdown_table(
        [
            "model",
            "params",
            "completion tokens / step",
            "step s median [min, max]",
            "completion tokens/s",
            "model TFLOP/s",
            "MFU",
            "peak GiB",
            "bf16 version to host s (nearest / dither)",
        ],
        rows,
    )
    la = res.get("loss_agreement")
    if la:
        text += "\n\n" + markdown_table(
            ["first step, same weights and batch", "bf16 autocast", "fp32", "relative difference"],
            [
                [
                    "loss",
                    f"{la['bf16']['loss']:.6f}",
                    f"{la['fp32']['loss']:.6f}",
                    f"{la['loss_rel_diff']:.2e}",
                ],
                [
                    "grad norm",
                    f"{la['bf16']['grad_norm']:.5f}",
                    f"{la['fp32']['grad_norm']:.5f}",
                    f"{la['grad_norm_rel_diff']:.2e}",
                ],
            ],
        )
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="tiny shapes on CPU: checks the script")
    p.add_argument("--models", default="1.5b,7b", help="comma-separated: 1.5b, 7b")
    p.add_argument("--steps", type=int, help="timed steps after one warm-up (default 5; dry 2)")
    p.add_argument("--groups", type=int, help="groups per step (default 8; dry 2)")
    p.add_argument("--group-size", type=int, help="completions per group (default 8; dry 4)")
    p.add_argument("--completion-tokens", type=int, help="tokens per completion (1024; dry 32)")
    p.add_argument("--agreement-groups", type=int, help="groups of the bf16/fp32 check (2)")
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=4096,
        help="learner.micro_batch_tokens (whole groups per micro-batch)",
    )
    p.add_argument("--no-agreement", action="store_true", help="skip the bf16 vs fp32 check")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU, TFLOP/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, help="JSON result (default runs/gpu-check/<utc>.json)")
    a = p.parse_args(argv)
    full = dict(steps=5, groups=8, group_size=8, completion_tokens=1024, agreement_groups=2)
    dry = dict(steps=2, groups=2, group_size=4, completion_tokens=32, agreement_groups=1)
    for k, v in (dry if a.dry else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    bootstrap()
    import torch
    import transformers

    if a.dry:
        device, keys = torch.device("cpu"), ["dry"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --dry for the CPU check)")
        device, keys = torch.device("cuda"), [k.strip() for k in a.models.split(",") if k.strip()]
        unknown = [k for k in keys if k not in ("1.5b", "7b")]
        if unknown:
            raise SystemExit(f"gpu_check: unknown model {unknown[0]!r} (1.5b, 7b)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, a.peak_tflops) if device.type == "cuda" else a.peak_tflops
    total_mem = (
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    )
    print(
        f"gpu_check: {name}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peak bf16 {peak} TFLOP/s",
        flush=True,
    )
    res: dict[str, Any] = {
        "device": name,
        "device_memory_gib": total_mem / 2**30 if total_mem else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "peak_bf16_tflops": peak,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "batch": {
            "groups": a.groups,
            "group_size": a.group_size,
            "completion_tokens": a.completion_tokens,
            "prompt_tokens": "16-32 (uniform)",
            "micro_batch_tokens": a.micro_batch_tokens,
        },
        "flops_formula": __doc__.split("MFU counts")[1].split("\n\n")[0].strip(),
        "models": [],
    }
    for key in keys:
        batch = positive_batch(a, a.groups, SHAPES[key]["vocab_size"], a.seed)
        print(f"{NAMES[key]}-shaped model:", flush=True)
        res["models"].append(run_model(key, a, device, batch, peak))
    if not a.no_agreement:
        vocab = SHAPES["dry" if a.dry else "1.5b"]["vocab_size"]
        batch = positive_batch(a, a.agreement_groups, vocab, a.seed + 1)
        print("bf16 vs fp32, first step:", flush=True)
        res["loss_agreement"] = loss_agreement(a, device, batch)
    res["total_s"] = time.perf_counter() - t_start
    print()
    print(report(res))
    print(f"\ntotal {res['total_s']:.0f} s")
    out = a.json_out or REPO / "runs" / "gpu-check" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(f"wrote {out}")
    return 0 if all(math.isfinite(r["step_s"]["median"]) for r in res["models"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
