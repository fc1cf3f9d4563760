"""Chaos: SIGKILL the learner, the verifier and the actor of a real `popo train` at seeded random
moments, including inside a weight publish and inside a checkpoint write; the run must complete
with every lease ended exactly once, nothing trained twice and the right final step count.

Hitting the write windows deterministically: the run is started with `POPO_FAULT_WRITE_DELAY_S`
(`common.weights.fault_window`), which makes the learner sleep for that long after a weight
version's or a checkpoint's files are written under their `.tmp-*` name and before the rename.
The driver watches `weights/` and `checkpoints/` for a `.tmp-*` directory carrying the live
learner's pid and SIGKILLs the learner while it exists (and checks it still existed after the kill).

The short version runs in CI (`not slow`); the long one, with a baseline run of the same config
for the time lost, is `pytest tests/deploy/test_chaos.py -m slow -s` (figures in RELIABILITY.md;
`POPO_CHAOS_REPORT=path.json` also writes them to a file). `POPO_CHAOS_SEED` picks the seed.

The first tests drive the Supervisor's restart policy with small real processes (no vLLM).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e_helpers import train_args

from popo.common.config import RunConfig
from popo.common.run_dir import RunDir
from popo.deploy.launch import Supervisor
from popo.learner.checkpoint import checkpoint_step, latest_checkpoint
from popo.learner.ledger import Ledger, LedgerReader

SEED = int(os.environ.get("POPO_CHAOS_SEED", "0"))


# --- the supervisor's restart policy ---------------------------------------------------------------


def _supervisor(tmp_path: Path, learner_script: str, **deploy: float) -> Supervisor:
    cfg = RunConfig.model_validate(
        {
            "actor": {"num_actors": 1},
            "verifier": {"replicas": 1},
            "deploy": {"restart_backoff_s": 0.05, "restart_backoff_max_s": 0.2, **deploy},
        }
    )
    sup = Supervisor(cfg, tmp_path, tmp_path / "config.toml")
    # Real processes standing in for the roles' commands: the policy only sees exit codes.
    sup.learner.argv = [sys.executable, "-c", learner_script]
    for role in sup.roles[1:]:
        role.argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    return sup


def _run(sup: Supervisor, timeout: float = 30.0) -> int:
    deadline = time.time() + timeout
    try:
        sup.start()
        while time.time() < deadline:
            code = sup.poll()
            if code is not None:
                return code
            time.sleep(0.02)
        raise AssertionError("supervisor did not finish")
    finally:
        sup.stop(grace_s=2)


def _records(run_dir: Path) -> list[dict]:
    p = run_dir / "restarts.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_killed_learner_is_restarted_until_it_succeeds(tmp_path):
    # The "learner" SIGKILLs itself on its first two starts and exits 0 on the third.
    script = (
        f"import os, signal, pathlib; p = pathlib.Path({str(tmp_path / 'starts')!r});"
        " n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1));"
        " n < 2 and os.kill(os.getpid(), signal.SIGKILL)"
    )
    sup = _supervisor(tmp_path, script, learner_max_restarts=3)
    assert _run(sup) == 0
    assert (tmp_path / "starts").read_text() == "3"
    recs = _records(tmp_path)
    assert [(r["role"], r["signal"], r["action"]) for r in recs] == [
        ("learner", "SIGKILL", "restart"),
        ("learner", "SIGKILL", "restart"),
    ]
    assert [r["delay_s"] for r in recs] == [0.05, 0.1]
    pids = json.loads((tmp_path / "pids.json").read_text())
    assert (
        set(pids["roles"]) == {"learner", "verifier-0", "actor-0"}
        and pids["supervisor"] == os.getpid()
    )


def test_learner_failing_at_start_is_not_restarted(tmp_path):
    # A deterministic start-up error (config, data): exit 1 at once. Restarting would only loop.
    sup = _supervisor(tmp_path, "raise SystemExit(1)", learner_min_uptime_s=30)
    assert _run(sup) == 1
    (rec,) = _records(tmp_path)
    assert rec["role"] == "learner" and rec["exit_code"] == 1 and "not restarted" in rec["action"]


def test_learner_restarts_are_bounded(tmp_path):
    sup = _supervisor(
        tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", learner_max_restarts=2
    )
    assert _run(sup) == -signal.SIGKILL
    recs = _records(tmp_path)
    assert [r["action"] for r in recs] == ["restart", "restart", "2 restarts: giving up"]
    # back-off doubles but never exceeds restart_backoff_max_s
    assert [r["delay_s"] for r in recs[:2]] == [0.05, 0.1]


def test_backoff_is_capped(tmp_path):
    sup = _supervisor(tmp_path, "import time; time.sleep(60)", max_restarts=5)
    sup.roles[1].argv = [sys.executable, "-c", "raise SystemExit(3)"]
    assert _run(sup) == 1  # the verifier gave up after 5 restarts: the run stops
    delays = [r["delay_s"] for r in _records(tmp_path) if r["action"] == "restart"]
    assert delays == [0.05, 0.1, 0.2, 0.2, 0.2]


def test_restart_limit_counts_only_the_window(tmp_path):
    # The verifier crashes 6 times, each restart >= 0.3 s (the back-off) after the last; with
    # max_restarts 2 it would be given up on at its third crash, but in a 0.5 s window at most one
    # earlier restart is ever recent, so the run goes on; the learner exits 0 once the verifier
    # has lived through its crashes.
    starts, up = tmp_path / "verifier-starts", tmp_path / "verifier-up"
    sup = _supervisor(
        tmp_path,
        f"import pathlib, time\nwhile not pathlib.Path({str(up)!r}).exists(): time.sleep(0.05)",
        max_restarts=2,
        restart_window_s=0.5,
        restart_backoff_s=0.3,
        restart_backoff_max_s=0.3,
    )
    sup.roles[1].argv = [
        sys.executable,
        "-c",
        (
            f"import pathlib, time; p = pathlib.Path({str(starts)!r});"
            " n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1));"
            f" n < 6 and exit(3); pathlib.Path({str(up)!r}).touch(); time.sleep(60)"
        ),
    ]
    code = _run(sup)
    recs = _records(tmp_path)
    assert code == 0, recs
    assert [r["action"] for r in recs] == ["restart"] * 6
    assert [r["restart"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert sup.roles[1].restarts == 6


# --- chaos on a real run ---------------------------------------------------------------------------


@dataclass
class Kill:
    role: str
    window: str | None = None
    """Kill the learner inside a window: `publish` (a weight version being written), `checkpoint`
    (a checkpoint being written while an older one exists), `train` (steps trained after the
    latest checkpoint, so the resume must rewind them)."""
    t: float = 0.0
    pid: int = 0
    in_window: bool | None = None


@dataclass
class ChaosResult:
    returncode: int
    output: str
    wall_s: float
    kills: list[Kill] = field(default_factory=list)


def chaos_args(run_dir: Path, model_dir: Path, steps: int) -> list[str]:
    """`train_args` (later flags win) without evaluation, with short leases and fast restarts."""
    return [
        *train_args(run_dir, model_dir, steps),
        "--learner.eval_every=0",
        "--data.eval_size=8",
        "--learner.lease_timeout_s=10",
        "--deploy.max_restarts=100",
        "--deploy.learner_max_restarts=100",
        "--deploy.restart_backoff_s=0.2",
        "--deploy.restart_backoff_max_s=1",
        "--metrics.jsonl_every_s=2",
    ]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a dead, not yet reaped role is a zombie


def _role_pid(run_dir: Path, role: str) -> int | None:
    try:
        pids = json.loads((run_dir / "pids.json").read_text())["roles"]
    except (OSError, ValueError, KeyError):
        return None
    pid = pids.get(role)
    return pid if pid and _alive(pid) else None


def _age(pid: int) -> float:
    """Seconds since the process started."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def plan(seed: int, n_learner: int, n_verifier: int, n_actor: int) -> list[Kill]:
    """The seeded kill order: three learner kills inside the windows, the rest at random moments,
    shuffled across roles."""
    rng = random.Random(seed)
    kills = [Kill("learner") for _ in range(n_learner - 3)]
    kills += [Kill("verifier-0") for _ in range(n_verifier)]
    kills += [Kill("actor-0") for _ in range(n_actor)]
    rng.shuffle(kills)
    # the windows early enough that the run is certainly still writing and training
    kills.insert(rng.randrange(1, 4), Kill("learner", "publish"))
    kills.insert(rng.randrange(5, 8), Kill("learner", "checkpoint"))
    kills.insert(rng.randrange(9, 12), Kill("learner", "train"))
    return kills


