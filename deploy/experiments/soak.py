"""Soak: run the embedded default for a long time and watch memory and throughput.

    .venv/bin/python deploy/experiments/soak.py --minutes 60 --out runs/soak

Starts `popo train` (the embedded default, with `total_steps` raised so it outlasts the soak), and
every `--interval` seconds samples, for each role the supervisor lists in `RUN_DIR/pids.json`, the
resident memory (VmRSS from /proc) of the role's leader and of its whole process group (an actor's
vLLM engine core and a verifier's scoring workers are children in its group), and the run's
throughput from `metrics.jsonl` (learner steps and trained tokens, actor sampled tokens). After
`--minutes` it stops the run as Ctrl-C would, then writes:

- `OUT/soak.jsonl`: every sample;
- `OUT/soak.png`: RSS per role and throughput over time;
- `OUT/soak_summary.json` and a table on stdout: per role, mean RSS in the warm-up window
  (`--warm`, default minutes 10-15) vs the last `--final` minutes (default 5), and the growth;
  the soak passes when every role grows less than `--max-growth` (10 %). Exit code 1 otherwise.

For a short validation run scale the windows, e.g. `--minutes 10 --warm 2,4 --final 2`.
Extra `popo train` flags go after `--`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from popo.common.run_dir import RunDir

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def rss_kb(pid: int) -> int | None:
    """VmRSS of one process in KiB, None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return 0  # a zombie has no VmRSS line


def group_rss_kb(pgid: int) -> tuple[int, int]:
    """(summed VmRSS in KiB, process count) of every process in process group `pgid`: each role
    leads its own group, so this is the role with the engine or worker processes it spawned."""
    total = n = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) != pgid:  # fields: state, ppid, pgrp, ...
            continue
        kb = rss_kb(int(d.name))
        if kb is not None:
            total += kb
            n += 1
    return total, n


def last_records(path: Path, tail_bytes: int = 1 << 18) -> dict[str, dict]:
    """The newest metrics.jsonl record of each role instance (reads only the file's tail)."""
    out: dict[str, dict] = {}
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        out[rec.get("instance") or rec.get("role", "?")] = rec
    return out


def sample(run_dir: Path, t0: float) -> dict:
    now = time.time()
    rec: dict = {"t": now, "elapsed_s": round(now - t0, 1), "roles": {}}
    try:
        pids = json.loads(RunDir(run_dir).pids.read_text())["roles"]
    except (OSError, ValueError, KeyError):
        pids = {}
    for role, pid in pids.items():
        leader = rss_kb(pid)
        if leader is None:
            continue
        tree, n = group_rss_kb(pid)
        rec["roles"][role] = {
            "pid": pid,
            "rss_mb": leader / 1024,
            "group_rss_mb": tree / 1024,
            "processes": n,
        }
    metrics = last_records(RunDir(run_dir).metrics)
    learner = metrics.get("learner", {})
    rec["learner_step"] = learner.get("popo_learner_step")
    rec["learner_tokens"] = learner.get("popo_learner_tokens_total")
    rec["actor_tokens"] = sum(
        r.get("popo_actor_tokens_total", 0) or 0
        for k, r in metrics.items()
        if k.startswith("actor")
    )
    return rec


def window_mean(samples: list[dict], lo_s: float, hi_s: float, key) -> float | None:
    vals = [v for s in samples if lo_s <= s["elapsed_s"] <= hi_s and (v := key(s)) is not None]
    return sum(vals) / len(vals) if vals else None


def rate(samples: list[dict], lo_s: float, hi_s: float, field: str) -> float | None:
    """Per-second increase of a cumulative figure over a window (None across a restart reset)."""
    pts = [
        (s["elapsed_s"], s[field])
        for s in samples
        if lo_s <= s["elapsed_s"] <= hi_s and s.get(field) is not None
    ]
    if len(pts) < 2 or pts[-1][1] < pts[0][1]:
        return None
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def summarize(samples: list[dict], warm: tuple[float, float], final_min: float, max_growth: float):
    end = samples[-1]["elapsed_s"]
    w0, w1 = warm[0] * 60, warm[1] * 60
    f0 = end - final_min * 60
    roles = sorted({r for s in samples for r in s["roles"]})
    rows = {}
    for role in roles:

        def g(s, role=role):
            r = s["roles"].get(role)
            return r["group_rss_mb"] if r else None

        a, b = window_mean(samples, w0, w1, g), window_mean(samples, f0, end, g)
        growth = (b - a) / a if a and b is not None else None
        rows[role] = {"warm_rss_mb": a, "final_rss_mb": b, "growth": growth}
    thr = {
        f: {"warm": rate(samples, w0, w1, f), "final": rate(samples, f0, end, f)}
        for f in ("learner_step", "learner_tokens", "actor_tokens")
    }
    ok = all(r["growth"] is not None and r["growth"] < max_growth for r in rows.values())
    return {
        "duration_s": end,
        "warm_window_s": [w0, w1],
        "final_window_s": [f0, end],
        "rss": rows,
        "throughput_per_s": thr,
        "max_growth": max_growth,
        "pass": ok,
    }


