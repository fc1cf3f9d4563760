"""Weights and checkpoints under write faults: a full disk or a failed write on the
learner side is retried with back-off and reported; nothing half-written is announced or resumed.

The faults are real failing syscalls: the process's file-size limit (RLIMIT_FSIZE, with SIGXFSZ
ignored so the write returns EFBIG instead of killing the process) is lowered below the size of
the file being written, and raised again from the failure callback when the test wants the next
attempt to succeed — as an operator freeing disk space would.
"""

from __future__ import annotations

import errno
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from learner_helpers import make_groups, tiny_qwen2

from popo.common.config import LearnerConfig, algorithm_config
from popo.common.weights import WEIGHTS_FILE, WeightStore, retry_write, verify_weights
from popo.learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from popo.learner.publish import publish_weights
from popo.learner.trainer import Trainer


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[list[int]]:
    """Within the block, writes past `nbytes` fail with EFBIG. Yields a one-element list: set
    [0] to a new soft limit and call `apply` via `raise_limit` to lift the fault."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield [soft, hard]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def lift_after(n_failures: int, limits: list[int], errors: list[OSError]):
    """A failure callback that records each error and removes the fault after `n_failures`."""

    def on_failure(e: OSError) -> None:
        errors.append(e)
        if len(errors) == n_failures:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits[0], limits[1]))

    return on_failure


def _no_leftovers(root: Path) -> None:
    assert list(root.glob(".tmp-*")) == [], "a failed write left its temporary directory"


def test_retry_write_backs_off_and_gives_up(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr("popo.common.weights.time.sleep", sleeps.append)
    calls = []

    def always_full() -> None:
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    seen: list[OSError] = []
    with pytest.raises(OSError, match="No space"):
        retry_write(always_full, "x", retries=3, backoff_s=0.5, on_failure=seen.append)
    assert len(calls) == 4 and len(seen) == 4
    assert sleeps == [0.5, 1.0, 2.0]
    # a programming error is not a write failure: it propagates at once
    with pytest.raises(ZeroDivisionError):
        retry_write(lambda: 1 / 0, "x", retries=3, backoff_s=0.5)


def test_publish_retries_a_failed_write_then_announces_a_complete_version(tmp_path):
    model = tiny_qwen2()
    root = tmp_path / "weights"
    errors: list[OSError] = []
    with file_size_limit(4096) as limits:
        msg = publish_weights(
            model, root, 1, retries=3, backoff_s=0.01, on_failure=lift_after(2, limits, errors)
        )
    assert [e.errno for e in errors] == [errno.EFBIG, errno.EFBIG]
    assert msg is not None and msg.version == 1
    verify_weights(Path(msg.path) / WEIGHTS_FILE, msg.sha256, msg.nbytes)
    assert WeightStore(root).versions() == [1]
    _no_leftovers(root)


def test_publish_that_keeps_failing_announces_nothing(tmp_path):
    model = tiny_qwen2()
    root = tmp_path / "weights"
    publish_weights(model, root, 1)
    errors: list[OSError] = []
    with file_size_limit(4096), pytest.raises(OSError) as info:
        publish_weights(model, root, 2, retries=2, backoff_s=0.01, on_failure=errors.append)
    assert info.value.errno == errno.EFBIG and len(errors) == 3
    # no v2 (and no message for it): actors that start now still find v1, complete
    assert WeightStore(root).versions() == [1]
    _no_leftovers(root)


def _trainer() -> Trainer:
    lc = LearnerConfig(lr=1e-2, total_steps=6, device="cpu", seed=3)
    ac = algorithm_config(name="popo", predictor_hidden=16)
    return Trainer(tiny_qwen2(), lc, ac, max_completion_len=8)


def test_failed_checkpoint_write_leaves_nothing_resume_would_pick_up(tmp_path):
    tr = _trainer()
    root = tmp_path / "ckpt"
    tr.train_step(make_groups(2, 4, seed=1))
    good = save_checkpoint(tr, root)
    tr.train_step(make_groups(2, 4, seed=2))
    errors: list[OSError] = []
    with file_size_limit(4096), pytest.raises(OSError):
        save_checkpoint(tr, root, retries=1, backoff_s=0.01, on_failure=errors.append)
    assert len(errors) == 2
    assert latest_checkpoint(root) == good  # resume takes the last complete one
    _no_leftovers(root)
    fresh = _trainer()
    load_checkpoint(fresh, latest_checkpoint(root))
    assert fresh.step == 1

    # the disk recovers mid-way: the write is retried and lands whole
    errors.clear()
    with file_size_limit(4096) as limits:
        path = save_checkpoint(
            tr, root, retries=3, backoff_s=0.01, on_failure=lift_after(1, limits, errors)
        )
    assert len(errors) == 1 and latest_checkpoint(root) == path
    load_checkpoint(fresh, path)
    assert fresh.step == 2
    _no_leftovers(root)


def test_leftover_of_a_killed_checkpoint_write_is_ignored_and_cleaned(tmp_path):
    tr = _trainer()
    root = tmp_path / "ckpt"
    tr.train_step(make_groups(2, 4, seed=1))
    good = save_checkpoint(tr, root)
    # what a SIGKILL inside the write window leaves: a partial temporary directory
    dead = root / ".tmp-step-00000002-99999"
    dead.mkdir()
    (dead / "tensors.safetensors").write_bytes(b"\x00" * 100)
    assert latest_checkpoint(root) == good
    tr.train_step(make_groups(2, 4, seed=2))
    save_checkpoint(tr, root)
    assert not dead.exists()
