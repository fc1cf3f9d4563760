"""`WeightStore`: the `v<N>` layout of published weight versions, and `RunDir`, the run directory."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from popo.common.run_dir import RunDir, append_jsonl, read_jsonl
from popo.common.weights import (
    CHECKSUM_FILE,
    WEIGHTS_FILE,
    WeightsError,
    WeightStore,
    sha256_file,
    verify_weights,
)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)}


def test_names_and_paths(tmp_path):
    store = WeightStore(tmp_path / "weights")
    assert WeightStore.dir_name(7) == "v7"
    assert [WeightStore.parse(n) for n in ("v7", "v012", "v", "v1a", "x7", ".tmp-v3-1")] == [
        7,
        12,
        None,
        None,
        None,
        None,
    ]
    assert store.path(3) == tmp_path / "weights" / "v3"
    assert store.weights_file(3) == tmp_path / "weights" / "v3" / WEIGHTS_FILE
    assert store.versions() == []  # no root yet
    assert store.latest() is None


def test_publish_writes_an_atomic_checksummed_version(tmp_path):
    store = WeightStore(tmp_path / "weights")
    msg = store.publish(2, _tensors(), extra_files={"config.json": b"{}"})
    d = tmp_path / "weights" / "v2"
    assert (msg.version, msg.path) == (2, str(d))
    assert msg.sha256 == sha256_file(d / WEIGHTS_FILE) == (d / CHECKSUM_FILE).read_text().strip()
    assert msg.nbytes == (d / WEIGHTS_FILE).stat().st_size
    assert (d / "config.json").read_bytes() == b"{}"
    verify_weights(d / WEIGHTS_FILE, msg.sha256, msg.nbytes)
    assert not [p for p in (tmp_path / "weights").iterdir() if p.name.startswith(".tmp-")]
    assert store.announcement(2) == msg
    with pytest.raises(FileExistsError, match="immutable"):
        store.publish(2, _tensors(1))


def test_versions_and_latest_skip_what_is_not_a_complete_version(tmp_path):
    store = WeightStore(tmp_path)
    for v in (1, 10, 2):
        store.publish(v, _tensors(v))
    (tmp_path / "v11").mkdir()  # a directory without weights or checksum
    (tmp_path / "v12").mkdir()
    (tmp_path / "v12" / CHECKSUM_FILE).write_text("ab" * 32 + "\n")  # checksum, no weights
    (tmp_path / ".tmp-v13-99").mkdir()  # a write cut short by a crash
    (tmp_path / "vx").mkdir()
    (tmp_path / "notes.txt").write_text("")
    assert store.versions() == [1, 2, 10, 11, 12]  # numeric order, complete or not
    latest = store.latest()
    assert latest is not None and latest.version == 10
    assert latest == store.announcement(10)
    with pytest.raises(WeightsError, match="incomplete"):
        store.announcement(11)


def test_a_corrupt_version_is_skipped(tmp_path):
    store = WeightStore(tmp_path)
    good = store.publish(1, _tensors(1))
    store.publish(2, _tensors(2))
    store.publish(3, _tensors(3))
    # v3: a sidecar that is not a sha256 is never announced, even without verification
    (tmp_path / "v3" / CHECKSUM_FILE).write_text("not a digest\n")
    with pytest.raises(WeightsError, match="not a sha256"):
        store.announcement(3)
    # v2: flipped bytes keep the size; only the full checksum sees them
    data = bytearray((tmp_path / "v2" / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "v2" / WEIGHTS_FILE).write_bytes(bytes(data))
    cheap = store.latest()
    assert cheap is not None and cheap.version == 2
    assert store.latest(verify=True) == good


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    store = WeightStore(tmp_path)
    for v in range(1, 6):
        store.publish(v, _tensors(v))
    assert store.prune(keep=2, protect={2}) == [1, 3]
    assert store.versions() == [2, 4, 5]
    assert store.prune(keep=5) == []
    assert store.prune(keep=0, protect={5}) == [2, 4]
    assert store.versions() == [5]


def test_remove_leftovers_only_touches_temporary_directories(tmp_path):
    store = WeightStore(tmp_path)
    store.publish(1, _tensors())
    (tmp_path / f".tmp-v2-{os.getpid()}").mkdir()
    (tmp_path / f".tmp-v2-{os.getpid()}" / WEIGHTS_FILE).write_bytes(b"half")
    store.remove_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]
    WeightStore(tmp_path / "absent").remove_leftovers()  # no root: nothing to do


def test_run_dir_names_every_file(tmp_path):
    run = RunDir(tmp_path)
    assert os.fspath(run) == str(tmp_path)
    names = {
        run.config: "config.toml",
        run.ledger: "ledger.db",
        run.metrics: "metrics.jsonl",
        run.evals: "eval.jsonl",
        run.summary: "summary.json",
        run.endpoints: "endpoints.json",
        run.placement: "placement.json",
        run.pids: "pids.json",
        run.restarts: "restarts.jsonl",
        run.prometheus_targets: "prometheus-targets.json",
        run.weights: "weights",
        run.checkpoints: "checkpoints",
        run.logs: "logs",
        run.sockets: "sockets",
        run.report: "report.png",
    }
    for path, name in names.items():
        assert path == tmp_path / name
    assert run.log("actor-0") == tmp_path / "logs" / "actor-0.log"
    assert RunDir.log_name("learner") == "logs/learner.log"
    assert run.pid_file("actor-1") == tmp_path / "pids" / "actor-1.pid"
    assert run.weights_cache() == tmp_path / "weights-cache" / socket.gethostname()
    assert run.weights_cache("node-2") == tmp_path / "weights-cache" / "node-2"
    assert run.weight_store().root == tmp_path / "weights"


def test_run_dir_weight_store_is_what_the_learner_publishes_into(tmp_path):
    run = RunDir(tmp_path)
    msg = run.weight_store().publish(4, _tensors())
    assert Path(msg.path) == tmp_path / "weights" / "v4"
    assert run.weight_store().latest() == msg


def test_jsonl_append_after_a_torn_line_loses_only_that_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    assert read_jsonl(path) == []
    append_jsonl(path, {"step": 0})
    with open(path, "a") as f:
        f.write('{"step": 2, "accu')  # a crash mid-append
    append_jsonl(path, {"step": 4})
    assert path.read_text() == '{"step": 0}\n{"step": 2, "accu\n{"step": 4}\n'
    assert read_jsonl(path) == [{"step": 0}, {"step": 4}]
