"""Where each role of a local run runs: its cores, its thread count, its GPUs and its environment.

Every role of `popo train` is compute-bound (the learner's torch ops, each actor's vLLM engine) or
close to it (the verifier's scoring workers). Left to their defaults each sizes its threads to the
whole machine, and on a small machine they preempt one another: measured on 2 cores, the learner's
step took 1.2-1.5 s next to an unpinned actor and 0.15-0.23 s with the learner and the verifier on
core 0 and the actor on core 1. `plan_placement` makes that split for any core count, role count
and GPU count; the launcher applies it (CPU affinity set between fork and exec, so everything a role
spawns inherits it, plus the role's environment). It is a pure function of its inputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from popo.common.config import RunConfig

Kind = Literal["learner", "verifier", "actor"]


class PlacementError(ValueError):
    """The machine cannot hold the run as configured (e.g. fewer GPUs than roles need)."""


@dataclass(frozen=True)
class RolePlacement:
    name: str
    """`learner`, `verifier-0`, `actor-1`, ..."""
    kind: Kind
    cpus: list[int]
    """Cores the role and every process it spawns may run on."""
    threads: int
    """Learner: torch intra-op threads per rank. Actor: OpenMP threads per engine rank. Verifier:
    scoring worker processes."""
    gpus: list[str] = field(default_factory=list)
    """CUDA devices of the role, as the launcher's `CUDA_VISIBLE_DEVICES` names them."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment the role starts with (on top of the launcher's)."""
    shared: bool = False
    """Whether another role may run on any of these cores (too few cores to keep them apart)."""


@dataclass(frozen=True)
class Plan:
    cpus: list[int]
    """Every core the launcher may use."""
    gpus: list[str]
    roles: list[RolePlacement]

    def role(self, name: str) -> RolePlacement:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "gpus": self.gpus, "roles": [asdict(r) for r in self.roles]}

    def table(self) -> str:
        """A few lines for the start of `popo train`: one per role."""
        unit = {
            "learner": "torch threads",
            "verifier": "scoring workers",
            "actor": "engine threads",
        }
        head = f"placement on cores {cpu_list(self.cpus)}"
        head += f" and GPUs {','.join(self.gpus)}:" if self.gpus else ":"
        lines = [head]
        for r in self.roles:
            gpus = f"  GPUs {','.join(r.gpus)}" if r.gpus else ""
            lines.append(
                f"  {r.name:<11} cores {cpu_list(r.cpus):<8} {unit[r.kind]} {r.threads}{gpus}"
            )
        return "\n".join(lines)


def cpu_list(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> `0-2,5` (the kernel's list format, as in /proc/PID/status)."""
    out: list[str] = []
    cpus = sorted(cpus)
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def _split(pool: Sequence[int], weights: Sequence[int]) -> list[list[int]]:
    """Contiguous shares of `pool` for parts of the given weights (largest remainder, at least one
    core each); with fewer cores than parts, part j gets core j mod len(pool).

    pool: [n] core ids; weights: [k] positive ints -> k lists of core ids."""
    n, k = len(pool), len(weights)
    if n < k:
        return [[pool[j % n]] for j in range(k)]
    total = sum(weights)
    exact = [(n - k) * w / total for w in weights]  # cores beyond the one each part is owed
    sizes = [1 + int(e) for e in exact]
    by_remainder = sorted(range(k), key=lambda j: exact[j] - int(exact[j]), reverse=True)
    for j in by_remainder[: n - sum(sizes)]:
        sizes[j] += 1
    out, start = [], 0
    for size in sizes:
        out.append(list(pool[start : start + size]))
        start += size
    return out


