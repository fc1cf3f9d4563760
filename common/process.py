"""Process helpers shared by the launchers (supervisor, learner ranks, benchmarks) and tests."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import time

_PR_SET_PDEATHSIG = 1


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


def free_port_flags() -> list[str]:
    """Dotted config flags putting every ZeroMQ endpoint and the metrics servers on free loopback
    ports, so runs can share a machine (tests, benchmarks)."""
    from popo.common.config import TransportConfig

    names = [k for k in TransportConfig.model_fields if k.endswith("_port")]
    *ports, metrics = free_ports(len(names) + 1)
    return [*(f"--transport.{k}={p}" for k, p in zip(names, ports, strict=True)),
            f"--metrics.base_port={metrics}"]  # fmt: skip
