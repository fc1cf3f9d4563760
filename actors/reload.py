"""Checks an actor runs on an announced weight version before and after loading it
(docs/architecture.md, Weights).

Before: the file must hash to the announced sha256 (`common.weights.verify_weights`) and its
safetensors header must name every parameter of the served model with the same shape, so a file that
would load only partly (and silently leave old tensors behind) is rejected before the engine is
touched. After: the fixed probe in `WeightsReady` compares the actor's log-probs with the learner's.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from popo.common.weights import WeightsError

Schema = dict[str, tuple[int, ...]]
"""Tensor name -> shape."""

_MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB


def read_schema(path: str | Path) -> Schema:
    """Tensor names and shapes from a safetensors file's header (reads only the header).

    Raises WeightsError on a missing, unreadable or malformed file.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise WeightsError(f"{p}: too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise WeightsError(f"{p}: header length {n} is not plausible")
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"{p}: {e.strerror}") from None
    if len(raw) != n:
        raise WeightsError(f"{p}: truncated header")
    try:
        header = json.loads(raw)
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{p}: malformed safetensors header: {e}") from None


def model_schema(model_dir: str | Path) -> Schema:
    """Union of the headers of every *.safetensors file of a model directory (sharded or not)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{model_dir}: no *.safetensors file")
    schema: Schema = {}
    for f in files:
        schema.update(read_schema(f))
    return schema


def check_data_length(path: str | Path) -> None:
    """Raise WeightsError unless the file is exactly as long as its header says: a file cut short
    (or with trailing bytes) whose checksum was announced as is must not reach the engine, which
    would load part of it and leave the rest of the old weights behind."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        size = p.stat().st_size
    except (OSError, ValueError, struct.error) as e:
        raise WeightsError(f"{p}: unreadable safetensors header: {e}") from None
    try:
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (KeyError, TypeError, IndexError) as e:
        raise WeightsError(f"{p}: malformed safetensors header: {e}") from None
    if size != 8 + n + end:
        raise WeightsError(f"{p}: {size} bytes, its header describes {8 + n + end}")


def check_schema(path: str | Path, expected: Schema) -> None:
    """Raise WeightsError unless the file holds every tensor of `expected` with its shape, and
    all of their bytes."""
    got = read_schema(path)
    missing = sorted(set(expected) - set(got))
    if missing:
        raise WeightsError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    wrong = [k for k in expected if got[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise WeightsError(f"{path}: {k} has shape {got[k]}, the served model {expected[k]}")
    check_data_length(path)


def probe_mismatch(actor_lp: np.ndarray, learner_lp: np.ndarray) -> tuple[float, float]:
    """Parity of the actor's and the learner's log-probs of the same probe tokens.

    actor_lp, learner_lp: [T] log-probs of the probe continuation.
    Returns (mismatch_kl, max_abs_diff). mismatch_kl is the k3 estimate of KL(learner || actor)
    on tokens taken as samples of the learner: mean(r - 1 - log r), r = exp(actor - learner);
    it is >= 0 and 0 only when the two agree on every token.
    """
    if actor_lp.shape != learner_lp.shape:
        raise ValueError(f"probe shapes differ: actor {actor_lp.shape}, learner {learner_lp.shape}")
    d = actor_lp.astype(np.float64) - learner_lp.astype(np.float64)  # log r, [T]
    kl = float(np.mean(np.expm1(d) - d)) if d.size else 0.0
    return kl, float(np.max(np.abs(d))) if d.size else 0.0
