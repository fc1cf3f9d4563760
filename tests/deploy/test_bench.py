"""`popo bench`: the statistics and refusal, the schedule the e2e comparison relies on, the
role pinning, the weight-streaming benchmark, and every subcommand's `--quick` mode run for real
(harness, not timing thresholds)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from popo.common.config import RunConfig
from popo.common.data import Problem
from popo.common.messages import LeaseRequest, Leases
from popo.common.transport import connect
from popo.deploy.bench.e2e import (
    learner_split,
    overlap_ceiling,
    overlap_fraction,
    parse_pin,
    step_times,
    sync_ceilings,
    train_flags,
    window_throughput,
)
from popo.deploy.bench.stats import Summary, alternate, markdown_table, paired_ratio, spread
from popo.deploy.bench.sync import raw_write_read
from popo.deploy.launch import Role, role_cpus
from popo.learner.dispatch import Dispatcher, SharedState
from popo.learner.ledger import Ledger

# --- statistics ---------------------------------------------------------------------------------------


def test_summary_and_spread():
    s = Summary.of([2.0, 4.0, 3.0])
    assert (s.median, s.min, s.max) == (3.0, 2.0, 4.0)
    assert s.spread == pytest.approx(2 / 3)
    assert s.fmt(".1f") == "3.0 [2.0, 4.0]"
    assert Summary.of([0.002, 0.003]).fmt(".1f", 1e3) == "2.5 [2.0, 3.0]"
    assert spread([5.0]) == 0.0
    assert spread([0.0, 0.0]) == 0.0 and spread([-1.0, 0.0, 1.0]) == float("inf")


def test_paired_ratio_pairs_repetitions_and_checks_the_target():
    # A machine that slows down 2x in repetition 2 slows both sides: the pairs still agree.
    r = paired_ratio([9.0, 4.5, 9.2], [10.0, 5.0, 10.0], max_spread=0.5, target=">= 0.9")
    assert r.values == pytest.approx([0.9, 0.9, 0.92])
    assert r.median == pytest.approx(0.9) and not r.refused and r.meets_target is True
    assert r.fmt() == "0.90 [0.90, 0.92]"
    low = paired_ratio([3.0, 3.2], [1.0, 1.0], target="<= 2")
    assert low.meets_target is False and not low.refused
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_paired_ratio_refuses_when_runs_disagree():
    r = paired_ratio([1.0, 2.0, 0.5], [1.0, 1.0, 1.0], max_spread=0.5, target=">= 0.9")
    assert r.refused and r.meets_target is None
    assert r.spread == pytest.approx(1.5)
    assert r.fmt() == "refused: runs disagree (spread 1.50)"
    doc = r.to_json()
    assert doc["refused"] is True and doc["values"] == [1.0, 2.0, 0.5]
    # the same runs pass a looser threshold
    assert not paired_ratio([1.0, 2.0, 0.5], [1.0, 1.0, 1.0], max_spread=2.0).refused


def test_alternate_is_round_robin_after_warmup():
    calls: list[str] = []

    def f(name: str, value: float):
        return lambda: (calls.append(name), value)[1]

    out = alternate({"a": f("a", 1.0), "b": f("b", 2.0)}, reps=3, warmup=1)
    assert calls == ["a", "b"] * 4  # interleaved, warm-up round included
    assert out == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert markdown_table(["x", "y"], [[1, 2]]) == "| x | y |\n| --- | --- |\n| 1 | 2 |"


def test_parse_pin():
    assert parse_pin("learner=0;actor=1;verifier=1,2") == {
        "learner": [0],
        "actor": [1],
        "verifier": [1, 2],
    }
    assert parse_pin("none") == {}


def test_raw_write_read_reads_back_every_byte_and_leaves_nothing(tmp_path):
    data = os.urandom(3 << 20 | 5)  # several read buffers and a partial one
    assert raw_write_read(data, tmp_path / "raw.bin", chunk=1 << 20) > 0
    assert list(tmp_path.iterdir()) == []


def test_ceilings_by_hand():
    # the quiet-machine sync run (BENCHMARKS.md): a 0.52 s step = 0.38 s waiting for the batch +
    # 0.14 s learner work; the actor was busy 0.25 s (52 % idle), the verifier 0.05 s (~90 % idle)
    c = sync_ceilings(0.52, 0.38, {"actor-0": 0.52, "verifier-0": 0.9, "learner": 0.73})
    halves, stages = c["halves"], c["stages"]
    # generation side overlapped with the learner: a step takes the 0.38 s wait -> 0.52 / 0.38
    assert halves["bottleneck"] == "generation side" and halves["period_s"] == 0.38
    assert halves["ratio"] == pytest.approx(1.3684, abs=1e-4)
    # every role overlapped: the actor's 0.52 * 0.48 = 0.2496 s bounds it -> 0.52 / 0.2496
    assert stages["bottleneck"] == "actor-0"
    assert stages["busy_s"] == pytest.approx(
        {"actor-0": 0.2496, "verifier-0": 0.052, "learner": 0.14}
    )
    assert stages["ratio"] == pytest.approx(2.0833, abs=1e-4)
    # training-bound: 1.0 s = 0.4 s wait + 0.6 s learner -> 1.0 / 0.6; equal halves: 2x
    bound = overlap_ceiling(1.0, {"gen": 0.4, "learner": 0.6})
    assert bound["bottleneck"] == "learner" and bound["ratio"] == pytest.approx(1.6667, abs=1e-4)
    assert sync_ceilings(0.8, 0.4, {})["halves"]["ratio"] == pytest.approx(2.0)
    # a role without an idle figure is left out of the stages, not counted as never idle
    assert set(sync_ceilings(0.8, 0.4, {"actor-0": None})["stages"]["busy_s"]) == {"learner"}


def test_learner_split_from_metrics(tmp_path):
    """Per-step wait / train / publish are counter deltas over the window divided by the steps
    the learner's step histogram counted in it; other roles' and out-of-window records ignored."""
    recs = [
        {"role": "learner", "instance": "learner", "t": 90.0, "popo_learner_step_seconds_count": 1},
        {
            "role": "learner",
            "instance": "learner",
            "t": 100.0,
            "popo_learner_step_seconds_count": 5,
            "popo_learner_step_seconds_sum": 1.0,
            "popo_learner_wait_seconds_total": 2.0,
            "popo_learner_publish_seconds_sum": 0.5,
        },
        {"role": "actor", "instance": "actor-0", "t": 101.0, "popo_actor_idle_seconds_total": 9.0},
        {
            "role": "learner",
            "instance": "learner",
            "t": 104.0,
            "popo_learner_step_seconds_count": 9,
            "popo_learner_step_seconds_sum": 1.8,
            "popo_learner_wait_seconds_total": 3.2,
            "popo_learner_publish_seconds_sum": 0.7,
        },
        {
            "role": "learner",
            "instance": "learner",
            "t": 120.0,
            "popo_learner_step_seconds_count": 20,
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    split = learner_split(tmp_path, 100.2, 104.0)
    # 4 steps: wait 1.2 s, train 0.8 s, publish 0.2 s
    assert split == pytest.approx({"wait": 0.3, "train": 0.2, "publish": 0.05})
    with pytest.raises(ValueError):
        learner_split(tmp_path, 110.0, 115.0)


def test_train_flags_passes_extras_and_refuses_harness_keys():
    assert train_flags("--actor.reload_keeps_kv=true  --learner.publish_every 2") == [
        "--actor.reload_keeps_kv=true",
        "--learner.publish_every",
        "2",
    ]
    assert train_flags("") == []
    with pytest.raises(SystemExit, match=r"learner\.max_staleness"):
        train_flags("--learner.max_staleness=3")


# --- weight streaming against a raw ZeroMQ transfer --------------------------------------------------


def test_bench_stream_measures_every_side(tmp_path):
    from popo.deploy.bench.weight_stream import bench_stream, table

    res = bench_stream(8 << 20, reps=1, chunk_bytes=1 << 20, window=4, work_dir=tmp_path)
    assert set(res["bytes_per_s"]) == {
        "sha256 (in memory)",
        "raw",
        "raw->tmpfs",
        "raw->disk",
        "stream->tmpfs",
        "stream->disk",
    }
    assert all(v["median"] > 0 for v in res["bytes_per_s"].values())
    r = res["ratios"]["stream->tmpfs / raw"]
    assert r["median"] == pytest.approx(
        res["bytes_per_s"]["stream->tmpfs"]["median"] / res["bytes_per_s"]["raw"]["median"]
    )
    assert "stream->disk / raw->disk" in table(res)
    assert list(tmp_path.iterdir()) == []  # cleaned up


# --- role pinning (deploy.cpu_affinity) ---------------------------------------------------------------


def test_role_cpus_lookup_and_pinned_start(tmp_path):
    aff = {"learner": [0], "actor": [1], "actor-2": [0, 1]}
    assert role_cpus(aff, "learner") == [0]
    assert role_cpus(aff, "actor-0") == [1]
    assert role_cpus(aff, "actor-2") == [0, 1]
    assert role_cpus(aff, "verifier-0") is None
    core = max(os.sched_getaffinity(0))
    code = (
        "import os, subprocess, sys; print(sorted(os.sched_getaffinity(0)), flush=True);"
        "subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'])"
    )
    role = Role("actor-0", [sys.executable, "-c", code], False, tmp_path / "a.log", cpus=[core])
    role.start(dict(os.environ))
    assert role.proc is not None and role.proc.wait(30) == 0
    lines = role.log_path.read_text().splitlines()
    assert lines[-2:] == [str([core]), str([core])]  # the role and what it spawns


# --- the schedule behind `popo bench e2e` -------------------------------------------------------------


def _ask(dealer, actor_version: int, n: int = 8) -> int:
    dealer.send(LeaseRequest(actor_id="actor-0", n=n, policy_version=actor_version))
    got = dealer.recv(5000)
    assert got is not None and isinstance(got[1], Leases)
    return len(got[1].leases)


@pytest.mark.parametrize("staleness", [0, 1])
def test_dispatch_schedule_sync_alternates_async_overlaps(tmp_path, staleness):
    """The real dispatcher thread and ledger over a real ROUTER socket, with this test as the actor
    and the training loop: with max_staleness 0 no lease for the next step exists until the step
    before it is trained and published (strict alternation); with 1 the next step's prompts are
    generated while the current one trains. The bench's ledger analysis must tell them apart."""
    p = 2
    cfg = RunConfig(learner={"max_staleness": staleness, "prompts_per_step": p})
    ledger = Ledger(tmp_path / "ledger.db")
    state = SharedState()
    problems = [Problem(str(i), f"{i}+1=", str(i + 1)) for i in range(20)]
    d = Dispatcher(
        cfg, ledger, problems, list(range(20)), [], state, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*"
    )
    d.start()
    d.ready.wait(10)
    ctx = zmq.Context()
    dealer = connect(ctx, "dispatch", d.dispatch_address, cfg.transport, identity="actor-0:t")
    try:
        for step in (1, 2, 3):
            version = step - 1
            got = _ask(dealer, version)
            # sync: exactly one step's prompts; async: also the next step's
            assert got == (p if staleness == 0 or step > 1 else 2 * p)
            assert _ask(dealer, version) == 0  # admission is full
            batch = _receive_all(ledger, version)[:p]
            time.sleep(0.01)
            state.version = step  # publish, then close the step's leases (as Learner.run does)
            if staleness == 0:
                assert _ask(dealer, version) == 0  # an actor on the old version waits for it
            ledger.mark_trained(batch, step)
            time.sleep(0.01)
    finally:
        dealer.close()
        ctx.term()
        d.stop_event.set()
        d.join(5)
    steps = step_times(tmp_path)
    assert sorted(steps) == [1, 2, 3] and all(s["positives"] == 2 * p for s in steps.values())
    assert overlap_fraction(steps) == (0.0 if staleness == 0 else 1.0)
    rate, pos, secs = window_throughput(steps, 1)
    assert pos == 2 * 2 * p and secs > 0 and rate == pytest.approx(pos / secs)
    ledger.close()


