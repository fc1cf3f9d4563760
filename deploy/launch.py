"""Local supervisor for `popo train`: every role in its own process on this machine (docs/architecture.md, Processes and threads).

The learner is the run: when it exits 0 the run is done and the others are stopped. A crashed actor
or verifier is restarted with exponential back-off (the learner's leases cover its lost work) up to
`deploy.max_restarts` times within `deploy.restart_window_s`. A learner killed by a signal, or failing
after it ran at least `deploy.learner_min_uptime_s`, is restarted the same way up to
`deploy.learner_max_restarts` times within the window:
it resumes from its run directory (latest checkpoint + ledger), losing and retraining nothing. A
learner that fails sooner failed to start (config, data, code): the run stops with its error rather
than loop. Every restart (and every give-up) is a line in the log and a record in
`RUN_DIR/restarts.jsonl`; `RUN_DIR/pids.json` holds every role's current pid. Each role runs in its own
process group, so stopping a role also stops the engine workers it spawned, and each child asks the
kernel to SIGTERM it if the supervisor dies: no orphans.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from popo.common.config import RunConfig
from popo.common.metrics import RESTARTS_ENV
from popo.common.process import die_with_parent
from popo.common.run_dir import RunDir
from popo.deploy.placement import Plan, plan_for
from popo.deploy.placement import role_cpus as role_cpus  # re-exported for launchers and tests
from popo.deploy.restart_policy import RestartPolicy

log = logging.getLogger("popo.launch")


def _child_setup(cpus: list[int] | None) -> None:
    # Between fork and exec: the affinity set here is inherited by everything the role spawns
    # (vLLM's engine core and its OpenMP threads, verifier workers).
    die_with_parent()  # a SIGKILLed supervisor's roles get SIGTERM and shut down
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


@dataclass
class Role:
    name: str
    """`learner`, `verifier-0`, `actor-1`, ..."""
    argv: list[str]
    restartable: bool
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    policy: RestartPolicy | None = None
    """Its restart history and limit (set by the launcher that restarts it)."""
    next_start: float = 0.0
    started_at: float = 0.0
    history: list[tuple[float, int]] = field(default_factory=list)
    """(time, exit code) of every exit, for the run summary."""
    cpus: list[int] | None = None
    """Cores the role and its children may run on (`deploy.placement`); None: any."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment of this role on top of the launcher's (thread counts, devices)."""

    @property
    def restarts(self) -> int:
        """Restarts over the whole run."""
        return self.policy.restarts if self.policy is not None else 0

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it after fork
        out.write(f"\n=== start {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n".encode())
        out.flush()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={
                **env,
                **self.env,
                RESTARTS_ENV: str(self.restarts),
            },  # restarts: popo_role_restarts_total
            start_new_session=True,
            preexec_fn=functools.partial(_child_setup, self.cpus),
        )
        out.close()
        self.started_at = time.time()

    def signal(self, sig: int) -> None:
        """Signal the role's whole process group (it leads its own session), even after the
        leader exited, so engine workers it spawned go too."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


def _signal_name(code: int) -> str | None:
    """`SIGKILL` for a Popen return code of -9; None for a normal exit."""
    if code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def role_argv(role: str, config_path: Path, run_dir: Path, index: int = 0) -> list[str]:
    """The command a launcher (this one, or a cluster's) runs for one role."""
    argv = [sys.executable, "-m", "popo.deploy.cli", role, "--config", str(config_path)]
    argv += ["--run-dir", str(run_dir)]
    if role in ("actor", "verifier"):
        argv += ["--index", str(index)]
    return argv


class Supervisor:
    """Starts, watches and stops the roles of one local run."""

    def __init__(self, cfg: RunConfig, run_dir: Path, config_path: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.paths = RunDir(run_dir)
        self.roles = [
            Role(
                "learner",
                role_argv("learner", config_path, run_dir),
                False,
                self.paths.log("learner"),
            )
        ]
        for r in range(cfg.verifier.replicas):
            self.roles.append(
                Role(
                    f"verifier-{r}",
                    role_argv("verifier", config_path, run_dir, r),
                    True,
                    self.paths.log(f"verifier-{r}"),
                )
            )
        for i in range(cfg.actor.num_actors):
            self.roles.append(
                Role(
                    f"actor-{i}",
                    role_argv("actor", config_path, run_dir, i),
                    True,
                    self.paths.log(f"actor-{i}"),
                )
            )
        d = cfg.deploy
        self.plan: Plan | None = plan_for(cfg)
        """Cores, threads and devices of every role (None with `deploy.placement = "off"`)."""
        for role in self.roles:
            role.policy = RestartPolicy.of(d, d.max_restarts if role.restartable else 0)
            if self.plan is not None:
                p = self.plan.role(role.name)
                role.cpus, role.env = p.cpus, p.env
                if p.kind == "verifier" and p.threads != cfg.verifier.num_workers:
                    role.argv.append(f"--verifier.num_workers={p.threads}")
        self.learner.policy = RestartPolicy.of(d, d.learner_max_restarts)
        self.env = dict(os.environ)
        self._stopping = False

    @property
    def learner(self) -> Role:
        return self.roles[0]

    def start(self) -> None:
        if self.plan is not None:
            out = self.paths.placement
            tmp = out.with_name(f"{out.name}.tmp")
            tmp.write_text(json.dumps(self.plan.to_json(), indent=1) + "\n")
            tmp.replace(out)
        for role in self.roles:
            role.start(self.env)
            log.info("started %s (pid %d), log %s", role.name, role.proc.pid, role.log_path)  # type: ignore[union-attr]
        self._write_pids()

    def poll(self) -> int | None:
        """Check every role once. Returns the learner's exit code when the run is over."""
        now = time.time()
        d = self.cfg.deploy
        for role in self.roles:
            if role.proc is None:
                if now >= role.next_start and not self._stopping:
                    role.start(self.env)
                    self._write_pids()
                    log.info(
                        "restarted %s (restart %d, pid %d)", role.name, role.restarts, role.proc.pid
                    )  # type: ignore[union-attr]
                continue
            code = role.proc.poll()
            if code is None:
                continue
            role.history.append((now, code))
            role.signal(signal.SIGKILL)  # leftovers of the dead role's process group
            role.proc = None
            uptime = now - role.started_at
            if role is self.learner:
                if code == 0 or self._stopping:
                    return code
                # Killed (OOM, preemption, chaos) or crashed mid-run: it resumes from the run dir.
                # Failing before `learner_min_uptime_s` without a signal is a start-up error that
                # a restart would only repeat.
                if code > 0 and uptime < d.learner_min_uptime_s:
                    self._record(role, code, uptime, None, "start-up failure: not restarted")
                    log.error("learner failed %.0f s after its start; not restarting it", uptime)
                    return code
            else:
                if self._stopping:
                    continue
            assert role.policy is not None
            delay = role.policy.next_delay(now)
            if delay is None:
                recent = role.policy.in_window(now)
                self._record(role, code, uptime, None, f"{recent} restarts: giving up")
                log.error(
                    "%s exited with %d and will not be restarted; stopping the run", role.name, code
                )
                return code if role is self.learner else 1
            role.next_start = now + delay
            self._record(role, code, uptime, delay, "restart")
            log.warning(
                "%s exited with %d; restarting in %.1f s (see %s)",
                role.name,
                code,
                delay,
                role.log_path,
            )
        return None

    def _record(
        self, role: Role, code: int, uptime: float, delay: float | None, action: str
    ) -> None:
        """One line of `restarts.jsonl` per exit the supervisor acted on."""
        rec = {
            "t": time.time(),
            "role": role.name,
            "exit_code": code,
            "signal": _signal_name(code),
            "uptime_s": round(uptime, 3),
            "restart": role.restarts,
            "delay_s": delay,
            "action": action,
        }
        with open(self.paths.restarts, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _write_pids(self) -> None:
        """`pids.json`: the supervisor's and every live role's pid (for soak sampling and tests)."""
        pids = {r.name: r.proc.pid for r in self.roles if r.proc is not None}
        out = self.paths.pids
        tmp = out.with_name(f"{out.name}.tmp")
        tmp.write_text(json.dumps({"supervisor": os.getpid(), "roles": pids}))
        tmp.replace(out)

    def stop(self, grace_s: float | None = None, finished: bool = False) -> None:
        """SIGTERM every role, then SIGKILL what is left of its process group after `grace_s`
        (default `deploy.stop_grace_s`; `finished`: the run is over, so a kill is expected and not
        worth a warning)."""
        self._stopping = True
        if grace_s is None:
            grace_s = self.cfg.deploy.stop_grace_s
        # The role leader alone gets SIGTERM: it shuts down its own workers in order (a verifier
        # drains its pool, an actor its engine). Its process group is killed only afterwards.
        for role in reversed(self.roles):
            if role.proc is not None and role.proc.poll() is None:
                role.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + grace_s
        for role in self.roles:
            if role.proc is None:
                continue
            try:
                role.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log.log(
                    logging.INFO if finished else logging.WARNING,
                    "%s did not stop in %.0f s; killing it",
                    role.name,
                    grace_s,
                )
                role.signal(signal.SIGKILL)
                role.proc.wait()
            # the role's own children (engine workers) live in its process group
            role.signal(signal.SIGKILL)

    def tail(self, role: Role, n: int = 30) -> str:
        try:
            lines = role.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])
