"""Weight versions without a shared filesystem: chunked streaming over ZeroMQ into a node cache.

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
against a raw ZeroMQ transfer: BENCHMARKS.md, `popo.deploy.bench.weight_stream`). The server thread only
reads finished, immutable version directories and serves only the plain files listed in a version's
manifest (no path reaches the filesystem from the wire). A corrupt, short or timed-out transfer is
retried from scratch; a version the learner has pruned is a clean `StreamError`, not a retry.

The actors of one node share one cache directory and download each version once: a per-version
flock in the cache (`.lock-vN`) is held exclusively by the one actor that streams it and shared by
every actor that verifies, loads or serves it. Neighbours wait for the rename, verify every file
against the manifest the downloader stored beside them, and load the same copy. A download's
temporary directory whose lock is free belongs to a dead process and is removed; pruning takes a
version's lock without waiting, so a version some actor on the node still holds stays
(`WeightFetcher` has the rules).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import queue
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Literal, cast

import zmq

from popo.common import transport
from popo.common.config import TransportConfig
from popo.common.messages import (
    Chunk,
    FetchRequest,
    Manifest,
    ManifestRequest,
    StreamError,
    StreamFile,
    WeightsReady,
)
from popo.common.run_dir import RunDir
from popo.common.weights import (
    CHECKSUM_FILE,
    CHECKSUM_SUFFIX,
    WEIGHTS_FILE,
    WeightsError,
    WeightStore,
    fsync_dir,
    sha256_file,
    verify_weights,
)

log = logging.getLogger(__name__)

_MAX_FDS = 8
"""Open files the server keeps (a version being streamed to several actors is read once per
chunk, not reopened)."""
_SERVE_POLL_MS = 200
"""Longest wait of the server thread for a request: it checks its stop event at least this often,
so `stop()` returns within a fraction of a second; a request wakes it at once."""


def shared_visible(msg: WeightsReady) -> bool:
    """Whether the announced path holds this very version on this node: the directory exists, its
    model.safetensors has the announced size and its `.sha256` sidecar names the announced digest.

    A cheap probe (two stats and a 65-byte read); the caller still verifies the full sha256. A node
    that mounts another run's weights at the same path fails it (another digest)."""
    d = Path(msg.path)
    try:
        if (d / WEIGHTS_FILE).stat().st_size != msg.nbytes:
            return False
        return (d / CHECKSUM_FILE).read_text().strip() == msg.sha256
    except OSError:
        return False


# --- learner side ----------------------------------------------------------------------------------


class WeightServer(threading.Thread):
    """Serves the versions of the `WeightStore` at `weights_root` over the `weightstream` ROUTER
    from a background thread.

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
        self.store = WeightStore(weights_root)
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
                got = ch.recv(_SERVE_POLL_MS)
                if got is None:
                    continue
                ident, msg = got
                reply, data = self.handle(msg)
                gone = ch.unroutable
                # Never block on one actor: under the credit scheme its queue has room, and an
                # actor that breaks it (or left) loses this reply and times out.
                if not ch.send(reply, ident, timeout_ms=0, data=() if data is None else (data,)):
                    if ch.unroutable == gone:  # a peer that left is logged by the channel
                        log.warning("weight server: peer %r not ready, reply dropped", ident)
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
        """Plain files of `version` (no links, no hidden files, no subdirectories), or None when
        the version directory does not exist (pruned). Cached: a published version is immutable."""
        vdir = self.store.path(version)
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
            sidecar = vdir / f"{p.name}{CHECKSUM_SUFFIX}"
            # The learner already hashed the weights file when it published it: reuse that.
            digest = sidecar.read_text().strip() if sidecar.is_file() else sha256_file(p)
            files[p.name] = StreamFile(name=p.name, size=st.st_size, sha256=digest)
        self._manifests[version] = files
        for old in [v for v in self._manifests if not self.store.path(v).is_dir()]:
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
        path = self.store.path(version) / name
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
    Chunk, its bytes (its data frame, not copied), or None on time-out. A malformed or unexpected
    reply is counted and handed to the channel's `on_drop` (`Channel.recv_data`)."""
    got = ch.recv_data(timeout_ms)
    if got is None:
        return None
    _, msg, data = got
    reply = cast(Manifest | Chunk | StreamError, msg)  # the channel accepts nothing else
    return reply, data[0] if data else None


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