def run_chaos(
    run_dir: Path,
    model_dir: Path,
    steps: int,
    kills: list[Kill],
    seed: int,
    gap_s: tuple[float, float] = (1.0, 6.0),
    timeout_s: float = 900.0,
) -> ChaosResult:
    """Run `popo train` and execute `kills` in order, each after a seeded random gap and once its
    role is up; then wait for the run to end."""
    rng = random.Random(seed + 1)
    env = dict(os.environ, PYTHONUNBUFFERED="1", POPO_FAULT_WRITE_DELAY_S="0.3")
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "popo.deploy.cli", "train", *chaos_args(run_dir, model_dir, steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    done: list[Kill] = []
    try:
        for k in kills:
            time.sleep(rng.uniform(*gap_s))
            min_age = rng.uniform(0.0, 8.0)  # sometimes mid-start-up, mostly once running
            while proc.poll() is None and time.time() - t0 < timeout_s:
                pid = _role_pid(run_dir, k.role)
                if pid is not None and _window_ready(run_dir, k, pid, min_age):
                    os.kill(pid, signal.SIGKILL)
                    k.t, k.pid = time.time() - t0, pid
                    if k.window is not None:
                        k.in_window = _tmp_dirs(run_dir, k.window, pid) != []
                    done.append(k)
                    break
                time.sleep(0.01)
            if proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=max(1.0, timeout_s - (time.time() - t0)))
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return ChaosResult(proc.returncode, out, time.time() - t0, done)


