"""Rollout-test fixtures: one tiny policy directory (weights + tokenizer) and its model."""

import pytest

from rrvf_jax.models import qwen_vl
from rrvf_jax.processing import tokens
from rrvf_jax.testing import checkpoints


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory):
  """A random tiny policy in HF layout (seeded), written once per session."""
  return checkpoints.make_tiny_policy_dir(tmp_path_factory.mktemp("policy"), seed=3)


@pytest.fixture(scope="session")
def tok(policy_dir):
  return tokens.load_tokenizer(policy_dir)


@pytest.fixture(scope="session")
def model(policy_dir):
  return qwen_vl.from_hf(policy_dir)
