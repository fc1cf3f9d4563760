"""Weight streaming throughput against a raw ZeroMQ transfer of the same bytes.

    python -m popo.deploy.bench.weight_stream [--mib 256] [--reps 5] [--chunk-mib 4] [--window 8]

One safetensors file of `--mib` MiB is published as the learner does (`weights/v1/`). Each
repetition, round-robin so a busy phase of a shared machine hits every side alike:
- `raw`: the file's bytes, already in memory, pushed in chunks of the same size over a PUSH/PULL
  pair on loopback and received in another thread, zero-copy on both ends (the link's ceiling: no
  disk, no checksum);
- `raw->disk`, `raw->tmpfs`: the same, with the receiving thread also writing each chunk to a
  file on disk (the work directory) or on tmpfs (/dev/shm), hashing it with sha256 and fsyncing
  the file at the end: the naive single-threaded way to land verified bytes in a file there;
- `stream->disk`, `stream->tmpfs`: `WeightFetcher.fetch` from a `WeightServer` thread (manifest,
  credit-based chunk requests, reads of the learner's file, write + fsync + sha256 of every file,
  atomic rename) into a fresh cache directory on disk / on tmpfs.
- `sha256 (in memory)`: hashing the bytes on one core, which every verified copy must pay.
Figures are bytes/s (median [min, max]) and paired ratios: stream->tmpfs / raw (the whole cost of
streaming over the bare link, when the cache's fsync is free) and stream->disk / raw->disk (its
cost over the disk's own floor). `bench_stream` returns them as a dict.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from popo.common.config import TransportConfig
from popo.common.messages import WeightsReady
from popo.common.weight_stream import WeightFetcher, WeightServer
from popo.common.weights import WEIGHTS_FILE
from popo.deploy.bench.stats import Summary, alternate, markdown_table, paired_ratio


def _publish(root: Path, nbytes: int) -> WeightsReady:
    import torch

    from popo.common.weights import WeightStore

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(nbytes // 4, generator=g)}
    return WeightStore(root).publish(1, tensors, extra_files={"config.json": b"{}"})


def _raw(data: bytes, chunk: int, sink: Path | None) -> float:
    """Seconds to move `data` over a PUSH/PULL pair in `chunk`-byte messages (and, with `sink`,
    write + fsync + sha256 it at the receiver)."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    n = len(data)
    done = threading.Event()

    def receive() -> None:
        got = 0
        h = hashlib.sha256()
        out = open(sink, "wb") if sink is not None else None  # noqa: SIM115
        while got < n:
            frame = pull.recv(copy=False).buffer  # zero-copy both ways: the link's best case
            got += len(frame)
            if out is not None:
                out.write(frame)
                h.update(frame)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            h.hexdigest()
        done.set()

    th = threading.Thread(target=receive)
    view = memoryview(data)
    t0 = time.perf_counter()
    th.start()
    for off in range(0, n, chunk):
        push.send(view[off : off + chunk], copy=False)
    done.wait()
    seconds = time.perf_counter() - t0
    th.join()
    push.close(0)
    pull.close(0)
    ctx.term()
    return seconds


def bench_stream(
    nbytes: int = 256 << 20,
    reps: int = 5,
    chunk_bytes: int = 4 << 20,
    window: int = 8,
    work_dir: str | Path | None = None,
    tmpfs_dir: str | Path = "/dev/shm",
) -> dict[str, Any]:
    """Throughput (bytes/s) of weight streaming vs raw ZeroMQ on loopback; see the module doc."""
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="popo-stream-bench-", dir=work_dir))
    shm = Path(tempfile.mkdtemp(prefix="popo-stream-bench-", dir=tmpfs_dir))
    try:
        msg = _publish(tmp / "weights", nbytes)
        data = (Path(msg.path) / WEIGHTS_FILE).read_bytes()
        total = sum(p.stat().st_size for p in Path(msg.path).iterdir())
        cfg = TransportConfig(
            weightstream_port=0,
            linger_ms=0,
            stream_chunk_bytes=chunk_bytes,
            stream_window=window,
            stream_retries=0,
            stream_timeout_s=60.0,
        )
        ctx = zmq.Context()
        server = WeightServer(tmp / "weights", "tcp://127.0.0.1:*", cfg, ctx)
        server.start()
        fetchers = {d: WeightFetcher(server.address, d / "cache", cfg, keep=1) for d in (tmp, shm)}

        def stream(where: Path) -> float:
            shutil.rmtree(where / "cache" / "v1", ignore_errors=True)
            t0 = time.perf_counter()
            fetchers[where].fetch(msg)
            return total / (time.perf_counter() - t0)

        def raw(where: Path | None) -> float:
            sink = where / "raw-sink" if where is not None else None
            rate = len(data) / _raw(data, chunk_bytes, sink)
            if sink is not None:
                sink.unlink()
            return rate

        def sha() -> float:
            t0 = time.perf_counter()
            hashlib.sha256(data).hexdigest()
            return len(data) / (time.perf_counter() - t0)

        sides = {
            "sha256 (in memory)": sha,
            "raw": lambda: raw(None),
            "raw->tmpfs": lambda: raw(shm),
            "raw->disk": lambda: raw(tmp),
            "stream->tmpfs": lambda: stream(shm),
            "stream->disk": lambda: stream(tmp),
        }
        try:
            runs = alternate(sides, reps)
        finally:
            for f in fetchers.values():
                f.close()
            server.stop()
            ctx.term()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return {
        "nbytes": nbytes,
        "reps": reps,
        "chunk_bytes": chunk_bytes,
        "window": window,
        "cpus": os.cpu_count(),
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "bytes_per_s": {k: Summary.of(v).to_json() for k, v in runs.items()},
        "ratios": {
            "stream->tmpfs / raw": paired_ratio(runs["stream->tmpfs"], runs["raw"]).to_json(),
            "stream->tmpfs / raw->tmpfs": paired_ratio(
                runs["stream->tmpfs"], runs["raw->tmpfs"]
            ).to_json(),
            "stream->disk / raw->disk": paired_ratio(
                runs["stream->disk"], runs["raw->disk"]
            ).to_json(),
        },
    }


def table(res: dict[str, Any]) -> str:
    """BENCHMARKS.md table of a `bench_stream` result (MB/s = 1e6 bytes/s)."""
    rows = []
    for k, v in res["bytes_per_s"].items():
        s = Summary.of(v["values"])
        rows.append([f"`{k}`", s.fmt(",.0f", 1e-6) + " MB/s", f"{s.spread:.2f}"])
    for name, r in res["ratios"].items():
        rows.append(
            [name, f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]", f"{r['spread']:.2f}"]
        )
    return markdown_table(["transfer", "median [min, max]", "spread"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m popo.deploy.bench.weight_stream", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--mib", type=int, default=256, help="size of model.safetensors in MiB")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunk-mib", type=float, default=4.0)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args(argv)
    res = bench_stream(a.mib << 20, a.reps, int(a.chunk_mib * (1 << 20)), a.window)
    print(table(res))
    print(
        f"{res['cpus']} CPUs, 1-minute load average {res['load_average_1m'][0]:.1f} before, "
        f"{res['load_average_1m'][1]:.1f} after"
    )
    if a.json is not None:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
