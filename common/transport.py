"""Typed ZeroMQ channels for the endpoints of docs/architecture.md, Message contracts.

| endpoint | binder          | connecter       |
| -------- | --------------- | --------------- |
| dispatch | learner ROUTER  | actors DEALER   |
| rollouts | verifier PULL   | actors PUSH     |
| ingest   | learner PULL    | verifier PUSH   |
| weights  | learner PUB     | actors SUB      |
| weightstream | learner ROUTER | actors DEALER (weight bytes without a shared filesystem) |

A `Channel` sends and receives `common.messages` structs, one frame each; a message of a type that
carries bulk bytes (a weight `Chunk`) is followed by its binary frames, sent and received without a
copy (`_DATA_FRAMES`). A frame that does not decode, a message of a type its side of the endpoint
never receives, one whose content cannot be right (`messages.check`) or one with the wrong number
of frames is logged, counted in `Channel.dropped` and skipped: it never reaches the role and never
kills the process.

Security. With `transport.curve_keys_dir` set, `bind` makes every bound socket a CurveZMQ server
(the binding role's key pair, `common.keys`) whose clients a ZAP authenticator checks against the
one role kind allowed to connect to that endpoint, and `connect` makes every connecting socket a
Curve client of the binding role's public key. A peer without the right key completes no handshake:
nothing it sends is delivered and nothing reaches it. `bind` and `connect` are the only places
sockets are made, so this holds for every endpoint. Without keys, a wildcard bind (`*`, `0.0.0.0`,
`::`) is refused unless `transport.allow_insecure_bind` is set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import zmq

from popo.common import keys as curve_keys
from popo.common.config import TransportConfig, unauthenticated_bind
from popo.common.messages import (
    Chunk,
    FetchRequest,
    LeaseRequest,
    Leases,
    Manifest,
    ManifestRequest,
    Message,
    MessageError,
    RolloutGroup,
    ScoredGroup,
    StreamError,
    WeightsReady,
    check,
    decode,
    encode,
)
from popo.common.run_dir import RunDir

log = logging.getLogger(__name__)

Endpoint = Literal["dispatch", "rollouts", "ingest", "weights", "weightstream"]

# (socket type of the side that binds, socket type of the side that connects)
_SOCKET_TYPES: dict[Endpoint, tuple[int, int]] = {
    "dispatch": (zmq.ROUTER, zmq.DEALER),
    "rollouts": (zmq.PULL, zmq.PUSH),
    "ingest": (zmq.PULL, zmq.PUSH),
    "weights": (zmq.PUB, zmq.SUB),
    "weightstream": (zmq.ROUTER, zmq.DEALER),
}

# (role kind that binds, role kind allowed to connect): whose Curve keys each side uses.
# An endpoint missing here is learner-bound and actor-connected.
_PEERS: dict[str, tuple[curve_keys.Role, curve_keys.Role]] = {
    "dispatch": ("learner", "actor"),
    "rollouts": ("verifier", "actor"),
    "ingest": ("learner", "verifier"),
    "weights": ("learner", "actor"),
    "weightstream": ("learner", "actor"),
}

# (types the binding side receives, types the connecting side receives); anything else is a
# drop. An endpoint missing here accepts every message type.
_ACCEPTS: dict[str, tuple[tuple[type, ...], tuple[type, ...]]] = {
    "dispatch": ((LeaseRequest,), (Leases,)),
    "rollouts": ((RolloutGroup,), ()),
    "ingest": ((ScoredGroup,), ()),
    "weights": ((), (WeightsReady,)),
    "weightstream": ((ManifestRequest, FetchRequest), (Manifest, Chunk, StreamError)),
}


# Binary frames that follow a message of these types on the wire (a chunk's bytes beside its msgpack
# header); every other message is one frame.
_DATA_FRAMES: dict[type, int] = {Chunk: 1}

Buffer = bytes | bytearray | memoryview
"""A binary frame: anything ZeroMQ sends without a copy."""


def address(
    cfg: TransportConfig, name: Endpoint, host: str | None = None, run_dir: str | Path | None = None
) -> str:
    """The ZeroMQ address of endpoint `name`: tcp://host:port, or ipc://<run_dir>/sockets/<name>.

    A port of 0 becomes `*` (ZeroMQ picks a free port; read it back from `Channel.address`).
    """
    if cfg.scheme == "ipc":
        if run_dir is None:
            raise ValueError("ipc transport needs a run directory for its socket files")
        sock_dir = RunDir(Path(run_dir).resolve()).sockets
        sock_dir.mkdir(parents=True, exist_ok=True)
        return f"ipc://{sock_dir / name}"
    port = getattr(cfg, f"{name}_port")
    return f"tcp://{host or cfg.host}:{port or '*'}"


def rollouts_address(
    cfg: TransportConfig,
    replica: int = 0,
    run_dir: str | Path | None = None,
    host: str | None = None,
) -> str:
    """Where verifier replica `replica` binds its rollouts PULL (actors connect to every replica).

    tcp: `rollouts_port + replica` (port 0 stays 0: a free port each); ipc: `rollouts-<r>` for r > 0.
    """
    if cfg.scheme == "ipc":
        base = address(cfg, "rollouts", run_dir=run_dir)
        return base if replica == 0 else f"{base}-{replica}"
    port = cfg.rollouts_port + replica if cfg.rollouts_port else 0
    return f"tcp://{host or cfg.host}:{port or '*'}"


def learner_address(cfg: TransportConfig, name: Endpoint, run_dir: str | Path | None = None) -> str:
    """Where a peer connects to the learner's endpoint `name`: `learner_host` when a launcher
    (`popo ray`) placed the learner on another node, else `host`."""
    return address(cfg, name, host=cfg.learner_host, run_dir=run_dir)


def verifier_address(
    cfg: TransportConfig, replica: int = 0, run_dir: str | Path | None = None
) -> str:
    """Where an actor connects to verifier replica `replica`'s rollouts endpoint."""
    hosts = cfg.verifier_hosts
    return rollouts_address(cfg, replica, run_dir, hosts[replica] if replica < len(hosts) else None)


