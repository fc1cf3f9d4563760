"""Benchmark: verifications/s of the verifier service, per worker, against math-verify called
directly in one process on the same completions.

    python -m popo.verifier.bench [--quick] [--workers 1,2] [--reps 5] [--json out.json]

The service runs as in production: its own process (with its worker processes), real ZeroMQ
sockets on 127.0.0.1; this process plays the actors (PUSH) and the learner (PULL). Completions are
built from the gold answers of MATH-500 / AIME 2025 / AMC 2023 (`../shared/data/`): per prompt
G = 8 short reasoning texts, 3 boxing the gold, 4 boxing wrong answers, 1 with no box. Every
repetition scores a disjoint slice of the prompts, so math-verify's parse caches help neither
side more than the other. Ratio = (service completions/s / workers) / direct completions/s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
G = 8


def build_groups(n_groups: int) -> list[tuple[str, list[str]]]:
    """(gold, G completion texts) per prompt, cycling through the benchmark files."""
    import re

    from popo.common.data import BENCHMARKS, load_problems

    golds = []
    for name in ("math500", "aime25", "amc23"):
        golds += [p.gold for p in load_problems(DATA / f"{name}.jsonl", **BENCHMARKS[name])]
    groups = []
    for k in range(n_groups):
        gold = golds[k % len(golds)]
        m = re.search(r"\d", gold)
        bumped = gold[: m.start()] + str((int(m.group()) + 1) % 10) + gold[m.end() :] if m else "7"
        lead = (
            f"Problem {k}. Let us restate the question and define the unknowns. "
            f"Expanding and collecting terms, we get {k % 17} + {k % 5} = {k % 17 + k % 5}; "
            "substituting back and simplifying, then checking the edge cases, gives the result.\n"
        )
        texts = [
            lead + f"Therefore, the final answer is $\\boxed{{{gold}}}$.",
            lead + f"So the answer is \\boxed{{{gold}}}.",
            lead + f"Hence $\\boxed{{{gold}}}$ is the answer.",
            lead + f"Therefore, the final answer is $\\boxed{{{bumped}}}$.",
            lead + f"So the answer is \\boxed{{{k + 9973}}}.",
            lead + f"Hence $\\boxed{{\\frac{{{k + 1}}}{{{k + 7}}}}}$ is the answer.",
            lead + f"Thus the answer is $\\boxed{{{k % 13 + 1000}\\sqrt{{2}}}}$.",
            lead + "I am not sure how to finish; the answer might be large.",
        ]
        groups.append((gold, texts))
    return groups


def run_direct(groups: list[tuple[str, list[str]]]) -> tuple[float, list[str]]:
    """math-verify in this process: gold parsed once per prompt, like the service. -> (s, verdicts)"""
    from popo.verifier.scoring import parse_gold, score_completion

    verdicts: list[str] = []
    t0 = time.perf_counter()
    for gold, texts in groups:
        gp = parse_gold(gold)
        verdicts += [score_completion(gp, t)[0] for t in texts]
    return time.perf_counter() - t0, verdicts


def _serve(cfg_json: str, ingest_addr: str, conn: mp.connection.Connection) -> None:
    """Child process: one verifier replica until the bench closes the pipe."""
    import threading

    from popo.common.config import RunConfig
    from popo.verifier.service import Verifier

    v = Verifier(RunConfig.model_validate_json(cfg_json), ingest_addr=ingest_addr)
    v.setup()
    conn.send_bytes(v.rollouts.address.encode())  # type: ignore[union-attr]
    stop = threading.Event()

    def wait_for_stop() -> None:
        try:
            conn.recv_bytes()
        finally:
            stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    try:
        v.run(stop)
    finally:
        v.close()


def run_service(
    workers: int, reps: list[list[tuple[str, list[str]]]]
) -> list[tuple[float, list[str]]]:
    """Each rep's groups pushed through a verifier process; -> per rep (s, verdicts in order)."""
    import zmq

    from popo.common import transport
    from popo.common.config import RunConfig
    from popo.common.messages import Completion, RolloutGroup, ScoredGroup, pack_f32, pack_ids

    cfg = RunConfig(
        verifier={"num_workers": workers, "forward": "all", "timeout_s": 10.0},
        transport={"rollouts_port": 0, "ingest_port": 0, "recv_timeout_ms": 100},
        metrics={"enabled": False},
    )
    ctx = zmq.Context()
    learner = transport.bind(ctx, "ingest", "tcp://127.0.0.1:*", cfg.transport)
    spawn = mp.get_context("spawn")
    parent, child = spawn.Pipe()
    proc = spawn.Process(target=_serve, args=(cfg.model_dump_json(), learner.address, child))
    proc.start()
    actor = transport.connect(ctx, "rollouts", parent.recv_bytes().decode(), cfg.transport)
    out = []
    lease = 0
    try:
        for groups in reps:
            msgs = []
            for gold, texts in groups:
                comp = [
                    Completion(
                        token_ids=pack_ids(range(64)),
                        logprobs=pack_f32([-0.5] * 64),
                        text=t,
                        finish_reason="stop",
                    )
                    for t in texts
                ]
                msgs.append(
                    RolloutGroup(
                        lease_id=lease,
                        prompt_id=str(lease),
                        prompt_token_ids=pack_ids(range(32)),
                        gold=gold,
                        completions=comp,
                        version_min=0,
                        version_max=0,
                        actor_id="bench",
                        t_leased=0.0,
                        t_started=0.0,
                        t_finished=0.0,
                    )
                )
                lease += 1
            first = msgs[0].lease_id
            got: dict[int, ScoredGroup] = {}
            sent = 0
            t0 = time.perf_counter()
            while len(got) < len(msgs):
                while sent < len(msgs) and actor.send(msgs[sent], timeout_ms=0):
                    sent += 1
                r = learner.recv(timeout_ms=1 if sent < len(msgs) else 100)
                if r is not None:
                    s = r[1]
                    assert isinstance(s, ScoredGroup)
                    got[s.lease_id] = s
            dt = time.perf_counter() - t0
            verdicts = [c.verdict for k in range(len(msgs)) for c in got[first + k].completions]
            out.append((dt, verdicts))
    finally:
        parent.send_bytes(b"stop")
        proc.join(60)
        actor.close()
        learner.close()
        ctx.term()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer prompts and repetitions (~1 min)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5, quick 3)")
    ap.add_argument(
        "--groups", type=int, default=None, help="prompts per repetition (default 60, quick 20)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 5)
    per_rep = args.groups or (20 if args.quick else 60)
    workers = [int(w) for w in args.workers.split(",")]

    # Disjoint slices: one warm-up slice, then one per repetition (the same slices for both sides).
    groups = build_groups(per_rep * (reps + 1))
    slices = [groups[i * per_rep : (i + 1) * per_rep] for i in range(reps + 1)]
    n = per_rep * G

    run_direct(slices[0])
    direct = [run_direct(s) for s in slices[1:]]
    direct_rates = [n / dt for dt, _ in direct]
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "completions_per_rep": n,
        "reps": reps,
        "direct": _summary(direct_rates),
        "service": {},
    }
    for w in workers:
        runs = run_service(w, slices)[1:]  # first slice is the warm-up
        for (_, dv), (_, sv) in zip(direct, runs, strict=True):
            assert dv == sv, "service and direct verdicts differ"
        rates = [n / dt for dt, _ in runs]
        per_worker = [r / w for r in rates]
        results["service"][str(w)] = {
            "total": _summary(rates),
            "per_worker": _summary(per_worker),
            "ratio_per_worker_vs_direct": round(
                statistics.median(per_worker) / statistics.median(direct_rates), 3
            ),
        }

    d = results["direct"]
    print(
        f"\n{n} completions per repetition, {reps} repetitions, median [min, max] verifications/s"
    )
    print(f"{'setup':<28}{'total/s':>24}{'per worker/s':>24}{'ratio':>8}")
    print(f"{'direct (1 process)':<28}{_fmt(d):>24}{_fmt(d):>24}{'1.00':>8}")
    for w, r in results["service"].items():
        label = f"service, {w} worker{'s' if w != '1' else ''}"
        print(
            f"{label:<28}{_fmt(r['total']):>24}{_fmt(r['per_worker']):>24}{r['ratio_per_worker_vs_direct']:>8.2f}"
        )
    print(json.dumps(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _summary(xs: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(xs), 1),
        "min": round(min(xs), 1),
        "max": round(max(xs), 1),
        "stdev": round(statistics.stdev(xs), 1) if len(xs) > 1 else 0.0,
    }


def _fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.0f} [{s['min']:.0f}, {s['max']:.0f}]"


if __name__ == "__main__":
    raise SystemExit(main())