class _VersionLock:
    """The flock on `cache/.lock-v{N}`: exclusive while a version is downloaded or pruned, shared
    (a reader lease) while an actor verifies, loads or serves it.

    The lock file is only ever unlinked by a holder of the exclusive lock (the pruner, or a fetch
    that failed and left no version). A process that opened the file before that unlink and locks
    it afterwards holds a lock on a file nobody else can open any more, so `try_lock` checks that
    the path still names the locked inode and otherwise locks the file that is there now.
    """

    def __init__(self, cache: Path, version: int) -> None:
        self.path = cache / f".lock-{WeightStore.dir_name(version)}"
        self._fd: int | None = None

    def try_lock(self, shared: bool) -> bool:
        """Take the lock without waiting (also converts a held lock); True when held. A failed
        conversion leaves nothing held (flock drops the old lock first)."""
        while True:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(self._fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return True
            self.close()

    def unlock(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def remove(self) -> None:
        """Unlink the lock file and let go; only while holding the exclusive lock."""
        self.path.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


MANIFEST_FILE = ".manifest.json"
"""Written into a cached version by the actor that streamed it: every file with its size and
sha256, so a neighbour that finds the version on the node verifies it before loading it."""
_TMP = re.compile(r"^\.tmp-([^-]+)-")
"""A download's temporary directory: `.tmp-<version directory name>-<host>-<pid>-*`."""


class WeightFetcher:
    """Streams announced versions from a `WeightServer` into `cache_dir/v{N}/`, a directory the
    actors of one node share (one download per version per node; see `fetch`).

    `fetch` blocks (the actor runs it off its loop thread) and is not reentrant; each attempt uses
    a fresh DEALER socket, so a reply of an abandoned attempt can never be taken for a new one.
    `close()` may be called from another thread: a fetch waiting for a neighbour then fails.

    Sharing one cache between processes rests on one flock per version (`_VersionLock`):

    - Download: only the holder of the exclusive lock of version N writes, into
      `.tmp-vN-<host>-<pid>-*`, and renames it to `vN` once every file is fsynced and has the
      manifest's size and sha256. A `.tmp-vN-*` whose lock nobody holds exclusively belongs to a
      downloader that died (the kernel dropped its lock with its files): it is garbage, removed by
      the next exclusive holder, and by every fetcher that starts and can take the lock at once.
    - Readers: a fetcher that cannot take the lock waits (polling, so `close()` can end the wait);
      once it gets it shared and `vN` exists, it verifies every file against `.manifest.json` and
      the announcement before returning it. A version that is still missing (its downloader died
      or failed) is downloaded by whichever waiter gets the exclusive lock first.
    - Leases: the shared lock is kept after `fetch` returns, as a lease on the version being loaded
      and, through `protect`, on the one being served; the next `fetch` releases the others.
    - Pruning keeps the newest `keep` versions and takes the exclusive lock of an older one
      without waiting: it succeeds only when no actor on the node holds a lease on it (nor is
      downloading it). The version is renamed to `.del-*` before it is deleted, so a reader never
      sees a half-deleted directory, and a version in use is simply left for a later prune.
    """

    def __init__(
        self,
        addr: str,
        cache_dir: str | Path,
        cfg: TransportConfig,
        keep: int = 2,
        on_retry: Callable[[str], None] | None = None,
        poll_s: float = 0.05,
    ) -> None:
        self.addr = addr
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.store = WeightStore(self.cache)
        self.cfg = cfg
        self.keep = keep
        self.on_retry = on_retry
        self.poll_s = poll_s
        """How often a fetcher waiting for a neighbour's download looks again."""
        self.ctx = zmq.Context()
        self.bytes_streamed = 0
        """Bytes received over all fetches (chunks of failed attempts included)."""
        self.retries = 0
        self._leases: dict[int, _VersionLock] = {}
        self._closed = threading.Event()
        self._tag = f"{socket.gethostname()}-{os.getpid()}"
        self._clean_leftovers()

    def close(self) -> None:
        """Release every lease and end the fetcher (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        for v in list(self._leases):
            self._release(v)
        self.ctx.term()

    def leased(self) -> list[int]:
        """Versions this fetcher holds a reader lease on (in use: not pruned by any neighbour)."""
        return sorted(self._leases)

    def fetch(self, msg: WeightsReady, protect: Collection[int] = ()) -> Path:
        """The verified directory of version `msg.version` in the node cache: streamed by this
        fetcher, or by a neighbour on the node (waited for, then verified). Holds a lease on it,
        releases the leases on versions outside `protect` and prunes.

        Every file is checked against the manifest's size and sha256, and model.safetensors against
        the announcement. Raises WeightsError when the server cannot serve the version, every
        attempt (1 + stream_retries) failed, or the fetcher was closed; the cache is left without a
        partial version.
        """
        self._release(msg.version)  # a lease of our own would block our own exclusive lock
        try:
            d = self._obtain(msg)
            for v in [v for v in self._leases if v not in protect and v != msg.version]:
                self._release(v)
            self._prune(protect={*protect, msg.version})
        except OSError as e:  # the local cache (disk full, permissions): not the transfer
            raise WeightsError(f"weight cache {self.cache}: {e}") from e
        return d

    def _release(self, version: int) -> None:
        if (lk := self._leases.pop(version, None)) is not None:
            lk.close()

    def _obtain(self, msg: WeightsReady) -> Path:
        """Lease (shared lock) on a verified `v{N}`, downloading it under the exclusive lock when
        no one on the node has. Returns the directory; the lease is in `_leases`."""
        lk = _VersionLock(self.cache, msg.version)
        out = self.store.path(msg.version)
        bad: WeightsError | None = None  # the copy on disk did not verify: replace it
        give_up = 0.0
        try:
            while True:
                if self._closed.is_set():
                    raise WeightsError(f"weight fetcher closed while waiting for v{msg.version}")
                if bad is None and lk.try_lock(shared=True):
                    if out.is_dir():
                        try:
                            self._verify(out, msg)
                        except WeightsError as e:
                            log.warning("cached %s does not verify: %s", out.name, e)
                            bad, give_up = e, time.monotonic() + self.cfg.stream_timeout_s
                            lk.unlock()
                            continue
                        self._leases[msg.version] = lk
                        return out
                    lk.unlock()  # missing: whoever takes the exclusive lock first downloads it
                if lk.try_lock(shared=False):
                    self._clean_version(msg.version)
                    if out.is_dir():
                        if bad is None:
                            lk.unlock()  # finished while we were not looking: read it shared
                            continue
                        self._set_aside(out)
                        bad = None
                    try:
                        self._download(msg, out)
                    except BaseException:
                        lk.remove()
                        raise
                    # The conversion drops the lock for an instant (flock): a pruner that took it
                    # then removed the version, and the loop fetches it again.
                    if lk.try_lock(shared=True) and out.is_dir():
                        self._leases[msg.version] = lk
                        return out
                    continue
                if bad is not None and time.monotonic() > give_up:
                    raise WeightsError(
                        f"cached {out} does not verify ({bad}) and another actor on this node "
                        "still uses it"
                    )
                self._closed.wait(self.poll_s * random.uniform(0.5, 1.5))
        except BaseException:
            if self._leases.get(msg.version) is not lk:
                lk.close()
            raise

    def _verify(self, d: Path, msg: WeightsReady) -> None:
        """Raise WeightsError unless `d` holds every file of its manifest (size and sha256) and
        the manifest's model.safetensors is the announced one."""
        try:
            files = json.loads((d / MANIFEST_FILE).read_bytes())
            entries = {f["name"]: (int(f["size"]), str(f["sha256"])) for f in files}
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise WeightsError(f"{d / MANIFEST_FILE}: unreadable ({e})") from None
        if entries.get(WEIGHTS_FILE) != (msg.nbytes, msg.sha256):
            raise WeightsError(f"{d} is not the announced version {msg.version}")
        for name, (size, digest) in entries.items():
            if name != os.path.basename(name) or name in ("", ".", ".."):
                raise WeightsError(f"{d / MANIFEST_FILE} lists {name!r}, not a plain name")
            verify_weights(d / name, digest, size)

    def _download(self, msg: WeightsReady, out: Path) -> None:
        """Stream the version into a temporary directory and rename it to `out`, with retries."""
        attempts = 1 + self.cfg.stream_retries
        for attempt in range(1, attempts + 1):
            try:
                self._attempt(msg, out)
                return
            except _Retry as e:
                if attempt == attempts:
                    raise WeightsError(
                        f"streaming version {msg.version} failed {attempts} times; last: {e}"
                    ) from None
                self.retries += 1
                log.warning("version %d: %s; retrying (%d/%d)", msg.version, e, attempt, attempts)
                if self.on_retry is not None:
                    self.on_retry(str(e))

    def _attempt(self, msg: WeightsReady, out: Path) -> None:
        prefix = f".tmp-{self.store.dir_name(msg.version)}-{self._tag}-"
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.cache))
        ch = transport.connect(self.ctx, "weightstream", self.addr, self.cfg, self._bad_reply)
        ch.sock.setsockopt(zmq.LINGER, 0)  # requests of an abandoned attempt are worthless
        try:
            manifest = self._manifest(ch, msg)
            for f in manifest.files:
                self._fetch_file(ch, msg.version, f, tmp / f.name)
            listing = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in manifest.files]
            with open(tmp / MANIFEST_FILE, "w") as m:
                json.dump(listing, m)
                m.flush()
                os.fsync(m.fileno())
            fsync_dir(tmp)
            os.rename(tmp, out)
            fsync_dir(self.cache)
        finally:
            ch.close()
            shutil.rmtree(tmp, ignore_errors=True)

    def _bad_reply(self, why: str) -> None:
        """A reply the channel dropped (malformed, unexpected, wrong frames) ends the attempt."""
        raise _Retry(f"bad reply: {why}")

    def _recv(self, ch: transport.Channel) -> tuple[object, memoryview | None]:
        got = recv_reply(ch, int(self.cfg.stream_timeout_s * 1000))
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
            if f.name != os.path.basename(f.name) or f.name in ("", ".", "..", MANIFEST_FILE):
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
                if self._closed.is_set():  # neighbours waiting on this download take it over
                    raise WeightsError(f"weight fetcher closed while streaming v{version}")
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
        """Keep the newest `keep` versions (and `protect`); an older one goes only when no actor
        on the node holds it (its lock is free), else a later prune retries."""
        versions = self.store.versions()
        for v in versions[: max(0, len(versions) - self.keep)]:
            if v in protect:
                continue
            lk = _VersionLock(self.cache, v)
            if not lk.try_lock(shared=False):
                lk.close()
                continue
            self._set_aside(self.store.path(v))
            self._clean_version(v)
            lk.remove()

    def _set_aside(self, d: Path) -> None:
        """Rename a version out of readers' sight, then delete it (exclusive lock held)."""
        gone = self.cache / f".del-{d.name}-{self._tag}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(d, gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)

    def _clean_version(self, version: int) -> None:
        """Remove the temporary directories of `version` (exclusive lock held: all are dead)."""
        for p in self.cache.glob(f".tmp-{self.store.dir_name(version)}-*"):
            shutil.rmtree(p, ignore_errors=True)

    def _clean_leftovers(self) -> None:
        """Remove what dead processes left: a `.tmp-vN-*` whose lock is free (its downloader died;
        one whose lock is held is a neighbour's download in progress, or is cleaned by whoever
        takes that lock next) and `.del-*` (renamed under the lock, never read again)."""
        for p in self.cache.glob(".del-*"):
            shutil.rmtree(p, ignore_errors=True)
        versions = {
            v
            for p in self.cache.iterdir()
            if (m := _TMP.match(p.name)) and (v := self.store.parse(m.group(1))) is not None
        }
        for v in sorted(versions):
            lk = _VersionLock(self.cache, v)
            if not lk.try_lock(shared=False):
                lk.close()
                continue
            self._clean_version(v)
            if self.store.path(v).is_dir():
                lk.close()
            else:
                lk.remove()


