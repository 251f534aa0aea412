"""Shared fixtures: tiny random checkpoints built in code (no downloads anywhere in the suite)."""
import pytest

from model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Qwen2-architecture checkpoint directory (untied head, GQA, byte-level tokenizer), fp32."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2")
