"""The run directory: every file and folder a run keeps, named in one place.

    <run_dir>/
      config.toml             the run's resolved configuration (written by `popo train` / `popo ray`)
      ledger.db               the learner's prompt ledger and group buffer (SQLite, WAL)
      metrics.jsonl           every role's metric snapshots
      eval.jsonl              held-out evaluations
      summary.json            the learner's summary of a finished run
      endpoints.json          the learner's resolved addresses
      placement.json          the CPU/GPU placement plan
      pids.json               every role's current pid (`popo train`)
      pids/<role>.pid         a role's pid on its node (`popo ray`)
      restarts.jsonl          the supervisor's restarts
      prometheus-targets.json Prometheus file-SD targets (`popo ray`)
      weights/v<N>/           published versions (`common.weights.WeightStore`)
      weights-cache/<host>/   a node's cache of streamed versions (same layout)
      checkpoints/step-<N>/   learner checkpoints
      logs/<role>.log         each role's output
      sockets/<endpoint>      ipc transport sockets
      report.png              `popo report`'s default output

CurveZMQ keys are not part of a run: they live where `transport.curve_keys_dir` says.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from popo.common.weights import WeightStore


class RunDir:
    """Paths of one run directory (nothing is created or read here). The class attributes are the
    names relative to the run directory, for code that asks another node for a file."""

    CONFIG = "config.toml"
    LEDGER = "ledger.db"
    METRICS = "metrics.jsonl"
    EVALS = "eval.jsonl"
    SUMMARY = "summary.json"
    ENDPOINTS = "endpoints.json"
    PLACEMENT = "placement.json"
    PIDS = "pids.json"
    PID_FILES = "pids"
    RESTARTS = "restarts.jsonl"
    PROMETHEUS_TARGETS = "prometheus-targets.json"
    WEIGHTS = "weights"
    WEIGHTS_CACHE = "weights-cache"
    CHECKPOINTS = "checkpoints"
    LOGS = "logs"
    SOCKETS = "sockets"
    REPORT = "report.png"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def ledger(self) -> Path:
        return self.root / self.LEDGER

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def evals(self) -> Path:
        return self.root / self.EVALS

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    @property
    def endpoints(self) -> Path:
        return self.root / self.ENDPOINTS

    @property
    def placement(self) -> Path:
        return self.root / self.PLACEMENT

    @property
    def pids(self) -> Path:
        return self.root / self.PIDS

    @property
    def restarts(self) -> Path:
        return self.root / self.RESTARTS

    @property
    def prometheus_targets(self) -> Path:
        return self.root / self.PROMETHEUS_TARGETS

    @property
    def weights(self) -> Path:
        return self.root / self.WEIGHTS

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def logs(self) -> Path:
        return self.root / self.LOGS

    @property
    def sockets(self) -> Path:
        return self.root / self.SOCKETS

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    def weight_store(self) -> WeightStore:
        """The learner's published versions."""
        return WeightStore(self.weights)

    def weights_cache(self, host: str | None = None) -> Path:
        """The stream cache the actors of node `host` (default: this one) share; per node, so a
        run directory on a shared filesystem still downloads once per node."""
        return self.root / self.WEIGHTS_CACHE / (host or socket.gethostname())

    @classmethod
    def log_name(cls, role: str) -> str:
        """`logs/<role>.log`, relative to the run directory."""
        return f"{cls.LOGS}/{role}.log"

    def log(self, role: str) -> Path:
        """The output of role instance `role` (`learner`, `actor-0`, `verifier-1`, ...)."""
        return self.root / self.log_name(role)

    def pid_file(self, role: str) -> Path:
        """Where `popo ray` records role instance `role`'s pid on its node."""
        return self.root / self.PID_FILES / f"{role}.pid"


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSONL file a run appends to (eval.jsonl, metrics.jsonl, restarts.jsonl);
    none if it does not exist. A line cut short by a crash mid-append is skipped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in filter(str.strip, text.splitlines()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one record as a line. After a line cut short by a crash the record starts a line of
    its own, so the torn line costs only itself."""
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(json.dumps(record).encode() + b"\n")
