"""common/process.py: handing freed C-heap pages back to the kernel; free port blocks."""

import ctypes
import json
import subprocess
import sys
import textwrap

import pytest


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "malloc_trim"),
    reason="glibc only",
)
def test_release_free_memory_returns_fragmented_heap_pages():
    # In a fresh interpreter: 256 MiB in 64 KiB blocks (below glibc's mmap threshold, so on the
    # heap), then every block freed except the last, which pins the heap's top so free() cannot
    # shrink it: RSS stays up until malloc_trim hands the free pages back.
    code = textwrap.dedent("""
        import ctypes, json
        from popo.common.process import release_free_memory
        def rss_mib():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        blocks = [libc.malloc(64 << 10) for _ in range(4096)]
        for b in blocks:
            ctypes.memset(b, 1, 64 << 10)
        peak = rss_mib()
        for b in blocks[:-1]:
            libc.free(b)
        held = rss_mib()
        seconds = release_free_memory()
        print(json.dumps({"peak": peak, "held": held, "after": rss_mib(), "s": seconds}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["held"] > r["peak"] - 16, r  # glibc kept the freed pages
    assert r["after"] < r["held"] - 200, r  # ... until they were released
    assert r["s"] >= 0.0


def test_free_port_block_is_free_and_below_the_ephemeral_range():
    """Every port of the block binds, and none lies where the kernel hands out ports to outgoing
    connections (a role re-binding its fixed port after a restart must not find it taken)."""
    import socket

    from popo.common.process import _ephemeral_ports, free_port_block, free_port_flags

    base = free_port_block(64)
    assert base >= 10000 and base + 64 <= _ephemeral_ports()[0]
    socks = [socket.socket() for _ in range(64)]
    try:
        for i, s in enumerate(socks):
            s.bind(("127.0.0.1", base + i))
    finally:
        for s in socks:
            s.close()

    from popo.common.config import load_config

    cfg = load_config(None, free_port_flags())
    t = cfg.transport
    ports = [t.dispatch_port, t.ingest_port, t.weights_port, t.rollouts_port, t.weightstream_port]
    assert len(set(ports)) == len(ports) and all(p < _ephemeral_ports()[0] for p in ports)
    # replicas (rollouts_port + r) and metrics (base, +1+r, +20+i) never land on another endpoint
    taken = {p + r for p in ports for r in range(8)}
    assert not taken & {cfg.metrics.base_port + k for k in range(40)}