def default_cache_dir(run_dir: str | Path | None) -> Path:
    """`<run_dir>/weights-cache/<hostname>`, shared by the actors of this node (a run directory on a
    shared filesystem still gets one cache per node), or a fresh temporary directory without a run
    directory."""
    if run_dir is not None:
        return RunDir(run_dir).weights_cache()
    return Path(tempfile.mkdtemp(prefix="popo-weights-cache-"))


def local_weights(
    msg: WeightsReady,
    mode: Literal["auto", "shared", "stream"],
    fetcher: WeightFetcher | None,
    protect: Collection[int] = (),
    verify_shared: bool = True,
) -> tuple[Path, Literal["shared", "stream"]]:
    """The verified directory of version `msg` on this node, and how it got there. Blocking.

    `shared` reads the announced path (full sha256 check); `stream` fetches into the fetcher's
    cache; `auto` reads the path when `shared_visible` says it holds the announced bytes here and
    streams otherwise, also when the full checksum of a visible path fails. Raises WeightsError.
    verify_shared=False returns a shared path without its sha256 check, which the caller then owes
    (`verify_weights`) before it uses the bytes, and the fallback to streaming with it.
    """
    if mode == "shared" or (mode == "auto" and shared_visible(msg)):
        if not verify_shared:
            return Path(msg.path), "shared"
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
    if (n := fetcher.bytes_streamed - before) > 0:
        log.info("streamed version %d (%d bytes) into %s", msg.version, n, local)
    else:
        log.info("version %d found in the node cache %s (verified)", msg.version, local)
    return local, "stream"
