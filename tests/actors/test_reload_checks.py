"""Pure checks on weight files and the parity probe (no engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from popo.actors.reload import check_schema, model_schema, probe_mismatch, read_schema
from popo.common.run_dir import RunDir
from popo.common.weights import WEIGHTS_FILE, WeightsError, write_version_dir


def _state() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.zeros(3, 4), "b.bias": torch.ones(5)}


def test_schema_reads_names_and_shapes(tmp_path):
    path, _, _ = write_version_dir(tmp_path / "v1", _state())
    assert read_schema(path) == {"a.weight": (3, 4), "b.bias": (5,)}
    assert model_schema(tmp_path / "v1") == read_schema(path)
    check_schema(path, read_schema(path))


@pytest.mark.parametrize(
    "state, match",
    [
        ({"a.weight": torch.zeros(3, 4)}, "missing"),
        ({"a.weight": torch.zeros(4, 3), "b.bias": torch.ones(5)}, "shape"),
    ],
)
def test_schema_mismatch_is_rejected(tmp_path, state, match):
    good, _, _ = write_version_dir(tmp_path / "good", _state())
    bad, _, _ = write_version_dir(tmp_path / "bad", state)
    with pytest.raises(WeightsError, match=match):
        check_schema(bad, read_schema(good))


def test_unreadable_or_garbage_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError):
        read_schema(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not")
    with pytest.raises(WeightsError):
        read_schema(junk)
    junk.write_bytes(b"\xff" * 8)
    with pytest.raises(WeightsError, match="plausible"):
        read_schema(junk)


def test_probe_mismatch_is_zero_on_agreement_and_k3_otherwise():
    lp = np.log(np.array([0.5, 0.25, 0.125], dtype=np.float32))
    kl, mad = probe_mismatch(lp, lp.copy())
    assert kl == 0.0 and mad == 0.0
    d = np.array([0.1, -0.2, 0.0])
    kl, mad = probe_mismatch((lp + d).astype(np.float32), lp)
    expected = np.mean(np.exp(d) - 1 - d)  # hand-computed k3
    assert kl == pytest.approx(expected, rel=1e-4) and mad == pytest.approx(0.2, rel=1e-4)
    with pytest.raises(ValueError):
        probe_mismatch(lp[:2], lp)


def test_latest_published_picks_the_newest_complete_version(tmp_path):
    store = RunDir(tmp_path).weight_store()
    assert store.latest() is None
    for v in (1, 3, 2):
        write_version_dir(store.path(v), _state())
    store.path(9).mkdir()  # incomplete: no checksum file
    msg = store.latest()
    assert msg is not None and msg.version == 3
    assert (
        msg.sha256 == (tmp_path / "weights" / "v3" / f"{WEIGHTS_FILE}.sha256").read_text().strip()
    )
