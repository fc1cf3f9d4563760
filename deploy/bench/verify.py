"""`popo bench verify`: verifications/s of the verifier service, per worker, against math-verify
called directly in one process on the same completions.

The service runs as in production: its own process (with its worker processes), real ZeroMQ
sockets on 127.0.0.1; this process plays the actors (PUSH) and the learner (PULL). Completions are
built from the gold answers of MATH-500 / AIME 2025 / AMC 2023 (shipped in common/benchmarks/): per prompt
G = 8 short reasoning texts, 3 boxing the gold, 4 boxing wrong answers, 1 with no box. Every
repetition scores a disjoint slice of the prompts, so math-verify's parse caches help neither
side more than the other. Ratio = (service completions/s / workers) / direct completions/s, paired
per repetition.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

from popo.common.config import RunConfig
from popo.deploy.bench import ints
from popo.deploy.bench.stats import BenchResult, Summary, paired_ratio

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

G = 8


def build_groups(n_groups: int) -> list[tuple[str, list[str]]]:
    """(gold, G completion texts) per prompt, cycling through the benchmark files."""
    import re

    from popo.common.data import BENCHMARKS, benchmark_path, load_problems

    golds = []
    for name in ("math500", "aime25", "amc23"):
        golds += [p.gold for p in load_problems(benchmark_path(name), **BENCHMARKS[name])]
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
    from popo.common.grading import parse_gold
    from popo.verifier.scoring import score_completion

    verdicts: list[str] = []
    t0 = time.perf_counter()
    for gold, texts in groups:
        gp = parse_gold(gold)
        verdicts += [score_completion(gp, t)[0] for t in texts]
    return time.perf_counter() - t0, verdicts


def _serve(cfg_json: str, ingest_addr: str, conn: mp.connection.Connection) -> None:
    """Child process: one verifier replica until the bench closes the pipe."""
    import threading

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


class ServiceBench:
    """One verifier replica with `workers` scoring workers in its own process, fed by this process
    (PUSH, as an actor) and drained by it (PULL, as the learner). `run(groups)` times one batch."""

    def __init__(self, workers: int) -> None:
        import zmq

        from popo.common import transport

        cfg = RunConfig(
            verifier={"num_workers": workers, "forward": "all", "timeout_s": 10.0},
            transport={"rollouts_port": 0, "ingest_port": 0},
            metrics={"enabled": False},
        )
        self.workers = workers
        self.ctx = zmq.Context()
        self.learner = transport.bind(self.ctx, "ingest", "tcp://127.0.0.1:*", cfg.transport)
        spawn = mp.get_context("spawn")
        self.pipe, child = spawn.Pipe()
        self.proc = spawn.Process(
            target=_serve, args=(cfg.model_dump_json(), self.learner.address, child)
        )
        self.proc.start()
        self.actor = transport.connect(
            self.ctx, "rollouts", self.pipe.recv_bytes().decode(), cfg.transport
        )
        self._lease = 0

    def run(self, groups: list[tuple[str, list[str]]]) -> tuple[float, list[str]]:
        """Push every group, wait for every scored group -> (seconds, verdicts in order)."""
        from popo.common.messages import Completion, RolloutGroup, ScoredGroup, pack_f32, pack_ids

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
                    lease_id=self._lease,
                    prompt_id=str(self._lease),
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
            self._lease += 1
        first = msgs[0].lease_id
        got: dict[int, ScoredGroup] = {}
        sent = 0
        t0 = time.perf_counter()
        while len(got) < len(msgs):
            while sent < len(msgs) and self.actor.send(msgs[sent], timeout_ms=0):
                sent += 1
            r = self.learner.recv(timeout_ms=1 if sent < len(msgs) else 100)
            if r is not None:
                s = r[1]
                assert isinstance(s, ScoredGroup)
                got[s.lease_id] = s
        dt = time.perf_counter() - t0
        return dt, [c.verdict for k in range(len(msgs)) for c in got[first + k].completions]

    def close(self) -> None:
        self.pipe.send_bytes(b"stop")
        self.proc.join(60)
        self.actor.close()
        self.learner.close()
        self.ctx.term()


def measure(cfg: RunConfig, a: argparse.Namespace, out: Path) -> BenchResult:
    """`popo bench verify`: the service per worker against math-verify in one process."""
    workers = ints(a.workers)
    per_rep = a.groups
    n = per_rep * G
    # Disjoint slices per (worker count, repetition) plus a warm-up slice: math-verify's parse
    # caches help neither side, and both sides score the same slice in the same repetition.
    n_slices = len(workers) * (a.reps + 1)
    groups = build_groups(per_rep * n_slices)
    slices = [groups[i * per_rep : (i + 1) * per_rep] for i in range(n_slices)]
    res = BenchResult(
        "verify",
        f"verifier service per worker vs math-verify direct ({n} completions per repetition, "
        f"{a.reps} alternating repetitions)",
        [
            "setup",
            "verifications/s median [min, max]",
            "per worker/s",
            "ratio per worker / direct (target >= 0.8)",
        ],
    )
    figures: dict[str, Any] = {"completions_per_rep": n}
    k = 0
    for w in workers:
        svc = ServiceBench(w)
        direct_rate: list[float] = []
        svc_rate: list[float] = []
        try:
            for rep in range(a.reps + 1):
                part = slices[k]
                k += 1
                d_s, dv = run_direct(part)
                s_s, sv = svc.run(part)
                if dv != sv:
                    raise RuntimeError(f"service and direct verdicts differ ({w} workers)")
                if rep:  # the first slice warms both up
                    direct_rate.append(n / d_s)
                    svc_rate.append(n / s_s / w)
        finally:
            svc.close()
        r = paired_ratio(svc_rate, direct_rate, a.max_spread, ">= 0.8")
        res.ratios[f"per_worker_over_direct_w{w}"] = r
        if w == workers[0]:
            d = Summary.of(direct_rate)
            res.rows.append(["math-verify direct, 1 process", d.fmt(), d.fmt(), "1.00"])
        tot = Summary.of([x * w for x in svc_rate])
        res.rows.append(
            [f"service, {w} worker{'s' * (w > 1)}", tot.fmt(), Summary.of(svc_rate).fmt(), r.fmt()]
        )
        figures[f"w{w}"] = {"direct_per_s": direct_rate, "service_per_worker_per_s": svc_rate}
    res.figures = figures
    return res
