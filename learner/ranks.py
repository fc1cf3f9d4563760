"""Several learner ranks: one FSDP2 rank per device (`learner.devices = N > 1`).

`popo learner` starts N copies of itself under torchrun's environment contract (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or, started by torchrun, simply joins the group. Rank 0 is the
learner role — dispatcher, ledger, publishing, evaluation, metrics; ranks 1..N-1 only train. The
trainer's collectives (FSDP all-gathers, gradient reduce-scatters, checkpoint and weight gathers)
need every rank to make the same calls in the same order, so before each one rank 0 broadcasts a
`RankCommand` (msgpack bytes in a uint8 tensor: no pickle) naming it, and the followers do as told.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from popo.common.messages import RankCommand, decode, encode
from popo.common.process import die_with_parent, free_ports

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Rank 0 evaluates and waits for data between steps while the others sit in a broadcast: the
# collective timeout must outlast the longest such pause, not the default 10-30 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=6)


def in_group() -> bool:
    """Whether this process was started as one rank of a group (by `launch` or torchrun)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch(argv: Sequence[str], world: int) -> int:
    """Run `argv` as `world` ranks on this machine and wait for them. A rank that fails stops the
    others; SIGTERM/SIGINT are forwarded to rank 0, which stops the group after its current step.
    Returns the first non-zero exit code, else 0."""
    env = {
        **os.environ,
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_ports(1)[0]),
    }
    procs = [
        subprocess.Popen(
            list(argv),
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            # followers ignore SIGTERM (rank 0 stops them): only SIGKILL ends an orphan
            preexec_fn=lambda: die_with_parent(signal.SIGKILL),
        )
        for r in range(world)
    ]

    def forward(signum: int, _frame: object) -> None:
        if procs[0].poll() is None:
            procs[0].send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c is not None for c in codes):
                break
            time.sleep(0.2)
        if failed:
            log.error("a learner rank exited with %d; stopping the other ranks", failed[0])
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p in procs:
            p.wait()
        return failed[0] if failed else 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def init_group(device: str) -> tuple[int, int, str]:
    """Join the process group (NCCL for CUDA, gloo on CPU). Returns (rank, world, device), the
    device being `cuda:<LOCAL_RANK>` on GPUs."""
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), device if cuda else "cpu"


def leave_group(code: int) -> NoReturn:
    """End this rank's process with `code` once its work is done. Leaving the process group and
    skipping interpreter teardown: gloo's destructors at teardown were seen to abort a rank that had
    finished cleanly (SIGABRT, "terminate called without an active exception", ~1 run in 4)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class RankLink:
    """Rank 0 -> every other rank: one `RankCommand` per collective, by broadcast."""

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None  # NCCL needs device tensors

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.device is not None else t

    def send(self, cmd: RankCommand) -> None:
        import torch
        import torch.distributed as dist

        buf = encode(cmd)
        dist.broadcast(self._tensor(torch.tensor([len(buf)], dtype=torch.int64)), src=0)
        dist.broadcast(self._tensor(torch.frombuffer(bytearray(buf), dtype=torch.uint8)), src=0)

    def recv(self) -> RankCommand:
        import torch
        import torch.distributed as dist

        n = self._tensor(torch.zeros(1, dtype=torch.int64))
        dist.broadcast(n, src=0)
        data = self._tensor(torch.empty(int(n.item()), dtype=torch.uint8))
        dist.broadcast(data, src=0)
        return decode(data.cpu().numpy().tobytes(), RankCommand)  # type: ignore[return-value]


def main_argv() -> list[str]:
    """This process's command line (interpreter flags and `-m` included), to start its sibling
    ranks with."""
    return list(sys.orig_argv)
