"""`popo ray`: the roles of one run as Ray actors on a Ray cluster (DESIGN §1, §7; issue 8).

    driver (`popo ray`, or a `ray job submit` entrypoint)
      ray.init(address) -> placement group [learner | verifier x R | actor x N] (PACK / SPREAD ...)
      RoleHost(learner)    on bundle 0 ──┐  each host runs the same command `popo train` runs for the
      RoleHost(verifier r) on bundle 1+r ├─ role (`popo learner|verifier|actor`) as its child process,
      RoleHost(actor i)    on 1+R+i    ──┘  bound to the node IP Ray reports for the host's node

ZeroMQ endpoints come from the node addresses Ray reports: each host answers
`ray.util.get_node_ip_address()` before its role starts, and the driver hands the learner's and the
verifiers' addresses to every role as dotted config flags (`transport.learner_host`,
`transport.verifier_hosts`). Nothing is hand-edited per node.

Restarts are Ray's: a host whose role dies (crash, OOM, `kill -9`) exits its own process, and Ray's
restart policy (`max_restarts`, `max_task_retries`) brings the host back on the same bundle and
re-runs its role, which starts afresh; the learner's lease deadlines re-dispatch the prompts the dead
actor held. The learner is the run: when its role exits 0 the driver stops the others (SIGTERM, drain,
then kill) and removes the placement group.

Ray moves only plain strings and numbers between driver and hosts (the config travels as TOML
text); tensors and messages go over ZeroMQ as before.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popo.common.config import RunConfig

log = logging.getLogger("popo.ray")


@dataclass(frozen=True)
class Placement:
    """What one role asks the cluster for (one placement-group bundle)."""

    name: str
    """`learner`, `verifier-0`, `actor-1`, ..."""
    role: str
    index: int
    cpus: float
    gpus: int
    resources: dict[str, float]
    labels: dict[str, str]
    """Ray label selector of the bundle's node (empty: any node)."""

    @property
    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.cpus, **self.resources}
        if self.gpus:
            b["GPU"] = float(self.gpus)
        return b


def placements(cfg: RunConfig) -> list[Placement]:
    """One bundle per role: the learner first, then the verifier replicas, then the actors."""
    r = cfg.deploy.ray
    learner_gpus = cfg.learner.devices if r.use_gpus else 0  # one GPU per FSDP rank
    actor_gpus = cfg.actor.tensor_parallel_size if r.use_gpus else 0
    out = [
        Placement("learner", "learner", 0, r.learner_cpus, learner_gpus, r.learner_resources,
                  r.learner_labels)
    ]  # fmt: skip
    out += [
        Placement(f"verifier-{i}", "verifier", i, r.verifier_cpus, 0, r.verifier_resources,
                  r.verifier_labels)
        for i in range(cfg.verifier.replicas)
    ]  # fmt: skip
    out += [
        Placement(f"actor-{i}", "actor", i, r.actor_cpus, actor_gpus, r.actor_resources,
                  r.actor_labels)
        for i in range(cfg.actor.num_actors)
    ]  # fmt: skip
    return out


def peer_flags(cfg: RunConfig, ips: dict[str, str], name: str) -> list[str]:
    """Dotted config flags that point role `name` at its peers (and bind it on its own node IP)."""
    if not cfg.deploy.ray.bind_node_ip:
        return []
    verifiers = [ips[f"verifier-{r}"] for r in range(cfg.verifier.replicas)]
    own = ips[name]
    return [
        f"--transport.host={own}",
        f"--metrics.host={own}",
        f"--transport.learner_host={ips['learner']}",
        f"--transport.verifier_hosts={json.dumps(verifiers)}",
    ]


def prometheus_targets(cfg: RunConfig, ips: dict[str, str], run: str) -> list[dict[str, Any]]:
    """File-SD target groups for `deploy/prometheus/prometheus-cluster.yml`: one per role, at the
    node IP Ray reported and the role's metrics port, labelled with its role (-> job name)."""
    from popo.common.metrics import role_port

    if not cfg.metrics.enabled or cfg.metrics.base_port == 0:
        return []  # OS-assigned ports cannot be known here
    groups = []
    for p in placements(cfg):
        host = ips[p.name] if cfg.deploy.ray.bind_node_ip else cfg.metrics.host
        labels = {"role": p.role, "replica": str(p.index), "run": run, "node": ips[p.name]}
        groups.append({"targets": [f"{host}:{role_port(cfg.metrics, p.role, p.index)}"],
                       "labels": labels})  # fmt: skip
    return groups


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)  # Prometheus re-reads the file: never let it see half of one