def plan_placement(
    cpus: Sequence[int],
    num_actors: int = 1,
    verifier_replicas: int = 1,
    learner_ranks: int = 1,
    tensor_parallel_size: int = 1,
    gpus: Sequence[str] = (),
    verifier_workers: int | None = None,
    affinity: Mapping[str, Sequence[int]] | None = None,
    generation_bound: bool = False,
) -> Plan:
    """Cores, threads, GPUs and environment of every role of one run on one machine.

    cpus: the cores the launcher may use (`os.sched_getaffinity(0)`); gpus: its CUDA devices (none
    on a CPU machine); verifier_workers: a fixed scoring-worker count per replica (None: one per core
    of its share); affinity: `deploy.cpu_affinity`, which replaces the automatic split (a role it
    does not name gets every core); generation_bound: on a CPU machine, the actors' engines span
    every core and share the learner's and verifier's (`deploy.placement = "generation"`).

    CPU machine: 1 core is shared by all; with 2 the learner and verifier take core 0 and the
    actors core 1; from 3 the learner takes a quarter, each verifier replica a core of its own from
    8 cores up (below, it shares the learner's) and the actors split the rest. GPU machine: the
    learner takes the first `learner_ranks` GPUs, each actor the next `tensor_parallel_size`; the
    verifier takes an eighth of the cores and the learner and actors split the rest in proportion
    to their GPUs. Raises PlacementError when there are fewer GPUs than that.
    """
    cpus = sorted(set(cpus))
    if not cpus:
        raise PlacementError("no cores to place the roles on")
    names = [
        "learner",
        *(f"verifier-{r}" for r in range(verifier_replicas)),
        *(f"actor-{i}" for i in range(num_actors)),
    ]
    role_gpus = _gpu_split(list(gpus), num_actors, learner_ranks, tensor_parallel_size)
    if affinity:
        share = {n: sorted(set(role_cpus(affinity, n) or cpus)) for n in names}
    elif gpus:
        share = _gpu_node_cpus(
            cpus, num_actors, verifier_replicas, learner_ranks, tensor_parallel_size
        )
    else:
        share = _cpu_node_cpus(cpus, num_actors, verifier_replicas, generation_bound)
    roles = []
    for name in names:
        kind: Kind = name.split("-")[0]  # type: ignore[assignment]
        mine = share[name]
        shared = any(set(mine) & set(share[o]) for o in names if o != name)
        g = role_gpus.get(name, [])
        if kind == "learner":
            threads = max(1, len(mine) // learner_ranks)
        elif kind == "actor":
            threads = max(1, len(mine) // tensor_parallel_size)
        else:
            threads = verifier_workers or (1 if shared else len(mine))
        env = role_env(kind, mine, threads, g, tensor_parallel_size, bool(gpus))
        roles.append(RolePlacement(name, kind, mine, threads, g, env, shared))
    return Plan(cpus, list(gpus), roles)


def role_cpus(affinity: Mapping[str, Sequence[int]], name: str) -> list[int] | None:
    """Cores of role `name` (`actor-1`) from `deploy.cpu_affinity`: its own entry, else its kind's."""
    cpus = affinity.get(name, affinity.get(name.split("-")[0]))
    return None if cpus is None else list(cpus)


def _cpu_node_cpus(
    cpus: list[int], num_actors: int, replicas: int, generation_bound: bool = False
) -> dict[str, list[int]]:
    n = len(cpus)
    if n <= 2:
        learner, verifier_pool, actor_pool = cpus[:1], cpus[:1], cpus[-1:]
    else:
        n_learner = max(1, n // 4)
        n_verifier = min(replicas, n // 8)
        learner = cpus[:n_learner]
        # Below 8 cores scoring is light next to a core's worth of generation: the replicas run
        # on the learner's cores.
        verifier_pool = cpus[n_learner : n_learner + n_verifier] or learner
        actor_pool = cpus[n_learner + n_verifier :]
    out = {"learner": learner}
    if verifier_pool is learner:
        out.update({f"verifier-{r}": learner for r in range(replicas)})
    else:
        out.update(
            {f"verifier-{r}": c for r, c in enumerate(_split(verifier_pool, [1] * replicas))}
        )
    if generation_bound:
        # The learner trains only positives: with few of them it idles, and its cores generate.
        actor_pool = cpus
    out.update({f"actor-{i}": c for i, c in enumerate(_split(actor_pool, [1] * num_actors))})
    return out


def _gpu_node_cpus(
    cpus: list[int], num_actors: int, replicas: int, learner_ranks: int, tp: int
) -> dict[str, list[int]]:
    n = len(cpus)
    n_verifier = min(max(1, n // 8), n - 2) if n >= 3 else 0
    verifier_pool = cpus[:n_verifier] or cpus[:1]
    rest = cpus[n_verifier:]
    parts = _split(rest, [learner_ranks] + [tp] * num_actors)
    out = {"learner": parts[0]}
    out.update({f"verifier-{r}": c for r, c in enumerate(_split(verifier_pool, [1] * replicas))})
    out.update({f"actor-{i}": c for i, c in enumerate(parts[1:])})
    return out


def _gpu_split(
    gpus: list[str], num_actors: int, learner_ranks: int, tp: int
) -> dict[str, list[str]]:
    if not gpus:
        return {}
    need = learner_ranks + num_actors * tp
    if len(gpus) < need:
        raise PlacementError(
            f"{len(gpus)} GPU(s) visible but the run needs {need} (learner.devices "
            f"{learner_ranks} + {num_actors} actor(s) x tensor_parallel_size {tp}); set "
            "deploy.placement = 'off' to share them"
        )
    out = {"learner": gpus[:learner_ranks]}
    for i in range(num_actors):
        start = learner_ranks + i * tp
        out[f"actor-{i}"] = gpus[start : start + tp]
    return out


def thread_env(kind: Kind, threads: int, gpu_node: bool = False) -> dict[str, str]:
    """Thread counts of one role, read by torch and OpenMP at import (any launcher)."""
    if kind == "learner":
        # torch sizes its intra-op pool from OMP_NUM_THREADS at import; `popo learner` also sets
        # it explicitly from POPO_TORCH_THREADS, which nothing else reads.
        n = str(threads)
        return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "POPO_TORCH_THREADS": n}
    if kind == "verifier":
        return {"OMP_NUM_THREADS": "1"}  # math-verify is single-threaded Python in each worker
    # On a GPU vLLM keeps its own (single-threaded) CPU-side default.
    return {} if gpu_node else {"OMP_NUM_THREADS": str(threads)}


def role_env(
    kind: Kind, cpus: Sequence[int], threads: int, gpus: Sequence[str], tp: int, gpu_node: bool
) -> dict[str, str]:
    """Environment of one role on this machine: its thread counts, vLLM's CPU thread binding for
    actors, and its CUDA devices on a GPU node (none for the verifier)."""
    env = thread_env(kind, threads, gpu_node)
    if kind == "actor" and not gpu_node:
        # vLLM CPU: one core list per tensor-parallel rank (its multi-process executor binds each
        # rank's OpenMP threads to them); a single-rank engine runs OMP_NUM_THREADS threads on the
        # role's cores.
        groups = _split(list(cpus), [1] * tp)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(cpu_list(g) for g in groups)
    if gpu_node:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def visible_gpus() -> list[str]:
    """CUDA devices this process may hand out, without importing torch: `CUDA_VISIBLE_DEVICES` when
    set, else one per GPU the NVIDIA driver lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        return [str(i) for i in range(len(list(Path("/proc/driver/nvidia/gpus").iterdir())))]
    except OSError:
        return []


def plan_for(cfg: RunConfig, cpus: Sequence[int] | None = None) -> Plan | None:
    """The placement of `cfg`'s roles on this machine (None with `deploy.placement = "off"` and no
    `deploy.cpu_affinity`: every role runs anywhere with its libraries' defaults)."""
    d = cfg.deploy
    if d.placement == "off" and not d.cpu_affinity:
        return None
    fixed = "num_workers" in cfg.verifier.model_fields_set
    return plan_placement(
        sorted(os.sched_getaffinity(0)) if cpus is None else cpus,
        num_actors=cfg.actor.num_actors,
        verifier_replicas=cfg.verifier.replicas,
        learner_ranks=cfg.learner.devices,
        tensor_parallel_size=cfg.actor.tensor_parallel_size,
        gpus=visible_gpus() if cfg.learner.device != "cpu" else [],
        verifier_workers=cfg.verifier.num_workers if fixed else None,
        affinity=d.cpu_affinity,
        generation_bound=d.placement == "generation",
    )
