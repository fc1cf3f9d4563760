"""`popo ray`: the roles of one run as Ray actors on a Ray cluster.

    driver (`popo ray`, or a `ray job submit` entrypoint)
      ray.init(address) -> placement group [learner | verifier x R | actor x N] (PACK / SPREAD ...)
      RoleHost(learner)    on bundle 0 ──┐  each host runs the same command `popo train` runs for the
      RoleHost(verifier r) on bundle 1+r ├─ role (`popo learner|verifier|actor`) as its child process,
      RoleHost(actor i)    on 1+R+i    ──┘  bound to the node IP Ray reports for the host's node

ZeroMQ endpoints come from the node addresses Ray reports: each host answers
`ray.util.get_node_ip_address()` before its role starts, and the driver hands the learner's and the
verifiers' addresses to every role as dotted config flags (`transport.learner_host`,
`transport.verifier_hosts`). Nothing is hand-edited per node.

Restarts follow the local supervisor's policy (`RestartPolicy`: a sliding window of
`deploy.restart_window_s`, doubling back-off): when a role dies (crash, OOM, `kill -9`) its host
returns the exit code, and when the host itself is lost (its node gone) Ray brings the host back on
its bundle, wherever Ray re-placed it. Either way the driver asks every host for its node IP again
and re-runs the role with peer addresses from those IPs; a running role whose peers moved is
restarted with the new addresses (not counted as a failure). The learner's lease deadlines
re-dispatch the prompts a dead actor held. The learner is the run: when its role exits 0 the driver
stops the others (SIGTERM, drain, then kill) and removes the placement group.

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popo.common.config import RunConfig, unauthenticated_bind
from popo.common.metrics import RESTARTS_ENV
from popo.common.run_dir import RunDir
from popo.deploy.restart_policy import RestartPolicy

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

    def place(name: str, role: str, index: int, gpus: int) -> Placement:
        ask = getattr(r, role)  # deploy.ray.learner | verifier | actor
        return Placement(name, role, index, ask.cpus, gpus, ask.resources, ask.labels)

    out = [place("learner", "learner", 0, learner_gpus)]
    out += [place(f"verifier-{i}", "verifier", i, 0) for i in range(cfg.verifier.replicas)]
    out += [place(f"actor-{i}", "actor", i, actor_gpus) for i in range(cfg.actor.num_actors)]
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
        groups.append(
            {"targets": [f"{host}:{role_port(cfg.metrics, p.role, p.index)}"], "labels": labels}
        )
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


class LaunchError(RuntimeError):
    """The cluster, the job or the run directory does not fit the run; nothing was started."""


def job_env_vars() -> dict[str, str]:
    """`env_vars` of the Ray job this driver runs in (a `ray job submit --runtime-env-json`, a
    KubeRay RayJob's `runtimeEnvYAML`); empty outside a job."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return {}
    return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})


def driver_runtime_env(cfg: RunConfig, job_env: dict[str, str]) -> dict[str, Any]:
    """The `runtime_env` for `ray.init`: the run's worker environment less what the job's own
    runtime env already sets. Ray refuses to merge a job's and a driver's `env_vars` that share a
    key, so each variable has one source; a job that sets one to another value is refused here.

    Raises LaunchError naming the first variable the job and the run disagree on.
    """
    own = worker_env(cfg)
    for key, value in job_env.items():
        if key in own and own[key] != value:
            raise LaunchError(
                f"the Ray job's runtime env sets {key}={value!r}, the run needs {own[key]!r} "
                "(deploy.ray.env_vars or the offline environment): drop it from the job"
            )
    return {"env_vars": {k: v for k, v in own.items() if k not in job_env}}


def insecure_bind(cfg: RunConfig, ips: dict[str, str]) -> str | None:
    """Why the roles would listen unauthenticated on a network address (None when they would not).

    With `bind_node_ip` every role binds its node's IP: a pod or host address, reachable by every
    peer of that network, so it needs CurveZMQ keys as any non-loopback `transport.host` does."""
    if not cfg.deploy.ray.bind_node_ip:
        return None  # the roles bind `transport.host`, which the config itself checks
    return unauthenticated_bind(cfg.transport, ips.values())


class RunStateError(LaunchError):
    """The run directory on the learner's node does not fit the command (new run or resume)."""


