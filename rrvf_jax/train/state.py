"""The train state pytree, its shardings, and creating it abstractly first, then sharded.

`TrainState` holds only arrays (step, parameters, optimiser state, RNG key); the model's graphdef
(its structure and static fields) is kept apart and passed to the step functions as a constant.

Shardings come from each parameter's logical `axes` metadata through `rrvf_jax.sharding`. Optax
states that mirror the parameters (Adam's moments) are built by `tree_map` over the parameter
`nnx.State`, so their leaves are `nnx.Param` variables with the same metadata and get the same
sharding; every other optimiser leaf (step counts) is replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrvf_jax import sharding as sharding_lib

ModelFactory = Callable[[nnx.Rngs], nnx.Module]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a train step reads and replaces.

  Attributes:
    step: int32 scalar, the number of updates applied.
    params: `nnx.State` of the model's `nnx.Param` variables.
    opt_state: the optax state (moments are `nnx.Param` variables mirroring `params`).
    rng: raw uint32 `[2]` PRNG key (checkpoint-friendly); derive per-step keys with
      `jax.random.fold_in(rng, step)`.
  """

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array

  def replace(self, **changes: Any) -> TrainState:
    """A copy with some fields replaced."""
    return dataclasses.replace(self, **changes)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def resolve_rules(rules: sharding_lib.Rules | str | None) -> sharding_lib.Rules:
  """Rules from a preset name or a table; None means the default FSDP + tensor-parallel preset."""
  if rules is None:
    return sharding_lib.FSDP_TP
  return sharding_lib.get_rules(rules) if isinstance(rules, str) else rules


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params); raises a ValueError if the model holds variables other than nnx.Param."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  others = [".".join(str(k) for k in path) for path, _ in nnx.to_flat_state(rest)]
  if others:
    raise ValueError(
      f"the model holds non-parameter variables {others[:8]}; TrainState carries nnx.Param only "
      "(keep caches and other mutable state outside the module)"
    )
  return graphdef, params


def state_shardings(state: Any, mesh: Mesh, rules: sharding_lib.Rules | str | None) -> Any:
  """A tree like `state` (abstract, concrete or traced) with a NamedSharding in place of each leaf.

  Variables (parameters and optimiser moments) are sharded by their logical axes; everything else
  is replicated.
  """
  rules = resolve_rules(rules)
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(x: Any) -> Any:
    if _is_variable(x):
      spec = sharding_lib.trim_spec(sharding_lib.param_sharding(x, mesh, rules).spec)
      return x.replace(NamedSharding(mesh, spec))
    return replicated

  return jax.tree.map(one, state, is_leaf=_is_variable)


def check_state_divisible(abstract: Any, shardings: Any) -> None:
  """Raises a ValueError naming the first state leaf whose shape does not divide its mesh axes."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract)
  for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings), strict=True):
    sharding_lib.check_divisible(leaf.shape, sharding, f"train state {jax.tree_util.keystr(path)}")


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying their sharding (what Orbax restores into)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def _init_fn(make_model: ModelFactory, tx: optax.GradientTransformation, seed: int):
  """A function of no arguments building (graphdef, TrainState) from scratch."""

  def init() -> tuple[nnx.GraphDef, TrainState]:
    rng = jax.random.PRNGKey(seed)
    model_key, state_key = jax.random.split(rng)
    graphdef, params = split_params(make_model(nnx.Rngs(model_key)))
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), state_key)
    return graphdef, state

  return init


def abstract_train_state(
  make_model: ModelFactory,
  tx: optax.GradientTransformation,
  *,
  mesh: Mesh | None = None,
  rules: sharding_lib.Rules | str | None = None,
  seed: int = 0,
) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, TrainState of ShapeDtypeStructs), with shardings when a mesh is given.

  No parameter memory is allocated. This is the restore target of a checkpoint and the source of
  the shardings of `init_train_state`. Raises a readable ValueError when a dimension does not
  divide by its mesh axes.
  """
  graphdef_box: list[nnx.GraphDef] = []
  init = _init_fn(make_model, tx, seed)

  def arrays_only() -> TrainState:
    graphdef, state = init()
    graphdef_box.append(graphdef)
    return state

  abstract = jax.eval_shape(arrays_only)
  if mesh is None:
    return graphdef_box[0], abstract
  shardings = state_shardings(abstract, mesh, rules)
  check_state_divisible(abstract, shardings)
  return graphdef_box[0], _with_shardings(abstract, shardings)


def init_train_state(
  make_model: ModelFactory,
  tx: optax.GradientTransformation,
  *,
  mesh: Mesh | None = None,
  rules: sharding_lib.Rules | str | None = None,
  seed: int = 0,
) -> tuple[nnx.GraphDef, TrainState]:
  """Creates a fresh TrainState, each array materialised directly in its sharding.

  `make_model(rngs)` builds the module (e.g. `lambda rngs: QwenVL(cfg, rngs=rngs)`). The
  initialisation runs under one jit whose `out_shardings` are derived from the abstract state, so no
  device ever holds a whole unsharded parameter.
  """
  graphdef, abstract = abstract_train_state(make_model, tx, mesh=mesh, rules=rules, seed=seed)
  init = _init_fn(make_model, tx, seed)
  out_shardings = None if mesh is None else jax.tree.map(lambda a: a.sharding, abstract)
  state = jax.jit(lambda: init()[1], out_shardings=out_shardings)()
  return graphdef, state


def train_state_from_model(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  *,
  mesh: Mesh | None = None,
  rules: sharding_lib.Rules | str | None = None,
  seed: int = 0,
) -> tuple[nnx.GraphDef, TrainState]:
  """A TrainState around an already-built model (e.g. `params.from_hf(..., mesh=mesh)`).

  Parameters are placed in their shardings (a no-op for ones already there) and the optimiser state
  is created sharded like them. The state takes over the model's arrays: the first donated train
  step deletes them, so use `nnx.merge(graphdef, state.params)` for a live model afterwards.
  """
  graphdef, params = split_params(model)
  rng = jax.random.split(jax.random.PRNGKey(seed))[1]
  if mesh is None:
    params = jax.device_put(params)
    opt_state = jax.jit(tx.init)(params)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, opt_state, rng)
  param_shardings = state_shardings(params, mesh, rules)
  check_state_divisible(params, param_shardings)
  params = jax.device_put(params, param_shardings)
  abstract_opt = jax.eval_shape(tx.init, params)
  opt_shardings = state_shardings(abstract_opt, mesh, rules)
  check_state_divisible(abstract_opt, opt_shardings)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  replicated = NamedSharding(mesh, PartitionSpec())
  step, rng = jax.device_put((jnp.zeros((), jnp.int32), rng), replicated)
  return graphdef, TrainState(step, params, opt_state, rng)


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """The live model viewing the state's current parameters (shares their buffers)."""
  return nnx.merge(graphdef, state.params)
