"""Wire messages of every endpoint (docs/architecture.md, Message contracts), as msgspec Structs encoded with msgpack.

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
    """Parity probe result after the actor's last reload (docs/architecture.md, Weights)."""


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


# --- weightstream: actor DEALER <-> learner ROUTER ------------------------------------------------


class StreamFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One file of a version directory."""

    name: str
    size: int
    sha256: str


class ManifestRequest(_Msg, tag="manifest_request"):
    """An actor asks which files version `version` holds."""

    version: int


class Manifest(_Msg, tag="manifest"):
    """The files of `weights/v{version}/` (plain names, sizes, sha256 of each)."""

    version: int
    files: list[StreamFile]


class FetchRequest(_Msg, tag="fetch_request"):
    """One chunk: `length` bytes of `file` of `version` from `offset` (one credit)."""

    version: int
    file: str
    offset: int
    length: int


class Chunk(_Msg, tag="chunk"):
    """The answer to a FetchRequest; `eof` when it reaches the end of the file.

    The `nbytes` bytes themselves follow as the next ZeroMQ frame of the same message rather than
    inside the msgpack, so neither side copies megabytes through the codec."""

    version: int
    file: str
    offset: int
    nbytes: int
    eof: bool


class StreamError(_Msg, tag="stream_error"):
    """A request the weight server cannot serve (version pruned, file not in it, bad range)."""

    version: int
    reason: str
    file: str = ""


# --- learner ranks: rank 0 -> ranks 1..N-1 (a torch.distributed broadcast, not a socket) ---------


class RankCommand(_Msg, tag="rank_command"):
    """What every learner rank does next, so all enter the same collectives in the same order."""

    op: Literal["train", "publish", "checkpoint", "stop"]
    groups: list[bytes] = []
    """`train`: the batch, each an encoded ScoredGroup (every rank gets all; each trains its share)."""
    version: int = 0
    """`publish`: the version number being written."""
    protect: list[int] = []
    """`publish`: versions actors may still be loading (never pruned)."""
    probe: list[list[int]] = []
    """`publish`: [prompt ids, continuation ids] of the parity probe (its forward is collective)."""


Message = (
    LeaseRequest
    | Leases
    | RolloutGroup
    | ScoredGroup
    | WeightsReady
    | ManifestRequest
    | Manifest
    | FetchRequest
    | Chunk
    | StreamError
    | RankCommand
)
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


def check(msg: Message) -> None:
    """Raise MessageError if a decoded message cannot be right: what the schema lets through but a
    receiver would trip over later (a packed array of a partial element, token ids and log-probs of
    different lengths, counts that do not add up, a checksum that is no sha256). `transport.Channel`
    runs it on every received message, so a role never sees such a message."""
    _check_ints(msg)
    if isinstance(msg, LeaseRequest) and msg.n < 0:
        raise MessageError(f"LeaseRequest.n = {msg.n} < 0")
    if isinstance(msg, RolloutGroup | ScoredGroup):
        name = type(msg).__name__
        unpack_ids(msg.prompt_token_ids)
        for i, c in enumerate(msg.completions):
            if len(unpack_ids(c.token_ids)) != len(unpack_f32(c.logprobs)):
                raise MessageError(
                    f"{name} completion {i}: token ids and log-probs differ in length"
                )
        if msg.version_min > msg.version_max:
            raise MessageError(f"{name}: version_min {msg.version_min} > {msg.version_max}")
    if isinstance(msg, ScoredGroup):
        if not 0 <= msg.n_positive <= msg.n_total or len(msg.completions) > msg.n_total:
            raise MessageError(
                f"ScoredGroup: {msg.n_positive} positives, {len(msg.completions)} completions "
                f"of n_total {msg.n_total}"
            )
        if any(not 0.0 <= c.reward <= 1.0 for c in msg.completions):  # also catches NaN
            raise MessageError("ScoredGroup: a reward outside [0, 1]")
    if isinstance(msg, WeightsReady):
        if msg.version < 0 or msg.nbytes < 0:
            raise MessageError(f"WeightsReady: version {msg.version}, nbytes {msg.nbytes}")
        if len(msg.sha256) != 64 or msg.sha256.strip("0123456789abcdef"):
            raise MessageError("WeightsReady: sha256 is not 64 lowercase hex digits")
        n = len(unpack_ids(msg.probe_token_ids))
        unpack_f32(msg.probe_logprobs)
        if not 0 <= msg.probe_prompt_len <= n:
            raise MessageError(f"WeightsReady: probe_prompt_len {msg.probe_prompt_len} of {n} ids")


_INT64 = 1 << 63


def _check_ints(obj: msgspec.Struct) -> None:
    """msgpack carries integers up to 2**64 - 1; ours go to SQLite and numpy as int64."""
    for name in obj.__struct_fields__:
        v = getattr(obj, name)
        values = v.values() if isinstance(v, dict) else v if isinstance(v, list) else (v,)
        for x in values:
            if isinstance(x, msgspec.Struct):
                _check_ints(x)
            elif isinstance(x, int) and not -_INT64 <= x < _INT64:
                raise MessageError(f"{type(obj).__name__}.{name}: {x} does not fit in 64 bits")
