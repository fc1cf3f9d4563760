"""Learner test fixtures."""

import pytest
from learner_helpers import tiny_qwen2


@pytest.fixture
def model():
    return tiny_qwen2()
