"""One module per algorithm, each an `Algorithm` (see `base`). Adding one: a module here, its
config class in `popo.common.config` (in the `AlgorithmConfig` union), and a line below."""

from __future__ import annotations

from typing import Any

from popo.common.config import algorithm_config
from popo.learner.algorithms.base import Algorithm, MicroBatch
from popo.learner.algorithms.dr_grpo import DrGrpo
from popo.learner.algorithms.grpo import Grpo
from popo.learner.algorithms.popo import Popo
from popo.learner.algorithms.wapo import Wapo

ALGORITHMS: dict[str, type[Algorithm]] = {a.name: a for a in (Popo, Grpo, DrGrpo, Wapo)}


def make_algorithm(cfg: Any) -> Algorithm:
    """The algorithm of an `[algorithm]` config section, or of a name with default settings."""
    if isinstance(cfg, str):
        cfg = algorithm_config(cfg)
    return ALGORITHMS[cfg.name](cfg)


__all__ = ["ALGORITHMS", "Algorithm", "MicroBatch", "make_algorithm"]