def plot(samples: list[dict], out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    minutes = [s["elapsed_s"] / 60 for s in samples]
    for role in summary["rss"]:
        ys = [s["roles"].get(role, {}).get("group_rss_mb") for s in samples]
        ax1.plot(minutes, [y if y is not None else float("nan") for y in ys], label=role)
    for lo, hi, c in (
        (*summary["warm_window_s"], "tab:green"),
        (*summary["final_window_s"], "tab:red"),
    ):
        ax1.axvspan(lo / 60, hi / 60, color=c, alpha=0.1)
    ax1.set_ylabel("RSS of the role's process group (MiB)")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.set_title("soak: memory (shaded: warm-up and final windows) and throughput")
    # throughput over a sliding minute: metrics.jsonl snapshots are seconds apart, so rates
    # between consecutive samples alias
    k = max(1, round(60 / max(1e-9, samples[1]["elapsed_s"] - samples[0]["elapsed_s"])))
    steps, toks, mids = [], [], []
    for a, b in zip(samples, samples[k:], strict=False):
        dt = b["elapsed_s"] - a["elapsed_s"]
        if dt <= 0 or a.get("learner_step") is None or b.get("learner_step") is None:
            continue
        mids.append((a["elapsed_s"] + b["elapsed_s"]) / 120)
        steps.append(60 * (b["learner_step"] - a["learner_step"]) / dt)
        toks.append((b["actor_tokens"] - a["actor_tokens"]) / dt)
    ax2.plot(mids, steps, color="tab:blue", label="learner steps / min")
    ax2.set_ylabel("learner steps / min")
    ax3 = ax2.twinx()
    ax3.plot(mids, toks, color="tab:orange", alpha=0.6, label="actor tokens / s")
    ax3.set_ylabel("actor tokens / s")
    ax2.set_xlabel("minutes")
    handles = ax2.get_legend_handles_labels()[0] + ax3.get_legend_handles_labels()[0]
    ax2.legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="soak duration")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--warm", default="10,15", help="warm-up window, minutes from,to")
    ap.add_argument("--final", type=float, default=5.0, help="final window, last N minutes")
    ap.add_argument("--max-growth", type=float, default=0.10)
    ap.add_argument("--out", type=Path, default=Path("runs/soak"))
    ap.add_argument("--plot-only", action="store_true", help="re-analyse OUT/soak.jsonl")
    ap.add_argument("train_args", nargs="*", help="extra `popo train` flags (after --)")
    args = ap.parse_args(argv)
    warm = tuple(float(x) for x in args.warm.split(","))
    out: Path = args.out
    samples_path = out / "soak.jsonl"
    if not args.plot_only:
        run_dir = out / "run"
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists; pick another --out")
        out.mkdir(parents=True, exist_ok=True)
        from popo.deploy.bench.runs import train_command
        from popo.deploy.cli import OFFLINE_ENV

        cmd = train_command(run_dir, "--learner.total_steps=1000000", *args.train_args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE_ENV}
        print("soak:", " ".join(cmd), flush=True)
        with open(out / "train.log", "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        t0 = time.time()
        try:
            with open(samples_path, "w") as f:
                while time.time() - t0 < args.minutes * 60:
                    if proc.poll() is not None:
                        raise SystemExit(
                            f"popo train exited early ({proc.returncode}); see {out / 'train.log'}"
                        )
                    rec = sample(run_dir, t0)
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    time.sleep(max(0.0, args.interval - (time.time() - rec["t"])))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C: roles stop cleanly
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    samples = [json.loads(x) for x in samples_path.read_text().splitlines()]
    summary = summarize(samples, warm, args.final, args.max_growth)  # type: ignore[arg-type]
    (out / "soak_summary.json").write_text(json.dumps(summary, indent=1))
    plot(samples, out / "soak.png", summary)
    print(
        f"| role | RSS min {warm[0]:g}-{warm[1]:g} (MiB) | RSS last {args.final:g} min (MiB) "
        "| growth |\n| --- | --- | --- | --- |"
    )
    for role, r in summary["rss"].items():
        g = "n/a" if r["growth"] is None else f"{100 * r['growth']:+.1f} %"
        a = "n/a" if r["warm_rss_mb"] is None else f"{r['warm_rss_mb']:.0f}"
        b = "n/a" if r["final_rss_mb"] is None else f"{r['final_rss_mb']:.0f}"
        print(f"| {role} | {a} | {b} | {g} |")
    for k, v in summary["throughput_per_s"].items():
        print(f"{k}/s: warm {v['warm']}, final {v['final']}")
    print(f"pass (every role < {100 * args.max_growth:.0f} % growth): {summary['pass']}")
    print(f"plot: {out / 'soak.png'}")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
