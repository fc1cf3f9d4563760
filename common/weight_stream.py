"""Weight versions without a shared filesystem (DESIGN §3): chunked streaming over ZeroMQ.

    learner [WeightServer thread, ROUTER] <-- ManifestRequest / FetchRequest -- [DEALER] actor
                                          --- Manifest / Chunk / StreamError -->   WeightFetcher

The learner announces a version with `WeightsReady(path, sha256, nbytes)`. An actor whose node sees
that path with the announced bytes reads it directly (`shared`); otherwise it asks the learner's
`WeightServer` for the version's manifest (every file with its size and sha256) and fetches each
file in chunks into a node-local cache, writing through a temporary directory that is fsynced and
renamed into place, so the reload only ever sees a complete, verified version.

Flow control is credit-based: the fetcher keeps `stream_window` chunk requests in flight and the
server answers each with exactly one chunk, so the link stays busy (no stop-and-wait) while the
learner's send queue per actor never holds more than window x chunk bytes. A chunk's bytes travel
as a second ZeroMQ frame beside the msgpack `Chunk` header, sent and received without a copy, and
the fetcher writes and hashes them on helper threads while the next chunks arrive (throughput
against a raw ZeroMQ transfer: BENCHMARKS.md, `weight_stream_bench`). The server thread only
reads finished, immutable version directories and serves only the plain files listed in a version's
manifest (no path reaches the filesystem from the wire). A corrupt, short or timed-out transfer is
retried from scratch; a version the learner has pruned is a clean `StreamError`, not a retry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Literal

import zmq

from popo.common import transport
from popo.common.config import TransportConfig
from popo.common.messages import (
    Chunk,
    FetchRequest,
    Manifest,
    ManifestRequest,
    MessageError,
    StreamError,
    StreamFile,
    WeightsReady,
    check,
    decode,
    encode,
)
from popo.common.weights import WEIGHTS_FILE, WeightsError, fsync_dir, sha256_file, verify_weights

log = logging.getLogger(__name__)

_VERSION = re.compile(r"^v(\d+)$")
_MAX_FDS = 8
"""Open files the server keeps (a version being streamed to several actors is read once per
chunk, not reopened)."""


def shared_visible(msg: WeightsReady) -> bool:
    """Whether the announced path holds this very version on this node: the directory exists, its
    model.safetensors has the announced size and its `.sha256` sidecar names the announced digest.

    A cheap probe (two stats and a 65-byte read); the caller still verifies the full sha256. A node
    that mounts another run's weights at the same path fails it (another digest)."""
    d = Path(msg.path)
    try:
        if (d / WEIGHTS_FILE).stat().st_size != msg.nbytes:
            return False
        return (d / f"{WEIGHTS_FILE}.sha256").read_text().strip() == msg.sha256
    except OSError:
        return False


# --- learner side ----------------------------------------------------------------------------------


