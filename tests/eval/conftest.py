"""Shared fixture of the evaluation tests: one small sandboxed tracing pool."""

from __future__ import annotations

import pytest

from rrvf_jax.eval import create_trace_pool, eval_sandbox_config


@pytest.fixture(scope="session")
def trace_pool():
  """Two sandboxed tracing workers for the whole eval test session."""
  with create_trace_pool(2, config=eval_sandbox_config()) as pool:
    yield pool