def _receive_all(ledger: Ledger, version: int) -> list[int]:
    """Every outstanding train lease comes back verified (2 positives of 4), as the verifier would."""
    import sqlite3

    db = sqlite3.connect(ledger.path)
    ids = [
        i
        for (i,) in db.execute(
            "SELECT lease_id FROM leases WHERE state='outstanding' ORDER BY lease_id"
        )
    ]
    db.close()
    for i in ids:
        assert ledger.receive(i, version, 4, 2, b"x") == "train"
    return [r.lease_id for r in ledger.received()]


# --- each subcommand's quick mode, for real -----------------------------------------------------------


def _bench(sub: str, out: Path, *extra: str, timeout: int = 600) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "popo.deploy.cli",
        "bench",
        sub,
        "--quick",
        "--out",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "| --- |" in proc.stdout and f"{sub}.json" in proc.stdout
    doc = json.loads((out / f"{sub}.json").read_text())
    assert doc["name"] == sub and doc["quick"] is True
    assert doc["command"].startswith(f"popo bench {sub} --quick")
    assert doc["machine"]["cpus"] >= 1 and len(doc["load_average_after"]) == 3
    assert doc["table"]["rows"] and doc["ratios"]
    for r in doc["ratios"].values():
        assert len(r["values"]) == doc["args"]["reps"] and all(v > 0 for v in r["values"])
        assert r["refused"] == (r["spread"] > r["max_spread"])
    return doc


