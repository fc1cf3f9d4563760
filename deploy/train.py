"""`popo train`: prepare a run directory, start every role locally, show progress, stop cleanly."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from pathlib import Path

from popo.common.config import RunConfig
from popo.common.process import LAUNCH_T0_ENV, process_start_time
from popo.common.run_dir import RunDir
from popo.deploy.launch import Supervisor
from popo.deploy.placement import PlacementError
from popo.deploy.progress import RunView

log = logging.getLogger("popo.train")

FINISHED_GRACE_S = 2.0
"""Seconds the actors and verifiers get to exit after the learner finished the run."""


def prepare_run_dir(
    cfg: RunConfig, resume: Path | None, state_here: bool = True
) -> tuple[RunConfig, Path]:
    """Create (or reopen, with `resume`) the run directory and write the config snapshot that every
    role reads. The demo model is built here, once, so roles never race to build it.

    The data is read first: a bad row stops the command (`file:line: reason`, non-zero exit)
    before anything is written, and a run directory this call created is removed again if
    anything after it fails. state_here=False: the run's state (ledger.db, checkpoints) lives
    where its learner runs, maybe another node (`popo ray`, which checks it there), so a resume
    needs only the config snapshot here."""
    from popo.common.data import DataError, load_prompts
    from popo.common.demo_model import resolve_model_dir

    for split in ("train", "test"):
        try:
            load_prompts(cfg.data, split)  # type: ignore[arg-type]
        except DataError as e:
            raise SystemExit(f"popo train: data error: {e}") from None

    if resume is not None:
        run_dir = resume
        if state_here and not RunDir(run_dir).ledger.exists():
            raise SystemExit(f"popo train: {run_dir} is not a run directory (no {RunDir.LEDGER})")
    else:
        run_dir = Path(
            cfg.deploy.run_dir or time.strftime(f"runs/%Y%m%d-%H%M%S-{cfg.algorithm.name}")
        )
        if RunDir(run_dir).ledger.exists():
            raise SystemExit(
                f"popo train: {run_dir} already holds a run; use --resume {run_dir} or another "
                "--deploy.run_dir"
            )
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        cfg = cfg.model_copy(deep=True)
        cfg.model.path = str(resolve_model_dir(cfg).resolve())
        cfg.deploy.run_dir = str(run_dir)
        config = RunDir(run_dir).config
        tmp = config.with_name(f"{config.name}.tmp")
        tmp.write_text(cfg.to_toml())
        tmp.replace(config)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return cfg, run_dir


def train(
    cfg: RunConfig, config_path: Path | None, resume: Path | None, overrides: list[str]
) -> int:
    cfg, run_dir = prepare_run_dir(cfg, resume)
    try:
        sup = Supervisor(cfg, run_dir, RunDir(run_dir).config)
    except PlacementError as e:
        raise SystemExit(f"popo train: {e}") from None
    sup.env[LAUNCH_T0_ENV] = str(process_start_time())  # start-up figures count from our start
    view = RunView(run_dir, cfg.learner.total_steps)
    print(f"run directory: {run_dir}  (logs in {RunDir(run_dir).logs})", flush=True)
    if sup.plan is not None:
        print(sup.plan.table(), flush=True)
    _print_metrics_endpoints(cfg)
    interrupted = False

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    code: int | None = None
    try:
        sup.start()
        while code is None:
            time.sleep(0.5)
            code = sup.poll()
            view.update()
    except KeyboardInterrupt:
        interrupted = True
        print(
            f"\ninterrupted: stopping every role, up to {cfg.deploy.stop_grace_s:g} s (the learner "
            f"finishes its step, actors drain); resume with `popo train --resume {run_dir}`",
            flush=True,
        )
    finally:
        view.close()
        # A finished run's state is durable (ledger closed, summary and checkpoint written): the
        # other roles have nothing left to deliver, so they get a short grace, not a drain.
        if code == 0:
            sup.stop(grace_s=FINISHED_GRACE_S, finished=True)
        else:
            sup.stop()
    for role in sup.roles:
        for t, rc in role.history:
            if rc != 0 and not interrupted:
                log.warning(
                    "%s exited with %d at %s",
                    role.name,
                    rc,
                    time.strftime("%H:%M:%S", time.localtime(t)),
                )
    if interrupted:
        return 130
    if code != 0:
        print(
            f"the learner failed (exit {code}); last lines of {sup.learner.log_path}:\n"
            + sup.tail(sup.learner),
            flush=True,
        )
        return 1
    _print_summary(run_dir)
    return 0


def _print_metrics_endpoints(cfg: RunConfig) -> None:
    from popo.common.metrics import role_port

    if not cfg.metrics.enabled:
        return
    if cfg.metrics.base_port == 0:  # role_port would print ":0"; each role picks its own port
        print(
            "metrics: on OS-assigned ports (metrics.base_port = 0), not scrapeable by the shipped "
            "Prometheus config",
            flush=True,
        )
        return
    h = cfg.metrics.host
    lines = [f"  learner     http://{h}:{role_port(cfg.metrics, 'learner')}/metrics"]
    lines += [
        f"  verifier-{r}  http://{h}:{role_port(cfg.metrics, 'verifier', r)}/metrics"
        for r in range(cfg.verifier.replicas)
    ]
    lines += [
        f"  actor-{i}     http://{h}:{role_port(cfg.metrics, 'actor', i)}/metrics"
        for i in range(cfg.actor.num_actors)
    ]
    print("metrics:\n" + "\n".join(lines), flush=True)


def _print_summary(run_dir: Path) -> None:
    try:
        print_summary(json.loads(RunDir(run_dir).summary.read_text()))
    except (OSError, json.JSONDecodeError):
        return


def print_summary(s: dict) -> None:
    """The end-of-run lines of a run's `summary.json`."""
    before, after = s.get("accuracy_before"), s.get("accuracy_after")
    if before is not None and after is not None:
        print(
            f"held-out accuracy: {100 * before:.1f}% -> {100 * after:.1f}% "
            f"({100 * (after - before):+.1f} points) after {s['steps']} steps",
            flush=True,
        )
    print(f"leases: {s['leases']}", flush=True)
    if st := s.get("startup"):
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in st.items())
        print(f"start-up (seconds from launch; base_eval ran beside training): {parts}", flush=True)
    if "wall_seconds" in s:
        print(f"learner wall-clock from launch to summary: {s['wall_seconds']:.1f}s", flush=True)
