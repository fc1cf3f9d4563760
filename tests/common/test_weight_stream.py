"""Weight streaming over real ZeroMQ sockets on loopback: a WeightServer thread serving version
directories written as the learner writes them, WeightFetchers pulling them into a local cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from popo.common import transport
from popo.common.config import TransportConfig
from popo.common.messages import (
    Chunk,
    FetchRequest,
    Manifest,
    ManifestRequest,
    StreamError,
    WeightsReady,
)
from popo.common.weight_stream import (
    MANIFEST_FILE,
    WeightFetcher,
    WeightServer,
    local_weights,
    recv_reply,
    shared_visible,
)
from popo.common.weights import (
    WEIGHTS_FILE,
    WeightsError,
    WeightStore,
    sha256_file,
)

# Small chunks so a ~1 MB file takes many pipelined requests and the last one is partial.
CFG = TransportConfig(
    weightstream_port=0,
    linger_ms=0,
    stream_chunk_bytes=64 << 10,
    stream_window=4,
    stream_timeout_s=2.0,
    stream_retries=2,
)


def publish(root: Path, version: int, seed: int = 0) -> WeightsReady:
    """A version directory as `learner.publish` writes it (weights + sidecar + config files)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"a.weight": torch.randn(300, 777, generator=g), "b.bias": torch.randn(5)}
    extra = {"config.json": b'{"model_type": "qwen2"}', "tokenizer.json": os.urandom(3000)}
    return WeightStore(root).publish(version, tensors, extra_files=extra)


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return tmp_path / "weights"


@pytest.fixture
def server(weights: Path) -> Iterator[WeightServer]:
    weights.mkdir()
    srv = WeightServer(weights, "tcp://127.0.0.1:*", CFG, zmq.Context())
    srv.start()
    yield srv
    srv.stop()
    assert srv.error is None
    srv.ctx.term()


@pytest.fixture
def fetcher(server: WeightServer, tmp_path: Path) -> Iterator[WeightFetcher]:
    f = WeightFetcher(server.address, tmp_path / "cache", CFG, keep=2)
    yield f
    f.close()


def assert_same_dir(src: Path, local: Path) -> None:
    """`local` holds every file of `src` byte for byte, and the manifest the fetcher stored."""
    names = sorted(p.name for p in src.iterdir())
    assert sorted(p.name for p in local.iterdir()) == sorted([*names, MANIFEST_FILE])
    for n in names:
        assert (src / n).read_bytes() == (local / n).read_bytes(), n


def versions(cache: Path) -> list[str]:
    """The version directories in a cache (beside them: lock files)."""
    return sorted(p.name for p in cache.glob("v*"))


def test_stream_reproduces_identical_bytes(weights, server, fetcher, tmp_path):
    msg = publish(weights, 1)
    assert msg.nbytes > 10 * CFG.stream_chunk_bytes and msg.nbytes % CFG.stream_chunk_bytes
    local = fetcher.fetch(msg)
    assert local == tmp_path / "cache" / "v1" and local != Path(msg.path)
    assert_same_dir(Path(msg.path), local)
    assert sha256_file(local / WEIGHTS_FILE) == msg.sha256
    # only the files (config/tokenizer included) crossed, nothing twice
    total = sum(p.stat().st_size for p in Path(msg.path).iterdir())
    assert fetcher.bytes_streamed == total and fetcher.retries == 0
    assert not list((tmp_path / "cache").glob(".tmp-*"))
    assert fetcher.leased() == [1]
    # a cached version is not fetched again
    assert fetcher.fetch(msg) == local and fetcher.bytes_streamed == total


def test_cache_keeps_last_k_and_the_protected_version(weights, server, fetcher, tmp_path):
    msgs = [publish(weights, v, seed=v) for v in (1, 2, 3, 4)]
    fetcher.fetch(msgs[0])
    for m in msgs[1:]:
        fetcher.fetch(m, protect={1})
    assert versions(tmp_path / "cache") == ["v1", "v3", "v4"]
    assert fetcher.leased() == [1, 4]


def _ask(ch: transport.Channel, req: object) -> object:
    return _ask_data(ch, req)[0]


def _ask_data(ch: transport.Channel, req: object) -> tuple[object, memoryview | None]:
    assert ch.send(req, timeout_ms=2000)
    got = recv_reply(ch, 2000)
    assert got is not None, f"no reply to {req}"
    return got


