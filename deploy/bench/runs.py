"""Whole runs for the measurements that time a complete command (`popo bench e2e`, `popo bench
default`, deploy/experiments/soak.py): each a subprocess of this interpreter on its own run
directory."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def train_command(run_dir: Path, *flags: str) -> list[str]:
    """`popo train` writing its run to `run_dir`, with `flags` after it."""
    return [sys.executable, "-m", "popo.deploy.cli", "train", f"--deploy.run_dir={run_dir}", *flags]


def run_logged(
    cmd: list[str], log_path: Path, timeout: float, env: dict[str, str] | None = None
) -> float:
    """Run `cmd` to its end, its output (unbuffered) in `log_path` and `env` added to this process's
    environment; -> the time.time() it started at. A failed run raises with the log's last lines."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as f:
        t0 = time.time()
        proc = subprocess.run(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(
            f"{shlex.join(cmd[:4])}... failed ({proc.returncode}); see {log_path}:\n{tail}"
        )
    return t0
