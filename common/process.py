"""Process helpers shared by the launchers (supervisor, learner ranks, benchmarks) and tests."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies. Call it in a child
    between fork and exec (`preexec_fn`), so nothing outlives a SIGKILLed launcher."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


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