def test_only_files_of_the_version_are_served(weights, server, tmp_path):
    msg = publish(weights, 1)
    publish(weights, 2, seed=2)
    secret = tmp_path / "secret.txt"
    secret.write_text("learner-only")
    os.symlink(secret, Path(msg.path) / "link.txt")
    (Path(msg.path) / ".probe-run").write_text("hidden")
    (Path(msg.path) / "sub").mkdir()
    (Path(msg.path) / "sub" / "x").write_text("nested")

    ctx = zmq.Context()
    ch = transport.connect(ctx, "weightstream", server.address, CFG)
    try:
        manifest = _ask(ch, ManifestRequest(version=1))
        assert isinstance(manifest, Manifest)
        assert sorted(f.name for f in manifest.files) == [
            "config.json",
            WEIGHTS_FILE,
            f"{WEIGHTS_FILE}.sha256",
            "tokenizer.json",
        ]
        bad_names = [
            "../../secret.txt",
            str(secret),
            "/etc/passwd",
            "../v2/config.json",
            "link.txt",
            ".probe-run",
            "sub/x",
            "sub",
            "",
            ".",
            "..",
            "config.json/",
            "./config.json",
        ]
        for name in bad_names:
            reply = _ask(ch, FetchRequest(version=1, file=name, offset=0, length=100))
            assert isinstance(reply, StreamError), name
            assert "not a file of version 1" in reply.reason
        for req in (
            FetchRequest(version=1, file="config.json", offset=-1, length=10),
            FetchRequest(version=1, file="config.json", offset=0, length=0),
            FetchRequest(version=1, file="config.json", offset=10**6, length=10),
            FetchRequest(version=1, file="config.json", offset=0, length=1 << 30),
            FetchRequest(version=-1, file="config.json", offset=0, length=10),
        ):
            assert isinstance(_ask(ch, req), StreamError), req
        ok, data = _ask_data(ch, FetchRequest(version=1, file="config.json", offset=0, length=1000))
        assert isinstance(ok, Chunk) and ok.eof and bytes(data) == b'{"model_type": "qwen2"}'
        part, data = _ask_data(ch, FetchRequest(version=1, file="config.json", offset=2, length=5))
        assert (part.offset, part.nbytes, part.eof, bytes(data)) == (2, 5, False, b"model")
    finally:
        ch.close()
        ctx.term()