class Channel:
    """One typed ZeroMQ socket. Not thread-safe (ZeroMQ sockets never are): one owner thread."""

    def __init__(
        self,
        sock: zmq.Socket,
        name: str,
        on_drop: Callable[[str], None] | None = None,
        accepts: tuple[type, ...] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.name = name
        self.dropped = 0
        self.unroutable = 0
        """ROUTER replies to a peer that is gone (dropped, not raised)."""
        self._on_drop = on_drop
        self._accepts = accepts
        self._on_close = on_close
        self._router = sock.socket_type == zmq.ROUTER

    @property
    def address(self) -> str:
        """The bound address (with the real port when bound to port 0)."""
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(
        self,
        msg: object,
        identity: bytes | None = None,
        timeout_ms: int | None = None,
        data: Sequence[Buffer] = (),
    ) -> bool:
        """Send one message. With `timeout_ms` (0 = do not wait) returns False instead of blocking
        when the peer's queue is full (high-water mark): the caller applies backpressure.

        `data`: the binary frames that follow a message of a type that carries them (a `Chunk`:
        one), sent from the caller's buffers without a copy; they must stay unchanged until sent.
        """
        want = _DATA_FRAMES.get(type(msg), 0)
        if len(data) != want:
            raise ValueError(f"{self.name}: {type(msg).__name__} carries {want} data frame(s)")
        frame = encode(msg)  # type: ignore[arg-type]
        parts = [identity, frame, *data] if self._router else [frame, *data]
        if self._router and identity is None:
            raise ValueError(f"{self.name}: a ROUTER send needs the peer identity")
        if timeout_ms is not None and not self.sock.poll(timeout_ms, zmq.POLLOUT):
            return False
        try:
            self.sock.send_multipart(
                parts, flags=zmq.NOBLOCK if timeout_ms is not None else 0, copy=not data
            )
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            # ROUTER_MANDATORY: the peer is gone (an actor died after asking, or a stray peer
            # sent and left). Its leases expire and are re-dispatched; the learner lives on.
            self.unroutable += 1
            log.warning("%s: reply to a peer that is gone (%d so far)", self.name, self.unroutable)
            return False
        return True

    def recv(self, timeout_ms: int) -> tuple[bytes | None, Message] | None:
        """Wait up to `timeout_ms` for one valid message; returns (peer identity or None, message),
        or None on time-out. Malformed frames, messages of a type this side never receives and
        messages that fail `messages.check` are counted, logged and skipped. For messages with
        data frames, see `recv_data`."""
        got = self._recv(timeout_ms, copy=True)
        return None if got is None else (got[0], got[1])

    def recv_data(self, timeout_ms: int) -> tuple[bytes | None, Message, list[memoryview]] | None:
        """`recv` that also returns the message's data frames (`send(data=...)`; [] for a message
        without), as views of ZeroMQ's buffers, not copies. The same checks apply, and a message
        with a number of frames its type does not carry is dropped."""
        return self._recv(timeout_ms, copy=False)

    def _recv(
        self, timeout_ms: int, copy: bool
    ) -> tuple[bytes | None, Message, list[memoryview]] | None:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(left, zmq.POLLIN):
                return None
            parts: list = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=copy)
            head = 2 if self._router else 1  # [identity,] message
            if not copy:  # the message frame is small and copied; data frames stay in place
                parts = [p.bytes for p in parts[:head]] + [p.buffer for p in parts[head:]]
            identity = parts[0] if self._router else None
            payload = parts[head - 1 :]
            if not payload:
                self._drop("0 frames, expected 1")
                continue
            try:
                msg = decode(payload[0])
                check(msg)
            except MessageError as e:
                self._drop(str(e))
                continue
            if self._accepts is not None and not isinstance(msg, self._accepts):
                self._drop(f"unexpected {type(msg).__name__}")
                continue
            want = 1 + _DATA_FRAMES.get(type(msg), 0)
            if len(payload) != want:
                self._drop(f"{type(msg).__name__} in {len(payload)} frames, expected {want}")
                continue
            return identity, msg, [memoryview(p) for p in payload[1:]]

    def _drop(self, why: str) -> None:
        self.dropped += 1
        log.warning("%s: dropped a bad message (%d so far): %s", self.name, self.dropped, why)
        if self._on_drop is not None:
            self._on_drop(why)

    def close(self) -> None:
        if not self.sock.closed:
            self.sock.close()
            if self._on_close is not None:
                self._on_close()


