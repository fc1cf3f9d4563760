"""One weight cache per node: actors (separate processes, as on a node) share one cache directory and
a real WeightServer on loopback; each version crosses the wire once, whatever dies on the way."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zmq
from test_weight_stream import CFG, assert_same_dir, versions

from popo.common.messages import Chunk, Manifest, WeightsReady
from popo.common.weight_stream import WeightFetcher, WeightServer, default_cache_dir
from popo.common.weights import WEIGHTS_FILE, WeightsError, WeightStore, sha256_file

# A node's actor, reduced to its weight path: it follows the announcements the test writes, fetches
# each version into the shared cache (protecting the one it serves, as the actor does), reads every
# file of what it got back and reports their sha256.
ACTOR = textwrap.dedent("""
    import hashlib, json, os, sys, time
    from pathlib import Path
    from popo.common.config import TransportConfig
    from popo.common.messages import WeightsReady
    from popo.common.weight_stream import WeightFetcher

    addr, cache, cfg_json, control, name, wanted = sys.argv[1:7]
    control = Path(control)
    cfg = TransportConfig.model_validate_json(cfg_json)
    f = WeightFetcher(addr, cache, cfg, keep=2, poll_s=0.02)
    (control / f"ready-{name}").write_text(str(os.getpid()))
    served = None
    for v in map(int, wanted.split(",")):
        ann = control / f"announce-v{v}.json"
        while not ann.exists():
            time.sleep(0.02)
        msg = WeightsReady(**json.loads(ann.read_text()))
        before = f.bytes_streamed
        d = f.fetch(msg, protect=set() if served is None else {served})
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}
        rec = {"name": name, "pid": os.getpid(), "version": v, "dir": str(d), "files": files,
               "streamed": f.bytes_streamed - before, "leased": f.leased()}
        (control / f".result-{name}").write_text(json.dumps(rec))
        os.rename(control / f".result-{name}", control / f"result-{name}-v{v}.json")
        served = v
    f.close()
