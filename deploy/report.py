"""`popo report RUN_DIR [RUN_DIR ...]`: PNG plots of one or more runs, overlaid for comparison.

Reads each run's `eval.jsonl` (held-out accuracy), `metrics.jsonl` (every role's snapshots),
`config.toml` (the label), `summary.json` and, read-only, `ledger.db` (the steps of a run that did
not finish). Panels: held-out accuracy against steps and against wall-clock, verifier pass rate
(reward), loss terms, throughput per role, staleness of trained groups.
"""

from __future__ import annotations

import json
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

from popo.common.metrics import paired_p_value
from popo.common.run_dir import RunDir, read_jsonl
from popo.learner.ledger import LedgerReader


def load_run(run_dir: Path) -> dict[str, Any]:
    run = RunDir(run_dir)
    cfg = tomllib.loads(run.config.read_text()) if run.config.exists() else {}
    algo = cfg.get("algorithm", {}).get("name", "?")
    seed = cfg.get("learner", {}).get("seed", "?")
    recs = read_jsonl(run.metrics)
    by_inst: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        by_inst[r.get("instance", "?")].append(r)
    t0 = min((r["t"] for r in recs), default=0.0)
    return {
        "label": f"{run_dir.name} ({algo}, seed {seed})",
        "algorithm": algo,
        "evals": read_jsonl(run.evals),
        "by_inst": dict(by_inst),
        "t0": t0,
    }


def _rate(
    recs: list[dict[str, Any]], key: str, t0: float, window_s: float = 15.0
) -> tuple[list[float], list[float]]:
    """Rate of counter `key`, averaged over `window_s` (snapshots are ~1-5 s apart and counters
    such as trained tokens move in steps)."""
    pts = [(r["t"], r[key]) for r in recs if key in r]
    xs, ys = [], []
    j = 0
    for t, v in pts:
        while t - pts[j][0] > window_s:
            j += 1
        if t - pts[j][0] >= window_s / 2:
            xs.append(t - t0)
            ys.append((v - pts[j][1]) / (t - pts[j][0]))
    return xs, ys


