"""Damaged weight files an actor is told to load: every one is a WeightsError before
the engine is touched, so the actor keeps serving its last good version (the actor-level test is
`test_actor.py::test_corrupt_version_is_rejected_and_old_one_keeps_serving`)."""

from __future__ import annotations

import pytest
import torch

from popo.actors.reload import check_schema
from popo.common.weights import WEIGHTS_FILE, WeightsError, sha256_file, verify_weights
from popo.common.weights import write_version_dir as write

STATE = {"a.weight": torch.randn(64, 32), "b.bias": torch.randn(32)}
SCHEMA = {k: tuple(v.shape) for k, v in STATE.items()}


@pytest.fixture
def version(tmp_path):
    path, sha, nbytes = write(tmp_path / "v1", STATE)
    check_schema(path, SCHEMA)
    verify_weights(path, sha, nbytes)
    return path, sha, nbytes


def test_flipped_byte_fails_the_checksum(version):
    path, sha, nbytes = version
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    check_schema(path, SCHEMA)  # header intact: only the checksum can tell
    with pytest.raises(WeightsError, match="sha256"):
        verify_weights(path, sha, nbytes)


def test_truncated_file_fails_size_then_header_length(version):
    path, sha, nbytes = version
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="announced"):
        verify_weights(path, sha, nbytes)
    # announced as is (its own checksum and size): the header still gives it away
    verify_weights(path, sha256_file(path), path.stat().st_size)
    with pytest.raises(WeightsError, match="header describes"):
        check_schema(path, SCHEMA)


def test_trailing_bytes_are_rejected(version):
    path, _, _ = version
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    with pytest.raises(WeightsError, match="header describes"):
        check_schema(path, SCHEMA)


@pytest.mark.parametrize("header", [b"{not json", b'{"a.weight": {"shape": [64, 32]}}'])
def test_garbled_header_with_a_matching_checksum(tmp_path, header):
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    verify_weights(path, sha256_file(path), path.stat().st_size)
    with pytest.raises(WeightsError):
        check_schema(path, SCHEMA)
