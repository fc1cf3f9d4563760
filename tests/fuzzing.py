"""Frame strategies for fuzzing the roles' endpoints (tests/deploy/test_fuzz.py,
tests/actors/test_actor_fuzz.py): random frames and mutated valid ones, and the classifier that says
which of them a role must receive (anything else it must drop and count)."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import zmq
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from popo.common.messages import (
    Completion,
    FetchRequest,
    LeaseRequest,
    Leases,
    ManifestRequest,
    MessageError,
    RolloutGroup,
    ScoredCompletion,
    ScoredGroup,
    WeightsReady,
    check,
    decode,
    encode,
    pack_f32,
    pack_ids,
)

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,  # the examples depend on a live role; a replayed one proves nothing extra
)


# --- frames ----------------------------------------------------------------------------------------


def completion(i: int) -> Completion:
    return Completion(
        token_ids=pack_ids([5 + i, 6]),
        logprobs=pack_f32([-0.5, -0.25]),
        text=f"\\boxed{{{i}}}",
        finish_reason="stop",
    )


def rollout(lease_id: int = 10**9) -> RolloutGroup:
    return RolloutGroup(
        lease_id=lease_id,
        prompt_id="p",
        prompt_token_ids=pack_ids([1, 2, 3]),
        gold="1",
        completions=[completion(i) for i in range(3)],
        version_min=0,
        version_max=0,
        actor_id="fuzz",
        t_leased=0.0,
        t_started=0.0,
        t_finished=0.0,
    )


def scored(lease_id: int = 10**9) -> ScoredGroup:
    c = ScoredCompletion(
        token_ids=pack_ids([5, 6]), logprobs=pack_f32([-0.5, -0.25]), reward=1.0, verdict="positive"
    )
    return ScoredGroup(
        lease_id=lease_id,
        prompt_id="p",
        prompt_token_ids=pack_ids([1, 2]),
        completions=[c],
        forwarded="positives",
        n_total=4,
        n_positive=1,
        verdicts={"positive": 1, "negative": 3},
        version_min=0,
        version_max=0,
        actor_id="fuzz",
        t_leased=0.0,
        t_generated=0.0,
        t_verified=0.0,
        verify_seconds=0.0,
    )


def ready(version: int = 10**6) -> WeightsReady:
    return WeightsReady(version=version, path="/nonexistent/v", sha256="ab" * 32, nbytes=8)


BASES = [
    LeaseRequest(actor_id="fuzz", n=1, policy_version=0),
    Leases(leases=[], learner_version=0),
    rollout(),
    scored(),
    ready(),
    ManifestRequest(version=1),
    FetchRequest(version=1, file="model.safetensors", offset=0, length=16),
]

# Content that decodes but cannot be right (messages.check) or ints past what SQLite stores.
SEMANTIC_BAD = [
    msgspec.structs.replace(rollout(), prompt_token_ids=b"\x01\x02\x03"),
    msgspec.structs.replace(
        rollout(), completions=[msgspec.structs.replace(completion(0), logprobs=b"")]
    ),
    msgspec.structs.replace(rollout(), version_min=3, version_max=1),
    msgspec.structs.replace(scored(), n_positive=9),
    msgspec.structs.replace(scored(), n_total=-1, n_positive=-1, completions=[]),
    msgspec.structs.replace(
        scored(),
        completions=[
            ScoredCompletion(token_ids=b"", logprobs=b"", reward=float("nan"), verdict="positive")
        ],
    ),
    msgspec.structs.replace(scored(), lease_id=2**64 - 1),
    msgspec.structs.replace(rollout(), lease_id=-(2**63) - 1 + 1, version_max=2**64 - 1),
    LeaseRequest(actor_id="fuzz", n=-5),
    LeaseRequest(actor_id="fuzz", n=2**64 - 1),
    msgspec.structs.replace(ready(), sha256="not-a-digest"),
    msgspec.structs.replace(ready(), version=-1),
    msgspec.structs.replace(ready(), probe_token_ids=b"\x00" * 5),
    msgspec.structs.replace(ready(), probe_token_ids=pack_ids([1, 2]), probe_prompt_len=3),
]

# msgpack headers that announce far more than the frame holds (str32, bin32, array32, map32).
HUGE_HEADERS = [
    b"\xdb\xff\xff\xff\xff",
    b"\xc6\xff\xff\xff\xff",
    b"\xdd\xff\xff\xff\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    frame = encode(draw(st.sampled_from(BASES)))
    how = draw(st.sampled_from(["truncate", "flip", "insert_huge", "replace_huge", "append"]))
    if how == "truncate":
        return frame[: draw(st.integers(0, len(frame) - 1))]
    if how == "flip":
        buf = bytearray(frame)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= draw(st.integers(1, 255))
        return bytes(buf)
    huge = draw(st.sampled_from(HUGE_HEADERS))
    i = draw(st.integers(0, len(frame)))
    if how == "insert_huge":
        return frame[:i] + huge + frame[i:]
    if how == "replace_huge":
        return frame[:i] + huge + frame[i + len(huge) :]
    return frame + draw(st.binary(min_size=1, max_size=16))


@st.composite
def other_version(draw: st.DrawFn) -> bytes:
    msg = draw(st.sampled_from(BASES))
    return encode(msgspec.structs.replace(msg, v=draw(st.sampled_from([0, 2, -1, 2**31]))))


def frames(valid: list[object]) -> st.SearchStrategy[list[bytes]]:
    """Multipart messages: mostly one frame (random, mutated, wrong version, wrong type,
    semantically bad, or valid for this endpoint), sometimes extra frames."""
    one = st.one_of(
        st.binary(max_size=256),
        mutated(),
        other_version(),
        st.sampled_from(BASES).map(encode),  # every type: the wrong ones must be dropped
        st.sampled_from(SEMANTIC_BAD).map(encode),
        st.sampled_from(valid).map(encode),
    )
    return st.one_of(
        one.map(lambda f: [f]),
        st.lists(one, min_size=2, max_size=4),
        st.just([b""]),
    )


def is_valid(parts: list[bytes], accepts: tuple[type, ...]) -> bool:
    """Whether the role should receive this multipart message (anything else must be counted)."""
    if len(parts) != 1:
        return False
    try:
        msg = decode(parts[0])
        check(msg)
    except MessageError:
        return False
    return isinstance(msg, accepts)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def raw_socket(ctx: zmq.Context, kind: int, addr: str) -> zmq.Socket:
    s = ctx.socket(kind)
    s.linger = 0
    s.connect(addr)
    return s


def metric(registry, name: str) -> float:  # type: ignore[no-untyped-def]
    value = registry.get_sample_value(name)
    return 0.0 if value is None else value