def _by_step(recs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    seen: dict[float, float] = {}
    for r in recs:
        if key in r and "popo_learner_step" in r:
            seen[r["popo_learner_step"]] = r[key]
    steps = sorted(seen)
    return steps, [seen[s] for s in steps]


def summary_row(run_dir: Path) -> dict[str, Any]:
    """One run's headline figures (from summary.json, eval.jsonl, the ledger and the learner's
    metrics)."""
    run = load_run(run_dir)
    summary = RunDir(run_dir).summary
    s = json.loads(summary.read_text()) if summary.exists() else {}
    ev = run["evals"]
    learner = run["by_inst"].get("learner", [])
    last = learner[-1] if learner else {}
    wall = (ev[-1]["t"] - run["t0"]) if ev else None
    return {
        "run": run_dir.name,
        "algorithm": s.get("algorithm", run["algorithm"]),
        "acc_before": ev[0]["accuracy"] if ev else None,
        "acc_after": ev[-1]["accuracy"] if ev else None,
        "p_paired": held_out_p_value(ev[0], ev[-1]) if len(ev) > 1 else None,
        "steps": s.get("steps", _steps_trained(run_dir, last)),
        "wall_s": wall,
        "tokens": s.get("tokens_trained", last.get("popo_learner_tokens_total")),
        "pass_rate": last.get("popo_learner_pass_rate"),
    }


def held_out_p_value(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Paired p-value of the change in held-out accuracy between two evaluations of the same
    prompts (`per_prompt` in eval.jsonl); None when either lacks it or the prompts differ."""
    a, b = before.get("per_prompt"), after.get("per_prompt")
    if not a or not b or len(a) != len(b):
        return None
    return paired_p_value(a, b)


def _steps_trained(run_dir: Path, last: dict[str, Any]) -> int:
    """Steps of a run without a summary (still running, or stopped): the ledger's last trained
    step, else the learner's last metric snapshot (a run without a ledger: the plain trainer)."""
    ledger = RunDir(run_dir).ledger
    if ledger.exists():
        with LedgerReader(ledger) as db:
            return db.last_trained_step()
    return int(last.get("popo_learner_step", 0))


def time_to_accuracy(run_dir: Path, threshold: float) -> float | None:
    """Seconds from the run's first record to the first evaluation at or above `threshold`."""
    run = load_run(run_dir)
    for e in run["evals"]:
        if e["accuracy"] >= threshold:
            return e["t"] - run["t0"]
    return None


def markdown_table(run_dirs: list[Path]) -> str:
    rows = [summary_row(d) for d in run_dirs]
    out = [
        "| run | algorithm | held-out before | after | paired p | steps | wall-clock s | tokens trained | pass rate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    num = lambda x: "-" if x is None else f"{x:,.0f}"  # noqa: E731
    for r in rows:
        p = "-" if r["p_paired"] is None else f"{r['p_paired']:.3g}"
        out.append(
            f"| {r['run']} | {r['algorithm']} | {pct(r['acc_before'])} | {pct(r['acc_after'])} | "
            f"{p} | {r['steps']} | {num(r['wall_s'])} | {num(r['tokens'])} | "
            f"{pct(r['pass_rate'])} |"
        )
    return "\n".join(out)


def report(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    ax_acc_step, ax_acc_time, ax_pass, ax_loss, ax_tput, ax_stale = axes.flat
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        ev = run["evals"]
        if ev:
            ax_acc_step.plot(
                [e["step"] for e in ev],
                [100 * e["accuracy"] for e in ev],
                "o-",
                color=color,
                label=run["label"],
            )
            ax_acc_time.plot(
                [e["t"] - run["t0"] for e in ev],
                [100 * e["accuracy"] for e in ev],
                "o-",
                color=color,
            )
        learner = run["by_inst"].get("learner", [])
        s, y = _by_step(learner, "popo_learner_pass_rate")
        ax_pass.plot(s, [100 * v for v in y], color=color)
        for term, style in (("total", "-"), ("nll", "--"), ("sim", ":"), ("pg", "-.")):
            s, y = _by_step(learner, f'popo_learner_loss{{term="{term}"}}')
            if s:
                ax_loss.plot(s, y, style, color=color, label=f"{term}" if i == 0 else None)
        x, y = _rate(learner, "popo_learner_tokens_total", run["t0"])
        ax_tput.plot(x, y, "-", color=color, alpha=0.9)
        for inst, recs in run["by_inst"].items():
            if inst.startswith("actor"):
                x, y = _rate(recs, "popo_actor_tokens_total", run["t0"])
                ax_tput.plot(x, y, ":", color=color, alpha=0.7)
        s_sum, y_sum = _by_step(learner, "popo_learner_staleness_versions_sum")
        _, y_cnt = _by_step(learner, "popo_learner_staleness_versions_count")
        ax_stale.plot(
            s_sum, [a / b if b else 0 for a, b in zip(y_sum, y_cnt, strict=False)], color=color
        )

    ax_acc_step.set(title="held-out sampled accuracy", xlabel="step", ylabel="%")
    ax_acc_time.set(title="held-out accuracy vs wall-clock", xlabel="seconds", ylabel="%")
    ax_pass.set(title="verifier pass rate (reward)", xlabel="step", ylabel="% positive")
    ax_loss.set(title="loss terms (solid total, dashed NLL, dotted sim)", xlabel="step")
    ax_tput.set(title="tokens/s (solid learner, dotted actors)", xlabel="seconds")
    ax_stale.set(
        title="mean staleness of trained groups (cumulative)", xlabel="step", ylabel="versions"
    )
    ax_acc_step.legend(fontsize=8)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
