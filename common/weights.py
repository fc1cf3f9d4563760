"""Weight files: atomic safetensors writes with a sha256, and verification (docs/architecture.md, Weights).

A version directory is written under a temporary name, every file fsynced, the directory renamed into
place and its parent fsynced, so a reader never sees a half-written version: either the old state or
the whole new one. The sha256 of `model.safetensors` is stored beside it (`model.safetensors.sha256`)
and travels in `WeightsReady`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from popo.common.messages import WeightsReady

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

WEIGHTS_FILE = "model.safetensors"
CHECKSUM_FILE = f"{WEIGHTS_FILE}.sha256"
"""Beside `WEIGHTS_FILE` in a version directory: its hex sha256 and a newline."""
CHECKSUM_SUFFIX = ".sha256"
FAULT_DELAY_ENV = "POPO_FAULT_WRITE_DELAY_S"
"""Test hook (chaos tests only): seconds a writer sleeps inside its write window; see fault_window."""


class WeightsError(RuntimeError):
    """A weight file is missing, unreadable, or does not match its checksum."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    # One reused buffer: a new 1 MiB `bytes` per read is a new mapping, zero-filled page by page.
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# safetensors' dtype names, keyed by torch's (`str(torch.float32)` without `torch.`), in the order
# of safetensors' dtype enum: its writer lays tensors out by that rank, highest first, then name.
_SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
}
_RANK = {k: i for i, k in enumerate(_SAFETENSORS_DTYPES)}
_CAST_BUFFERS = 4  # blocks a casting writer has in flight: one being written, the rest hashing

_DITHER_PERIOD = 1 << 20  # offsets in the table; element j of a tensor takes entry (s + j) mod this
_dither_tables: dict[str, torch.Tensor] = {}


def _dither_table(device: torch.device) -> torch.Tensor:
    """The fixed offsets, twice over, so any `_DITHER_PERIOD` consecutive entries are one slice."""
    import torch

    if str(device) not in _dither_tables:
        gen = torch.Generator().manual_seed(0x5EED)
        t = torch.randint(0, 1 << 16, (_DITHER_PERIOD,), generator=gen, dtype=torch.int32)
        _dither_tables[str(device)] = torch.cat([t, t]).to(device)
    return _dither_tables[str(device)]


