"""Publishing the policy to actors (docs/architecture.md, Weights): a version of the run's
`WeightStore` (`weights/v{N}/model.safetensors` + sha256).

Only the online policy is published — never the EMA siamese copy, the predictor or the optimizer.
Tensor names are the Hugging Face ones of `model.state_dict()` (`model.layers.0.self_attn.q_proj.
weight`, `lm_head.weight`, …), which is the checkpoint format vLLM's in-place reload
(`collective_rpc("reload_weights", kwargs={"weights_path": dir})`) maps onto its fused layers.
A tied `lm_head.weight` is left out, as `save_pretrained` does. Config and tokenizer files of the
source model directory are hard-linked into every version so each version directory is a complete
HF model directory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from popo.common.messages import WeightsReady, pack_f32, pack_ids
from popo.common.weights import WeightStore, cast_for_publish, retry_write
from popo.learner.model import sequence_logprobs

# Files of a HF model directory that describe the model rather than hold its weights.
_SKIP = re.compile(r"(\.safetensors(\.sha256)?|\.bin|\.pt|\.pth|\.safetensors\.index\.json)$")


def hf_state_dict(
    model: nn.Module, dtype: torch.dtype | None = None, rounding: str = "nearest"
) -> dict[str, torch.Tensor]:
    """The policy's tensors under HF names, on CPU, optionally cast (e.g. to the actors' dtype;
    `rounding` as `learner.publish_rounding`)."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    out = {}
    for k, v in model.state_dict().items():
        if tied and k == "lm_head.weight":
            continue
        v = v.detach()
        if hasattr(v, "full_tensor"):  # FSDP2 shard: all-gather (a collective: every rank calls)
            v = v.full_tensor()
        out[k] = (cast_for_publish(v, dtype, rounding, k) if dtype is not None else v).cpu()
    return out


def publish_dtype(publish: str, served: str, learner_device: str) -> torch.dtype:
    """The dtype of published versions: `learner.publish_dtype`, whose `auto` is the actors'
    serving dtype (`model.dtype`, whose own `auto` is bf16 on GPU and fp32 on CPU, judged by
    the learner's device type `learner_device`, e.g. "cuda")."""
    name = publish if publish != "auto" else served
    if name == "auto":
        name = "bfloat16" if learner_device == "cuda" else "float32"
    return getattr(torch, name)


class PublishedChange:
    """The share of a fixed sample of the policy's elements whose published value, in the published
    dtype, differs from the previous publish's.

    Rounding to a low-precision serving dtype holds back the part of an update smaller than its
    spacing: with AdamW each element moves about `lr` a step, while bfloat16's spacing near a
    weight w is |w| / 256 to |w| / 128. Near 0, the actors sample a policy that lags the learner's
    by more than the version numbers say (docs/benchmarks-notes.md, "Serving dtype on CPU").
    """

    def __init__(self, per_tensor: int = 4096) -> None:
        self.per_tensor = per_tensor
        """Elements sampled per tensor (evenly strided over it)."""
        self.fraction: float | None = None
        """The last publish's changed share; None until there are two to compare."""
        self._last: torch.Tensor | None = None

    def update(
        self, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, rounding: str = "nearest"
    ) -> None:
        """Compare with the previous call: `tensors` as written with `dtype` and `rounding`
        (`publish_weights`' arguments)."""
        parts = []
        for name in sorted(tensors):
            flat = tensors[name].reshape(-1)
            at = torch.arange(0, flat.numel(), max(1, flat.numel() // self.per_tensor))
            at = at[: self.per_tensor]
            sample = flat[at]
            if dtype is not None:  # rounded as the writer rounds these elements
                sample = cast_for_publish(sample, dtype, rounding, name, at=at)
            parts.append(sample.float())
        now = torch.cat(parts)
        if self._last is not None and self._last.shape == now.shape:
            self.fraction = (now != self._last).float().mean().item()
        self._last = now


def publish_weights(
    model: nn.Module,
    weights_root: str | Path,
    version: int,
    *,
    source_dir: str | Path | None = None,
    keep: int = 3,
    protect: Collection[int] = (),
    dtype: torch.dtype | None = None,
    probe: tuple[np.ndarray, np.ndarray] | None = None,
    pad_id: int = 0,
    retries: int = 0,
    backoff_s: float = 1.0,
    on_failure: Callable[[OSError], None] | None = None,
    change: PublishedChange | None = None,
    rounding: str = "nearest",
) -> WeightsReady | None:
    """Write the policy as version `version` of the `WeightStore` at `weights_root` atomically,
    prune older versions (`keep`, `protect`) and return its announcement.

    source_dir: HF model directory whose config / tokenizer files are linked into the version.
    dtype: cast of the published tensors (`publish_dtype`: the actors' serving dtype); None keeps
    the policy's own.
    probe: (prompt ids, continuation ids) whose learner log-probs travel in the message so actors
    can measure their parity after the reload.
    change: updated with this version's tensors (rank 0).
    rounding: `learner.publish_rounding` (`common.weights.cast_for_publish`).
    retries, backoff_s, on_failure: a failed write (full disk, I/O error) leaves nothing behind and
    is tried again `retries` times with doubling back-off (`common.weights.retry_write`); the
    announcement exists only once the version directory is complete, fsynced and renamed.
    Under FSDP2 every rank must call this (gathering the shards is a collective); rank 0 writes
    and returns the message, the other ranks return None.
    """
    import torch.distributed as dist

    sharded = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if sharded else 0
    # A CPU policy is cast by the writer, block by block (no second copy of the whole state); on
    # an accelerator the cast runs there, before the copy to the host, which it halves.
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    tensors = hf_state_dict(model, None if on_cpu else dtype, rounding)
    with ThreadPoolExecutor(1, thread_name_prefix="probe") as probing:
        learner_lp: Callable[[], np.ndarray] | None = None
        if probe is not None:
            prompt, cont = (np.asarray(a, dtype=np.int64) for a in probe)
            if sharded:  # its forward is a collective: every rank issues it now, in this order
                lp = sequence_logprobs(model, prompt, cont, pad_id)
                learner_lp = lambda: lp  # noqa: E731
            else:  # it only reads the weights: it runs while they are written
                learner_lp = probing.submit(sequence_logprobs, model, prompt, cont, pad_id).result
        if rank != 0:
            return None
        links = {}
        if source_dir is not None:
            for p in Path(source_dir).iterdir():
                if p.is_file() and not _SKIP.search(p.name):
                    links[p.name] = p
        store = WeightStore(weights_root)
        msg = retry_write(
            lambda: store.publish(
                version, tensors, link_files=links, dtype=dtype, rounding=rounding
            ),
            f"weights {store.dir_name(version)}",
            retries,
            backoff_s,
            on_failure,
        )
        store.prune(keep, protect={*protect, version})
        if change is not None:
            change.update(tensors, dtype, rounding)
        if learner_lp is not None:
            msg.probe_token_ids = pack_ids(np.concatenate([prompt, cont]))
            msg.probe_prompt_len = len(prompt)
            msg.probe_logprobs = pack_f32(learner_lp())
    return msg