def test_bench_learn_quick(tmp_path):
    doc = _bench("learn", tmp_path)
    assert (tmp_path / "learn.png").stat().st_size > 0
    curve = doc["figures"]["pass_rate_curve"]
    assert [c["pass_rate"] for c in curve] == [0.25, 0.5, 1.0]
    # POPO trains the positives only: its tokens grow with the pass rate, all of them at 1.0
    toks = [c["tokens"] for c in curve]
    assert toks[0] < toks[1] < toks[2] == doc["figures"]["tokens"]["grpo"]
    assert "cost_over_nll/plain NLL" in doc["ratios"]
    assert doc["ratios"]["cost_over_nll/plain NLL"]["median"] == 1.0


def test_bench_refuses_disagreeing_runs(tmp_path):
    """With a zero spread threshold every timing ratio disagrees with itself: refused, in the
    table and in the JSON."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "popo.deploy.cli",
            "bench",
            "learn",
            "--quick",
            "--out",
            str(tmp_path),
            "--max-spread",
            "0",
            "--pass-rates",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: runs disagree (spread" in proc.stdout
    doc = json.loads((tmp_path / "learn.json").read_text())
    refused = [k for k, r in doc["ratios"].items() if r["refused"]]
    assert refused and all(doc["ratios"][k]["meets_target"] is None for k in refused)


def test_bench_verify_quick(tmp_path):
    doc = _bench("verify", tmp_path)
    assert set(doc["ratios"]) == {"per_worker_over_direct_w1"}
    assert doc["ratios"]["per_worker_over_direct_w1"]["target"] == ">= 0.8"
    assert doc["figures"]["completions_per_rep"] == 4 * 8


@pytest.mark.vllm
def test_bench_generate_quick(tmp_path):
    doc = _bench("generate", tmp_path)
    assert min(doc["figures"]["tokens"]["raw"] + doc["figures"]["tokens"]["actor"]) > 0
    assert doc["ratios"]["actor_over_raw"]["target"] == ">= 0.9"


@pytest.mark.vllm
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_bench_sync_quick(tmp_path, dtype):
    doc = _bench("sync", tmp_path, "--dtype", dtype)
    (point,) = doc["figures"]["sizes"]
    assert point["nbytes"] > 0 and len(point["publish_s"]) == len(point["raw_s"])
    # every reload served the published weights (the parity probe after it agreed; a bfloat16
    # engine computes in bfloat16 what the learner computes in float32)
    assert all(kl < (1e-3 if dtype == "auto" else 5e-2) for kl in point["mismatch_kl"])
    # where the time goes: the engine's phases of every reload, the publish steps one by one
    for k in ("engine_load", "pause_resume", "state_dict", "write_hash_fsync", "actor_sha256"):
        assert len(point[f"{k}_s"]) == len(point["raw_s"]) and min(point[f"{k}_s"]) > 0, k
    # auto: a CPU engine's serving dtype, published as such; bfloat16 versions as the learner
    # makes them by default
    assert point["dtype"] == {"auto": "float32", "bfloat16": "bfloat16"}[dtype]
    assert point["rounding"] == "dither"
    # the model and the versions are gone, the figures kept
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.vllm
@pytest.mark.slow
def test_bench_e2e_quick(tmp_path):
    doc = _bench("e2e", tmp_path, timeout=1200)
    runs = doc["figures"]["runs"]
    assert runs["sync"][0]["overlap_fraction"] == 0.0
    for mode in ("sync", "async"):
        (r,) = runs[mode]
        assert r["steps"] == 3 and r["positives"] > 0 and r["positives_per_s"] > 0
        assert set(r["idle"]) >= {"learner", "actor-0"}


@pytest.mark.vllm
@pytest.mark.slow
def test_bench_default_quick(tmp_path):
    doc = _bench("default", tmp_path, timeout=1800)
    runs = doc["figures"]["runs"]
    (train,) = runs["popo train (defaults)"]
    (plain,) = runs["plain synchronous trainer"]
    for r in (train, plain):
        assert r["wall_s"] > 0 and sorted(r["accuracy"]) == ["0", "1", "2"]  # JSON keys
    assert set(train["startup"]) >= {"learner_ready", "actor_ready", "first_step", "base_eval"}
    assert train["step_s"] > 0 and set(train["idle"]) >= {"learner", "actor-0"}
    assert len(doc["figures"]["standalone_step_s"]) == 2
