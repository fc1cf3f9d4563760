"""Shared fixtures. Nothing in the test suite may call out to the network."""

import os

from popo.deploy.cli import OFFLINE_ENV

for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


# --- demo model fixtures (common/demo_model.py) ---------------------------------------------------
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A random-init tiny Qwen2 + the character tokenizer (HF directory; built in ~1 s)."""
    from popo.common.demo_model import save_random_model

    return save_random_model(tmp_path_factory.mktemp("random-model") / "model")


@pytest.fixture(scope="session")
def demo_model_dir():
    """The warm-started demo model of the default config, cached in `.cache/demo-model` (built once,
    a few minutes, the first time; reused by later runs)."""
    from popo.common.config import DemoModelConfig, ModelConfig, SyntheticTaskConfig
    from popo.common.demo_model import ensure_demo_model

    cache = Path(__file__).resolve().parent.parent / ".cache" / "demo-model"
    model = ModelConfig(demo=DemoModelConfig(cache_dir=str(cache)))
    return ensure_demo_model(model, SyntheticTaskConfig())