def _socket(ctx: zmq.Context, kind: int, cfg: TransportConfig) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, cfg.linger_ms)
    sock.setsockopt(zmq.SNDHWM, cfg.hwm)
    sock.setsockopt(zmq.RCVHWM, cfg.hwm)
    if kind == zmq.ROUTER:
        # A reply to an unknown identity (actor gone) is reported by send(), not silently lost.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


def bind(
    ctx: zmq.Context,
    name: Endpoint,
    addr: str,
    cfg: TransportConfig,
    on_drop: Callable[[str], None] | None = None,
) -> Channel:
    """Create the binding side of endpoint `name` at `addr`: a Curve server when
    `cfg.curve_keys_dir` is set. Refuses a network (non-loopback) host without keys unless
    `cfg.allow_insecure_bind`, as the config does."""
    host = _tcp_host(addr)
    if host is not None and (why := unauthenticated_bind(cfg, [host])) is not None:
        raise ValueError(f"{name}: {why}")
    sock = _socket(ctx, _SOCKET_TYPES[name][0], cfg)
    release: Callable[[], None] | None = None
    try:
        if cfg.curve_keys_dir:
            release = _curve_server(ctx, sock, name, cfg.curve_keys_dir)
        sock.bind(addr)
    except BaseException:
        sock.close(linger=0)
        if release is not None:
            release()
        raise
    with _zap_lock:  # the rejection counter's series exists, at 0, for every bound endpoint
        _zap_rejected.setdefault(name, 0)
    return Channel(sock, f"{name}@bind", on_drop, _ACCEPTS.get(name, (None, None))[0], release)