class WeightServer(threading.Thread):
    """Serves `weights_root/v{N}/*` over the `weightstream` ROUTER from a background thread.

    `start()` binds (a bind error is raised there, in the caller); `stop()` ends the thread. The
    thread catches nothing but per-request I/O errors, which become `StreamError` replies; anything
    else ends it and is kept in `error` for the owner to raise.
    """

    def __init__(
        self,
        weights_root: str | Path,
        addr: str,
        cfg: TransportConfig,
        ctx: zmq.Context | None = None,
        max_chunk_bytes: int = 64 << 20,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name="weight-server", daemon=True)
        self.root = Path(weights_root)
        self.addr = addr
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.max_chunk_bytes = max_chunk_bytes
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.address = ""
        """The bound address (real port when configured 0), once `start()` returned."""
        self.bytes_sent = 0
        self.requests = 0
        self.dropped = 0
        """Malformed, unexpected or invalid frames dropped (counted by the Channel)."""
        self._on_drop = on_drop
        self._manifests: dict[int, dict[str, StreamFile]] = {}
        self._fds: OrderedDict[tuple[int, str], int] = OrderedDict()

    def start(self) -> None:
        super().start()
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        try:
            ch = transport.bind(self.ctx, "weightstream", self.addr, self.cfg, self._dropped)
        except BaseException as e:
            self.error = e
            self.ready.set()
            return
        self.address = ch.address
        self.ready.set()
        try:
            while not self.stop_event.is_set():
                got = ch.recv(min(self.cfg.recv_timeout_ms, 200))
                if got is None:
                    continue
                ident, msg = got
                reply, data = self.handle(msg)
                frames = [ident, encode(reply)] + ([data] if data is not None else [])
                try:
                    # Never block on one actor: under the credit scheme its queue has room, and an
                    # actor that breaks it (or left) loses this reply and times out.
                    ch.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    log.warning("weight server: peer %r not ready, reply dropped", ident)
                    continue
                except zmq.ZMQError as e:  # ROUTER_MANDATORY: the peer disconnected
                    log.info("weight server: peer %r gone (%s)", ident, e)
                    continue
                if data is not None:
                    self.bytes_sent += len(data)
        except BaseException as e:
            self.error = e
            log.exception("weight server failed")
        finally:
            ch.close()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _dropped(self, why: str) -> None:
        self.dropped += 1
        if self._on_drop is not None:
            self._on_drop(why)

    def handle(self, msg: object) -> tuple[Manifest | Chunk | StreamError, bytes | None]:
        """One request -> one reply, and a chunk's bytes (its second frame) or None."""
        self.requests += 1
        if isinstance(msg, ManifestRequest):
            files = self._manifest(msg.version)
            if files is None:
                return StreamError(version=msg.version, reason=self._gone(msg.version)), None
            return Manifest(version=msg.version, files=list(files.values())), None
        if isinstance(msg, FetchRequest):
            return self._chunk(msg)
        return StreamError(version=-1, reason=f"unexpected {type(msg).__name__}"), None

    def _gone(self, version: int) -> str:
        return f"version {version} is not available (pruned or never published)"

    def _manifest(self, version: int) -> dict[str, StreamFile] | None:
        """Plain files of `v{version}` (no links, no hidden files, no subdirectories), or None when
        the version directory does not exist (pruned). Cached: a published version is immutable."""
        vdir = self.root / f"v{version}"
        if version < 0 or not vdir.is_dir():
            self._manifests.pop(version, None)
            self._close_version(version)
            return None
        if version in self._manifests:
            return self._manifests[version]
        files: dict[str, StreamFile] = {}
        for p in sorted(vdir.iterdir()):
            st = p.lstat()
            if p.name.startswith(".") or not p.is_file() or p.is_symlink():
                continue
            sidecar = vdir / f"{p.name}.sha256"
            # The learner already hashed the weights file when it published it: reuse that.
            digest = sidecar.read_text().strip() if sidecar.is_file() else sha256_file(p)
            files[p.name] = StreamFile(name=p.name, size=st.st_size, sha256=digest)
        self._manifests[version] = files
        for old in [v for v in self._manifests if not (self.root / f"v{v}").is_dir()]:
            del self._manifests[old]
            self._close_version(old)
        return files

    def _chunk(self, req: FetchRequest) -> tuple[Chunk | StreamError, bytes | None]:
        def err(reason: str) -> tuple[StreamError, None]:
            return StreamError(version=req.version, file=req.file, reason=reason), None

        files = self._manifest(req.version)
        if files is None:
            return err(self._gone(req.version))
        # Only names listed in the manifest are served: "../x", "/etc/passwd", "a/b" never match.
        entry = files.get(req.file)
        if entry is None:
            return err(f"{req.file!r} is not a file of version {req.version}")
        if req.offset < 0 or req.length <= 0 or req.offset > entry.size:
            return err(f"bad range offset={req.offset} length={req.length} of {entry.size}")
        if req.length > self.max_chunk_bytes:
            return err(f"chunk of {req.length} bytes exceeds the limit {self.max_chunk_bytes}")
        try:
            fd = self._open(req.version, req.file)
            data = self.read(fd, req.offset, min(req.length, entry.size - req.offset))
        except OSError as e:
            return err(f"{req.file}: {e.strerror or e}")
        eof = req.offset + len(data) >= entry.size
        return Chunk(
            version=req.version, file=req.file, offset=req.offset, nbytes=len(data), eof=eof
        ), data

    def read(self, fd: int, offset: int, length: int) -> bytes:
        """The bytes of one chunk (a method so tests can corrupt a transfer at the source)."""
        return os.pread(fd, length, offset)

    def _open(self, version: int, name: str) -> int:
        key = (version, name)
        if key in self._fds:
            self._fds.move_to_end(key)
            return self._fds[key]
        path = self.root / f"v{version}" / name
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        self._fds[key] = fd
        while len(self._fds) > _MAX_FDS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _close_version(self, version: int) -> None:
        for key in [k for k in self._fds if k[0] == version]:
            os.close(self._fds.pop(key))


