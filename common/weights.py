"""Weight files: atomic safetensors writes with a sha256, and verification (DESIGN §3).

A version directory is written under a temporary name, every file fsynced, the directory renamed into
place and its parent fsynced, so a reader never sees a half-written version: either the old state or
the whole new one. The sha256 of `model.safetensors` is stored beside it (`model.safetensors.sha256`)
and travels in `WeightsReady`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

WEIGHTS_FILE = "model.safetensors"
FAULT_DELAY_ENV = "POPO_FAULT_WRITE_DELAY_S"
"""Test hook (chaos tests only): seconds a writer sleeps inside its write window; see fault_window."""


class WeightsError(RuntimeError):
    """A weight file is missing, unreadable, or does not match its checksum."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
) -> tuple[Path, str, int]:
    """Atomically create directory `out_dir` holding `model.safetensors` (+ its .sha256) and
    `extra_files` (name -> bytes) and `link_files` (name -> existing file, hard-linked when possible
    so unchanged config/tokenizer files cost no copy).

    Returns (path of model.safetensors, sha256 hex, size in bytes). Fails if `out_dir` exists.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; versions are immutable")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        weights = tmp / WEIGHTS_FILE
        # safetensors refuses non-contiguous or shared-storage tensors; clone what needs it.
        flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        # Hashing the file read back from the page cache measured 2x faster than serialising
        # with safetensors' in-memory `save` and hashing that (an extra copy of every byte).
        save_file(flat, str(weights), metadata={"format": "pt"})
        _fsync_file(weights)
        digest = sha256_file(weights)
        (tmp / f"{WEIGHTS_FILE}.sha256").write_text(digest + "\n")
        _fsync_file(tmp / f"{WEIGHTS_FILE}.sha256")  # actors that start late read it
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
    return out / WEIGHTS_FILE, digest, (out / WEIGHTS_FILE).stat().st_size


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
