"""Where the trainer and the sampler run, and how the trainer's weights reach the sampler.

Two layouts:

- colocated (default, `roles.sampler_devices = 0`): the sampler shares the trainer's devices. On
  one host it uses the trainer's mesh itself (no copy); on several hosts each host samples its own
  rollouts on a mesh of its own devices, so episodes never wait on another host.
- disaggregated (`roles.sampler_devices = k > 0`): on every host the last k local devices form the
  sampler's mesh and the others join the trainer's (global) mesh.

A sampler mesh is host-local, shaped (data = n / t, fsdp = 1, tensor = t) with
t = `roles.sampler_tensor`: parameters are split over tensor and replicated over data, and
rollout rows spread over data. Weights move with `transfer`: one jitted reshard on the trainer's
devices to the sampler's layout replicated per host (each device receives only its own shard; no
device gathers a whole parameter unless the sampler layout itself replicates it), then, when the
roles do not share devices, a device-to-device copy inside each host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrvf_jax import sharding


@dataclasses.dataclass(frozen=True)
class Roles:
  """The trainer's (global) mesh and this host's sampler mesh."""

  trainer_mesh: Mesh
  sampler_mesh: Mesh

  @property
  def colocated(self) -> bool:
    """True when the sampler samples on the trainer's mesh itself (weights need no copy)."""
    return self.sampler_mesh is self.trainer_mesh


def _by_process(devices: Sequence[jax.Device]) -> dict[int, list[jax.Device]]:
  """Devices grouped by process, each group in id order."""
  groups: dict[int, list[jax.Device]] = {}
  for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
    groups.setdefault(d.process_index, []).append(d)
  return groups