""")


class CountingServer(WeightServer):
    """A real server that counts what it serves per version and can be slowed per chunk."""

    def __init__(self, *a, chunk_delay_s: float = 0.0, **kw) -> None:
        super().__init__(*a, **kw)
        self.chunk_delay_s = chunk_delay_s
        self.manifests: Counter[int] = Counter()
        self.chunk_bytes: Counter[int] = Counter()

    def handle(self, msg: object):
        reply, data = super().handle(msg)
        if isinstance(reply, Manifest):
            self.manifests[reply.version] += 1
        elif isinstance(reply, Chunk):
            self.chunk_bytes[reply.version] += reply.nbytes
            time.sleep(self.chunk_delay_s)
        return reply, data


def publish(root: Path, version: int) -> WeightsReady:
    """A ~3 MB version directory as the learner writes it."""
    g = torch.Generator().manual_seed(version)
    tensors = {"a.weight": torch.randn(1000, 777, generator=g), "b.bias": torch.randn(5)}
    extra = {"config.json": b'{"model_type": "qwen2"}', "tokenizer.json": os.urandom(3000)}
    return WeightStore(root).publish(version, tensors, extra_files=extra)


def wait_for(what: str, cond: Callable[[], object], timeout: float = 90.0) -> object:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return got


def results(control: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in control.glob("result-*.json")]


def done(control: Path, names: set[str], version: int) -> bool:
    return {r["name"] for r in results(control) if r["version"] == version} >= names


def downloading(cache: Path, version: int, at_least: int) -> Path | None:
    """The temporary directory of a download of `version` with `at_least` weight bytes in it."""
    for tmp in cache.glob(f".tmp-v{version}-*"):
        try:
            if (tmp / WEIGHTS_FILE).stat().st_size >= at_least:
                return tmp
        except FileNotFoundError:
            continue
    return None


def test_actors_on_one_node_download_each_version_once(tmp_path):
    root, cache, control = tmp_path / "weights", tmp_path / "node-cache", tmp_path / "control"
    root.mkdir()
    control.mkdir()
    msgs = {v: publish(root, v) for v in (1, 2, 3)}
    size = {v: sum(p.stat().st_size for p in Path(m.path).iterdir()) for v, m in msgs.items()}
    source = {v: {p.name: sha256_file(p) for p in Path(m.path).iterdir()} for v, m in msgs.items()}
    ctx = zmq.Context()
    server = CountingServer(root, "tcp://127.0.0.1:*", CFG, ctx, chunk_delay_s=0.03)
    server.start()
    script = tmp_path / "actor.py"
    script.write_text(ACTOR)
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, wanted: str) -> None:
        args = [server.address, str(cache), CFG.model_dump_json(), str(control), name, wanted]
        procs[name] = subprocess.Popen([sys.executable, str(script), *args])

    def announce(v: int) -> None:
        tmp = control / f".announce-v{v}"
        m = msgs[v]
        tmp.write_text(json.dumps(dict(version=v, path=m.path, sha256=m.sha256, nbytes=m.nbytes)))
        os.rename(tmp, control / f"announce-v{v}.json")

    try:
        for i in range(4):
            start(f"actor-{i}", "1,2,3")
        wait_for("4 actors up", lambda: len(list(control.glob("ready-*"))) == 4)
        # 1. v1: one actor streams it while three wait; it is SIGKILLed mid-transfer
        announce(1)
        first = wait_for("a download of v1", lambda: downloading(cache, 1, 512 << 10))
        killed_pid = int(first.name.rsplit("-", 2)[1])
        (killed,) = [n for n, p in procs.items() if p.pid == killed_pid]
        procs[killed].send_signal(signal.SIGKILL)
        assert procs[killed].wait(10) == -signal.SIGKILL
        survivors = set(procs) - {killed}
        wait_for("v1 on the survivors", lambda: done(control, survivors, 1))
        assert not first.exists()  # the next downloader removed the dead one's leftovers
        # 2. v2 streams slowly; the killed actor restarts meanwhile and its start-up cleaning
        # leaves the neighbour's download alone
        server.chunk_delay_s = 0.5  # until the restarted actor is up; lowered below
        announce(2)
        second = wait_for("a download of v2", lambda: downloading(cache, 2, 1))
        start(f"{killed}-restarted", "2,3")
        wait_for("the restarted actor", lambda: (control / f"ready-{killed}-restarted").exists())
        assert second.exists()
        server.chunk_delay_s = 0.01
        everyone = survivors | {f"{killed}-restarted"}
        wait_for("v2 everywhere", lambda: done(control, everyone, 2))
        announce(3)
        for name, p in procs.items():
            if name != killed:
                assert p.wait(90) == 0, name
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        server.stop()
        ctx.term()
    assert server.error is None

    # exactly one transfer per version; v1 once more only for the part the killed actor got
    assert server.manifests == {1: 2, 2: 1, 3: 1}
    assert server.chunk_bytes[2] == size[2] and server.chunk_bytes[3] == size[3]
    assert size[1] < server.chunk_bytes[1] < 2 * size[1]
    recs = results(control)
    assert sorted((r["name"], r["version"]) for r in recs) == sorted(
        [(n, v) for n in survivors for v in (1, 2, 3)]
        + [(f"{killed}-restarted", v) for v in (2, 3)]
    )
    for v in (2, 3):
        assert sum(r["streamed"] for r in recs if r["version"] == v) == size[v]
    # no partial or corrupt load: every actor read back exactly the learner's files
    for r in recs:
        assert r["dir"] == str(WeightStore(cache).path(r["version"]))
        assert {n: s for n, s in r["files"].items() if not n.startswith(".")} == source[
            r["version"]
        ], r
    # served versions are leased until the next fetch; v1 went once nobody on the node held it
    for r in recs:
        first_seen = r["version"] == (2 if r["name"].endswith("restarted") else 1)
        assert r["leased"] == ([] if first_seen else [r["version"] - 1]) + [r["version"]], r
    assert versions(cache) == ["v2", "v3"]
    assert not [p.name for p in cache.iterdir() if p.name.startswith((".tmp-", ".del-"))]
    for v in (2, 3):
        assert_same_dir(Path(msgs[v].path), WeightStore(cache).path(v))


@pytest.fixture
def node(tmp_path):
    root = tmp_path / "weights"
    root.mkdir()
    ctx = zmq.Context()
    server = CountingServer(root, "tcp://127.0.0.1:*", CFG, ctx)
    server.start()
    yield root, server
    server.stop()
    assert server.error is None
    ctx.term()


def test_a_version_in_use_on_the_node_is_not_pruned(node, tmp_path):
    root, server = node
    cache = tmp_path / "cache"
    m1, m2 = publish(root, 1), publish(root, 2)
    a = WeightFetcher(server.address, cache, CFG, keep=1)
    b = WeightFetcher(server.address, cache, CFG, keep=1)
    try:
        a.fetch(m1)  # a loads v1 and serves it
        assert b.fetch(m1) == cache / "v1" and b.bytes_streamed == 0
        b.fetch(m2)  # b moves on, keeps 1 version, but a still holds v1
        assert versions(cache) == ["v1", "v2"] and b.leased() == [2]
        a.fetch(m2)  # a moves on too: now nobody holds v1
        assert versions(cache) == ["v2"] and a.bytes_streamed == server.chunk_bytes[1]
        assert server.manifests == {1: 1, 2: 1}
    finally:
        a.close()
        b.close()


def test_a_corrupt_cached_copy_is_replaced_once_nobody_holds_it(node, tmp_path):
    root, server = node
    cache = tmp_path / "cache"
    msg = publish(root, 1)
    cfg = CFG.model_copy(update={"stream_timeout_s": 0.3})
    a = WeightFetcher(server.address, cache, cfg)
    b = WeightFetcher(server.address, cache, cfg)
    try:
        a.fetch(msg)
        raw = bytearray((cache / "v1" / WEIGHTS_FILE).read_bytes())
        raw[len(raw) // 2] ^= 1  # same size, other bytes: only the sha256 tells
        (cache / "v1" / WEIGHTS_FILE).write_bytes(raw)
        with pytest.raises(WeightsError, match=r"does not verify .*another actor on this node"):
            b.fetch(msg)
        a.close()
        assert b.fetch(msg) == cache / "v1"
        assert server.manifests[1] == 2
        digest = hashlib.sha256((cache / "v1" / WEIGHTS_FILE).read_bytes()).hexdigest()
        assert digest == msg.sha256
        assert_same_dir(Path(msg.path), cache / "v1")
    finally:
        a.close()
        b.close()


def test_the_default_cache_is_one_per_node(tmp_path):
    assert default_cache_dir(tmp_path) == tmp_path / "weights-cache" / socket.gethostname()
    a, b = default_cache_dir(None), default_cache_dir(None)  # no run directory: private ones
    try:
        assert a.is_dir() and b.is_dir() and a != b
    finally:
        a.rmdir()
        b.rmdir()