def connect(
    ctx: zmq.Context,
    name: Endpoint,
    addrs: str | list[str],
    cfg: TransportConfig,
    on_drop: Callable[[str], None] | None = None,
    identity: str | None = None,
) -> Channel:
    """Create the connecting side of endpoint `name`. Several addresses spread messages across
    peers (PUSH round-robins, e.g. over verifier replicas). ZeroMQ reconnects by itself, so a peer
    that starts later is picked up without a retry loop here."""
    sock = _socket(ctx, _SOCKET_TYPES[name][1], cfg)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    if sock.socket_type == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    # Queue nothing for a peer that is not connected yet: a PUSH with no peer then blocks (or
    # reports would-block), which is the backpressure the actor relies on.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if cfg.curve_keys_dir:
        try:
            _curve_client(sock, name, cfg.curve_keys_dir)
        except BaseException:
            sock.close(linger=0)
            raise
    for a in [addrs] if isinstance(addrs, str) else addrs:
        sock.connect(a)
    return Channel(sock, f"{name}@connect", on_drop, _ACCEPTS.get(name, (None, None))[1])


def _tcp_host(addr: str) -> str | None:
    """The host of a tcp:// address (`tcp://[::]:5550` -> `[::]`); None for other transports."""
    if not addr.startswith("tcp://"):
        return None
    return addr[len("tcp://") :].rsplit(":", 1)[0]


# --- CurveZMQ ------------------------------------------------------------------------------------


def _curve_client(sock: zmq.Socket, name: str, keys_dir: str) -> None:
    binder, client = _PEERS.get(name, ("learner", "actor"))
    public, secret = curve_keys.load_keypair(keys_dir, client)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = curve_keys.load_public(keys_dir, binder)


def _curve_server(
    ctx: zmq.Context, sock: zmq.Socket, name: str, keys_dir: str
) -> Callable[[], None]:
    """Make `sock` a Curve server with the binding role's keys, allow the connecting role's public
    key in ZAP domain `name`; returns the release to call when the socket closes."""
    binder, client = _PEERS.get(name, ("learner", "actor"))
    public, secret = curve_keys.load_keypair(keys_dir, binder)
    allowed = curve_keys.load_public(keys_dir, client)
    release = _zap_allow(ctx, name, allowed)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = name.encode()
    return release


class _AllowedKeys:
    """ZAP credentials provider: the client public keys (Z85) allowed per domain (= endpoint)."""

    def __init__(self) -> None:
        self.keys: dict[str, set[bytes]] = {}
        self.rejected: dict[str, int] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys.get(domain, ())
        if not ok:
            self.rejected[domain] = self.rejected.get(domain, 0) + 1
            log.warning("%s: refused a Curve client with an unknown key", domain)
        return ok


class _Zap:
    """One ZAP authenticator per ZeroMQ context (ZeroMQ routes every handshake of a context to
    inproc://zeromq.zap.01), shared by the Curve servers bound in it and stopped with the last
    one, so `ctx.term()` never waits on it."""

    def __init__(self, ctx: zmq.Context) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.allowed = _AllowedKeys()
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
        self.auth.start()
        self.users = 0


_zap_lock = threading.Lock()
_zaps: dict[int, _Zap] = {}
"""id(context) -> its authenticator, while a Curve server of that context is open."""
_zap_rejected: dict[str, int] = {}
"""Handshakes refused per endpoint, over this process' life (authenticators come and go)."""


def _zap_allow(ctx: zmq.Context, domain: str, key: bytes) -> Callable[[], None]:
    with _zap_lock:
        zap = _zaps.get(id(ctx))
        if zap is None:
            zap = _zaps[id(ctx)] = _Zap(ctx)
            zap.allowed.rejected = _zap_rejected
        if domain not in zap.allowed.keys:
            zap.auth.configure_curve_callback(domain, zap.allowed)
        zap.allowed.keys.setdefault(domain, set()).add(key)
        zap.users += 1

    def release() -> None:
        with _zap_lock:
            zap.users -= 1
            if zap.users == 0:
                zap.auth.stop()
                _zaps.pop(id(ctx), None)

    return release


def auth_rejections(name: str | None = None) -> int:
    """Curve handshakes this process refused (an unknown client key), for endpoint `name` or all.
    A client with no Curve at all fails the handshake before ZAP and is not counted here."""
    with _zap_lock:
        return _zap_rejected.get(name, 0) if name else sum(_zap_rejected.values())


def auth_rejections_by_endpoint() -> dict[str, int]:
    """Endpoint -> Curve handshakes refused there (every endpoint this process bound, 0 included:
    without keys nothing is ever refused)."""
    with _zap_lock:
        return dict(_zap_rejected)
