"""sharding.py: mesh from config, the sharding table, distributed set-up, per-host data."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rrvf_jax import sharding
from rrvf_jax.models.qwen_vl import QwenVL, get_preset


def test_mesh_from_config_fills_minus_one():
  mesh = sharding.mesh_from_config(ml_collections.ConfigDict({"data": 2, "fsdp": -1, "tensor": 2}))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.mesh_from_config({}).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert dict(sharding.mesh_from_config(None).shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize(
  "section, match",
  [
    (
      {"data": 3},
      r"mesh config \{'data': 3, 'fsdp': -1, 'tensor': 1\}: 8 devices are not divisible",
    ),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices, have 8"),
    ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
    ({"tensor": 0}, r"mesh\.tensor must be a positive integer or -1 \(fill\), got 0"),
    ({"fsdp": "4"}, r"mesh\.fsdp must be a positive integer"),
    ({"model": 2}, r"unknown keys \['model'\]"),
  ],
)
def test_mesh_from_config_errors(section, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_from_config(section)


@pytest.fixture(scope="module")
def abstract_model():
  return nnx.eval_shape(lambda: QwenVL(get_preset("tiny"), rngs=nnx.Rngs(0)))


def test_sharding_table(abstract_model):
  mesh = sharding.make_mesh(1, 4, 2)
  table = sharding.sharding_table(abstract_model, mesh, sharding.FSDP_TP)
  lines = table.splitlines()
  n_params = len(nnx.to_flat_state(nnx.state(abstract_model, nnx.Param)))
  assert len(lines) == n_params + 1
  assert (
    "text.layers.0.mlp.gate.kernel  64x128  float32  ('embed', 'mlp')  P('fsdp', 'tensor')"
    in (lines)
  )
  fraction = sharding.replicated_fraction(abstract_model, mesh, sharding.FSDP_TP)
  assert 0 < fraction < 0.01  # only small vectors (norm scales over unsharded axes) stay whole
  assert lines[-1] == (
    f"{n_params} parameters on mesh (data=1, fsdp=4, tensor=2); "
    f"{100 * fraction:.2f}% of parameter bytes replicated"
  )
  assert sharding.replicated_fraction(abstract_model, mesh, sharding.REPLICATED) == 1.0
  # The same table from an nnx.State.
  state = nnx.state(abstract_model, nnx.Param)
  assert sharding.sharding_table(state, mesh, sharding.FSDP_TP) == table
  with pytest.raises(ValueError, match=r"expected an nnx\.Module"):
    sharding.sharding_table({"w": 1}, mesh, sharding.FSDP_TP)


@pytest.mark.parametrize(
  "env, request_",
  [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    (
      {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
      {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2},
    ),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, {"coordinator_address": "h:1"}),
    ({"RRVF_DISTRIBUTED": "1"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "w0"}, {}),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, {}),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}),
  ],
)
def test_distributed_request(env, request_):
  assert sharding.distributed_request(env) == request_


def test_distributed_request_bad_integer():
  with pytest.raises(ValueError, match="SLURM_NTASKS='many' is not an integer"):
    sharding.distributed_request({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "many"})


def test_maybe_initialize_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert sharding.maybe_initialize_distributed({}) is False
  assert sharding.maybe_initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1"}) is True
  assert calls == [{"coordinator_address": "h:1"}]
  # This machine's own environment asks for nothing.
  assert sharding.maybe_initialize_distributed() is False


def test_host_batch_slice():
  assert sharding.host_batch_slice(8) == slice(0, 8)
  assert sharding.host_batch_slice(12, process_index=2, process_count=4) == slice(6, 9)
  with pytest.raises(ValueError, match="global batch size 10 is not divisible by the 4 processes"):
    sharding.host_batch_slice(10, process_index=0, process_count=4)


def test_host_local_to_global():
  mesh = sharding.make_mesh(4, 2, 1)
  rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
  local = {"ids": rows[sharding.host_batch_slice(8)], "scale": np.float32(2.0)}
  shardings = {"ids": NamedSharding(mesh, P("data")), "scale": NamedSharding(mesh, P())}
  out = sharding.host_local_to_global(local, shardings)
  assert isinstance(out["ids"], jax.Array) and out["ids"].sharding == shardings["ids"]
  assert len(out["ids"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(out["ids"]), rows)
  assert float(out["scale"]) == 2.0


def test_trim_spec():
  assert sharding.trim_spec(P("fsdp", None, None)) == P("fsdp")
  assert sharding.trim_spec(P(None, "tensor")) == P(None, "tensor")
  assert sharding.trim_spec(P(None)) == P()


def test_constrain_replicates_dimensions_the_mesh_does_not_divide():
  """Regression: 2 prompts prefilled on an 8-way batch axis (before a fork to 8 rows) must work."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (fake) devices")
  mesh = sharding.make_mesh(1, 8, 1)
  spec = sharding.divisible_spec((2, 16), P("fsdp", None), mesh)
  assert spec == P(None, None)
  assert sharding.divisible_spec((8, 16), P("fsdp"), mesh) == P("fsdp", None)

  @jax.jit
  def f(x):
    return sharding.constrain(x * 2, ("batch", None))

  with sharding.activation_rules(mesh, sharding.FSDP_TP):
    np.testing.assert_array_equal(f(np.ones((2, 16))), 2 * np.ones((2, 16)))
    assert f(np.ones((8, 16))).sharding.spec[0] == "fsdp"
