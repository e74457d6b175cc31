"""The pure, jitted train step: gradients (accumulated over micro-batches), clipping, AdamW update.

`loss_fn(model, batch) -> (loss_sum, weight, aux)` returns a *sum* over tokens and the tokens'
total weight. The step divides by the weight summed over all micro-batches, so accumulating M
micro-batches gives exactly the token-mean gradient of one batch holding all of them (a mean of
per-micro-batch means would weight short micro-batches more).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from rrvf_jax import sharding as sharding_lib
from rrvf_jax.models.qwen_vl.remat import layer_remat
from rrvf_jax.train import batch as batch_lib
from rrvf_jax.train import state as state_lib
from rrvf_jax.train.state import TrainState

LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, jax.Array, Mapping[str, jax.Array]]]
StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]

# Which intermediates the backward pass keeps when remat is on; everything else is recomputed.
REMAT_POLICIES = {
  # Keep the outputs of weight matmuls (no batch dims in the dot), recompute attention and the
  # element-wise work: most of the memory saving for a fraction of the recompute.
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # Keep nothing: the whole forward runs again in the backward.
  "full": jax.checkpoint_policies.nothing_saveable,
}


def _remat_policy(remat: bool | str) -> Callable[..., bool] | None:
  """The checkpoint policy for `remat` (False: none; True: "dots")."""
  if remat is False or remat in ("", "none"):
    return None
  name = "dots" if remat is True else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; known: {[False, True, *REMAT_POLICIES]}")
  return REMAT_POLICIES[name]


def _check_micro_axis(batch: Any, micro_batches: int) -> None:
  """Raises a ValueError naming the first leaf without the leading micro-batch axis."""
  for path, x in jax.tree_util.tree_leaves_with_path(batch):
    if not x.shape or x.shape[0] != micro_batches:
      raise ValueError(
        f"micro_batches={micro_batches} but batch{jax.tree_util.keystr(path)} has shape "
        f"{x.shape}; build the batch with train.batch.stack_micro_batches"
      )


def _grad_fn(graphdef: nnx.GraphDef, loss_fn: LossFn, remat: bool | str):
  """(params, batch) -> (grads of loss_sum, loss_sum, weight, aux) for one micro-batch."""

  policy = _remat_policy(remat)

  def loss_of_params(params: nnx.State, batch: Any):
    # Read while tracing: every decoder and vision layer gets its own checkpoint.
    with layer_remat(policy):
      loss_sum, weight, aux = loss_fn(nnx.merge(graphdef, params), batch)
    return loss_sum.astype(jnp.float32), (jnp.asarray(weight, jnp.float32), dict(aux))

  def grad_fn(params: nnx.State, batch: Any):
    (loss_sum, (weight, aux)), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
      params, batch
    )
    return grads, loss_sum, weight, aux

  return grad_fn


def _accumulate(grad_fn, params: nnx.State, batch: Any, micro_batches: int, constrain):
  """Sums gradients, loss sums, weights and aux over the leading micro-batch axis (lax.scan)."""
  if micro_batches == 1:
    return grad_fn(params, batch)
  first = jax.tree.map(lambda x: x[0], batch)
  zeros = jax.tree.map(
    lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first)
  )
  zeros = (constrain(zeros[0]), *zeros[1:])

  def body(carry, micro_batch):
    out = grad_fn(params, micro_batch)
    total = jax.tree.map(jnp.add, carry, out)
    return (constrain(total[0]), *total[1:]), None

  total, _ = jax.lax.scan(body, zeros, batch)
  return total


def make_train_step(
  graphdef: nnx.GraphDef,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  *,
  micro_batches: int = 1,
  remat: bool | str = False,
  mesh: Mesh | None = None,
  rules: sharding_lib.Rules | str | None = None,
  schedule: optax.Schedule | None = None,
) -> StepFn:
  """A jitted `(state, batch) -> (state, metrics)`; the input state is donated.

  Args:
    graphdef: the model's graphdef (from `init_train_state` / `train_state_from_model`).
    loss_fn: `(model, batch) -> (loss_sum, weight, aux)`; `aux` values are sums over tokens too
      and are reported divided by the total weight.
    tx: the optax transformation the state's `opt_state` was made with.
    micro_batches: M > 1 accumulates gradients over a leading `[M, ...]` axis of every batch leaf
      (see `train.batch.stack_micro_batches`); M = 1 takes the batch as it is.
    remat: False, True (= "dots") or a policy name in REMAT_POLICIES: a jax.checkpoint with that
      policy around each decoder and vision layer (`models.qwen_vl.remat`).
    mesh: when given, activations follow `rules` (traced under `sharding.activation_rules`), the
      batch is constrained to its data-parallel sharding and the new state to the state's own
      shardings, so the step compiles once and keeps its layout.
    rules: sharding rules (a preset name or a table); default FSDP_TP.
    schedule: the learning-rate schedule, to report `lr` (omitted without it).

  Returns:
    The step. Metrics: loss (token mean), grad_norm (before clipping), tokens (total weight), lr,
    and each aux key divided by the total weight.
  """
  if micro_batches < 1:
    raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
  rules = state_lib.resolve_rules(rules)
  grad_fn = _grad_fn(graphdef, loss_fn, remat)

  def constrain(tree: Any, shardings: Any | None = None) -> Any:
    if mesh is None:
      return tree
    if shardings is None:
      shardings = state_lib.state_shardings(tree, mesh, rules)
    return jax.lax.with_sharding_constraint(tree, shardings)

  def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    if micro_batches > 1:
      _check_micro_axis(batch, micro_batches)
    context = (
      sharding_lib.activation_rules(mesh, rules) if mesh is not None else contextlib.nullcontext()
    )
    with context:
      if mesh is not None:
        shardings = batch_lib.batch_shardings(batch, mesh, rules, micro_batches=micro_batches)
        batch = constrain(batch, shardings)
      grads, loss_sum, weight, aux = _accumulate(
        grad_fn, state.params, batch, micro_batches, constrain
      )
    denom = jnp.where(weight > 0, weight, 1.0)
    grads = constrain(jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = constrain(state.replace(step=state.step + 1, params=params, opt_state=opt_state))
    metrics = {
      "loss": loss_sum / denom,
      "grad_norm": optax.tree.norm(grads),
      "tokens": weight,
      **{k: v / denom for k, v in aux.items()},
    }
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    return new_state, metrics

  return jax.jit(step, donate_argnums=0)
