"""Wire messages: round trips, packed arrays, and `decode` raising MessageError and nothing else."""

from __future__ import annotations

import typing

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popo.common import messages
from popo.common.messages import (
    SCHEMA_VERSION,
    Chunk,
    Completion,
    FetchRequest,
    Lease,
    LeaseRequest,
    Leases,
    Manifest,
    ManifestRequest,
    Message,
    MessageError,
    RankCommand,
    RolloutGroup,
    ScoredCompletion,
    ScoredGroup,
    StreamError,
    StreamFile,
    WeightsReady,
    decode,
    encode,
    pack_f32,
    pack_ids,
    unpack_f32,
    unpack_ids,
)


def _samples() -> list[Message]:
    ids = pack_ids([1, 5, 9, 200_000])
    lps = pack_f32([-0.5, -1.25, -3.0, -0.0])
    return [
        LeaseRequest(actor_id="actor-0", n=4),
        LeaseRequest(actor_id="actor-1", n=0, policy_version=7, mismatch_kl=1.5e-6),
        Leases(
            leases=[
                Lease(
                    lease_id=3,
                    prompt_id="test/algebra/1.json",
                    prompt="<|im_start|>user\nWhat is $\\frac{1}{2}$?<|im_end|>\n",
                    gold="\\frac{1}{2}",
                    dispatch_version=2,
                    deadline=1.7e9,
                )
            ],
            learner_version=2,
        ),
        Leases(leases=[], learner_version=0, retry_after_s=0.5),
        RolloutGroup(
            lease_id=3,
            prompt_id="p3",
            prompt_token_ids=pack_ids([7, 8]),
            gold="18",
            completions=[
                Completion(
                    token_ids=ids, logprobs=lps, text="so \\boxed{18}", finish_reason="stop"
                ),
                Completion(token_ids=b"", logprobs=b"", text="", finish_reason="length"),
            ],
            version_min=1,
            version_max=2,
            actor_id="actor-0",
            t_leased=1.0,
            t_started=1.5,
            t_finished=2.0,
        ),
        ScoredGroup(
            lease_id=3,
            prompt_id="p3",
            prompt_token_ids=pack_ids([7, 8]),
            completions=[
                ScoredCompletion(token_ids=ids, logprobs=lps, reward=1.0, verdict="positive")
            ],
            forwarded="positives",
            n_total=8,
            n_positive=1,
            verdicts={"positive": 1, "negative": 6, "timeout": 1},
            version_min=1,
            version_max=2,
            actor_id="actor-0",
            t_leased=1.0,
            t_generated=2.0,
            t_verified=2.5,
            verify_seconds=0.4,
        ),
        WeightsReady(version=4, path="/run/weights/v4", sha256="ab" * 32, nbytes=3_200_000),
        WeightsReady(
            version=5,
            path="/run/weights/v5",
            sha256="cd" * 32,
            nbytes=1,
            probe_token_ids=ids,
            probe_prompt_len=2,
            probe_logprobs=pack_f32([-0.1, -0.2]),
        ),
        ManifestRequest(version=5),
        Manifest(
            version=5,
            files=[StreamFile(name="model.safetensors", size=3_200_000, sha256="cd" * 32)],
        ),
        FetchRequest(version=5, file="model.safetensors", offset=4 << 20, length=4 << 20),
        Chunk(version=5, file="config.json", offset=0, nbytes=2, eof=True),
        StreamError(version=1, reason="version 1 is not available", file="model.safetensors"),
        RankCommand(op="publish", version=3, protect=[1, 2], probe=[[1, 2], [3]]),
    ]


SAMPLES = _samples()
FRAMES = [encode(m) for m in SAMPLES]


def test_samples_cover_every_message_type() -> None:
    union = set(typing.get_args(Message))
    assert {type(m) for m in SAMPLES} == union
    # A message class added to the module but not to the decoder's union would be undecodable.
    assert set(messages._Msg.__subclasses__()) == union


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    frame = encode(msg)
    assert isinstance(frame, bytes)
    back = decode(frame)
    assert back == msg and type(back) is type(msg)
    assert back.v == SCHEMA_VERSION
    assert decode(frame, expect=type(msg)) == msg


def test_packed_arrays_survive_the_wire() -> None:
    group = decode(FRAMES[4], expect=RolloutGroup)
    np.testing.assert_array_equal(unpack_ids(group.completions[0].token_ids), [1, 5, 9, 200_000])
    np.testing.assert_array_equal(unpack_f32(group.completions[0].logprobs), [-0.5, -1.25, -3.0, 0])
    assert unpack_ids(group.completions[1].token_ids).shape == (0,)


