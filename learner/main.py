"""`popo learner`: the process entry of the learner role, for one rank or several.

With `learner.devices` > 1 it starts that many ranks of itself (or, started by torchrun, is one):
rank 0 runs the learner role (`service.Learner`), the others `follow` its commands.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from popo.common.config import RunConfig
from popo.common.demo_model import resolve_model_dir
from popo.common.messages import RankCommand, ScoredGroup, decode
from popo.common.process import release_free_memory
from popo.learner.ops import build_trainer, write_checkpoint, write_weights
from popo.learner.ranks import RankLink

log = logging.getLogger("popo.learner")


def main(cfg: RunConfig, run_dir: str | Path) -> int:
    """Run until `total_steps` (exit 0) or an error (logged, exit 1)."""
    from popo.learner import ranks

    if cfg.learner.devices > 1 and not ranks.in_group():
        return ranks.launch(ranks.main_argv(), cfg.learner.devices)
    if not ranks.in_group():
        return _leader_main(cfg, run_dir, None)
    rank, world, device = ranks.init_group(cfg.learner.device)
    log.info("learner rank %d of %d on %s", rank, world, device)
    if rank > 0:
        ranks.leave_group(_follower_main(cfg, Path(run_dir), device, rank))
    ranks.leave_group(_leader_main(cfg, run_dir, device))


def follow(cfg: RunConfig, run_dir: Path, model_dir: Path, device: str) -> None:
    """Learner ranks 1..N-1: build the same trainer, then do what rank 0 says until `stop`."""
    trainer, _ = build_trainer(cfg, run_dir, model_dir, device)
    link = RankLink(trainer.device)
    while (cmd := link.recv()).op != "stop":
        if cmd.op == "train":
            trainer.train_step([decode(b, ScoredGroup) for b in cmd.groups])
        elif cmd.op == "publish":
            probe = (cmd.probe[0], cmd.probe[1]) if cmd.probe else None
            write_weights(trainer, cfg, run_dir, model_dir, cmd.version, set(cmd.protect), probe)
        elif cmd.op == "checkpoint":
            write_checkpoint(trainer, cfg, run_dir)
        if cfg.learner.release_memory:
            release_free_memory()


def _follower_main(cfg: RunConfig, run_dir: Path, device: str | None, rank: int) -> int:
    # rank 0 stops the group (a `stop` command after its current step); a signal here would
    # only kill this rank mid-collective
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        follow(cfg, run_dir, resolve_model_dir(cfg), device or "cpu")
        return 0
    except Exception:
        log.exception("learner rank %d failed", rank)
        return 1


def _leader_main(cfg: RunConfig, run_dir: str | Path, device: str | None) -> int:
    from popo.learner.service import Learner

    learner: Learner | None = None

    def on_signal(signum: int, _frame: object) -> None:
        log.info("learner: signal %d, stopping after the current step", signum)
        if learner is not None:
            learner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        learner = Learner(cfg, run_dir, resolve_model_dir(cfg), device)
        learner.setup()
        learner.run()
        if learner.link is not None:
            learner.link.send(RankCommand(op="stop"))
        return 0
    except Exception:
        log.exception("learner failed")
        return 1
    finally:
        if learner is not None:
            learner.close()
