"""Wire messages of every endpoint (DESIGN §4), as msgspec Structs encoded with msgpack.

Each message is a tagged struct carrying the schema version `v`. Token ids and log-probs travel as
packed little-endian arrays (`bytes`), not Python lists. `decode` turns any malformed, truncated,
unknown or wrong-version frame into one typed error, `MessageError`, so a receiver can count and
drop it without ever crashing.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import msgspec
import numpy as np

SCHEMA_VERSION = 1

Verdict = Literal["positive", "negative", "timeout", "error"]


class MessageError(ValueError):
    """A frame could not be decoded into a known message of this schema version."""


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    v: int = SCHEMA_VERSION
    """Schema version of the sender."""


# --- packed arrays -----------------------------------------------------------------------------


def pack_ids(ids: np.ndarray | list[int]) -> bytes:
    """Token ids -> little-endian int32 bytes."""
    return np.asarray(ids, dtype="<i4").tobytes()


def unpack_ids(buf: bytes) -> np.ndarray:
    """Inverse of `pack_ids`; raises MessageError on a length that is not a whole number of ids."""
    if len(buf) % 4:
        raise MessageError(f"packed int32 array has {len(buf)} bytes, not a multiple of 4")
    return np.frombuffer(buf, dtype="<i4")


def pack_f32(x: np.ndarray | list[float]) -> bytes:
    """Floats (log-probs) -> little-endian float32 bytes."""
    return np.asarray(x, dtype="<f4").tobytes()


def unpack_f32(buf: bytes) -> np.ndarray:
    """Inverse of `pack_f32`."""
    if len(buf) % 4:
        raise MessageError(f"packed float32 array has {len(buf)} bytes, not a multiple of 4")
    return np.frombuffer(buf, dtype="<f4")


# --- dispatch: actor DEALER <-> learner ROUTER ----------------------------------------------------


class LeaseRequest(_Msg, tag="lease_request"):
    """An actor asks for up to `n` prompt leases (credit-based flow control)."""

    actor_id: str
    n: int
    policy_version: int = -1
    """The weight version the actor currently serves (-1: not known yet)."""
    mismatch_kl: float | None = None
    """Parity probe result after the actor's last reload (DESIGN §3), if any."""


class Lease(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One prompt handed to one actor until `deadline` (unix seconds)."""

    lease_id: int
    prompt_id: str
    prompt: str
    """The full prompt text, template already applied."""
    gold: str
    """Gold answer, carried along so the verifier stays stateless."""
    dispatch_version: int
    deadline: float


class Leases(_Msg, tag="leases"):
    """The learner's answer to a LeaseRequest; may hold fewer than asked (admission control)."""

    leases: list[Lease]
    learner_version: int
    retry_after_s: float = 0.0
    """When no lease is given, how long the actor should wait before asking again."""


# --- rollouts: actor PUSH -> verifier PULL ------------------------------------------------------


class Completion(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One sampled completion with the behaviour policy's log-probs of its tokens."""

    token_ids: bytes
    """int32 packed, length T."""
    logprobs: bytes
    """float32 packed, length T: log mu(y_t | x, y_<t) under the sampling policy."""
    text: str
    finish_reason: str
    """`stop` or `length` (vLLM's vocabulary)."""


class RolloutGroup(_Msg, tag="rollout_group"):
    """G completions of one prompt, tagged with the policy version(s) that produced them."""

    lease_id: int
    prompt_id: str
    prompt_token_ids: bytes
    """int32 packed prompt tokens."""
    gold: str
    completions: list[Completion]
    version_min: int
    """Oldest policy version that generated any token of the group (staleness uses this)."""
    version_max: int
    actor_id: str
    t_leased: float
    t_started: float
    t_finished: float


# --- ingest: verifier PUSH -> learner PULL --------------------------------------------------------


class ScoredCompletion(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    token_ids: bytes
    logprobs: bytes
    reward: float
    verdict: Verdict


class ScoredGroup(_Msg, tag="scored_group"):
    """A verified group: the positives only (or everything, for GRPO) plus the group summary.

    Sent for all-negative groups too (with no completions) so the ledger can close their lease.
    """

    lease_id: int
    prompt_id: str
    prompt_token_ids: bytes
    completions: list[ScoredCompletion]
    forwarded: Literal["positives", "all"]
    n_total: int
    n_positive: int
    verdicts: dict[str, int]
    """Counts by verdict: positive / negative / timeout / error."""
    version_min: int
    version_max: int
    actor_id: str
    t_leased: float
    t_generated: float
    t_verified: float
    verify_seconds: float


# --- weights: learner PUB -> actor SUB --------------------------------------------------------------


class WeightsReady(_Msg, tag="weights_ready"):
    """A new policy version is on disk at `path` (a directory holding model.safetensors)."""

    version: int
    path: str
    sha256: str
    """Hex digest of model.safetensors."""
    nbytes: int
    probe_token_ids: bytes = b""
    """int32 packed probe sequence (prompt + continuation) for the parity check."""
    probe_prompt_len: int = 0
    probe_logprobs: bytes = b""
    """float32 packed learner log-probs of the probe continuation tokens."""


Message = LeaseRequest | Leases | RolloutGroup | ScoredGroup | WeightsReady
M = TypeVar("M", bound=_Msg)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)  # type: ignore[arg-type]


def encode(msg: _Msg) -> bytes:
    """Message -> msgpack frame."""
    return _encoder.encode(msg)


def decode(frame: bytes, expect: type[M] | None = None) -> Message:
    """msgpack frame -> message. Raises MessageError (and nothing else) for a bad frame, a frame of
    another schema version, or (with `expect`) a message of another type."""
    try:
        msg = _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise MessageError(f"malformed frame ({len(frame)} bytes): {e}") from None
    except Exception as e:  # msgspec raises only the above today; be certain the contract holds
        raise MessageError(f"undecodable frame ({len(frame)} bytes): {type(e).__name__}") from None
    if msg.v != SCHEMA_VERSION:
        raise MessageError(f"schema version {msg.v} != {SCHEMA_VERSION} ({type(msg).__name__})")
    if expect is not None and not isinstance(msg, expect):
        raise MessageError(f"expected {expect.__name__}, got {type(msg).__name__}")
    return msg
