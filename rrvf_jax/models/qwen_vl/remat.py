"""Per-layer rematerialisation: a checkpoint policy set while tracing applies to every layer."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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


def call_layers(layers: Sequence[nnx.Module], x: jax.Array, *args: Any) -> jax.Array:
  """`x` through `layers` in order (each `layer(x, *args)`), rematerialised per layer when a
  policy is set: then as one `lax.scan` over the layers' stacked states.

  Unrolled, the checkpoints do not bound memory on TPU: each layer's recomputation depends only on
  its saved input, and XLA's scheduler ran most of them ahead of the backward pass (compile_check,
  7B GRPO micro-batch on v5p-64: the MLP intermediates of 17 layers live at once, 85 GiB at the
  peak). Inside a scan the backward is a loop that recomputes one layer per iteration, and the
  compiler sees one layer instead of all of them. The stacked states are a per-step copy of the
  layers' (sharded) parameters; their gradient flows back to each layer's own.
  """
  policy = _POLICY.get()
  splits = [nnx.split(layer) for layer in layers] if policy is not None else []
  if len(splits) < 2 or any(g != splits[0][0] for g, _ in splits):
    for layer in layers:
      x = call_layer(layer, x, *args)
    return x
  graphdef = splits[0][0]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(state for _, state in splits))

  def body(x, state):
    return nnx.merge(graphdef, state)(x, *args), None

  x, _ = jax.lax.scan(jax.checkpoint(body, policy=policy), x, stacked)
  return x
