"""Authenticated transport and safe defaults, over real sockets on loopback.

With CurveZMQ keys every endpoint kind (ROUTER/DEALER, PUSH/PULL, PUB/SUB) serves a peer holding
the right key and gives a peer without it (no Curve, a key of its own, another role's key, another
cluster's keys) nothing in and nothing out. Without keys, wildcard binds are refused unless
explicitly allowed; metrics bind loopback by default.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from popo.common import transport
from popo.common.config import ConfigError, MetricsConfig, TransportConfig, load_config
from popo.common.keys import (
    ROLES,
    KeysError,
    create_keys,
    load_keypair,
    load_public,
    public_path,
    secret_path,
)
from popo.common.messages import (
    LeaseRequest,
    Leases,
    RolloutGroup,
    ScoredGroup,
    WeightsReady,
    encode,
)
from popo.common.metrics import RoleMetrics

ANY = "tcp://127.0.0.1:*"
WAIT_MS = 600  # long enough for a loopback Curve handshake (~ms) and a ZAP round trip


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "cluster"
    create_keys(d)
    return d


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys of another cluster: the same role names, different pairs."""
    d = tmp_path_factory.mktemp("keys") / "other"
    create_keys(d)
    return d


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _cfg(keys_dir: Path | None) -> TransportConfig:
    return TransportConfig(curve_keys_dir=str(keys_dir) if keys_dir else None, linger_ms=0)


def _group(lease_id: int = 1) -> RolloutGroup:
    return RolloutGroup(
        lease_id=lease_id,
        prompt_id="p",
        prompt_token_ids=b"",
        gold="4",
        completions=[],
        version_min=0,
        version_max=0,
        actor_id="actor-0",
        t_leased=0.0,
        t_started=0.0,
        t_finished=0.0,
    )


