"""Process helpers shared by the launchers (supervisor, learner ranks, benchmarks) and tests."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1

LAUNCH_T0_ENV = "POPO_LAUNCH_T0"
"""Environment variable a launcher sets to the time.time() its command started, so a role's
start-up figures count from there (without it, from the role's own start)."""


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies. Call it in a child
    between fork and exec (`preexec_fn`), so nothing outlives a SIGKILLed launcher."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def release_free_memory() -> float:
    """Return the C heap's free pages to the kernel (glibc `malloc_trim(0)`); seconds it took.

    glibc keeps pages freed in the middle of its heaps and arenas; a learner whose step allocates
    differently sized tensors every time (batch shapes vary with the positives) then grows its RSS
    step by step to the high-water mark of every size mix seen (measured: +150 MiB in 200 steps of
    the embedded default without it, flat with it). No-op where libc has no malloc_trim."""
    t0 = time.perf_counter()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return time.perf_counter() - t0


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports that are free on `host` right now (all held open at once while
    choosing, so they differ; another process may still take one before the caller binds it)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports it assigns to outgoing connections and bind(0)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port_block(size: int, host: str = "127.0.0.1") -> int:
    """First port of `size` consecutive TCP ports that are all free on `host` right now, chosen
    below the kernel's ephemeral range. A run binds ports at fixed offsets from a base (verifier
    replica r at rollouts_port + r, actor i's metrics at base + 20 + i) and binds them again when a
    role restarts; a port inside the ephemeral range can be taken meanwhile as the local end of any
    process's outgoing connection (seen: an actor restarting six times on EADDRINUSE), one below it
    only by an explicit bind."""
    lo = 10000
    hi = min(_ephemeral_ports()[0], 65536) - size
    if hi <= lo:
        raise RuntimeError(f"no room for {size} ports below the ephemeral range")
    rng = random.SystemRandom()
    for _ in range(200):
        base = rng.randrange(lo, hi)
        socks = []
        try:
            for port in range(base, base + size):
                socks.append(socket.socket())
                socks[-1].bind((host, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError(f"no {size} consecutive free ports on {host} in [{lo}, {hi + size})")


def free_port_flags() -> list[str]:
    """Dotted config flags putting every ZeroMQ endpoint and the metrics servers on free loopback
    ports, so runs can share a machine (tests, benchmarks): one checked block, 8 ports per
    endpoint (room for replicas at port + r), the metrics ports above them (base, +1+r, +20+i)."""
    from popo.common.config import TransportConfig

    names = [k for k in TransportConfig.model_fields if k.endswith("_port")]
    metrics = 8 * len(names)
    base = free_port_block(metrics + 40)
    return [
        *(f"--transport.{k}={base + 8 * i}" for i, k in enumerate(names)),
        f"--metrics.base_port={base + metrics}",
    ]


def process_start_time(pid: str | int = "self") -> float:
    """time.time() at which process `pid` started (from /proc; the current time where /proc is
    missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, counted from the ")" that ends field 2
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()
