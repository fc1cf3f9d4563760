"""Typed ZeroMQ channels for the four endpoints of DESIGN §4.

| endpoint | binder          | connecter       |
| -------- | --------------- | --------------- |
| dispatch | learner ROUTER  | actors DEALER   |
| rollouts | verifier PULL   | actors PUSH     |
| ingest   | learner PULL    | verifier PUSH   |
| weights  | learner PUB     | actors SUB      |

A `Channel` sends and receives `common.messages` structs. A frame that does not decode is logged,
counted in `Channel.dropped` and skipped: it never reaches the role and never kills the process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import zmq

from popo.common.config import TransportConfig
from popo.common.messages import Message, MessageError, decode, encode

log = logging.getLogger(__name__)

Endpoint = Literal["dispatch", "rollouts", "ingest", "weights"]

# (socket type of the side that binds, socket type of the side that connects)
_SOCKET_TYPES: dict[Endpoint, tuple[int, int]] = {
    "dispatch": (zmq.ROUTER, zmq.DEALER),
    "rollouts": (zmq.PULL, zmq.PUSH),
    "ingest": (zmq.PULL, zmq.PUSH),
    "weights": (zmq.PUB, zmq.SUB),
}


def address(
    cfg: TransportConfig, name: Endpoint, host: str | None = None, run_dir: str | Path | None = None
) -> str:
    """The ZeroMQ address of endpoint `name`: tcp://host:port, or ipc://<run_dir>/sockets/<name>.

    A port of 0 becomes `*` (ZeroMQ picks a free port; read it back from `Channel.address`).
    """
    if cfg.scheme == "ipc":
        if run_dir is None:
            raise ValueError("ipc transport needs a run directory for its socket files")
        sock_dir = Path(run_dir).resolve() / "sockets"
        sock_dir.mkdir(parents=True, exist_ok=True)
        return f"ipc://{sock_dir / name}"
    port = getattr(cfg, f"{name}_port")
    return f"tcp://{host or cfg.host}:{port or '*'}"


def rollouts_address(
    cfg: TransportConfig, replica: int = 0, run_dir: str | Path | None = None
) -> str:
    """Where verifier replica `replica` binds its rollouts PULL (actors connect to every replica).

    tcp: `rollouts_port + replica` (port 0 stays 0: a free port each); ipc: `rollouts-<r>` for r > 0.
    """
    if cfg.scheme == "ipc":
        base = address(cfg, "rollouts", run_dir=run_dir)
        return base if replica == 0 else f"{base}-{replica}"
    port = cfg.rollouts_port + replica if cfg.rollouts_port else 0
    return f"tcp://{cfg.host}:{port or '*'}"


class Channel:
    """One typed ZeroMQ socket. Not thread-safe (ZeroMQ sockets never are): one owner thread."""

    def __init__(
        self,
        sock: zmq.Socket,
        name: str,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.sock = sock
        self.name = name
        self.dropped = 0
        self._on_drop = on_drop
        self._router = sock.socket_type == zmq.ROUTER

    @property
    def address(self) -> str:
        """The bound address (with the real port when bound to port 0)."""
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(
        self, msg: object, identity: bytes | None = None, timeout_ms: int | None = None
    ) -> bool:
        """Send one message. With `timeout_ms` (0 = do not wait) returns False instead of blocking
        when the peer's queue is full (high-water mark): the caller applies backpressure."""
        frame = encode(msg)  # type: ignore[arg-type]
        parts = [identity, frame] if self._router else [frame]
        if self._router and identity is None:
            raise ValueError(f"{self.name}: a ROUTER send needs the peer identity")
        if timeout_ms is not None and not self.sock.poll(timeout_ms, zmq.POLLOUT):
            return False
        try:
            self.sock.send_multipart(parts, flags=zmq.NOBLOCK if timeout_ms is not None else 0)
        except zmq.Again:
            return False
        return True

    def recv(self, timeout_ms: int) -> tuple[bytes | None, Message] | None:
        """Wait up to `timeout_ms` for one valid message; returns (peer identity or None, message),
        or None on time-out. Malformed frames are counted, logged and skipped."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(left, zmq.POLLIN):
                return None
            parts = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            identity = parts[0] if self._router else None
            payload = parts[1:] if self._router else parts
            if len(payload) != 1:
                self._drop(f"{len(payload)} frames, expected 1")
                continue
            try:
                return identity, decode(payload[0])
            except MessageError as e:
                self._drop(str(e))

    def _drop(self, why: str) -> None:
        self.dropped += 1
        log.warning("%s: dropped a bad message (%d so far): %s", self.name, self.dropped, why)
        if self._on_drop is not None:
            self._on_drop(why)

    def close(self) -> None:
        self.sock.close()


def _socket(ctx: zmq.Context, kind: int, cfg: TransportConfig) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, cfg.linger_ms)
    sock.setsockopt(zmq.SNDHWM, cfg.hwm)
    sock.setsockopt(zmq.RCVHWM, cfg.hwm)
    if kind == zmq.ROUTER:
        # An unknown identity (actor gone) raises instead of silently dropping the reply.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


def bind(
    ctx: zmq.Context,
    name: Endpoint,
    addr: str,
    cfg: TransportConfig,
    on_drop: Callable[[str], None] | None = None,
) -> Channel:
    """Create the binding side of endpoint `name` at `addr`."""
    sock = _socket(ctx, _SOCKET_TYPES[name][0], cfg)
    sock.bind(addr)
    return Channel(sock, f"{name}@bind", on_drop)


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
    for a in [addrs] if isinstance(addrs, str) else addrs:
        sock.connect(a)
    return Channel(sock, f"{name}@connect", on_drop)