def _tmp_dirs(run_dir: Path, window: str, pid: int) -> list[Path]:
    if window == "train":
        return [run_dir] if _trained_after_checkpoint(run_dir) else []
    sub = "weights" if window == "publish" else "checkpoints"
    return list((run_dir / sub).glob(f".tmp-*-{pid}"))


def _latest_checkpoint_step(run_dir: Path) -> int | None:
    latest = latest_checkpoint(RunDir(run_dir).checkpoints)
    return checkpoint_step(latest) if latest is not None else None


def _trained_after_checkpoint(run_dir: Path) -> bool:
    ckpt = _latest_checkpoint_step(run_dir)
    if ckpt is None:
        return False
    with LedgerReader(RunDir(run_dir).ledger, timeout_s=5) as db:
        return db.trained_after(ckpt) > 0


def _window_ready(run_dir: Path, k: Kill, pid: int, min_age: float) -> bool:
    if k.window == "checkpoint" and _latest_checkpoint_step(run_dir) is None:
        return False  # wait for a write that has an older checkpoint to fall back on
    if k.window is not None:
        return _tmp_dirs(run_dir, k.window, pid) != []
    return _age(pid) >= min_age


def check_ledger(run_dir: Path, steps: int, prompts_per_step: int) -> dict[str, int]:
    """Exactly-once audit of a finished run; returns the figures for the report."""
    ledger = Ledger(RunDir(run_dir).ledger)
    try:
        assert ledger.check_exactly_once() == []
    finally:
        ledger.close()
    with LedgerReader(RunDir(run_dir).ledger) as db:
        states = db.state_counts()
        buffered_untrained = db.buffered_untrained()
        cursor = db.meta("cursor")
        prompts_twice = db.prompts_trained_twice(kind=None)
        rows = db.leases()
    trained = [r for r in rows if r["state"] == "trained"]
    # every lease ended: nothing outstanding or received after the run finished
    assert states.get("outstanding", 0) + states.get("received", 0) == 0
    assert buffered_untrained == 0
    # trained exactly once: the prompt cursor never wrapped, so no prompt may be trained twice
    assert cursor < 4000
    assert prompts_twice == 0
    # every step 1..steps trained once, with at most one batch of groups
    per_step = Counter(r["step"] for r in trained)
    assert sorted(per_step) == list(range(1, steps + 1)), per_step
    assert max(per_step.values()) <= prompts_per_step
    assert sum(r["step"] is None for r in trained) == 0
    # every expired lease's prompt was leased again (re-dispatched) later
    last_lease = {}
    for r in rows:
        last_lease[r["prompt_idx"]] = max(r["lease_id"], last_lease.get(r["prompt_idx"], -1))
    not_redispatched = [
        r for r in rows if r["state"] == "expired" and last_lease[r["prompt_idx"]] == r["lease_id"]
    ]
    assert len(not_redispatched) == 0
    return {
        "leases": len(rows),
        "trained": len(trained),
        "expired_redispatched": states.get("expired", 0),
        "rewound_retrained": sum(r["resumed"] == 1 for r in rows),
        "too_stale": sum(r["reason"] == "too_stale" for r in rows),
    }