# --- actor side ------------------------------------------------------------------------------------


def recv_reply(
    ch: transport.Channel, timeout_ms: int
) -> tuple[Manifest | Chunk | StreamError, memoryview | None] | None:
    """One reply of the weight server on a connected `weightstream` channel: the message and, for a
    Chunk, its bytes (the second frame, not copied), or None on time-out. Chunks carry two frames,
    which `Channel.recv` (one frame per message) would drop, so replies are read here; they get the
    same decoding and checks. Raises MessageError for a malformed or unexpected reply."""
    if not ch.sock.poll(timeout_ms, zmq.POLLIN):
        return None
    frames = ch.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
    msg = decode(frames[0].bytes)
    check(msg)
    if not isinstance(msg, Manifest | Chunk | StreamError):
        raise MessageError(f"unexpected {type(msg).__name__} on weightstream")
    if len(frames) != (2 if isinstance(msg, Chunk) else 1):
        raise MessageError(f"{type(msg).__name__} in {len(frames)} frames")
    return msg, frames[1].buffer if len(frames) == 2 else None


class _Retry(Exception):
    """A transfer attempt failed in a way another attempt may not (timeout, corrupt, short)."""


class _Sink:
    """Writes a file's chunks and hashes them on two helper threads, so the disk, sha256 and the
    network overlap (all three release the GIL). `finish()` fsyncs and returns the hex digest,
    raising a write error."""

    def __init__(self, path: Path, depth: int) -> None:
        self._out = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self._hash = hashlib.sha256()
        self._error: BaseException | None = None
        self._queues: list[queue.Queue[bytes | memoryview | None]] = []
        self._threads: list[threading.Thread] = []
        for name, fn in (("write", self._write_one), ("hash", self._hash.update)):
            q: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=max(1, depth))
            th = threading.Thread(target=self._drain, args=(q, fn), name=f"weight-{name}")
            th.daemon = True
            th.start()
            self._queues.append(q)
            self._threads.append(th)

    def _write_one(self, data: bytes | memoryview) -> None:
        self._out.write(data)

    def _drain(self, q: queue.Queue[bytes | memoryview | None], fn: Callable[..., object]) -> None:
        while (data := q.get()) is not None:
            if self._error is None:  # after an error keep taking chunks, so put() never blocks
                try:
                    fn(data)
                except BaseException as e:
                    self._error = e

    def put(self, data: bytes | memoryview) -> None:
        for q in self._queues:
            q.put(data)

    def _stop(self) -> None:
        for q in self._queues:
            q.put(None)
        for th in self._threads:
            th.join()

    def finish(self) -> str:
        self._stop()
        if self._error is not None:
            raise self._error
        self._out.flush()
        os.fsync(self._out.fileno())
        return self._hash.hexdigest()

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        if any(th.is_alive() for th in self._threads):  # left early (a failed transfer)
            self._stop()
        self._out.close()


