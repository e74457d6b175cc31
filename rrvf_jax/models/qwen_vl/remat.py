"""Per-layer rematerialisation: a checkpoint policy set while tracing applies to every layer."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx

_POLICY: contextvars.ContextVar[Callable[..., bool] | None] = contextvars.ContextVar(
  "rrvf_jax_layer_remat", default=None
)


@contextlib.contextmanager
def layer_remat(policy: Callable[..., bool] | None) -> Iterator[None]:
  """Within this context (at trace time), decoder and vision layers are rematerialised."""
  token = _POLICY.set(policy)
  try:
    yield
  finally:
    _POLICY.reset(token)


def call_layer(layer: nnx.Module, *args: Any) -> Any:
  """`layer(*args)`, under `jax.checkpoint` with the active policy when one is set.

  One checkpoint per layer bounds the backward pass's live activations to the policy's saved
  values at every layer boundary plus one layer's recomputation (a single checkpoint around the
  whole loss would replay the full forward at once and save nothing).
  """
  policy = _POLICY.get()
  if policy is None:
    return layer(*args)
  # A pure jax.checkpoint of (layer state, inputs): the layer only reads its parameters, so
  # nothing needs writing back, and it works under any outer transform. nnx.remat writes the
  # state back to the module, which fails when the module comes from an outer trace level (the
  # GRPO loss encodes images one by one in a lax.map over the model it closes over).
  graphdef, state = nnx.split(layer)
  run = lambda state, *xs: nnx.merge(graphdef, state)(*xs)
  return jax.checkpoint(run, policy=policy)(state, *args)
