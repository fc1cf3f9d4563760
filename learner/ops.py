"""What every learner rank does: build the trainer, publish weights, write checkpoints. Rank 0 and
the followers call the same functions, so their collectives match (learner/ranks.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popo.common.config import RunConfig
from popo.common.messages import WeightsReady
from popo.common.run_dir import RunDir

if TYPE_CHECKING:
    from popo.learner.publish import PublishedChange

log = logging.getLogger("popo.learner")


def build_trainer(
    cfg: RunConfig, run_dir: Path, model_dir: Path, device: str | None = None
) -> tuple[Any, Any]:
    """(trainer, tokenizer), restored from the run's latest checkpoint if there is one. Every
    learner rank calls this (with a process group, loading the checkpoint is a collective)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from popo.learner.checkpoint import latest_checkpoint, load_checkpoint
    from popo.learner.trainer import Trainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(
        model,
        cfg.learner,
        cfg.algorithm,
        max_completion_len=cfg.actor.max_tokens,
        temperature=cfg.actor.temperature,
        pad_id=tokenizer.pad_token_id or 0,
        device=device,
    )
    ckpt = latest_checkpoint(RunDir(run_dir).checkpoints)
    if ckpt is not None:
        load_checkpoint(trainer, ckpt)
        log.info("resumed from %s (step %d)", ckpt, trainer.step)
    return trainer, tokenizer


def write_weights(
    trainer: Any,
    cfg: RunConfig,
    run_dir: Path,
    model_dir: Path,
    version: int,
    protect: set[int],
    probe: tuple[list[int], list[int]] | None,
    on_failure: Any = None,
    change: PublishedChange | None = None,
) -> WeightsReady | None:
    """Publish the policy as version `version` of the run's `WeightStore` (every rank calls; rank 0
    writes and returns the announcement)."""
    from popo.learner.publish import publish_dtype, publish_weights

    lc = cfg.learner
    dtype = publish_dtype(lc.publish_dtype, cfg.model.dtype, trainer.device.type)
    return publish_weights(
        trainer.policy,
        RunDir(run_dir).weights,
        version,
        source_dir=model_dir,
        keep=lc.keep_weights,
        protect=protect,
        dtype=dtype,
        probe=probe,
        pad_id=trainer.pad_id,
        retries=lc.write_retries,
        backoff_s=lc.write_retry_backoff_s,
        on_failure=on_failure,
        change=change,
        rounding=lc.publish_rounding,
    )


def write_checkpoint(trainer: Any, cfg: RunConfig, run_dir: Path, on_failure: Any = None) -> None:
    """Checkpoint the trainer (every rank calls; rank 0 writes)."""
    from popo.learner.checkpoint import save_checkpoint

    lc = cfg.learner
    save_checkpoint(
        trainer,
        RunDir(run_dir).checkpoints,
        keep=lc.keep_checkpoints,
        retries=lc.write_retries,
        backoff_s=lc.write_retry_backoff_s,
        on_failure=on_failure,
    )
