"""Train state: abstract creation with shardings, optimiser state following params, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rrvf_jax import sharding
from rrvf_jax.models.qwen_vl import QwenVL
from rrvf_jax.train import optim
from rrvf_jax.train import state as state_lib

TX, _ = optim.make_optimizer(1e-3, weight_decay=0.1)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(1, 4, 2)


@pytest.fixture(scope="module")
def abstract(cfg, mesh):
  return state_lib.abstract_train_state(lambda rngs: QwenVL(cfg, rngs=rngs), TX, mesh=mesh)


def test_abstract_state_has_shapes_and_shardings(abstract, cfg):
  _, state = abstract
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  gate = state.params["text"]["layers"][0]["mlp"]["gate"]["kernel"].get_value()
  assert gate.shape == (64, 128) and gate.sharding.spec == P("fsdp", "tensor")
  embed = state.params["text"]["embed"].get_value()
  assert embed.shape == (cfg.text.vocab_size, 64) and embed.sharding.spec == P("tensor", "fsdp")
  assert state.step.sharding.spec == P() and state.step.dtype == jnp.int32
  assert state.rng.shape == (2,) and state.rng.sharding.spec == P()


def test_optimizer_state_follows_params(abstract):
  _, state = abstract
  adam = state.opt_state[1][0]
  params = nnx.to_flat_state(state.params)
  for moments in (adam.mu, adam.nu):
    flat = dict(nnx.to_flat_state(moments))
    assert set(flat) == {path for path, _ in params}
    for path, var in params:
      assert flat[path].get_value().sharding == var.get_value().sharding, path
      assert flat[path].get_value().shape == var.get_value().shape
  assert adam.count.sharding.spec == P()


def test_abstract_state_without_mesh(cfg):
  _, state = state_lib.abstract_train_state(lambda rngs: QwenVL(cfg, rngs=rngs), TX)
  assert all(x.sharding is None for x in jax.tree.leaves(state))


def test_indivisible_parameter_is_a_readable_error(cfg, mesh):
  odd = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=1191))
  with pytest.raises(ValueError, match=r"params\['lm_head'\].*1191 is not divisible .*'tensor'"):
    state_lib.abstract_train_state(lambda rngs: QwenVL(odd, rngs=rngs), TX, mesh=mesh)


class _Toy(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 6)), axes=("embed", "mlp"))
    self.b = nnx.Param(jnp.zeros((6,)), axes=("mlp",))


def test_state_from_model_is_placed_and_keeps_values(mesh):
  model = _Toy(nnx.Rngs(0))
  w = np.asarray(model.w[...])
  graphdef, state = state_lib.train_state_from_model(model, TX, mesh=mesh, rules="fsdp_tp")
  assert state.params["w"].get_value().sharding.spec == P("fsdp", "tensor")
  assert state.opt_state[1][0].mu["w"].get_value().sharding.spec == P("fsdp", "tensor")
  assert state.params["b"].get_value().sharding.spec == P("tensor")
  np.testing.assert_array_equal(np.asarray(state.params["w"].get_value()), w)
  merged = state_lib.merge_model(graphdef, state)
  assert isinstance(merged, _Toy)
  # The graphdef and a fresh abstract state agree on structure and shardings.
  _, abstract = state_lib.abstract_train_state(_Toy, TX, mesh=mesh, rules="fsdp_tp")
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
    assert a.shape == x.shape and a.dtype == x.dtype and a.sharding == x.sharding


def test_non_param_variables_are_rejected():
  class WithCache(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((2,)), axes=("embed",))
      self.cache = nnx.Cache(jnp.zeros((3,)))

  with pytest.raises(ValueError, match=r"non-parameter variables \['cache'\]"):
    state_lib.train_state_from_model(WithCache(), TX)


def test_unknown_rules_name(mesh):
  with pytest.raises(ValueError, match="unknown sharding rules 'fsdp_typo'"):
    state_lib.train_state_from_model(_Toy(nnx.Rngs(0)), TX, mesh=mesh, rules="fsdp_typo")
