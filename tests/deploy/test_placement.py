"""Placement of a local run's roles: the plan for 1 to 16 cores and GPU nodes (pure function), the
supervisor applying it, a default `popo train` whose roles stay on their cores, and an idle actor
engine that does not spin."""

import json
import os
import time
from pathlib import Path

import pytest

from popo.common.config import RunConfig, load_config
from popo.deploy.launch import Supervisor
from popo.deploy.placement import PlacementError, cpu_list, plan_for, plan_placement


def _cores(plan, name):
    return set(plan.role(name).cpus)


def _check_invariants(plan, n: int, actors: int, replicas: int) -> None:
    """What must hold on any CPU machine: every core is used, roles stay on the launcher's cores,
    no role runs more threads than its cores, and with enough cores the compute roles (learner,
    each actor) have cores of their own."""
    all_cores = set(plan.cpus)
    assert set().union(*(set(r.cpus) for r in plan.roles)) == all_cores
    for r in plan.roles:
        assert r.cpus and set(r.cpus) <= all_cores
        if r.kind != "verifier":
            assert 1 <= r.threads <= len(r.cpus)
            assert r.env["OMP_NUM_THREADS"] == str(r.threads)
        else:
            assert r.env["OMP_NUM_THREADS"] == "1"
    actor_names = [f"actor-{i}" for i in range(actors)]
    if n >= 2:
        for a in actor_names:
            assert not _cores(plan, a) & _cores(plan, "learner"), (n, a)
            assert all(not _cores(plan, a) & _cores(plan, f"verifier-{r}") for r in range(replicas))
    if n >= actors + 2:
        for i, a in enumerate(actor_names):
            for b in actor_names[i + 1 :]:
                assert not _cores(plan, a) & _cores(plan, b), (n, a, b)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize(("actors", "replicas"), [(1, 1), (2, 1), (3, 2), (4, 3)])
def test_plan_invariants(n, actors, replicas):
    plan = plan_placement(list(range(n)), num_actors=actors, verifier_replicas=replicas)
    assert [r.name for r in plan.roles] == [
        "learner",
        *(f"verifier-{r}" for r in range(replicas)),
        *(f"actor-{i}" for i in range(actors)),
    ]
    _check_invariants(plan, n, actors, replicas)


def test_one_core_is_shared_by_everyone():
    plan = plan_placement([0], num_actors=2, verifier_replicas=2)
    assert all(r.cpus == [0] and r.threads == 1 and r.shared for r in plan.roles)


def test_two_cores_learner_and_verifier_on_one_actor_on_the_other():
    # The split measured fastest on a 2-core machine (vs no pinning).
    plan = plan_placement([0, 1])
    assert plan.role("learner").cpus == [0] and plan.role("verifier-0").cpus == [0]
    assert plan.role("actor-0").cpus == [1] and not plan.role("actor-0").shared
    assert plan.role("learner").env["POPO_TORCH_THREADS"] == "1"
    assert plan.role("actor-0").env == {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "1"}
    # the explicit override that split was measured with gives the same plan
    aff = plan_placement([0, 1], affinity={"learner": [0], "verifier": [0], "actor": [1]})
    assert aff.to_json() == plan.to_json()


def test_generation_bound_runs_spread_the_engine_over_every_core():
    plan = plan_placement([0, 1], generation_bound=True)
    assert plan.role("learner").cpus == [0] and plan.role("verifier-0").cpus == [0]
    assert plan.role("actor-0").cpus == [0, 1] and plan.role("actor-0").threads == 2
    assert plan.role("actor-0").env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    # the flag the GSM8K run was measured with gives the same plan
    aff = plan_placement([0, 1], affinity={"learner": [0], "verifier": [0], "actor": [0, 1]})
    assert aff.to_json() == plan.to_json()
    two = plan_placement(list(range(8)), num_actors=2, generation_bound=True)
    assert two.role("learner").cpus == [0, 1] and two.role("verifier-0").cpus == [2]
    assert two.role("actor-0").cpus == [0, 1, 2, 3] and two.role("actor-1").cpus == [4, 5, 6, 7]
    cfg = load_config(cli_args=["--deploy.placement=generation"])
    assert plan_for(cfg, cpus=[0, 1]).to_json() == plan.to_json()  # type: ignore[union-attr]


def test_four_cores_actors_get_the_rest():
    plan = plan_placement([0, 1, 2, 3])
    assert plan.role("learner").cpus == [0] and plan.role("verifier-0").cpus == [0]
    assert plan.role("actor-0").cpus == [1, 2, 3] and plan.role("actor-0").threads == 3
    three = plan_placement([0, 1, 2, 3], num_actors=3, verifier_replicas=2)
    assert [three.role(f"actor-{i}").cpus for i in range(3)] == [[1], [2], [3]]
    assert three.role("verifier-1").cpus == [0]


