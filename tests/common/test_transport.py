"""Typed ZeroMQ channels over real sockets: tcp on 127.0.0.1 (port 0) and ipc in a tmp directory."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from popo.common.config import TransportConfig
from popo.common.messages import (
    Chunk,
    FetchRequest,
    LeaseRequest,
    Leases,
    ManifestRequest,
    RolloutGroup,
    ScoredGroup,
    StreamError,
    WeightsReady,
    encode,
    pack_ids,
)
from popo.common.transport import Channel, Endpoint, address, bind, connect, rollouts_address

# linger 0: a test that fails mid-way must not hang in context.term() on unsent messages.
CFG = TransportConfig(
    dispatch_port=0, rollouts_port=0, ingest_port=0, weights_port=0, linger_ms=0, hwm=1000
)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _pair(
    ctx: zmq.Context, name: Endpoint, scheme: str, tmp_path: Path, cfg: TransportConfig = CFG
) -> tuple[Channel, Channel]:
    cfg = cfg.model_copy(update={"scheme": scheme})
    server = bind(ctx, name, address(cfg, name, run_dir=tmp_path), cfg)
    client = connect(
        ctx, name, server.address, cfg, identity="actor-0" if name == "dispatch" else None
    )
    return server, client


def _weights(version: int, probe: bytes = b"") -> WeightsReady:
    return WeightsReady(
        version=version, path=f"/w/v{version}", sha256="0" * 64, nbytes=1, probe_token_ids=probe
    )


def _group(lease_id: int) -> RolloutGroup:
    return RolloutGroup(
        lease_id=lease_id,
        prompt_id=f"p{lease_id}",
        prompt_token_ids=pack_ids([1, 2, 3]),
        gold="4",
        completions=[],
        version_min=0,
        version_max=0,
        actor_id="actor-0",
        t_leased=0.0,
        t_started=0.0,
        t_finished=0.0,
    )


def _scored(lease_id: int) -> ScoredGroup:
    return ScoredGroup(
        lease_id=lease_id,
        prompt_id=f"p{lease_id}",
        prompt_token_ids=b"",
        completions=[],
        forwarded="positives",
        n_total=8,
        n_positive=0,
        verdicts={"negative": 8},
        version_min=0,
        version_max=0,
        actor_id="actor-0",
        t_leased=0.0,
        t_generated=0.0,
        t_verified=0.0,
        verify_seconds=0.0,
    )


def test_addresses(tmp_path: Path) -> None:
    assert address(TransportConfig(), "dispatch") == "tcp://127.0.0.1:5550"
    assert address(CFG, "weights") == "tcp://127.0.0.1:*"
    assert address(TransportConfig(), "ingest", host="10.0.0.2") == "tcp://10.0.0.2:5551"
    assert rollouts_address(TransportConfig(), 2) == "tcp://127.0.0.1:5562"
    ipc = TransportConfig(scheme="ipc")
    assert (
        address(ipc, "rollouts", run_dir=tmp_path) == f"ipc://{tmp_path.resolve()}/sockets/rollouts"
    )
    assert (tmp_path / "sockets").is_dir()
    with pytest.raises(ValueError, match="run directory"):
        address(ipc, "rollouts")


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_dispatch_router_replies_by_identity(ctx: zmq.Context, tmp_path: Path, scheme: str) -> None:
    learner, actor0 = _pair(ctx, "dispatch", scheme, tmp_path)
    if scheme == "tcp":
        assert learner.address.startswith("tcp://127.0.0.1:") and not learner.address.endswith(":0")
    actor1 = connect(ctx, "dispatch", learner.address, CFG, identity="actor-1")
    assert actor0.send(LeaseRequest(actor_id="actor-0", n=2), timeout_ms=1000)
    assert actor1.send(LeaseRequest(actor_id="actor-1", n=5), timeout_ms=1000)
    got = {}
    for _ in range(2):
        rx = learner.recv(timeout_ms=2000)
        assert rx is not None
        identity, msg = rx
        assert isinstance(msg, LeaseRequest)
        got[identity] = msg
    assert {k: v.n for k, v in got.items()} == {b"actor-0": 2, b"actor-1": 5}
    # Each reply reaches only the actor whose identity it names.
    assert learner.send(Leases(leases=[], learner_version=1), identity=b"actor-1", timeout_ms=1000)
    assert learner.send(Leases(leases=[], learner_version=0), identity=b"actor-0", timeout_ms=1000)
    rx0, rx1 = actor0.recv(timeout_ms=2000), actor1.recv(timeout_ms=2000)
    assert rx0 is not None and rx1 is not None
    assert rx0[0] is None and isinstance(rx0[1], Leases) and rx0[1].learner_version == 0
    assert isinstance(rx1[1], Leases) and rx1[1].learner_version == 1
    assert actor0.recv(timeout_ms=50) is None
    with pytest.raises(ValueError, match="identity"):
        learner.send(Leases(leases=[], learner_version=0))
    # ROUTER_MANDATORY: a reply to an actor that is gone is reported and counted, not silently lost,
    # and never raises (a peer that asks and vanishes must not take the learner down).
    assert not learner.send(Leases(leases=[], learner_version=0), identity=b"ghost", timeout_ms=100)
    assert learner.unroutable == 1


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
@pytest.mark.parametrize(
    ("name", "make"), [("rollouts", _group), ("ingest", _scored)], ids=["rollouts", "ingest"]
)
def test_push_pull_delivers_in_order(
    ctx: zmq.Context, tmp_path: Path, scheme: str, name: Endpoint, make
) -> None:
    puller, pusher = _pair(ctx, name, scheme, tmp_path)
    assert puller.sock.socket_type == zmq.PULL and pusher.sock.socket_type == zmq.PUSH
    for i in range(20):
        assert pusher.send(make(i), timeout_ms=2000)
    received = []
    for _ in range(20):
        rx = puller.recv(timeout_ms=2000)
        assert rx is not None and rx[0] is None
        received.append(rx[1])
    assert received == [make(i) for i in range(20)]
    assert puller.dropped == 0


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_pub_sub_reaches_every_subscriber(ctx: zmq.Context, tmp_path: Path, scheme: str) -> None:
    learner, actor0 = _pair(ctx, "weights", scheme, tmp_path)
    actor1 = connect(ctx, "weights", learner.address, CFG)
    # Slow joiner: PUB drops what it sends before a peer's subscription arrives, and a SUB sends
    # its subscription only once its owner thread touches the socket (an actor's loop polls it).
    for actor in (actor0, actor1):
        assert actor.recv(timeout_ms=100) is None
    time.sleep(0.2)
    assert learner.send(_weights(1), timeout_ms=1000)
    for actor in (actor0, actor1):
        rx = actor.recv(timeout_ms=2000)
        assert rx is not None and rx[1] == _weights(1)


def test_recv_timeout_returns_none(ctx: zmq.Context, tmp_path: Path) -> None:
    puller, _ = _pair(ctx, "rollouts", "tcp", tmp_path)
    t0 = time.monotonic()
    assert puller.recv(timeout_ms=200) is None
    elapsed = time.monotonic() - t0
    assert 0.15 <= elapsed < 1.0, elapsed
    assert puller.recv(timeout_ms=0) is None


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_garbage_is_counted_and_dropped(ctx: zmq.Context, tmp_path: Path, scheme: str) -> None:
    cfg = CFG.model_copy(update={"scheme": scheme})
    why: list[str] = []
    puller = bind(ctx, "ingest", address(cfg, "ingest", run_dir=tmp_path), cfg, on_drop=why.append)
    raw = ctx.socket(zmq.PUSH)  # a peer that speaks ZeroMQ but not our schema
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(puller.address)
    raw.send(b"\xc1 definitely not msgpack")
    raw.send_multipart([encode(_scored(1)), b"extra"])  # two frames where one is expected
    raw.send(encode(msgspec.structs.replace(_weights(1), v=2)))  # a newer sender's schema
    raw.send(encode(_scored(2)))
    rx = puller.recv(timeout_ms=2000)
    assert rx is not None and rx[1] == _scored(2)
    assert puller.dropped == 3
    assert len(why) == 3 and "2 frames" in why[1] and "schema version" in why[2]
    raw.close()


def test_dealer_garbage_does_not_reach_the_router_role(ctx: zmq.Context, tmp_path: Path) -> None:
    learner, actor = _pair(ctx, "dispatch", "tcp", tmp_path)
    actor.sock.send(b"garbage")
    assert actor.send(LeaseRequest(actor_id="actor-0", n=1), timeout_ms=1000)
    rx = learner.recv(timeout_ms=2000)
    assert rx is not None and rx[0] == b"actor-0" and isinstance(rx[1], LeaseRequest)
    assert learner.dropped == 1


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_send_reports_backpressure(ctx: zmq.Context, tmp_path: Path, scheme: str) -> None:
    # Tiny high-water marks and a reader that never reads: once ZeroMQ's queues and the kernel's
    # socket buffers are full, a send with a timeout must give up and say so.
    cfg = CFG.model_copy(update={"hwm": 2})
    puller, pusher = _pair(ctx, "rollouts", scheme, tmp_path, cfg)
    # big frames fill kernel buffers in a few sends
    msg = msgspec.structs.replace(_group(0), prompt_token_ids=b"\x00" * 65_536)
    assert pusher.send(msg, timeout_ms=2000)
    assert puller.recv(timeout_ms=2000) is not None  # connected end to end
    sent = 0
    t0 = time.monotonic()
    while pusher.send(msg, timeout_ms=100):
        sent += 1
        assert sent < 10_000, "send never reported a full queue"
    assert time.monotonic() - t0 < 30
    # Once the reader drains, the writer can send again.
    for _ in range(sent):
        assert puller.recv(timeout_ms=2000) is not None
    assert pusher.send(msg, timeout_ms=2000)


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_push_with_no_peer_does_not_block(ctx: zmq.Context, tmp_path: Path, scheme: str) -> None:
    # Nobody listens at the address: with IMMEDIATE the PUSH queues nothing and reports would-block.
    if scheme == "tcp":
        with socket.socket() as s:  # a port that was free a moment ago (closed synchronously)
            s.bind(("127.0.0.1", 0))
            addr = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    else:
        addr = f"ipc://{tmp_path}/nobody"
    pusher = connect(ctx, "rollouts", addr, CFG)
    t0 = time.monotonic()
    assert pusher.send(_group(1), timeout_ms=200) is False
    assert pusher.send(_group(1), timeout_ms=0) is False
    assert time.monotonic() - t0 < 2.0
    # A peer that binds later is picked up by ZeroMQ's reconnect, without a retry loop.
    puller = bind(ctx, "rollouts", addr, CFG)
    assert pusher.send(_group(2), timeout_ms=5000)
    rx = puller.recv(timeout_ms=2000)
    assert rx is not None and rx[1] == _group(2)


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_data_frames_travel_beside_their_message(
    ctx: zmq.Context, tmp_path: Path, scheme: str
) -> None:
    cfg = CFG.model_copy(update={"weightstream_port": 0})
    server, client = _pair(ctx, "weightstream", scheme, tmp_path, cfg)
    assert client.send(FetchRequest(version=1, file="f", offset=0, length=3), timeout_ms=1000)
    rx = server.recv_data(timeout_ms=2000)
    assert rx is not None
    ident, req, data = rx
    assert isinstance(req, FetchRequest) and data == []
    payload = bytearray(b"\x00\x01\xff" * 1000)
    chunk = Chunk(version=1, file="f", offset=0, nbytes=len(payload), eof=True)
    assert server.send(chunk, ident, timeout_ms=0, data=[memoryview(payload)])
    assert server.send(StreamError(version=1, reason="gone"), ident, timeout_ms=0)
    got = client.recv_data(timeout_ms=2000)
    assert got is not None and got[1] == chunk and len(got[2]) == 1
    assert bytes(got[2][0]) == bytes(payload)
    got = client.recv(timeout_ms=2000)  # a message without data frames through plain recv
    assert got is not None and isinstance(got[1], StreamError)
    assert client.dropped == server.dropped == 0
    # a Chunk must carry its bytes, and only a Chunk carries any
    with pytest.raises(ValueError, match="carries 1 data frame"):
        server.send(chunk, ident, timeout_ms=0)
    with pytest.raises(ValueError, match="carries 0 data frame"):
        server.send(StreamError(version=1, reason="x"), ident, timeout_ms=0, data=[b"x"])


def test_data_frames_are_counted_like_any_bad_frame(ctx: zmq.Context, tmp_path: Path) -> None:
    cfg = CFG.model_copy(update={"weightstream_port": 0})
    why: list[str] = []
    server = bind(ctx, "weightstream", "tcp://127.0.0.1:*", cfg)
    client = connect(ctx, "weightstream", server.address, cfg, on_drop=why.append)
    assert client.send(ManifestRequest(version=1), timeout_ms=1000)
    rx = server.recv(timeout_ms=2000)
    assert rx is not None
    ident = rx[0]
    chunk = Chunk(version=1, file="f", offset=0, nbytes=2, eof=True)
    # written past the channel, as a broken or hostile server would
    server.sock.send_multipart([ident, encode(chunk)])  # a chunk without its bytes
    server.sock.send_multipart([ident, encode(StreamError(version=1, reason="x")), b"extra"])
    server.sock.send_multipart([ident, encode(ManifestRequest(version=1))])  # never a reply
    server.sock.send_multipart([ident, encode(chunk), b"ok"])
    got = client.recv_data(timeout_ms=2000)
    assert got is not None and got[1] == chunk and bytes(got[2][0]) == b"ok"
    assert client.dropped == 3 and len(why) == 3
    assert "Chunk in 1 frames" in why[0] and "StreamError in 2 frames" in why[1]
    assert "unexpected ManifestRequest" in why[2]