def share_env(cfg: RunConfig, p: Placement) -> dict[str, str]:
    """Thread counts of a role sized to the CPUs its bundle reserves (at least one), split over the
    learner's ranks or an actor's tensor-parallel ranks; Ray itself hands out the GPUs."""
    from popo.deploy.placement import thread_env

    ranks = {"learner": cfg.learner.devices, "actor": cfg.actor.tensor_parallel_size}.get(p.role, 1)
    return thread_env(p.role, max(1, int(p.cpus) // ranks), p.gpus > 0)  # type: ignore[arg-type]


def worker_env(cfg: RunConfig) -> dict[str, str]:
    """The environment every Ray worker of the run gets: offline, unbuffered, plus `env_vars`."""
    from popo.deploy.cli import OFFLINE_ENV

    return {**OFFLINE_ENV, "PYTHONUNBUFFERED": "1", **cfg.deploy.ray.env_vars}


class RunStateError(RuntimeError):
    """The run directory on the learner's node does not fit the command (new run or resume)."""


class RoleHost:
    """A Ray actor that runs one role as its child process and lives and dies with it.

    `run()` blocks until the role exits. A role that fails while no stop was asked for takes its
    host down with it (`os._exit`), so Ray's restart policy, not this class, decides whether the
    role comes back. `stop()` runs on a second thread (max_concurrency=2) while `run()` waits.
    """

    def __init__(self, name: str, role: str, index: int, run_dir: str) -> None:
        self.name, self.role, self.index = name, role, index
        self.run_dir = Path(run_dir)
        self._stopping = threading.Event()
        self._role: Any = None

    def node(self) -> dict[str, Any]:
        """Where this host runs: node IP (the address its role binds), Ray node id, pid."""
        import ray

        return {
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

    def run(self, config_toml: str, flags: list[str], env: dict[str, str] | None = None) -> int:
        """Write the run's config on this node (no shared filesystem needed), start the role with the
        same command `popo train` uses (plus `env`), wait for it, and return its exit code."""
        from popo.deploy.launch import Role, role_argv

        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = self.run_dir / "config.toml"
        if not config.exists() or config.read_text() != config_toml:
            tmp = self.run_dir / f".config-{self.name}.tmp"
            tmp.write_text(config_toml)
            tmp.replace(config)
        argv = role_argv(self.role, config, self.run_dir, self.index) + flags
        self._role = Role(self.name, argv, self.role != "learner",
                          self.run_dir / "logs" / f"{self.name}.log", env=env or {})  # fmt: skip
        self._role.start(dict(os.environ))
        pid_file = self.run_dir / "pids" / f"{self.name}.pid"
        pid_file.parent.mkdir(exist_ok=True)
        pid_file.write_text(f"{self._role.proc.pid}\n")
        code = self._role.proc.wait()
        self._role.signal(signal.SIGKILL)  # leftovers of its process group (engine workers)
        if code != 0 and not self._stopping.is_set():
            # Ray restarts a host whose process died; an exception would only fail this call.
            logging.getLogger("popo.ray").error("%s exited with %d; host exits", self.name, code)
            os._exit(1)
        return code

    def holds_run(self) -> bool:
        """Whether this node's copy of the run directory holds a run's state (its ledger)."""
        return (self.run_dir / "ledger.db").exists()

    def read_text(self, name: str, tail_lines: int | None = None) -> str | None:
        """A file of the run directory as this node sees it (None if absent), for a driver on
        another node: the learner's `summary.json` and log live where the learner ran."""
        path = (self.run_dir / name).resolve()
        if not path.is_relative_to(self.run_dir.resolve()):
            raise ValueError(f"{name} is outside the run directory")
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return None
        return text if tail_lines is None else "\n".join(text.splitlines()[-tail_lines:])

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM the role (it drains), SIGKILL its process group after `grace_s`."""
        self._stopping.set()
        role = self._role
        if role is None or role.proc is None or role.proc.poll() is not None:
            return None if role is None or role.proc is None else role.proc.returncode
        role.proc.send_signal(signal.SIGTERM)
        try:
            return role.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            role.signal(signal.SIGKILL)
            return role.proc.wait()


class RayRun:
    """The driver side: placement, start-up order, waiting, shutdown."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.places = placements(cfg)
        self.hosts: dict[str, Any] = {}
        self.refs: dict[str, Any] = {}
        self.pg: Any = None

    def connect(self) -> None:
        import ray

        r = self.cfg.deploy.ray
        local: dict[str, Any] = {}
        if r.address is None:
            # A local cluster declares what the bundles need (logical CPUs, custom resources), as
            # `popo train` runs every role however few cores there are.
            custom: dict[str, float] = {}
            for p in self.places:
                for k, v in p.resources.items():
                    custom[k] = custom.get(k, 0.0) + v
            cpus = sum(p.cpus for p in self.places)
            local = {"num_cpus": max(os.cpu_count() or 1, math.ceil(cpus)), "resources": custom,
                     "include_dashboard": False}  # fmt: skip
        ray.init(
            address=r.address,
            namespace=r.namespace,
            runtime_env={"env_vars": worker_env(self.cfg)},
            log_to_driver=True,
            **local,
        )
        log.info("ray: %d node(s), resources %s", len(ray.nodes()), ray.cluster_resources())

    def place(self) -> dict[str, str]:
        """Reserve every bundle at once (all or nothing), start the hosts, return their node IPs."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        r, d = self.cfg.deploy.ray, self.cfg.deploy
        labels = [p.labels for p in self.places]
        self.pg = placement_group(
            [p.bundle for p in self.places],
            strategy=r.placement_strategy,
            bundle_label_selector=labels if any(labels) else None,
        )
        deadline = time.monotonic() + r.ready_timeout_s
        # Short waits: Ctrl-C must reach the driver while the cluster has no room yet.
        ready = False
        while not ready and time.monotonic() < deadline:
            ready = self.pg.wait(timeout_seconds=1)
        if not ready:
            raise RuntimeError(
                f"ray: the cluster cannot place {[p.bundle for p in self.places]} "
                f"({r.placement_strategy}) within {r.ready_timeout_s:.0f} s; free resources: "
                f"{ray.available_resources()}"
            )
        learner_restarts = getattr(d, "learner_max_restarts", 0)
        host_cls = ray.remote(RoleHost)
        for i, p in enumerate(self.places):
            restarts = learner_restarts if p.role == "learner" else d.max_restarts
            self.hosts[p.name] = host_cls.options(
                name=f"{self.run_dir.name}/{p.name}",
                num_cpus=p.cpus,
                num_gpus=p.gpus,
                max_restarts=restarts,
                max_task_retries=restarts,
                max_concurrency=2,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=i
                ),
            ).remote(p.name, p.role, p.index, str(self.run_dir))
        found = ray.get([h.node.remote() for h in self.hosts.values()])
        nodes = dict(zip(self.hosts, found, strict=True))
        for name, n in nodes.items():
            log.info("ray: %s on node %s (%s)", name, n["ip"], n["node_id"][:12])
        return {name: n["ip"] for name, n in nodes.items()}

    def check_state(self, resume: bool, learner_ip: str) -> None:
        """A resumed run must find its state on the learner's node and a new one must find none
        there. The ledger, buffer and checkpoints live where the learner ran, which need not be
        the driver's node: checked here, before any role starts, because Ray's restarts of the
        learner (which resume by design) cannot tell a stale run from their own."""
        import ray

        held = ray.get(self.hosts["learner"].holds_run.remote())
        where = f"{self.run_dir} on the learner's node ({learner_ip})"
        if resume and not held:
            raise RunStateError(
                f"{where} holds no ledger.db: a run's state stays on the node its learner ran "
                "on; place the learner there (deploy.ray.learner_resources or learner_labels)"
            )
        if not resume and held:
            raise RunStateError(
                f"{where} already holds a run; use `popo ray --resume {self.run_dir}` "
                "or another --deploy.run_dir"
            )

    def learner_file(self, name: str, tail_lines: int | None = None) -> str | None:
        """A file of the learner's run directory, read on the learner's node (None if gone)."""
        import ray

        try:
            return ray.get(self.hosts["learner"].read_text.remote(name, tail_lines), timeout=30)
        except (ray.exceptions.RayError, TimeoutError, KeyError):
            return None

    def start(self, ips: dict[str, str]) -> None:
        toml = self.cfg.to_toml()
        envs = {p.name: share_env(self.cfg, p) for p in self.places}
        for name, host in self.hosts.items():
            self.refs[name] = host.run.remote(toml, peer_flags(self.cfg, ips, name), envs[name])

    def wait(self) -> int:
        """Until the learner's role exits (its code), or a host is gone for good (1)."""
        import ray

        by_ref = {ref: name for name, ref in self.refs.items()}
        pending = list(by_ref)
        while True:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                name = by_ref[ref]
                try:
                    code = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    log.error("ray: %s is gone after its restarts: %s", name, e)
                    return 1
                if name == "learner":
                    return code
                log.error("ray: %s exited with %d while the learner runs", name, code)
                return 1

    def stop(self) -> None:
        """Stop the actors first (they drain into the verifiers), then verifiers, then learner."""
        import ray

        grace = self.cfg.deploy.ray.stop_grace_s
        for group in ("actor", "verifier", "learner"):
            names = [p.name for p in self.places if p.role == group and p.name in self.hosts]
            stops = [self.hosts[n].stop.remote(grace) for n in names]
            try:
                ray.get(stops, timeout=grace + 10)
            except (ray.exceptions.RayError, TimeoutError) as e:
                log.warning("ray: stopping %s: %s", group, e)
        for host in self.hosts.values():
            ray.kill(host, no_restart=True)
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
        ray.shutdown()


def ray_train(cfg: RunConfig, resume: Path | None) -> int:
    """`popo ray`: prepare the run directory here, run every role on the cluster, stop cleanly."""
    from popo.deploy.train import prepare_run_dir, print_summary

    # Ray workers start in other directories (and on other nodes): every path absolute.
    if cfg.deploy.run_dir and resume is None:
        cfg = cfg.model_copy(deep=True)
        cfg.deploy.run_dir = str(Path(cfg.deploy.run_dir).resolve())
    fresh = resume is None and not (cfg.deploy.run_dir and Path(cfg.deploy.run_dir).exists())
    cfg, run_dir = prepare_run_dir(cfg, resume.resolve() if resume else None, state_here=False)
    run_dir = run_dir.resolve()
    cfg.deploy.run_dir = str(run_dir)
    if cfg.transport.scheme != "tcp":
        raise SystemExit("popo ray: transport.scheme must be tcp (ipc sockets do not cross nodes)")
    run = RayRun(cfg, run_dir)
    print(f"run directory: {run_dir}  (role logs in {run_dir / 'logs'} on each role's node)",
          flush=True)  # fmt: skip

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    code = 1
    summary = tail = None
    try:
        run.connect()
        ips = run.place()
        run.check_state(resume is not None, ips["learner"])
        run.start(ips)
        targets = prometheus_targets(cfg, ips, run_dir.name)
        for path in filter(None, [run_dir / "prometheus-targets.json",
                                  cfg.deploy.ray.prometheus_targets]):  # fmt: skip
            _write_json(Path(path), targets)
        print("ray: " + ", ".join(f"{n}@{ip}" for n, ip in ips.items()), flush=True)
        code = run.wait()
        if code == 0:
            summary = run.learner_file("summary.json")
        elif code != 130:
            tail = run.learner_file("logs/learner.log", tail_lines=30)
    except RunStateError as e:
        print(f"popo ray: {e}", file=sys.stderr, flush=True)
        if fresh:  # the config snapshot written here belongs to no run
            shutil.rmtree(run_dir, ignore_errors=True)
        code = 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping every role (resume with `popo ray --resume {run_dir}`)",
              flush=True)  # fmt: skip
        code = 130
    finally:
        t0 = time.monotonic()
        run.stop()
        log.info("ray: stopped every role in %.1f s", time.monotonic() - t0)
    if summary is not None:
        print_summary(json.loads(summary))
    elif tail is not None:
        print(f"popo ray: exit {code}; last lines of the learner's log ({ips['learner']}:"
              f"{run_dir / 'logs' / 'learner.log'}):\n{tail}", flush=True)  # fmt: skip
    return code