def test_sixteen_cores():
    plan = plan_placement(list(range(16)), num_actors=2, verifier_replicas=2)
    assert plan.role("learner").cpus == [0, 1, 2, 3] and plan.role("learner").threads == 4
    # a core of its own per verifier replica, one worker on it
    assert plan.role("verifier-0").cpus == [4] and plan.role("verifier-1").cpus == [5]
    assert plan.role("verifier-0").threads == 1 and not plan.role("verifier-0").shared
    a0, a1 = plan.role("actor-0"), plan.role("actor-1")
    assert a0.cpus == list(range(6, 11)) and a1.cpus == list(range(11, 16))
    assert a0.env["VLLM_CPU_OMP_THREADS_BIND"] == "6-10" and a0.threads == 5
    # learner ranks split the learner's threads; tensor-parallel ranks each get a core list
    tp = plan_placement(list(range(16)), learner_ranks=2, tensor_parallel_size=2)
    assert tp.role("learner").threads == 2
    assert tp.role("actor-0").env["VLLM_CPU_OMP_THREADS_BIND"] == "5-10|11-15"
    assert tp.role("actor-0").threads == 5


def test_uses_the_launchers_own_cores():
    plan = plan_placement([7, 3, 2, 6])  # e.g. a launcher restricted by taskset or a cgroup
    assert plan.cpus == [2, 3, 6, 7]
    assert plan.role("learner").cpus == [2] and plan.role("actor-0").cpus == [3, 6, 7]
    assert plan.role("actor-0").env["VLLM_CPU_OMP_THREADS_BIND"] == "3,6-7"
    assert cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_gpu_node_gives_each_role_its_devices_and_a_cpu_share():
    gpus = ["0", "1", "2", "3", "4", "5", "6", "7"]
    plan = plan_placement(
        list(range(32)), num_actors=2, learner_ranks=2, tensor_parallel_size=2, gpus=gpus
    )
    assert plan.role("learner").gpus == ["0", "1"]
    assert plan.role("actor-0").gpus == ["2", "3"] and plan.role("actor-1").gpus == ["4", "5"]
    assert plan.role("actor-1").env["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert plan.role("verifier-0").env["CUDA_VISIBLE_DEVICES"] == ""  # scoring never sees a GPU
    assert plan.role("verifier-0").threads == 4  # an eighth of the cores, one worker each
    learner, a0 = plan.role("learner"), plan.role("actor-0")
    assert learner.threads == len(learner.cpus) // 2 and "OMP_NUM_THREADS" not in a0.env
    everyone = [set(r.cpus) for r in plan.roles]
    assert all(not a & b for i, a in enumerate(everyone) for b in everyone[i + 1 :])
    # the launcher's CUDA_VISIBLE_DEVICES names are handed on as they are
    named = plan_placement(list(range(8)), gpus=["GPU-a", "GPU-b"])
    assert named.role("learner").gpus == ["GPU-a"] and named.role("actor-0").gpus == ["GPU-b"]
    with pytest.raises(PlacementError, match="needs 5"):
        plan_placement(list(range(8)), num_actors=2, tensor_parallel_size=2, gpus=["0", "1"])


def test_affinity_replaces_the_split_and_unnamed_roles_run_anywhere():
    plan = plan_placement([0, 1, 2, 3], num_actors=2, affinity={"actor-1": [3], "learner": [0, 1]})
    assert plan.role("actor-1").cpus == [3] and plan.role("actor-0").cpus == [0, 1, 2, 3]
    assert plan.role("learner").threads == 2


def test_config_switches():
    assert plan_for(load_config(cli_args=["--deploy.placement=off"]), cpus=[0, 1]) is None
    pinned = load_config(
        cli_args=["--deploy.placement=off", '--deploy.cpu_affinity={"actor": [1]}']
    )
    assert plan_for(pinned, cpus=[0, 1]).role("actor-0").cpus == [1]  # type: ignore[union-attr]
    # an explicit verifier.num_workers is kept; otherwise the plan sizes it to the share
    fixed = load_config(cli_args=["--verifier.num_workers=3"])
    assert plan_for(fixed, cpus=list(range(16))).role("verifier-0").threads == 3  # type: ignore[union-attr]


def test_supervisor_applies_the_plan(tmp_path):
    cfg = RunConfig.model_validate({"actor": {"num_actors": 2}, "learner": {"device": "cpu"}})
    sup = Supervisor(cfg, tmp_path, tmp_path / "config.toml")
    assert sup.plan is not None
    for role in sup.roles:
        p = sup.plan.role(role.name)
        assert role.cpus == p.cpus and role.env == p.env
    off = RunConfig.model_validate({"deploy": {"placement": "off"}})
    sup_off = Supervisor(off, tmp_path, tmp_path / "config.toml")
    assert sup_off.plan is None and all(r.cpus is None and not r.env for r in sup_off.roles)


def test_train_refuses_a_gpu_node_too_small_with_one_line(tmp_path, monkeypatch, random_model_dir):
    from popo.deploy.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(SystemExit) as e:
        main(
            [
                "train",
                f"--deploy.run_dir={tmp_path / 'run'}",
                f"--model.path={random_model_dir}",
                "--actor.num_actors=2",
            ]
        )
    assert str(e.value).startswith("popo train: 1 GPU(s) visible but the run needs 3")


def test_ray_roles_size_their_threads_to_their_bundle():
    from popo.deploy.ray_launch import placements, share_env

    cfg = RunConfig.model_validate(
        {
            "learner": {"devices": 2},
            "deploy": {"ray": {"learner": {"cpus": 8}, "actor": {"cpus": 3}}},
        }
    )
    envs = {p.name: share_env(cfg, p) for p in placements(cfg)}
    assert envs["learner"]["POPO_TORCH_THREADS"] == "4"  # 8 CPUs over 2 ranks
    assert envs["actor-0"] == {"OMP_NUM_THREADS": "3"}
    assert envs["verifier-0"] == {"OMP_NUM_THREADS": "1"}
    cfg.deploy.ray.use_gpus = True
    assert share_env(cfg, placements(cfg)[-1]) == {}  # GPU actors keep vLLM's own CPU threads


# --- a real run --------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    out = [pid]
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for t in tasks:
        try:
            kids = (t / "children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out += _descendants(int(k))
    return out


def _allowed(pid: int) -> set[int] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None  # exited meanwhile
    text = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:"))
    cores: set[int] = set()
    for part in text.split(":", 1)[1].strip().split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


@pytest.mark.vllm
def test_default_run_keeps_every_role_on_its_cores(tmp_path, demo_model_dir):
    from tests.deploy.e2e_helpers import popo_train, train_args

    run_dir = tmp_path / "run"
    proc = popo_train(train_args(run_dir, demo_model_dir, steps=3))
    seen: dict[str, int] = {}
    try:
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            time.sleep(1.0)
            if not (run_dir / "pids.json").exists() or not (run_dir / "placement.json").exists():
                continue
            plan = {
                r["name"]: set(r["cpus"])
                for r in json.loads((run_dir / "placement.json").read_text())["roles"]
            }
            for name, pid in json.loads((run_dir / "pids.json").read_text())["roles"].items():
                for p in _descendants(pid):
                    cores = _allowed(p)
                    if cores is not None:
                        assert cores == plan[name], (name, p, cores, plan[name])
                        seen[name] = max(seen.get(name, 0), len(_descendants(pid)))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "placement on cores" in out and "actor-0" in out
    # the actor was seen with its engine process under it (inherited the actor's cores)
    assert seen.get("actor-0", 0) >= 2 and {"learner", "verifier-0"} <= seen.keys()


# --- an idle actor engine -----------------------------------------------------------------------------


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def _tree_cpu(seconds: float) -> float:
    """Cores used by this process and all its descendants over the next `seconds`."""
    pids = _descendants(os.getpid())
    before = _cpu_seconds(pids)
    time.sleep(seconds)
    return (_cpu_seconds(pids) - before) / seconds


@pytest.mark.vllm
def test_idle_engine_does_not_spin(random_model_dir):
    """Between batches (the actor waiting for leases or weights) and long idle, the engine's
    processes sleep: well under a fifth of a core, where a spinning wait holds a whole one."""
    from popo.actors.engine import RolloutEngine

    cfg = RunConfig()
    cfg.actor.max_tokens = 8
    engine = RolloutEngine(random_model_dir, cfg.actor, cfg.model)
    engine.start()
    try:
        prompt = engine.encode("1+2=")
        gaps = []
        for _ in range(3):
            engine.generate_many([prompt] * 4, engine.sampling_params(n=4))
            gaps.append(_tree_cpu(0.8))  # the pause right after a batch
        idle = _tree_cpu(3.0)
    finally:
        engine.close()
    assert max(gaps) < 0.2, gaps
    assert idle < 0.2, idle
