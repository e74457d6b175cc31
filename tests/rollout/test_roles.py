"""Trainer and sampler on separate sub-meshes: placement, weight transfer, equal samples."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rrvf_jax import roles, sharding
from rrvf_jax.models import qwen_vl
from rrvf_jax.rollout import Sampler, SamplingParams
from rrvf_jax.testing.prompts import image_prompt, random_image
from rrvf_jax.train import state as state_lib

# The tiny tokenizer's vocabulary (1191) does not divide by 2: keep vocab replicated.
RULES = tuple((k, None if k in ("vocab", "act_vocab") else v) for k, v in sharding.FSDP_TP)


@pytest.fixture(autouse=True)
def _eight_devices():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (fake) devices")


def test_roles_split_each_hosts_devices():
  colocated = roles.make_roles({"fsdp": -1})
  assert colocated.colocated and colocated.sampler_mesh.devices.size == 8
  split = roles.make_roles({"fsdp": -1}, sampler_devices=4, sampler_tensor=2)
  trainer = set(split.trainer_mesh.devices.flat)
  sampler = set(split.sampler_mesh.devices.flat)
  assert not split.colocated and not trainer & sampler and len(trainer) == len(sampler) == 4
  assert dict(split.sampler_mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  assert dict(split.trainer_mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="at least one device"):
    roles.make_roles({"fsdp": -1}, sampler_devices=8)
  with pytest.raises(ValueError, match="sampler_tensor=3"):
    roles.make_roles({"fsdp": -1}, sampler_devices=4, sampler_tensor=3)


def _episode(sampler: Sampler, tok) -> list:
  prompts = [image_prompt(tok, "draw " * (i + 1), random_image(i)) for i in range(2)]
  params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50)
  return sampler.sample(prompts, params, jax.random.key(0), group_size=2)


def test_sampler_on_its_own_sub_mesh_gets_the_trainers_weights(policy_dir, model, tok):
  split = roles.make_roles({"fsdp": -1}, sampler_devices=4, sampler_tensor=2)
  trained = qwen_vl.from_hf(policy_dir, mesh=split.trainer_mesh, rules=RULES)
  graphdef, params = state_lib.split_params(trained)
  targets = roles.sampler_shardings(params, split.sampler_mesh, RULES)
  moved = roles.transfer(params, split, targets)
  for (path, a), b, want in zip(
    jax.tree_util.tree_leaves_with_path(params),
    jax.tree.leaves(moved),
    jax.tree.leaves(targets),
    strict=True,
  ):
    assert b.sharding == want, jax.tree_util.keystr(path)
    assert set(b.sharding.device_set) == set(split.sampler_mesh.devices.flat)
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  kernel = moved["text"]["layers"][0]["attn"]["q"]["kernel"]
  assert kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  # Sampling on the sub-mesh gives what one device gives.
  expected = _episode(Sampler(model, tok, cache_length=384), tok)
  got = _episode(
    Sampler(
      nnx.merge(graphdef, moved), tok, cache_length=384, mesh=split.sampler_mesh, rules=RULES
    ),
    tok,
  )
  for a, b in zip(expected, got, strict=True):
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_one_host_weights_are_already_readable(policy_dir):
  # The multi-host gather (for the HF export) runs in tests/test_multihost.py.
  mesh = sharding.make_mesh(1, 4, 2)
  _, params = state_lib.split_params(qwen_vl.from_hf(policy_dir, mesh=mesh, rules=RULES))
  assert roles.fully_replicated_local(params) is params


def test_host_reshard_takes_a_trainer_mesh_in_torus_order(policy_dir, caplog):
  # On TPU, jax.make_mesh lists a slice's chips in torus order, which interleaves hosts (v5p-64:
  # processes 0, 2, 4, 6, 0, ...; see rrvf_jax.compile_check), while the per-host layout lists
  # them host by host. The reshard used to be one jit from the one to the other, which JAX
  # refuses ("incompatible devices"): multi-host GRPO failed as it built its sampler.
  devices = jax.devices()
  order = [devices[i] for i in (0, 2, 1, 3, 4, 6, 5, 7)]
  auto = (jax.sharding.AxisType.Auto,) * 3
  trainer = jax.sharding.Mesh(
    np.asarray(order).reshape(1, 8, 1), sharding.MESH_AXES, axis_types=auto
  )
  placement = roles.Roles(trainer, roles.local_mesh(devices, tensor=2))
  _, params = state_lib.split_params(qwen_vl.from_hf(policy_dir, mesh=trainer, rules=RULES))
  targets = roles.sampler_shardings(params, placement.sampler_mesh, RULES)
  spread, _, outputs = roles.host_reshard(params, placement, targets)
  leaves = jax.tree.leaves(params)
  moved = spread(leaves)
  for a, b, want in zip(leaves, moved, outputs, strict=True):
    assert b.sharding == want
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  # Every later step reuses the compiled reshards.
  with caplog.at_level("WARNING"), jax.log_compiles():
    spread(leaves)
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


def test_free_copies_deletes_only_the_samplers_own_buffers():
  # Between rollouts the sampler's weight copy is freed (grpo._loop); the trainer's arrays, and any
  # sampler leaf sharing their buffers, must survive.
  trainer_mesh = sharding.make_mesh(1, 8, 1)
  placement = roles.Roles(trainer_mesh, roles.local_mesh(jax.devices(), tensor=2))
  assert not placement.colocated and roles.shares_devices(placement)
  kernel = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
  on = lambda mesh, *spec: NamedSharding(mesh, PartitionSpec(*spec))
  params = {
    "kernel": jax.device_put(kernel, on(trainer_mesh, "fsdp", None)),
    "bias": jax.device_put(np.ones(16, np.float32), on(trainer_mesh)),
  }
  targets = {"kernel": on(placement.sampler_mesh, None, "tensor"), "bias": on(trainer_mesh)}
  moved = roles.transfer(params, placement, targets)
  # A distinct array over the trainer's own buffers (what a reshard that changes nothing gives).
  shared = jax.make_array_from_single_device_arrays(
    (16,), params["bias"].sharding, [s.data for s in params["bias"].addressable_shards]
  )
  moved["bias"] = shared
  freed = roles.free_copies(moved, params)
  assert moved["kernel"].is_deleted() and freed == 8 * kernel.nbytes // 2  # 2 tensor shards x 4
  assert not shared.is_deleted()
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))
  np.testing.assert_array_equal(np.asarray(params["kernel"]), kernel)
  # Colocated: the sampler samples with the trainer's arrays themselves; nothing is freed.
  colocated = roles.Roles(trainer_mesh, trainer_mesh)
  same = roles.transfer(params, colocated, targets)
  assert roles.free_copies(same, params) == 0
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))
  assert not roles.shares_devices(
    roles.make_roles({"fsdp": -1}, sampler_devices=4, sampler_tensor=2)
  )