def _scored(lease_id: int = 1) -> ScoredGroup:
    return ScoredGroup(
        lease_id=lease_id,
        prompt_id="p",
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


def _ready(version: int = 1) -> WeightsReady:
    return WeightsReady(version=version, path=f"/w/v{version}", sha256="0" * 64, nbytes=1)


# --- keys ------------------------------------------------------------------------------------------


def test_keys_files_modes_and_pairs(keys: Path) -> None:
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for role in ROLES:
        assert stat.S_IMODE(secret_path(keys, role).stat().st_mode) == 0o600
        assert stat.S_IMODE(public_path(keys, role).stat().st_mode) == 0o644
        public, secret = load_keypair(keys, role)
        assert load_public(keys, role) == public and zmq.curve_public(secret) == public
        assert b"secret-key" not in public_path(keys, role).read_bytes()
    assert len({load_public(keys, r) for r in ROLES}) == 3
    assert not [p for p in keys.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_keys_never_overwritten_without_force(tmp_path: Path) -> None:
    d = tmp_path / "k"
    create_keys(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(KeysError, match="--force"):
        create_keys(d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    create_keys(d, force=True)
    after = {p.name: p.read_bytes() for p in d.iterdir()}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)


def test_keys_loading_refuses_bad_files(tmp_path: Path) -> None:
    d = tmp_path / "k"
    create_keys(d)
    os.chmod(secret_path(d, "actor"), 0o644)
    with pytest.raises(KeysError, match="readable by others"):
        load_keypair(d, "actor")
    other = tmp_path / "o"
    create_keys(other)
    secret_path(d, "learner").write_bytes(secret_path(other, "learner").read_bytes())
    os.chmod(secret_path(d, "learner"), 0o600)
    with pytest.raises(KeysError, match="does not match"):
        load_keypair(d, "learner")
    secret_path(d, "verifier").unlink()
    with pytest.raises(KeysError, match="no secret key of the verifier role"):
        load_keypair(d, "verifier")


def test_popo_keys_cli(tmp_path: Path) -> None:
    d = tmp_path / "cluster-keys"
    run = [sys.executable, "-m", "popo.deploy.cli", "keys"]
    first = subprocess.run(
        [*run, "--transport.curve_keys_dir", str(d)], capture_output=True, text=True, timeout=60
    )
    assert first.returncode == 0, first.stderr
    assert sorted(Path(p).name for p in first.stdout.split()) == sorted(
        f"{r}.key{s}" for r in ROLES for s in ("", "_secret")
    )
    again = subprocess.run([*run, "--out", str(d)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    forced = subprocess.run(
        [*run, "--out", str(d), "--force"], capture_output=True, text=True, timeout=60
    )
    assert forced.returncode == 0
    none = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert none.returncode == 2 and "--out" in none.stderr


# --- Curve on every endpoint kind -----------------------------------------------------------------


def _peer(
    ctx: zmq.Context, kind: int, name: str, addr: str, how: str, keys: Path, other: Path
) -> zmq.Socket:
    """A raw ZeroMQ client of endpoint `name`. `how`:
    right   - the allowed role's key and the server key (the control: this one must work);
    plain   - no Curve at all;
    own     - a Curve key pair of its own, with the (public) server key of the cluster;
    role    - this cluster's key of a role not allowed here (an actor on ingest, a verifier on
              an actor endpoint);
    cluster - another cluster's keys of the allowed role and server."""
    server_role, allowed = transport._PEERS[name]
    s = ctx.socket(kind)
    s.linger = 0
    if kind != zmq.SUB:  # (a SUB with IMMEDIATE set before subscribing never hears anything)
        s.setsockopt(zmq.IMMEDIATE, 1)
    if how != "plain":
        if how == "own":
            public, secret = zmq.curve_keypair()
        elif how == "role":
            public, secret = load_keypair(keys, "actor" if allowed != "actor" else "verifier")
        else:
            public, secret = load_keypair(other if how == "cluster" else keys, allowed)
        s.curve_publickey, s.curve_secretkey = public, secret
        s.curve_serverkey = load_public(other if how == "cluster" else keys, server_role)
    if kind == zmq.SUB:
        s.subscribe(b"")
    if kind == zmq.DEALER:
        s.identity = b"peer"
    s.connect(addr)
    return s


ROGUES = ["plain", "own", "role", "cluster"]
WHO = ["right", *ROGUES]


@pytest.mark.parametrize("how", WHO)
def test_dispatch_router_dealer(ctx: zmq.Context, keys: Path, other_keys: Path, how: str) -> None:
    cfg = _cfg(keys)
    learner = transport.bind(ctx, "dispatch", ANY, cfg)
    actor = transport.connect(ctx, "dispatch", learner.address, cfg, identity="actor-0")
    peer = _peer(ctx, zmq.DEALER, "dispatch", learner.address, how, keys, other_keys)
    rejected0 = transport.auth_rejections("dispatch")
    # The keyed actor: a request in, a reply out.
    assert actor.send(LeaseRequest(actor_id="actor-0", n=3), timeout_ms=2000)
    rx = learner.recv(timeout_ms=2000)
    assert rx is not None and rx[0] == b"actor-0" and rx[1].n == 3
    assert learner.send(Leases(leases=[], learner_version=7), identity=rx[0], timeout_ms=1000)
    back = actor.recv(timeout_ms=2000)
    assert back is not None and back[1].learner_version == 7
    request = encode(LeaseRequest(actor_id="peer", n=1))
    reply = Leases(leases=[], learner_version=1)
    if how == "right":  # the same raw client with the right key gets through both ways
        assert peer.poll(2000, zmq.POLLOUT)
        peer.send(request)
        rx = learner.recv(timeout_ms=2000)
        assert rx is not None and rx[0] == b"peer"
        assert learner.send(reply, identity=b"peer", timeout_ms=1000)
        assert peer.poll(2000, zmq.POLLIN)
        return
    # Nothing in: the handshake never completes, so the peer cannot even queue a frame.
    assert peer.poll(WAIT_MS, zmq.POLLOUT) == 0
    with pytest.raises(zmq.Again):
        peer.send(request, flags=zmq.NOBLOCK)
    assert learner.recv(timeout_ms=100) is None and learner.dropped == 0
    # Nothing out: the learner cannot route anything to it.
    assert not learner.send(reply, identity=b"peer", timeout_ms=0)
    assert peer.poll(100, zmq.POLLIN) == 0
    if how in ("own", "role"):  # the handshake got as far as the authenticator, which said no
        assert transport.auth_rejections("dispatch") > rejected0
    # ... and every role's Prometheus registry serves the count
    snap = RoleMetrics("learner", MetricsConfig()).snapshot()
    assert snap['popo_auth_rejections_total{endpoint="dispatch"}'] == transport.auth_rejections(
        "dispatch"
    )
    for ch in (learner, actor):
        ch.close()


@pytest.mark.parametrize("name", ["rollouts", "ingest"])
@pytest.mark.parametrize("how", WHO)
def test_push_pull(ctx: zmq.Context, keys: Path, other_keys: Path, name: str, how: str) -> None:
    cfg = _cfg(keys)
    make = _group if name == "rollouts" else _scored
    puller = transport.bind(ctx, name, ANY, cfg)
    pusher = transport.connect(ctx, name, puller.address, cfg)
    peer = _peer(ctx, zmq.PUSH, name, puller.address, how, keys, other_keys)
    assert pusher.send(make(1), timeout_ms=2000)
    rx = puller.recv(timeout_ms=2000)
    assert rx is not None and rx[1] == make(1)
    if how == "right":
        assert peer.poll(2000, zmq.POLLOUT)
        peer.send(encode(make(2)))
        rx = puller.recv(timeout_ms=2000)
        assert rx is not None and rx[1] == make(2)
        return
    # IMMEDIATE: with no completed handshake the peer cannot queue anything; nothing arrives.
    assert peer.poll(WAIT_MS, zmq.POLLOUT) == 0
    with pytest.raises(zmq.Again):
        peer.send(encode(make(2)), flags=zmq.NOBLOCK)
    assert puller.recv(timeout_ms=100) is None and puller.dropped == 0
    for ch in (puller, pusher):
        ch.close()


@pytest.mark.parametrize("how", WHO)
def test_weights_pub_sub(ctx: zmq.Context, keys: Path, other_keys: Path, how: str) -> None:
    cfg = _cfg(keys)
    pub = transport.bind(ctx, "weights", ANY, cfg)
    sub = transport.connect(ctx, "weights", pub.address, cfg)
    peer = _peer(ctx, zmq.SUB, "weights", pub.address, how, keys, other_keys)
    # PUB drops messages for subscribers not joined yet: announce until the right one hears it.
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:
        pub.send(_ready(1), timeout_ms=0)
        got = sub.recv(timeout_ms=50)
    assert got is not None and got[1] == _ready(1)
    for v in range(2, 6):
        pub.send(_ready(v), timeout_ms=0)
    assert [sub.recv(timeout_ms=1000)[1].version for _ in range(4)] == [2, 3, 4, 5]  # type: ignore[index]
    for v in range(6, 9):  # sent after the peer has had every chance to join
        time.sleep(0.1)
        pub.send(_ready(v), timeout_ms=0)
    if how == "right":
        assert peer.poll(1000, zmq.POLLIN)
        return
    assert peer.poll(WAIT_MS, zmq.POLLIN) == 0  # nothing out to the peer
    # Nothing in: a SUB sends only subscriptions (a raw send on it is refused by ZeroMQ itself),
    # and a PUB receives no messages at all.
    with pytest.raises(zmq.ZMQError):
        peer.send(b"x", flags=zmq.NOBLOCK)
    for ch in (pub, sub):
        ch.close()


def test_curve_client_of_plain_server_gets_nothing(ctx: zmq.Context, keys: Path) -> None:
    # The other way round: a keyed actor never talks to an endpoint that is not a Curve server
    # (e.g. an impostor learner without keys on the expected port).
    plain = transport.bind(ctx, "dispatch", ANY, _cfg(None))
    actor = transport.connect(ctx, "dispatch", plain.address, _cfg(keys), identity="actor-0")
    assert not actor.send(LeaseRequest(actor_id="actor-0", n=1), timeout_ms=WAIT_MS)
    assert plain.recv(timeout_ms=WAIT_MS) is None
    impostor = transport.bind(ctx, "weights", ANY, _cfg(None))
    sub = transport.connect(ctx, "weights", impostor.address, _cfg(keys))
    for _ in range(10):
        impostor.send(_ready(9), timeout_ms=0)
        time.sleep(0.03)
    assert sub.recv(timeout_ms=WAIT_MS) is None


def test_every_endpoint_is_keyed() -> None:
    # A new endpoint gets Curve through bind/connect; its roles must be declared, not guessed.
    assert set(transport._SOCKET_TYPES) <= set(transport._PEERS)


def test_missing_key_fails_at_socket_creation(ctx: zmq.Context, tmp_path: Path) -> None:
    d = tmp_path / "k"
    create_keys(d)
    secret_path(d, "learner").unlink()  # an actor node holds no learner secret
    with pytest.raises(KeysError, match="learner"):
        transport.bind(ctx, "dispatch", ANY, _cfg(d))
    actor = transport.connect(ctx, "dispatch", "tcp://127.0.0.1:1", _cfg(d))  # actor key: fine
    actor.close()


def test_context_terminates_after_curve_channels_close(keys: Path) -> None:
    # The ZAP authenticator is stopped with the last Curve server of its context, so a role's
    # ctx.term() does not hang on it.
    c = zmq.Context()
    chans = [
        transport.bind(c, "dispatch", ANY, _cfg(keys)),
        transport.bind(c, "weights", ANY, _cfg(keys)),
    ]
    for ch in chans:
        ch.close()
    done = threading.Event()
    threading.Thread(target=lambda: (c.term(), done.set()), daemon=True).start()
    assert done.wait(5), "context.term() hung on the authenticator"


# --- binds: loopback by default, no open wildcard -------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "::"])
def test_wildcard_transport_host_needs_keys_or_override(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--transport.host", host])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config error: command line: transport.host:")
    assert "allow_insecure_bind" in msg and "curve_keys_dir" in msg
    toml = tmp_path / "c.toml"
    toml.write_text(f'[transport]\nhost = "{host}"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{toml}:2: transport.host: ")):
        load_config(toml)
    assert load_config(toml, ["--transport.curve_keys_dir", str(tmp_path)]).transport.host == host
    assert load_config(toml, ["--transport.allow_insecure_bind", "true"]).transport.host == host


@pytest.mark.parametrize("host", ["10.0.0.5", "192.168.1.20", "fd00::1", "eth0", "node-1.example"])
def test_network_transport_host_needs_keys_or_override(tmp_path: Path, host: str) -> None:
    """A network address (or a name that may resolve to one) is reachable from other machines: the
    same check as `popo ray`'s node IPs refuses it without keys, naming the key and its line."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--transport.host", host])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config error: command line: transport.host: ")
    assert f"bind {host} without CurveZMQ keys" in msg and "allow_insecure_bind" in msg
    toml = tmp_path / "c.toml"
    toml.write_text(f'[transport]\nscheme = "tcp"\nhost = "{host}"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{toml}:3: transport.host: ")):
        load_config(toml)
    assert load_config(toml, ["--transport.curve_keys_dir", str(tmp_path)]).transport.host == host
    assert load_config(toml, ["--transport.allow_insecure_bind", "true"]).transport.host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_transport_host_needs_no_keys(host: str) -> None:
    assert load_config(None, ["--transport.host", host]).transport.host == host


def test_popo_train_refuses_network_bind_without_keys(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "popo.deploy.cli",
            "train",
            "--transport.host=10.0.0.5",
            f"--deploy.run_dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "transport.host" in lines[0], r.stderr
    assert "10.0.0.5 without CurveZMQ keys" in lines[0]
    assert not run_dir.exists()  # refused before anything started


def test_wildcard_metrics_host_needs_override() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.host: '0\.0\.0\.0'.*allow_insecure_bind"):
        load_config(None, ["--metrics.host", "0.0.0.0"])
    # Transport keys do not cover /metrics: the metrics override is its own.
    with pytest.raises(ConfigError, match=r"metrics\.host"):
        load_config(None, ["--metrics.host", "0.0.0.0", "--transport.curve_keys_dir", "/k"])
    cfg = load_config(None, ["--metrics.host", "0.0.0.0", "--metrics.allow_insecure_bind", "true"])
    assert cfg.metrics.host == "0.0.0.0"
    assert load_config(None, ["--metrics.host", "::", "--metrics.enabled", "false"])


def test_wildcard_bind_refused_at_the_socket_too(ctx: zmq.Context) -> None:
    cfg = _cfg(None)
    with pytest.raises(ValueError, match="allow_insecure_bind"):
        transport.bind(ctx, "rollouts", "tcp://0.0.0.0:*", cfg)
    ok = transport.bind(
        ctx, "rollouts", "tcp://0.0.0.0:*", cfg.model_copy(update={"allow_insecure_bind": True})
    )
    ok.close()


def test_popo_cli_rejects_wildcard_bind_with_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "popo.deploy.cli", "config", "--transport.host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "transport.host" in lines[0] and r.stdout == ""


def test_defaults_bind_loopback() -> None:
    t = TransportConfig()
    assert t.host == "127.0.0.1" and t.curve_keys_dir is None and not t.allow_insecure_bind
    for name in ("dispatch", "ingest", "weights"):
        assert transport.address(t, name).startswith("tcp://127.0.0.1:")  # type: ignore[arg-type]
    assert transport.rollouts_address(t, 1).startswith("tcp://127.0.0.1:")
    assert MetricsConfig().host == "127.0.0.1"


def _external_ip() -> str | None:
    """This machine's address on a non-loopback interface, if it has one (UDP connect sends
    nothing; it only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_metrics_endpoint_binds_loopback_by_default(tmp_path: Path) -> None:
    m = RoleMetrics("learner", MetricsConfig(), tmp_path)
    m.counter("security_probe_total", "a probe").inc()
    port = m.serve(0)
    try:
        assert m._server is not None and m._server.server_address[0] == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert (
            f'popo_security_probe_total{{role="learner",run="{tmp_path.name}"}} 1.0'
            in body.decode()
        )
        ip = _external_ip()
        if ip is not None:  # not reachable from another interface
            with pytest.raises(OSError), socket.create_connection((ip, port), timeout=2):
                pass
    finally:
        m.close()