def local_mesh(devices: Sequence[jax.Device], tensor: int = 1) -> Mesh:
  """A (data = n / tensor, fsdp = 1, tensor) mesh over one host's `devices`."""
  n = len(devices)
  if tensor < 1 or n % tensor:
    raise ValueError(f"roles.sampler_tensor={tensor} must divide the {n} sampler devices per host")
  grid = np.asarray(devices, dtype=object).reshape(n // tensor, 1, tensor)
  auto = (jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES)
  return Mesh(grid, sharding.MESH_AXES, axis_types=auto)


def make_roles(
  mesh_config: Mapping[str, Any],
  *,
  sampler_devices: int = 0,
  sampler_tensor: int = 1,
  devices: Sequence[jax.Device] | None = None,
) -> Roles:
  """The trainer mesh (from `mesh_config`) and this host's sampler mesh; see the module doc."""
  devices = list(jax.devices() if devices is None else devices)
  groups = _by_process(devices)
  me = jax.process_index() if len(groups) > 1 else next(iter(groups))
  if sampler_devices < 0:
    raise ValueError(f"roles.sampler_devices must be >= 0, got {sampler_devices}")
  if sampler_devices == 0:
    trainer = sharding.mesh_from_config(mesh_config, devices=_process_major(groups))
    if len(groups) == 1 and sampler_tensor == 1:
      return Roles(trainer, trainer)
    return Roles(trainer, local_mesh(groups[me], sampler_tensor))
  per_host = {len(g) for g in groups.values()}
  if len(per_host) != 1 or sampler_devices >= min(per_host):
    raise ValueError(
      f"roles.sampler_devices={sampler_devices} must leave the trainer at least one device on "
      f"every host (devices per host: {sorted(per_host)})"
    )
  trainer_devices = {p: g[: len(g) - sampler_devices] for p, g in groups.items()}
  trainer = sharding.mesh_from_config(mesh_config, devices=_process_major(trainer_devices))
  return Roles(trainer, local_mesh(groups[me][-sampler_devices:], sampler_tensor))


def _process_major(groups: Mapping[int, list[jax.Device]]) -> list[jax.Device]:
  """Devices in process order: a host's rows of a data-parallel batch sit on its own devices."""
  return [d for p in sorted(groups) for d in groups[p]]


def sampler_shardings(params: nnx.State, mesh: Mesh, rules: sharding.Rules) -> Any:
  """Per-leaf NamedShardings of `params` (an nnx.State of Params) on the sampler `mesh`."""

  def one(var: nnx.Variable) -> nnx.Variable:
    spec = sharding.param_sharding(var, mesh, rules).spec
    spec = sharding.divisible_spec(var.get_value().shape, spec, mesh)
    return var.replace(NamedSharding(mesh, sharding.trim_spec(spec)))

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _host_layout(trainer_mesh: Mesh, sampler_mesh: Mesh) -> tuple[Mesh, Mesh]:
  """(mesh of every host's trainer devices in the sampler's layout, this host's part of it)."""
  groups = _by_process(trainer_mesh.devices.flat)
  sizes = {len(g) for g in groups.values()}
  if len(sizes) != 1:
    raise ValueError(f"every host needs the same number of trainer devices, got {sorted(sizes)}")
  (n,) = sizes
  tensor = sampler_mesh.shape["tensor"]
  tensor = tensor if n % tensor == 0 else 1
  order = sorted(groups)
  grid = np.asarray([groups[p] for p in order], dtype=object)
  grid = grid.reshape(len(order), n // tensor, 1, tensor)
  auto = (jax.sharding.AxisType.Auto,) * (1 + len(sharding.MESH_AXES))
  hosts = Mesh(grid, ("hosts", *sharding.MESH_AXES), axis_types=auto)
  local = Mesh(grid[order.index(jax.process_index())], sharding.MESH_AXES, axis_types=auto[1:])
  return hosts, local


def host_reshard(params: Any, roles: Roles, shardings: Any):
  """(the reshard of `transfer` on several hosts, this host's mesh, the reshard's out shardings).

  The reshard takes the list of `params` leaves and gives each host's trainer devices the
  sampler's layout (replicated over hosts): every device receives only its own shard. It goes
  through `jax.device_put`, not one jit: on TPU the trainer mesh lists devices in the torus
  order `jax.make_mesh` picks, which interleaves hosts, while the per-host layout lists them host
  by host, and a jit refuses arguments and outputs whose device orders differ. `device_put`
  reorders each leaf's shards onto the target's device order first (no copy) and compiles one
  reshard per leaf shape, cached across steps.
  """
  hosts, local = _host_layout(roles.trainer_mesh, roles.sampler_mesh)
  leaves = jax.tree.leaves(params)
  targets = jax.tree.leaves(shardings)
  specs = [
    sharding.trim_spec(sharding.divisible_spec(x.shape, t.spec, local))
    for x, t in zip(leaves, targets, strict=True)
  ]
  outputs = [NamedSharding(hosts, s) for s in specs]

  def spread(xs: list[jax.Array]) -> list[jax.Array]:
    if jax.devices()[0].platform != "cpu":
      return jax.device_put(xs, outputs)
    # XLA:CPU runs the reshards' all-gathers on a shared thread pool: dispatched together (one
    # batched call, or back to back), their rendezvous wait on each other until the process
    # aborts. One at a time there; the fake-device tests and CPU runs are small.
    return [jax.block_until_ready(jax.device_put(x, o)) for x, o in zip(xs, outputs, strict=True)]

  return spread, local, outputs


def transfer(params: Any, roles: Roles, shardings: Any) -> Any:
  """The trainer's `params` placed for the sampler (`shardings` from `sampler_shardings`)."""
  if roles.colocated:
    return params
  if jax.process_count() == 1:
    return jax.device_put(params, shardings)
  spread_fn, local, outputs = host_reshard(params, roles, shardings)
  leaves, treedef = jax.tree.flatten(params)
  targets = jax.tree.leaves(shardings)
  spread = spread_fn(leaves)
  out = []
  specs = [o.spec for o in outputs]
  for x, spec, target in zip(spread, specs, targets, strict=True):
    here = jax.make_array_from_single_device_arrays(
      x.shape, NamedSharding(local, spec), [s.data for s in x.addressable_shards]
    )
    out.append(here if here.sharding == target else jax.device_put(here, target))
  return jax.tree.unflatten(treedef, out)


def shares_devices(roles: Roles) -> bool:
  """Whether the sampler's devices are (some of) the trainer's: its weights take trainer HBM."""
  return bool(set(roles.sampler_mesh.devices.flat) & set(roles.trainer_mesh.devices.flat))


def free_copies(copy: Any, original: Any) -> int:
  """Deletes the arrays of `copy` (a `transfer` of `original`) that hold buffers of their own.

  Between rollouts the sampler's weights are dead until the next `transfer`, and beside the update
  they take HBM the trainer needs (compile_check: 4.09 GiB per chip at 3B on v6e-8). A leaf that
  shares any device buffer with `original` (a colocated sampler, or a reshard that changed
  nothing) is left alone. Returns the bytes freed on this host's devices.
  """
  freed = 0
  for c, o in zip(jax.tree.leaves(copy), jax.tree.leaves(original), strict=True):
    if c is o or c.is_deleted():
      continue
    if _buffers(c) & _buffers(o):
      continue
    freed += sum(s.data.nbytes for s in c.addressable_shards)
    c.delete()
  return freed


def _buffers(x: jax.Array) -> set[int]:
  return {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}


def fully_replicated_local(params: Any) -> Any:
  """`params` with a full copy on each of this host's devices (readable from host memory)."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
    return params
  mesh = local_mesh(jax.local_devices())
  roles = Roles(jax.tree.leaves(params)[0].sharding.mesh, mesh)
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
  return transfer(params, roles, replicated)