class WeightFetcher:
    """Streams announced versions from a `WeightServer` into `cache_dir/v{N}/`.

    `fetch` blocks (the actor runs it off its loop thread) and is not reentrant; each attempt uses
    a fresh DEALER socket, so a reply of an abandoned attempt can never be taken for a new one.
    """

    def __init__(
        self,
        addr: str,
        cache_dir: str | Path,
        cfg: TransportConfig,
        keep: int = 2,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.addr = addr
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        for leftover in self.cache.glob(".tmp-v*"):  # a fetch cut short by a crash
            shutil.rmtree(leftover, ignore_errors=True)
        self.cfg = cfg
        self.keep = keep
        self.on_retry = on_retry
        self.ctx = zmq.Context()
        self.bytes_streamed = 0
        """Bytes received over all fetches (chunks of failed attempts included)."""
        self.retries = 0

    def close(self) -> None:
        self.ctx.term()

    def cached(self, msg: WeightsReady) -> Path | None:
        """The cached directory of `msg.version` if it holds the announced weights."""
        d = self.cache / f"v{msg.version}"
        probe = WeightsReady(version=msg.version, path=str(d), sha256=msg.sha256, nbytes=msg.nbytes)
        return d if shared_visible(probe) else None

    def fetch(self, msg: WeightsReady, protect: Collection[int] = ()) -> Path:
        """Stream version `msg.version` (unless already cached) and return its local directory.

        Every file is checked against the manifest's size and sha256, and model.safetensors against
        the announcement. Raises WeightsError when the server cannot serve the version or every
        attempt (1 + stream_retries) failed; the cache is left without a partial version.
        """
        if (d := self.cached(msg)) is not None:
            return d
        attempts = 1 + self.cfg.stream_retries
        for attempt in range(1, attempts + 1):
            try:
                d = self._attempt(msg)
            except OSError as e:  # the local cache (disk full, permissions): not the transfer
                raise WeightsError(f"weight cache {self.cache}: {e}") from e
            except _Retry as e:
                if attempt == attempts:
                    raise WeightsError(
                        f"streaming version {msg.version} failed {attempts} times; last: {e}"
                    ) from None
                self.retries += 1
                log.warning("version %d: %s; retrying (%d/%d)", msg.version, e, attempt, attempts)
                if self.on_retry is not None:
                    self.on_retry(str(e))
                continue
            self._prune(protect={*protect, msg.version})
            return d
        raise AssertionError("unreachable")

    def _attempt(self, msg: WeightsReady) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{msg.version}-", dir=self.cache))
        ch = transport.connect(self.ctx, "weightstream", self.addr, self.cfg)
        ch.sock.setsockopt(zmq.LINGER, 0)  # requests of an abandoned attempt are worthless
        try:
            manifest = self._manifest(ch, msg)
            for f in manifest.files:
                self._fetch_file(ch, msg.version, f, tmp / f.name)
            fsync_dir(tmp)
            out = self.cache / f"v{msg.version}"
            if out.exists():  # an earlier fetch of the same version that did not verify
                shutil.rmtree(out)
            os.rename(tmp, out)
            fsync_dir(self.cache)
            return out
        finally:
            ch.close()
            shutil.rmtree(tmp, ignore_errors=True)

    def _recv(self, ch: transport.Channel) -> tuple[object, memoryview | None]:
        try:
            got = recv_reply(ch, int(self.cfg.stream_timeout_s * 1000))
        except MessageError as e:
            raise _Retry(f"bad reply: {e}") from None
        if got is None:
            raise _Retry(f"no reply from {self.addr} within {self.cfg.stream_timeout_s} s")
        return got

    def _send(self, ch: transport.Channel, req: object) -> None:
        if not ch.send(req, timeout_ms=int(self.cfg.stream_timeout_s * 1000)):
            raise _Retry(f"cannot reach the weight server at {self.addr}")

    def _manifest(self, ch: transport.Channel, msg: WeightsReady) -> Manifest:
        self._send(ch, ManifestRequest(version=msg.version))
        reply, _ = self._recv(ch)
        if isinstance(reply, StreamError):
            raise WeightsError(f"weight server: {reply.reason}")
        if not isinstance(reply, Manifest) or reply.version != msg.version:
            raise _Retry(f"expected the manifest of version {msg.version}, got {reply!r:.80}")
        files = {f.name: f for f in reply.files}
        w = files.get(WEIGHTS_FILE)
        if w is None or w.size != msg.nbytes or w.sha256 != msg.sha256:
            raise WeightsError(
                f"the server's version {msg.version} is not the announced one ({WEIGHTS_FILE}: "
                f"{w.size if w else None} bytes, sha256 {w.sha256[:12] if w else None}…)"
            )
        for f in reply.files:
            if f.name != os.path.basename(f.name) or f.name in ("", ".", ".."):
                raise WeightsError(
                    f"weight server listed a file that is not a plain name: {f.name!r}"
                )
        return reply

    def _fetch_file(self, ch: transport.Channel, version: int, f: StreamFile, dest: Path) -> None:
        """Pipelined fetch of one file: `stream_window` requests out, one more per chunk back."""
        chunk = self.cfg.stream_chunk_bytes
        asked = done = 0
        with _Sink(dest, self.cfg.stream_window) as out:
            while done < f.size:
                while asked < f.size and asked - done < self.cfg.stream_window * chunk:
                    n = min(chunk, f.size - asked)
                    self._send(
                        ch, FetchRequest(version=version, file=f.name, offset=asked, length=n)
                    )
                    asked += n
                reply, data = self._recv(ch)
                if isinstance(reply, StreamError):
                    raise WeightsError(f"weight server: {reply.reason}")
                if not isinstance(reply, Chunk):
                    raise _Retry(f"expected a chunk, got {type(reply).__name__}")
                want = min(chunk, f.size - done)
                # One DEALER-ROUTER pipe delivers in order: anything else is a broken transfer.
                if (reply.version, reply.file, reply.offset) != (version, f.name, done):
                    raise _Retry(f"{f.name}: chunk at {reply.offset}, expected {done}")
                got = len(data) if data is not None else 0
                self.bytes_streamed += got
                if got != want or reply.nbytes != want:
                    raise _Retry(f"{f.name}: short chunk at {done}: {got} of {want} bytes")
                out.put(data)
                done += want
            digest = out.finish()
        if digest != f.sha256:
            raise _Retry(f"{f.name}: sha256 {digest[:12]}… != manifest {f.sha256[:12]}…")

    def _prune(self, protect: Collection[int]) -> None:
        """Keep the newest `keep` versions (and `protect`); drop leftovers of crashed fetches."""
        versions = sorted(
            int(m.group(1)) for p in self.cache.iterdir() if (m := _VERSION.match(p.name))
        )
        for v in versions[: max(0, len(versions) - self.keep)]:
            if v not in protect:
                shutil.rmtree(self.cache / f"v{v}", ignore_errors=True)


def default_cache_dir(run_dir: str | Path | None, actor_id: str) -> Path:
    """`<run_dir>/weights-cache/<actor_id>`, or a fresh temporary directory without a run dir."""
    if run_dir is not None:
        return Path(run_dir) / "weights-cache" / actor_id
    return Path(tempfile.mkdtemp(prefix=f"popo-{actor_id}-weights-"))


def local_weights(
    msg: WeightsReady,
    mode: Literal["auto", "shared", "stream"],
    fetcher: WeightFetcher | None,
    protect: Collection[int] = (),
) -> tuple[Path, Literal["shared", "stream"]]:
    """The verified directory of version `msg` on this node, and how it got there. Blocking.

    `shared` reads the announced path (full sha256 check); `stream` fetches into the fetcher's
    cache; `auto` reads the path when `shared_visible` says it holds the announced bytes here and
    streams otherwise, also when the full checksum of a visible path fails. Raises WeightsError.
    """
    if mode == "shared" or (mode == "auto" and shared_visible(msg)):
        try:
            verify_weights(Path(msg.path) / WEIGHTS_FILE, msg.sha256, msg.nbytes)
            return Path(msg.path), "shared"
        except WeightsError as e:
            if mode == "shared" or fetcher is None:
                raise
            log.warning("%s; streaming version %d instead", e, msg.version)
    if fetcher is None:
        raise WeightsError(
            f"{msg.path} does not hold version {msg.version} on this node and no weight stream "
            "endpoint is configured"
        )
    before = fetcher.bytes_streamed
    local = fetcher.fetch(msg, protect)
    log.info("streamed version %d (%d bytes) into %s", msg.version,
             fetcher.bytes_streamed - before, local)  # fmt: skip
    return local, "stream"
