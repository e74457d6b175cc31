"""The train step: 8-device meshes equal 1 device, accumulation equals one batch, donation, remat.

One random tiny model (created sharded on fsdp=4 x tensor=2 by `init_train_state`) is copied into
a 1-device state and a data=8 state; each runs one SFT step on the same 8-example batch.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx
from train_sizes import MAX_LENGTH

from rrvf_jax import sharding
from rrvf_jax.models.qwen_vl import QwenVL
from rrvf_jax.train import batch as batch_lib
from rrvf_jax.train import optim, sft
from rrvf_jax.train import state as state_lib
from rrvf_jax.train import step as step_lib

RULES = sharding.FSDP_TP
LOSS = functools.partial(sft.sft_loss, chunk_size=32)


@pytest.fixture(scope="module")
def tx():
  """AdamW with warm-up, decay and clipping; eps=1e-3 keeps the comparison well-conditioned.

  Adam's early updates are lr * g / (|g| + eps): with the usual eps=1e-8, an element whose gradient
  is ~1e-9 moves by a large fraction of lr whatever its sign, so a float32 rounding difference
  between device layouts (~1e-10 here) flips or halves its step. With eps=1e-3 such elements stay in
  the linear regime and the 1e-5 comparison measures the sharded arithmetic, not Adam's sign of
  rounding noise.
  """
  return optim.make_optimizer(1e-2, warmup_steps=2, eps=1e-3, weight_decay=0.1, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def meshes():
  return {"fsdp_tp": sharding.make_mesh(1, 4, 2), "data": sharding.make_mesh(8, 1, 1)}


@pytest.fixture(scope="module")
def initial(cfg, tx, meshes):
  """(graphdef, host copy of the initial params) of a state materialised on fsdp=4 x tensor=2."""
  make = lambda rngs: QwenVL(cfg, rngs=rngs)
  graphdef, state = state_lib.init_train_state(make, tx[0], mesh=meshes["fsdp_tp"], seed=3)
  kernel = state.params["text"]["layers"][0]["mlp"]["gate"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  # Materialised exactly as the abstract state (the checkpoint restore target) says.
  _, abstract = state_lib.abstract_train_state(make, tx[0], mesh=meshes["fsdp_tp"], seed=3)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
    assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)
  return graphdef, jax.device_get(state.params), state


def _state(initial, tx, mesh=None):
  """A fresh train state holding the initial params (1 device when `mesh` is None)."""
  graphdef, host_params, _ = initial
  model = nnx.merge(graphdef, jax.tree.map(np.array, host_params))
  return state_lib.train_state_from_model(model, tx[0], mesh=mesh, seed=3)[1]


@pytest.fixture(scope="module")
def single(initial, tx, sft_batch):
  """The 1-device step and its result: (step fn, old state, new state, metrics)."""
  graphdef = initial[0]
  step = step_lib.make_train_step(graphdef, LOSS, tx[0], schedule=tx[1])
  old = _state(initial, tx)
  new, metrics = step(old, sft_batch)
  return step, old, new, metrics


def _assert_same(new, metrics, reference, reference_metrics):
  """Metrics, parameters and optimiser state equal the reference to 1e-5 (norm-wise, per leaf)."""
  for key in ("loss", "grad_norm", "tokens", "lr"):
    np.testing.assert_allclose(metrics[key], reference_metrics[key], rtol=1e-5, err_msg=key)
  got = jax.tree_util.tree_leaves_with_path(jax.device_get(new))
  want = jax.tree.leaves(jax.device_get(reference))
  assert len(got) == len(want) > 100
  for (path, a), b in zip(got, want, strict=True):
    where = jax.tree_util.keystr(path)
    assert a.shape == b.shape and a.dtype == b.dtype, where
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), where
  assert int(new.step) == 2


def test_step_moves_parameters_and_reports_metrics(single, initial):
  _, _, new, metrics = single
  assert set(metrics) == {"loss", "grad_norm", "tokens", "lr"}
  assert float(metrics["lr"]) == 0.0  # warm-up step 0
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  # lr 0 at step 0: Adam's step is zero, so the first update leaves the params unchanged...
  kernel = new.params["text"]["layers"][0]["mlp"]["gate"]["kernel"][...]
  start = initial[1]["text"]["layers"][0]["mlp"]["gate"]["kernel"][...]
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(start))


def test_donated_state_is_deleted(single):
  _, old, new, _ = single
  leaves = jax.tree.leaves(old)
  assert leaves and all(x.is_deleted() for x in leaves)
  assert not any(x.is_deleted() for x in jax.tree.leaves(new))


@pytest.fixture(scope="module")
def two_steps(single, sft_batch):
  """A second 1-device step (lr > 0 now), reused as the reference of every comparison."""
  step, _, state, _ = single
  new, metrics = step(state, sft_batch)
  assert step._cache_size() == 1  # the same compiled step serves both
  return new, metrics


@pytest.mark.parametrize("mesh_name", ["fsdp_tp", "data"])
def test_mesh_equals_single_device(mesh_name, initial, tx, meshes, sft_batch, two_steps):
  mesh = meshes[mesh_name]
  if mesh_name == "fsdp_tp":
    state = initial[2]  # the state materialised sharded by init_train_state
  else:
    state = _state(initial, tx, mesh)
  step = step_lib.make_train_step(initial[0], LOSS, tx[0], mesh=mesh, rules=RULES, schedule=tx[1])
  batch = batch_lib.shard_batch(sft_batch, mesh, RULES)
  state, _ = step(state, batch)
  new, metrics = step(state, batch)
  assert step._cache_size() == 1  # the new state keeps the layout of the old one
  _assert_same(new, metrics, *two_steps)
  for old, now in zip(jax.tree.leaves(state), jax.tree.leaves(new), strict=True):
    assert now.sharding == old.sharding


def test_two_micro_batches_with_remat_equal_one_batch(initial, tx, tok, cfg, ipc, examples,
                                                     sft_batch, single, two_steps):  # fmt: skip
  stacked = sft.make_sft_batch(
    tok, cfg, examples, max_length=MAX_LENGTH, image_processor_cfg=ipc, micro_batches=2
  )
  step = step_lib.make_train_step(
    initial[0], LOSS, tx[0], micro_batches=2, remat=True, schedule=tx[1]
  )
  state, _ = step(_state(initial, tx), stacked)
  new, metrics = step(state, stacked)
  _assert_same(new, metrics, *two_steps)
  # Remat is really applied: the step's policy shows up on a remat of the loss.
  assert "policy=DotsSaveable" in str(jax.make_jaxpr(step)(new, stacked))
  shape = rf"\(8, {MAX_LENGTH}\)"
  with pytest.raises(ValueError, match=rf"micro_batches=2 but batch.* has shape {shape}"):
    step(new, sft_batch)


def test_indivisible_batch_is_a_readable_error(meshes, sft_batch):
  six = jax.tree.map(lambda x: x, sft_batch)
  six = sft.SFTBatch(six.inputs, np.asarray(six.targets)[:6], np.asarray(six.loss_mask)[:6])
  with pytest.raises(
    ValueError, match=r"batch\.targets: dimension 6 is not divisible by mesh axes \('data',\)"
  ):
    batch_lib.batch_shardings(six, meshes["data"], RULES)


def test_batch_shardings(meshes, sft_batch):
  spec = jax.sharding.PartitionSpec
  shardings = batch_lib.batch_shardings(sft_batch, meshes["fsdp_tp"], RULES)
  assert shardings.inputs.input_ids.spec == spec("fsdp")
  assert shardings.inputs.positions.spec == spec(None, "fsdp")
  assert shardings.inputs.pixel_values.spec == spec("fsdp")
  assert shardings.targets.spec == spec("fsdp")
  assert all(s.spec == spec() for s in jax.tree.leaves(shardings.inputs.vision_index))
  stacked = batch_lib.stack_micro_batches([sft_batch, sft_batch])
  shardings = batch_lib.batch_shardings(stacked, meshes["data"], RULES, micro_batches=2)
  assert shardings.inputs.positions.spec == spec(None, None, "data")
  assert shardings.loss_mask.spec == spec(None, "data")


def test_remat_checkpoints_every_layer(cfg, tx, sft_batch):
  # Regression: remat was one checkpoint around the whole loss, which replays the full forward at
  # once in the backward pass and bounds nothing. Regression 2: unrolled per-layer checkpoints let
  # the TPU scheduler recompute most layers ahead of the backward (85 GiB at 7B, compile_check).
  # (XLA:CPU's memory analysis shows no saving for remat at all, even for a toy MLP, so the
  # structure is what this machine can check.)
  deep = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=5))
  graphdef, state = state_lib.init_train_state(lambda r: QwenVL(deep, rngs=r), tx[0], seed=0)
  policies = {"dots": "policy=DotsSaveable", "full": "policy=<function nothing_saveable"}
  for remat, policy in policies.items():
    step = step_lib.make_train_step(graphdef, LOSS, tx[0], remat=remat)
    jaxpr = str(jax.make_jaxpr(step)(state, sft_batch))
    # One checkpoint per vision layer; the decoder's 5 layers are a scan over one checkpointed
    # layer (remat.call_layers), its backward a loop that recomputes a layer at a time.
    assert jaxpr.count(policy) == 1 + deep.vision.depth, remat
    assert "length=5" in jaxpr and "scan" in jaxpr, remat
  plain = str(jax.make_jaxpr(step_lib.make_train_step(graphdef, LOSS, tx[0]))(state, sft_batch))
  assert "DotsSaveable" not in plain and "nothing_saveable" not in plain