def dither_to_bf16(
    x: torch.Tensor, name: str, at: int | torch.Tensor = 0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 `x`, elements of the tensor called `name`, rounded to bfloat16 with a fixed offset
    per element (`learner.publish_rounding = "dither"`).

    bfloat16 is float32 without its low 16 bits: adding an integer u ~ U[0, 2^16) to those bits
    before cutting them rounds |x| up with probability equal to its distance from the value below,
    so E_u[result] = x. u depends only on the element's tensor and position, the same at every call:
    an element's published value changes only when x moves across a threshold, and a drift of a
    fraction f of the spacing moves about f of the elements, where rounding to nearest moves none.
    The offsets come from one table of 2^20 random values that each tensor reads from its own start
    (from its name), so they cost an add and a shift (1.3-1.5x a plain cast), where drawing them
    costs 10x. at: the position in the tensor of x's first element (x holds the following ones in
    order), or a tensor of every element's position. out: a bfloat16 tensor of x's size to fill.
    """
    import torch

    flat = x.reshape(-1).view(torch.int32)
    res = torch.empty(flat.shape, dtype=torch.bfloat16, device=x.device) if out is None else out
    dst = res.view(-1).view(torch.int16)
    table = _dither_table(x.device)
    start = zlib.crc32(name.encode()) % _DITHER_PERIOD
    # the arithmetic shift keeps the top 16 bits, sign included: bfloat16's bits, cast exactly
    if isinstance(at, torch.Tensor):
        dst.copy_((flat + table[(start + at.reshape(-1)) % _DITHER_PERIOD]) >> 16)
        return res.view(x.shape)
    for j in range(0, flat.numel(), _DITHER_PERIOD):  # one slice of the table a block
        k = min(_DITHER_PERIOD, flat.numel() - j)
        first = (start + at + j) % _DITHER_PERIOD
        dst[j : j + k] = (flat[j : j + k] + table[first : first + k]).bitwise_right_shift_(16)
    return res.view(x.shape)


def cast_for_publish(
    x: torch.Tensor,
    dtype: torch.dtype,
    rounding: str,
    name: str,
    at: int | torch.Tensor = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x` (elements of the tensor `name` from position `at`, as `dither_to_bf16`) in `dtype` as
    a published version holds it: float32 -> bfloat16 dithered when `rounding` is "dither",
    everything else rounded to nearest (`.to()`)."""
    import torch

    if rounding == "dither" and dtype == torch.bfloat16 and x.dtype == torch.float32:
        return dither_to_bf16(x, name, at, out)
    return x.to(dtype) if out is None else out.copy_(x)


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    chunk: int = 1 << 20,
    dtype: torch.dtype | None = None,
    rounding: str = "nearest",
) -> tuple[str, int]:
    """Write `tensors` as a safetensors file, fsync it, and return (sha256 hex, size in bytes).

    The bytes are hashed as they are written, block by block: one pass over the data, where
    safetensors' `save_file` followed by hashing the file reads every byte back, and its in-memory
    `save` copies every byte first. The format is safetensors': a little-endian u64 header length
    N; N bytes of JSON (per tensor its dtype, shape and [begin, end) data offsets, and
    `__metadata__`), padded with spaces so the data starts 8-byte aligned; then the raw
    little-endian tensor bytes back to back, in safetensors' own order (dtype rank, widest first,
    then name) so each tensor starts aligned to its item size. A file of contiguous, unshared
    tensors is byte for byte what `save_file` writes. Each tensor is written straight from its
    storage (a zero-copy view of a contiguous CPU tensor); only a non-contiguous or non-CPU tensor
    is copied, one at a time. Tensors sharing storage are each written whole, as independent ones.
    dtype: every tensor is written as this dtype (as `t.to(dtype)` would round it), cast block by
    block into a few reused buffers on the way out: no copy of the whole state in the new dtype
    is ever made (which would cost its allocation and a second pass over memory).
    rounding: how the cast rounds (`cast_for_publish`: "nearest" or "dither").
    """
    import torch

    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian bytes; this host is big-endian")
    dtypes = {k: str(dtype or t.dtype).removeprefix("torch.") for k, t in tensors.items()}
    unknown = {k: d for k, d in dtypes.items() if d not in _SAFETENSORS_DTYPES}
    if unknown:
        raise ValueError(f"no safetensors dtype for {unknown}")
    order = sorted(tensors, key=lambda k: (-_RANK[dtypes[k]], k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    end = 0
    for k in order:
        t = tensors[k]
        itemsize = dtype.itemsize if dtype is not None else t.element_size()
        begin, end = end, end + t.numel() * itemsize
        name = _SAFETENSORS_DTYPES[dtypes[k]]
        header[k] = {"dtype": name, "shape": list(t.shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    h = hashlib.sha256()
    # sha256 costs more CPU than writing the bytes (~170 vs ~70 ms for 242 MiB), so with a spare
    # core it runs on a second thread (hashlib releases the GIL on large blocks), fed each block in
    # order as it is written and finishing while the file is fsynced. Pinned to one core, the
    # thread only adds cache misses (+20 % CPU measured): hash each block right after writing it.
    spare_core = len(os.sched_getaffinity(0)) > 1
    hashed: deque[Future[None]] = deque()
    step = max(1, chunk // dtype.itemsize) if dtype is not None else 0  # elements per cast block
    ring = [torch.empty(step, dtype=dtype) for _ in range(_CAST_BUFFERS if dtype else 0)]

    def blocks() -> Iterator[bytes | memoryview]:
        yield struct.pack("<Q", len(raw))
        yield raw
        n = 0
        for k in order:
            t = tensors[k].detach().cpu().contiguous()  # no copy unless it has to be
            if dtype is None or t.dtype == dtype:
                data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                for i in range(0, len(data), chunk):
                    yield data[i : i + chunk]
                continue
            flat = t.reshape(-1)
            for i in range(0, flat.numel(), step):
                # The hasher reads blocks in order: with fewer blocks in its queue than buffers,
                # the one this buffer held is hashed already.
                while len(hashed) >= _CAST_BUFFERS:
                    hashed.popleft().result()
                out = ring[n % _CAST_BUFFERS][: min(step, flat.numel() - i)]
                n += 1
                cast_for_publish(flat[i : i + step], dtype, rounding, k, at=i, out=out)
                yield memoryview(out.view(torch.uint8).numpy())

    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher, open(path, "wb") as f:
        for block in blocks():
            if spare_core:
                hashed.append(hasher.submit(h.update, block))
            f.write(block)
            if not spare_core:
                h.update(block)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    for done in hashed:
        done.result()
    return h.hexdigest(), size


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fault_window() -> None:
    """Chaos-test hook, called by every atomic writer (weight versions, checkpoints) after its files
    are written under the `.tmp-*` name and before the rename. When `POPO_FAULT_WRITE_DELAY_S` is
    set it sleeps that long, so a test that sees a `.tmp-*` directory can SIGKILL the writer inside
    the window deterministically. Unset (always, outside tests) it does nothing."""
    delay = os.environ.get(FAULT_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


_OS_ERROR = re.compile(r"os error (\d+)")


def _write_error(exc: Exception) -> OSError | None:
    """The OSError behind a failed write, or None if `exc` is not one. safetensors reports I/O
    errors as `SafetensorError("... I/O error: No space left on device (os error 28)")`."""
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc):
        m = _OS_ERROR.search(str(exc))
        return OSError(int(m.group(1)) if m else errno.EIO, str(exc))
    return None


def retry_write(
    write: Callable[[], T],
    what: str,
    retries: int,
    backoff_s: float,
    on_failure: Callable[[OSError], None] | None = None,
) -> T:
    """Call an atomic writer (one that leaves nothing behind when it raises) until it succeeds.

    An OSError (disk full, I/O error, file too large, read-only file system) is logged and
    reported to `on_failure`, then the write is tried again after `backoff_s * 2**i` seconds, up to
    `retries` more times; the last error propagates. Only the file writing is retried, never a
    collective, so every rank of a sharded learner stays in step.
    """
    for attempt in range(retries + 1):
        try:
            return write()
        except Exception as exc:
            e = _write_error(exc)
            if e is None:
                raise
            if on_failure is not None:
                on_failure(e)
            if attempt == retries:
                log.error("writing %s failed %d times; giving up: %s", what, attempt + 1, e)
                if e is exc:
                    raise
                raise e from exc
            delay = backoff_s * 2**attempt
            log.warning("writing %s failed (%s); retrying in %.1f s", what, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_version_dir(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    extra_files: Mapping[str, bytes] | None = None,
    link_files: Mapping[str, Path] | None = None,
    dtype: torch.dtype | None = None,
    rounding: str = "nearest",
) -> tuple[Path, str, int]:
    """Atomically create directory `out_dir` holding `model.safetensors` (+ its .sha256) and
    `extra_files` (name -> bytes) and `link_files` (name -> existing file, hard-linked when possible
    so unchanged config/tokenizer files cost no copy). dtype, rounding: the tensors' dtype in the
    file and how they are cast to it (`write_safetensors`); dtype None: their own.

    Returns (path of model.safetensors, sha256 hex, size in bytes). Fails if `out_dir` exists.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; versions are immutable")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        digest, nbytes = write_safetensors(
            tmp / WEIGHTS_FILE, tensors, metadata={"format": "pt"}, dtype=dtype, rounding=rounding
        )
        (tmp / CHECKSUM_FILE).write_text(digest + "\n")
        _fsync_file(tmp / CHECKSUM_FILE)  # actors that start late read it
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
            _fsync_file(tmp / name)
        for name, src in (link_files or {}).items():
            try:
                os.link(src, tmp / name)
            except OSError:
                shutil.copy2(src, tmp / name)
        fsync_dir(tmp)
        fault_window()
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / WEIGHTS_FILE, digest, nbytes


def verify_weights(path: str | Path, sha256: str, nbytes: int | None = None) -> None:
    """Raise WeightsError unless the file at `path` exists, has `nbytes` bytes and hashes to `sha256`."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise WeightsError(f"{p}: {e.strerror}") from None
    if nbytes is not None and size != nbytes:
        raise WeightsError(f"{p}: {size} bytes, announced {nbytes}")
    try:
        digest = sha256_file(p)
    except OSError as e:
        raise WeightsError(f"{p}: {e.strerror}") from None
    if digest != sha256:
        raise WeightsError(f"{p}: sha256 {digest[:12]}… != announced {sha256[:12]}…")


_VERSION_DIR = re.compile(r"^v(\d+)$")


class WeightStore:
    """The layout of a directory of weight versions: `<root>/v<N>/` holding `model.safetensors`,
    its `.sha256` sidecar and the model's config/tokenizer files, each version written once by
    `publish` and never changed after. The learner's `<run_dir>/weights` and an actor node's
    stream cache both have this layout; nothing else names or parses a `v<N>` directory.

    A version directory appears whole (atomic rename), so one with a checksum sidecar is complete;
    `.tmp-*` siblings are writes cut short by a crash.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"WeightStore({str(self.root)!r})"

    @staticmethod
    def dir_name(version: int) -> str:
        """`v<N>`: the directory name of `version`."""
        return f"v{version}"

    @staticmethod
    def parse(name: str) -> int | None:
        """The version a directory name `v<N>` stands for; None for any other name."""
        m = _VERSION_DIR.match(name)
        return int(m.group(1)) if m else None

    def path(self, version: int) -> Path:
        """The directory of `version` (whether or not it exists)."""
        return self.root / self.dir_name(version)

    def weights_file(self, version: int) -> Path:
        """`model.safetensors` of `version`."""
        return self.path(version) / WEIGHTS_FILE

    def versions(self) -> list[int]:
        """Every `v<N>` entry under the root, ascending (complete or not); [] without a root."""
        if not self.root.is_dir():
            return []
        return sorted(v for p in self.root.iterdir() if (v := self.parse(p.name)) is not None)

    def announcement(self, version: int) -> WeightsReady:
        """The `WeightsReady` of a complete version, from its checksum sidecar and file size.
        Raises WeightsError when the version is incomplete or its sidecar is not a sha256."""
        d = self.path(version)
        try:
            digest = (d / CHECKSUM_FILE).read_text().strip()
            nbytes = (d / WEIGHTS_FILE).stat().st_size
        except OSError as e:
            raise WeightsError(f"{d}: incomplete version ({e.strerror or e})") from None
        if len(digest) != 64 or digest.strip("0123456789abcdef"):
            raise WeightsError(f"{d / CHECKSUM_FILE}: not a sha256 ({digest[:70]!r})")
        return WeightsReady(version=version, path=str(d), sha256=digest, nbytes=nbytes)

    def latest(self, verify: bool = False) -> WeightsReady | None:
        """The announcement of the newest complete version (weights file and a well-formed
        checksum sidecar), or None if there is none: what an actor that started late has missed.
        With `verify`, the weights file must also hash to its sidecar (reads every byte); a
        version that does not is skipped for the next older one."""
        for v in reversed(self.versions()):
            try:
                msg = self.announcement(v)
                if verify:
                    verify_weights(self.weights_file(v), msg.sha256, msg.nbytes)
            except WeightsError as e:
                log.debug("skipping version %d: %s", v, e)
                continue
            return msg
        return None

    def publish(
        self,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        extra_files: Mapping[str, bytes] | None = None,
        link_files: Mapping[str, Path] | None = None,
        dtype: torch.dtype | None = None,
        rounding: str = "nearest",
    ) -> WeightsReady:
        """Write `version` atomically with its checksum (`write_version_dir`, cast to `dtype` on
        the way as `rounding` says) and return its announcement. Fails if the version exists:
        versions are immutable."""
        path, digest, nbytes = write_version_dir(
            self.path(version), tensors, extra_files, link_files, dtype, rounding
        )
        return WeightsReady(version=version, path=str(path.parent), sha256=digest, nbytes=nbytes)

    def prune(self, keep: int, protect: Collection[int] = ()) -> list[int]:
        """Delete all but the newest `keep` versions, never one in `protect` (versions readers may
        still be loading). Returns the deleted versions."""
        versions = self.versions()
        doomed = [v for v in versions[: max(0, len(versions) - keep)] if v not in protect]
        for v in doomed:
            shutil.rmtree(self.path(v))
        return doomed

    def remove_leftovers(self) -> None:
        """Delete the `.tmp-*` directories of writes cut short by a crash. Only while no writer
        runs (the learner, before it publishes)."""
        if self.root.is_dir():
            for leftover in self.root.glob(".tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