@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=64))
def test_pack_ids_round_trip(ids: list[int]) -> None:
    buf = pack_ids(ids)
    assert len(buf) == 4 * len(ids)
    out = unpack_ids(buf)
    assert out.dtype == np.dtype("<i4")
    assert out.tolist() == ids


@given(st.lists(st.floats(width=32, allow_nan=False), max_size=64))
def test_pack_f32_round_trip(xs: list[float]) -> None:
    out = unpack_f32(pack_f32(np.array(xs, dtype=np.float32)))
    assert out.dtype == np.dtype("<f4")
    assert out.tolist() == xs


def test_pack_is_little_endian_and_accepts_arrays() -> None:
    assert pack_ids(np.array([1, 256], dtype=np.int64)) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert pack_f32([1.0]) == b"\x00\x00\x80\x3f"
    assert unpack_f32(pack_f32(np.array([np.nan]))).size == 1  # NaN log-probs are data, not errors


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_unpack_rejects_partial_elements(n: int) -> None:
    with pytest.raises(MessageError, match="not a multiple of 4"):
        unpack_ids(b"\x00" * n)
    with pytest.raises(MessageError, match="not a multiple of 4"):
        unpack_f32(b"\x00" * n)


# --- bad frames ------------------------------------------------------------------------------------


def _decode_or_message_error(frame: bytes, expect: type | None = None) -> Message | None:
    """decode's contract: a Message, or MessageError. Anything else escapes and fails the test."""
    try:
        return decode(frame, expect=expect)
    except MessageError:
        return None


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_message_error(frame: bytes) -> None:
    msg = _decode_or_message_error(frame)
    assert msg is None or isinstance(msg, typing.get_args(Message))


@settings(max_examples=300)
@given(data=st.data())
def test_truncated_frames_raise_message_error(data: st.DataObject) -> None:
    frame = data.draw(st.sampled_from(FRAMES))
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(MessageError):
        decode(frame[:cut])


@settings(max_examples=1000)
@given(data=st.data())
def test_one_mutated_byte_decodes_or_raises_message_error(data: st.DataObject) -> None:
    frame = bytearray(data.draw(st.sampled_from(FRAMES)))
    i = data.draw(st.integers(0, len(frame) - 1))
    frame[i] = data.draw(st.integers(0, 255).filter(lambda b: b != frame[i]))
    msg = _decode_or_message_error(bytes(frame))
    # A mutation inside a string or a number can leave a valid message; it must then be well typed.
    if msg is not None:
        assert isinstance(msg, typing.get_args(Message)) and msg.v == SCHEMA_VERSION


@given(msg=st.sampled_from(SAMPLES), v=st.integers(-(2**63), 2**64 - 1).filter(lambda v: v != 1))
def test_wrong_schema_version_raises(msg: Message, v: int) -> None:
    frame = encode(msgspec.structs.replace(msg, v=v))
    with pytest.raises(MessageError, match="schema version"):
        decode(frame)


@given(msg=st.sampled_from(SAMPLES), expect=st.sampled_from(typing.get_args(Message)))
def test_wrong_type_with_expect_raises(msg: Message, expect: type) -> None:
    if isinstance(msg, expect):
        assert decode(encode(msg), expect=expect) == msg
    else:
        with pytest.raises(MessageError, match=f"expected {expect.__name__}"):
            decode(encode(msg), expect=expect)


def _raw(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        _raw(None),
        _raw([1, 2, 3]),
        _raw({"type": "nope", "v": 1}),
        _raw({"v": 1, "actor_id": "a", "n": 1}),  # no tag
        _raw({"type": "lease_request", "v": 1, "actor_id": "a"}),  # missing field
        _raw({"type": "lease_request", "v": 1, "actor_id": "a", "n": "4"}),  # wrong type
        _raw({"type": "lease_request", "v": 1, "actor_id": "a", "n": 4, "extra": 0}),
        _raw({"type": "lease_request", "v": "1", "actor_id": "a", "n": 4}),
        _raw({"type": "leases", "v": 1, "leases": [{"lease_id": 1}], "learner_version": 0}),
        _raw({"type": "scored_group", **{"v": 1}}),
        FRAMES[0] + b"\x00",  # trailing garbage after a valid message
        b"\xc1",  # a byte msgpack never uses
        b"\xdd\xff\xff\xff\xff",  # array header claiming 4 G elements
    ],
)
def test_malformed_frames_raise_message_error(frame: bytes) -> None:
    with pytest.raises(MessageError):
        decode(frame)


def test_bad_verdict_is_rejected() -> None:
    group = SAMPLES[5]
    assert isinstance(group, ScoredGroup)
    raw = msgspec.to_builtins(group, builtin_types=(bytes,))
    assert decode(_raw(raw)) == group
    raw["completions"][0]["verdict"] = "maybe"
    with pytest.raises(MessageError, match="verdict"):
        decode(_raw(raw))