class RoleHost:
    """A Ray actor that runs one role as its child process and lives and dies with it.

    `run()` blocks until the role exits and returns its exit code; the driver decides whether it
    comes back. `node()` and `stop()` run on other threads (max_concurrency=3) while `run()` waits.
    """

    def __init__(self, name: str, role: str, index: int, run_dir: str) -> None:
        self.name, self.role, self.index = name, role, index
        self.run_dir = Path(run_dir)
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
        paths = RunDir(self.run_dir)
        config = paths.config
        if not config.exists() or config.read_text() != config_toml:
            tmp = self.run_dir / f".config-{self.name}.tmp"
            tmp.write_text(config_toml)
            tmp.replace(config)
        argv = role_argv(self.role, config, self.run_dir, self.index) + flags
        self._role = Role(
            self.name,
            argv,
            self.role != "learner",
            paths.log(self.name),
            env=env or {},
        )
        self._role.start(dict(os.environ))
        pid_file = paths.pid_file(self.name)
        pid_file.parent.mkdir(exist_ok=True)
        pid_file.write_text(f"{self._role.proc.pid}\n")
        code = self._role.proc.wait()
        self._role.signal(signal.SIGKILL)  # leftovers of its process group (engine workers)
        return code

    def holds_run(self) -> bool:
        """Whether this node's copy of the run directory holds a run's state (its ledger)."""
        return RunDir(self.run_dir).ledger.exists()

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
        """Role name -> the running `RoleHost.run` call."""
        self.pg: Any = None
        self.ips: dict[str, str] = {}
        """Role name -> node IP its host last reported."""
        self.flags: dict[str, list[str]] = {}
        """Role name -> the peer flags its current run was started with."""
        self.started: dict[str, float] = {}
        self.targets_files: list[Path] = []
        """The Prometheus file-SD files `write_targets` wrote."""
        d = cfg.deploy
        self.policies = {
            p.name: RestartPolicy.of(
                d, d.learner_max_restarts if p.role == "learner" else d.max_restarts
            )
            for p in self.places
        }

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
            local = {
                "num_cpus": max(os.cpu_count() or 1, math.ceil(cpus)),
                "resources": custom,
                "include_dashboard": False,
            }
        ray.init(
            address=r.address,
            namespace=r.namespace,
            runtime_env=driver_runtime_env(self.cfg, job_env_vars()),
            log_to_driver=True,
            **local,
        )
        log.info("ray: %d node(s), resources %s", len(ray.nodes()), ray.cluster_resources())

    def place(self) -> dict[str, str]:
        """Reserve every bundle at once (all or nothing), start the hosts, return their node IPs."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        r = self.cfg.deploy.ray
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
        host_cls = ray.remote(RoleHost)
        for i, p in enumerate(self.places):
            self.hosts[p.name] = host_cls.options(
                name=f"{self.run_dir.name}/{p.name}",
                num_cpus=p.cpus,
                num_gpus=p.gpus,
                # Ray only brings a lost host back (its node gone); whether its role runs again
                # is the driver's restart policy, which counts those losses too.
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=3,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=i
                ),
            ).remote(p.name, p.role, p.index, str(self.run_dir))
        self.ips = self.resolve()
        return self.ips

    def resolve(self) -> dict[str, str]:
        """Ask every host for its node IP (a host Ray is bringing back answers once it is up)."""
        import ray

        found = ray.get(
            [h.node.remote() for h in self.hosts.values()],
            timeout=self.cfg.deploy.ray.ready_timeout_s,
        )
        nodes = dict(zip(self.hosts, found, strict=True))
        for name, n in nodes.items():
            log.info("ray: %s on node %s (%s)", name, n["ip"], n["node_id"][:12])
        return {name: n["ip"] for name, n in nodes.items()}

    def write_targets(self) -> None:
        """The Prometheus file-SD targets of the roles where they run now."""
        targets = prometheus_targets(self.cfg, self.ips, self.run_dir.name)
        self.targets_files = [
            Path(p)
            for p in [
                RunDir(self.run_dir).prometheus_targets,
                self.cfg.deploy.ray.prometheus_targets,
            ]
            if p
        ]
        for path in self.targets_files:
            _write_json(path, targets)

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
                f"{where} holds no {RunDir.LEDGER}: a run's state stays on the node its learner ran "
                "on; place the learner there (deploy.ray.learner.resources or labels)"
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
        self.ips = dict(ips)
        self.envs = {p.name: share_env(self.cfg, p) for p in self.places}
        for name in self.hosts:
            self._run(name)

    def _run(self, name: str) -> None:
        """(Re)start role `name` pointed at its peers' current node IPs, with its CPU share's
        thread settings."""
        self.flags[name] = peer_flags(self.cfg, self.ips, name)
        env = {**self.envs[name], RESTARTS_ENV: str(self.policies[name].restarts)}
        self.refs[name] = self.hosts[name].run.remote(self.cfg.to_toml(), self.flags[name], env)
        self.started[name] = time.time()

    def wait(self) -> int:
        """Run until the learner's role exits 0 (0), or a role fails past its restart policy
        (the learner's exit code, else 1). Failed roles come back after their back-off."""
        import ray

        due: dict[str, float] = {}
        repointing: set[str] = set()
        while True:
            now = time.monotonic()
            ready = sorted(n for n, t in due.items() if t <= now)
            if ready:
                for n in ready:
                    del due[n]
                repointing |= self._restart(ready)
            by_ref = {ref: name for name, ref in self.refs.items()}
            if not by_ref:
                time.sleep(0.2)
                continue
            done, _ = ray.wait(list(by_ref), num_returns=1, timeout=0.5)
            for ref in done:
                name = by_ref[ref]
                del self.refs[name]
                try:
                    code: int | None = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    log.warning("ray: %s lost its host: %s", name, e)
                    code = None
                if name in repointing:  # stopped by the driver to follow a peer that moved
                    repointing.discard(name)
                    due[name] = now
                    continue
                if name == "learner" and code == 0:
                    return 0
                delay = self._on_failure(name, code)
                if delay is None:
                    return code if name == "learner" and code else 1
                due[name] = time.monotonic() + delay

    def _on_failure(self, name: str, code: int | None) -> float | None:
        """The back-off before role `name` runs again, or None to end the run."""
        d = self.cfg.deploy
        uptime = time.time() - self.started[name]
        what = "lost its host" if code is None else f"exited with {code}"
        # As `popo train`: a learner failing soon after its start without a signal failed to
        # start (config, data, code); a restart would only repeat it.
        if name == "learner" and code is not None and code > 0 and uptime < d.learner_min_uptime_s:
            log.error("ray: learner %s %.0f s after its start; not restarting it", what, uptime)
            return None
        policy = self.policies[name]
        delay = policy.next_delay(time.time())
        if delay is None:
            log.error(
                "ray: %s %s after %d restarts within %.0f s; stopping the run",
                name,
                what,
                policy.in_window(time.time()),
                d.restart_window_s,
            )
        else:
            log.warning("ray: %s %s; restart %d in %.1f s", name, what, policy.restarts, delay)
        return delay

    def _restart(self, names: list[str]) -> set[str]:
        """Run `names` again with the peers' node IPs as Ray reports them now (a lost node's roles
        came back elsewhere); stop every running role whose peers moved so that it follows.
        Returns the roles stopped that way."""
        old, self.ips = self.ips, self.resolve()
        for name in names:
            self._run(name)
        moved = sorted(n for n in self.ips if self.ips[n] != old.get(n))
        if not moved:
            return set()
        log.warning("ray: %s moved to %s", ", ".join(moved), [self.ips[n] for n in moved])
        self.write_targets()
        grace = self.cfg.deploy.stop_grace_s
        follow = {
            n
            for n in self.refs
            if n not in names and peer_flags(self.cfg, self.ips, n) != self.flags[n]
        }
        for n in sorted(follow):
            log.warning("ray: restarting %s to follow its peers", n)
            self.hosts[n].stop.remote(grace)
        return follow

    def stop(self) -> None:
        """Stop the actors first (they drain into the verifiers), then verifiers, then learner."""
        import ray

        grace = self.cfg.deploy.stop_grace_s
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
    print(
        f"run directory: {run_dir}  (role logs in {RunDir(run_dir).logs} on each role's node)",
        flush=True,
    )

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    code = 1
    summary = tail = None
    try:
        run.connect()
        ips = run.place()
        if (why := insecure_bind(cfg, ips)) is not None:
            raise LaunchError(why)
        run.check_state(resume is not None, ips["learner"])
        run.start(ips)
        run.write_targets()
        print("ray: " + ", ".join(f"{n}@{ip}" for n, ip in ips.items()), flush=True)
        code = run.wait()
        if code == 0:
            summary = run.learner_file(RunDir.SUMMARY)
        elif code != 130:
            tail = run.learner_file(RunDir.log_name("learner"), tail_lines=30)
    except LaunchError as e:
        print(f"popo ray: {e}", file=sys.stderr, flush=True)
        if fresh:  # the config snapshot written here belongs to no run
            shutil.rmtree(run_dir, ignore_errors=True)
        code = 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: stopping every role (resume with `popo ray --resume {run_dir}`)",
            flush=True,
        )
        code = 130
    finally:
        t0 = time.monotonic()
        run.stop()
        log.info("ray: stopped every role in %.1f s", time.monotonic() - t0)
        # The roles are gone: Prometheus must stop scraping them, or the Down alerts fire forever
        # (the run directory's copy stays, a record of where the roles ran).
        if cfg.deploy.ray.prometheus_targets:
            Path(cfg.deploy.ray.prometheus_targets).unlink(missing_ok=True)
    if summary is not None:
        print_summary(json.loads(summary))
    elif tail is not None:
        print(
            f"popo ray: exit {code}; last lines of the learner's log ({run.ips['learner']}:"
            f"{RunDir(run_dir).log('learner')}):\n{tail}",
            flush=True,
        )
    return code