def check_run(res: ChaosResult, run_dir: Path, steps: int, n_kills: int) -> dict:
    assert res.returncode == 0, res.output[-5000:]
    assert len(res.kills) == n_kills, f"run ended after {len(res.kills)} of {n_kills} kills"
    windows = {k.window: k.in_window for k in res.kills if k.window}
    assert windows == {"publish": True, "checkpoint": True, "train": True}, windows
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["ledger_problems"] == []
    figures = check_ledger(run_dir, steps, 4)
    # every kill was seen and logged as a restart: one SIGKILL record per kill and role, and no
    # role exited for any other reason
    recs = [json.loads(x) for x in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert all(r["signal"] == "SIGKILL" and r["action"] == "restart" for r in recs), recs
    by_role: dict[str, int] = {}
    for k in res.kills:
        by_role[k.role] = by_role.get(k.role, 0) + 1
    assert {r: sum(1 for x in recs if x["role"] == r) for r in by_role} == by_role
    assert res.output.count("exited with -9; restarting") == n_kills
    # the learner resumed from a checkpoint (the one before the write it was killed in) and
    # retrained the steps after it
    log = (run_dir / "logs" / "learner.log").read_text()
    assert "resumed from" in log and "go back to the buffer" in log
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, steps]  # restarts do not repeat the first eval
    # no half-written version or checkpoint is left where a reader would take it
    from popo.common.run_dir import RunDir
    from popo.common.weights import verify_weights

    last = RunDir(run_dir).weight_store().latest()
    assert last is not None
    verify_weights(Path(last.path) / "model.safetensors", last.sha256, last.nbytes)
    figures.update(kills=len(res.kills), kills_by_role=by_role, wall_s=round(res.wall_s, 1))
    return figures


def _report(figures: dict) -> None:
    print("\nchaos figures:", json.dumps(figures), flush=True)
    if path := os.environ.get("POPO_CHAOS_REPORT"):
        Path(path).write_text(json.dumps(figures, indent=1))


@pytest.mark.vllm
def test_chaos_short(tmp_path, demo_model_dir):
    """CI version: 22 kills (7 learner, 3 of them in the windows; 11 verifier, 4 actor)."""
    steps = 12
    kills = plan(SEED, n_learner=7, n_verifier=11, n_actor=4)
    res = run_chaos(tmp_path / "run", demo_model_dir, steps, kills, SEED)
    figures = check_run(res, tmp_path / "run", steps, len(kills))
    _report({"version": "short", "seed": SEED, "steps": steps, **figures})


@pytest.mark.vllm
@pytest.mark.slow
def test_chaos_long(tmp_path, demo_model_dir):
    """60 kills over a 60-step run, plus a baseline run of the same config without kills."""
    steps = 60
    t0 = time.time()
    base = run_chaos(tmp_path / "base", demo_model_dir, steps, [], SEED)
    assert base.returncode == 0, base.output[-5000:]
    base_s = time.time() - t0
    kills = plan(SEED, n_learner=16, n_verifier=30, n_actor=14)
    res = run_chaos(tmp_path / "run", demo_model_dir, steps, kills, SEED)
    figures = check_run(res, tmp_path / "run", steps, len(kills))
    figures.update(baseline_wall_s=round(base_s, 1), time_lost_s=round(res.wall_s - base_s, 1))
    _report({"version": "long", "seed": SEED, "steps": steps, **figures})