def test_pruned_version_is_a_clean_error(weights, server, fetcher, tmp_path):
    old = publish(weights, 1)
    publish(weights, 2, seed=2)
    fetcher.fetch(publish(weights, 3, seed=3))  # the server has opened and cached v3 files
    assert WeightStore(weights).prune(keep=1) == [1, 2]
    with pytest.raises(WeightsError, match="version 1 is not available"):
        fetcher.fetch(old)
    assert fetcher.retries == 0  # a pruned version is final, not retried
    assert versions(tmp_path / "cache") == ["v3"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock-v3", "v3"]
    ctx = zmq.Context()
    ch = transport.connect(ctx, "weightstream", server.address, CFG)
    try:
        reply = _ask(ch, FetchRequest(version=2, file=WEIGHTS_FILE, offset=0, length=10))
        assert isinstance(reply, StreamError) and "not available" in reply.reason
    finally:
        ch.close()
        ctx.term()


class FaultyServer(WeightServer):
    """A real server whose disk reads go wrong for the first `faults` chunks of model.safetensors."""

    def __init__(self, *a, fault: str, faults: int = 1, **kw) -> None:
        super().__init__(*a, **kw)
        self.fault, self.faults = fault, faults

    def read(self, fd: int, offset: int, length: int) -> bytes:
        data = super().read(fd, offset, length)
        if self.faults > 0 and length > 1000 and offset >= 3 * length:
            self.faults -= 1
            if self.fault == "flip":  # a bit flipped in transit: same size, wrong content
                return data[:100] + bytes([data[100] ^ 1]) + data[101:]
            return data[: len(data) // 2]  # a short read
        return data


@pytest.mark.parametrize("fault", ["flip", "short"])
def test_corrupt_or_short_chunk_is_detected_and_retried(fault, weights, tmp_path):
    weights.mkdir()
    msg = publish(weights, 1)
    ctx = zmq.Context()
    srv = FaultyServer(weights, "tcp://127.0.0.1:*", CFG, ctx, fault=fault, faults=1)
    srv.start()
    retried: list[str] = []
    f = WeightFetcher(srv.address, tmp_path / "cache", CFG, on_retry=retried.append)
    try:
        local = f.fetch(msg)
        assert_same_dir(Path(msg.path), local)
        assert f.retries == 1 and len(retried) == 1
        assert ("sha256" in retried[0]) if fault == "flip" else ("short chunk" in retried[0])
        # every attempt corrupt: the fetch fails whole and leaves nothing half-written behind
        srv.faults = 10**6
        with pytest.raises(WeightsError, match="failed 3 times"):
            f.fetch(publish(weights, 2, seed=2))
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock-v1", "v1"]
    finally:
        f.close()
        srv.stop()
        ctx.term()


def test_no_server_times_out_and_fails(weights, tmp_path):
    weights.mkdir()
    msg = publish(weights, 1)
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as s:  # a port nobody answers on
        port = s.bind_to_random_port("tcp://127.0.0.1")
    cfg = CFG.model_copy(update={"stream_timeout_s": 0.2, "stream_retries": 1})
    f = WeightFetcher(f"tcp://127.0.0.1:{port}", tmp_path / "cache", cfg)
    try:
        with pytest.raises(WeightsError, match="failed 2 times"):
            f.fetch(msg)
        assert f.retries == 1
    finally:
        f.close()


def test_auto_uses_the_shared_path_when_it_holds_the_version(weights, server, fetcher):
    msg = publish(weights, 1)
    assert shared_visible(msg)
    assert local_weights(msg, "auto", fetcher) == (Path(msg.path), "shared")
    assert fetcher.bytes_streamed == 0
    # the same path with other bytes (another run, a stale mount) is not this version
    other = WeightsReady(version=1, path=msg.path, sha256="0" * 64, nbytes=msg.nbytes)
    assert not shared_visible(other)
    moved = WeightsReady(version=1, path="/nonexistent/v1", sha256=msg.sha256, nbytes=msg.nbytes)
    assert not shared_visible(moved)
    local, mode = local_weights(moved, "auto", fetcher)
    assert mode == "stream" and local != Path(msg.path)
    assert_same_dir(Path(msg.path), local)
    with pytest.raises(WeightsError):
        local_weights(moved, "shared", fetcher)
    with pytest.raises(WeightsError, match="no weight stream endpoint"):
        local_weights(moved, "auto", None)
    # visible with the right size and sidecar, but its bytes differ on this node (a stale or damaged
    # copy): the full checksum fails and `auto` streams the learner's own bytes instead
    stale = Path(msg.path).parent.parent / "node-copy" / "v1"
    shutil.copytree(msg.path, stale)
    raw = bytearray((stale / WEIGHTS_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (stale / WEIGHTS_FILE).write_bytes(raw)
    copy = WeightsReady(version=1, path=str(stale), sha256=msg.sha256, nbytes=msg.nbytes)
    assert shared_visible(copy)
    assert local_weights(copy, "auto", fetcher) == (local, "stream")  # the verified cached copy
    with pytest.raises(WeightsError, match="sha256"):
        local_weights(copy, "shared", fetcher)
    # forced streaming ignores a visible path
    assert local_weights(publish(weights, 2, seed=2), "stream", fetcher)[1] == "stream"


def test_auto_streams_when_the_weights_dir_is_hidden_on_this_node(weights, server, tmp_path):
    """The honest "other node": a child in its own mount namespace with an empty tmpfs over the
    learner's weights/ (the path exists, the files do not) picks streaming by itself."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs root and unshare -m")
    msg = publish(weights, 1)
    child = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from popo.common.config import TransportConfig
        from popo.common.messages import WeightsReady
        from popo.common.weight_stream import WeightFetcher, local_weights
        msg = WeightsReady(version=1, path={msg.path!r}, sha256={msg.sha256!r}, nbytes={msg.nbytes})
        assert not Path(msg.path).exists(), "the learner's weights are visible"
        cfg = TransportConfig.model_validate_json({CFG.model_dump_json()!r})
        f = WeightFetcher({server.address!r}, {str(tmp_path / "node-cache")!r}, cfg)
        local, mode = local_weights(msg, "auto", f)
        f.close()
        print(mode, local)
    """)
    (tmp_path / "child.py").write_text(child)
    script = f"mount -t tmpfs tmpfs {weights} && exec {sys.executable} {tmp_path / 'child.py'}"
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    mode, local = out.stdout.split()
    assert mode == "stream" and Path(local) == tmp_path / "node-cache" / "v1"
    assert_same_dir(Path(msg.path), Path(local))  # the parent sees the real weights and the copy


def test_a_broken_local_cache_fails_the_version_not_the_actor(weights, server, fetcher, tmp_path):
    msg = publish(weights, 1)
    shutil.rmtree(tmp_path / "cache")
    (tmp_path / "cache").write_text("not a directory")  # e.g. a full or unusable cache disk
    with pytest.raises(WeightsError, match="weight cache"):
        fetcher.fetch(msg)
    assert fetcher.retries == 0
