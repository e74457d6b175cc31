"""Logical axis names, rule presets mapping them to the mesh ('data', 'fsdp', 'tensor'), helpers.

Model code only names logical axes (on each `nnx.Param` as `axes=`); which mesh axis shards a
logical axis is decided here, by a rules table chosen by name.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# FSDP over the embedding dimension, tensor parallelism over heads / MLP / vocab. The vision tower
# (~0.67B parameters; its 3420-wide MLP does not divide by 8) is sharded only along FSDP.
FSDP_TP: Rules = (
  # Activations: batch over data and FSDP, heads and MLP over tensor, the rest replicated.
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
  # Parameters.
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("vit_embed", "fsdp"),
  ("vit_heads", None),
  ("vit_head_dim", None),
  ("vit_mlp", None),
  ("vit_patch", None),
  ("vit_pos", None),  # Qwen3-VL's learned position table rows (its width is vit_embed).
  ("vit_merged", "fsdp"),
  ("vit_merged_out", "tensor"),
)

REPLICATED: Rules = ()

RULES = {"fsdp_tp": FSDP_TP, "replicated": REPLICATED}


def get_rules(name: str) -> Rules:
  """Returns the named rules preset; raises a ValueError listing the known names."""
  if name not in RULES:
    raise ValueError(f"unknown sharding rules {name!r}; known: {sorted(RULES)}")
  return RULES[name]


def logical_to_spec(
  axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None
) -> PartitionSpec:
  """PartitionSpec for logical `axes`; each mesh axis used at most once, size-1 axes dropped."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in axes:
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(
      t for t in targets if t not in used and (mesh is None or mesh.shape.get(t, 1) > 1)
    )
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return PartitionSpec(*spec)


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
  "rrvf_jax_sharding_rules", default=None
)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within this context, `constrain` pins activations to `rules` on `mesh` (at trace time)."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, Rules] | None:
  """The mesh and rules of the enclosing `activation_rules` (None outside one)."""
  return _ACTIVE.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint from logical `axes`; a no-op outside `activation_rules`.

  The rules are read when a function is traced, so trace (first call) inside the context. A
  dimension that does not divide by its mesh axes (e.g. 2 prompts before a fork to 8 rows on 8
  devices) is left replicated rather than failing.
  """
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = divisible_spec(x.shape, logical_to_spec(axes, rules, mesh), mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def divisible_spec(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """`spec` with the mesh axes of every dimension they do not divide dropped (replicated)."""
  parts = []
  for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    names = (part,) if isinstance(part, str) else tuple(part or ())
    size = 1
    for n in names:
      size *= mesh.shape[n]
    parts.append(part if dim % size == 0 else None)
  return PartitionSpec(*parts)


def trim_spec(spec: PartitionSpec) -> PartitionSpec:
  """The same layout without trailing None entries: the form jit gives its outputs.

  `P('fsdp', None)` and `P('fsdp')` shard alike but compare unequal, and jit keys its cache on
  the input shardings, so a state built with the long form would recompile the step once.
  """
  parts = list(spec)
  while parts and parts[-1] is None:
    parts.pop()
  return PartitionSpec(*parts)


def param_sharding(variable: nnx.Variable, mesh: Mesh, rules: Rules) -> NamedSharding:
  """NamedSharding of a parameter from its `axes` metadata (replicated when it has none)."""
  axes = variable.get_metadata().get("axes")
  spec = logical_to_spec(axes, rules, mesh) if axes else PartitionSpec()
  return NamedSharding(mesh, spec)


def check_divisible(shape: Sequence[int], sharding: NamedSharding, what: str) -> None:
  """Raises a readable ValueError when a dimension does not divide by its mesh axes."""
  for dim, part in zip(shape, sharding.spec, strict=False):
    names = (part,) if isinstance(part, str) else tuple(part or ())
    size = 1
    for n in names:
      size *= sharding.mesh.shape[n]
    if dim % size:
      raise ValueError(
        f"{what}: dimension {dim} is not divisible by mesh axes {names} of total size {size}; "
        "change the mesh or the sharding rules"
      )


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """Mesh ('data', 'fsdp', 'tensor'); one size may be -1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(
      f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}"
    )
  known = 1
  for s in sizes:
    known *= s if s != -1 else 1
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh axes ({known})")
    sizes[sizes.index(-1)] = len(devices) // known
  total = sizes[0] * sizes[1] * sizes[2]
  if total != len(devices):
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {total} devices, have {len(devices)}"
    )
  # Auto axes: XLA's sharding propagation places activations; parameters are pinned explicitly.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


# ----------------------------------------------------------------------------------------------
# Mesh from a config section, the per-parameter sharding table, multi-host set-up and data.
# ----------------------------------------------------------------------------------------------


def mesh_from_config(section: Mapping[str, Any] | None, devices=None) -> Mesh:
  """Mesh from a config section with `data`, `fsdp`, `tensor` sizes (-1 = the remaining devices).

  Missing keys default to data=1, fsdp=-1, tensor=1 (pure FSDP). Errors name the section's keys.
  """
  section = {} if section is None else dict(section)
  unknown = sorted(set(section) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh config has unknown keys {unknown}; known keys: {list(MESH_AXES)}")
  sizes = {"data": 1, "fsdp": -1, "tensor": 1, **section}
  for name in MESH_AXES:
    size = sizes[name]
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"mesh.{name} must be a positive integer or -1 (fill), got {size!r}")
  try:
    return make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)
  except ValueError as e:
    raise ValueError(f"mesh config {sizes}: {e}") from None


def _param_variables(state_or_model: Any) -> list[tuple[str, nnx.Variable]]:
  """(dotted path, variable) of every nnx.Param in a module, an nnx.State or a train state."""
  if isinstance(state_or_model, nnx.Module):
    state = nnx.state(state_or_model, nnx.Param)
  elif isinstance(state_or_model, nnx.State):
    state = state_or_model
  elif isinstance(getattr(state_or_model, "params", None), nnx.State):
    state = state_or_model.params
  else:
    raise ValueError(
      f"expected an nnx.Module, an nnx.State or a train state, got {type(state_or_model).__name__}"
    )
  return [(".".join(str(k) for k in path), var) for path, var in nnx.to_flat_state(state)]


def _nbytes(value: Any) -> int:
  """Bytes of an array or ShapeDtypeStruct."""
  size = 1
  for d in value.shape:
    size *= d
  return size * np.dtype(value.dtype).itemsize


def replicated_fraction(state_or_model: Any, mesh: Mesh, rules: Rules) -> float:
  """Fraction of parameter bytes that `rules` leave fully replicated on `mesh`."""
  total = replicated = 0
  for _, var in _param_variables(state_or_model):
    nbytes = _nbytes(var.get_value())
    total += nbytes
    if all(part is None for part in param_sharding(var, mesh, rules).spec):
      replicated += nbytes
  return replicated / total if total else 0.0


def sharding_table(state_or_model: Any, mesh: Mesh, rules: Rules) -> str:
  """One line per parameter (path, shape, dtype, logical axes, PartitionSpec) and a summary line."""
  lines = []
  for path, var in _param_variables(state_or_model):
    value = var.get_value()
    spec = param_sharding(var, mesh, rules).spec
    axes = var.get_metadata().get("axes")
    shape = "x".join(str(d) for d in value.shape) or "scalar"
    lines.append(f"{path}  {shape}  {np.dtype(value.dtype).name}  {axes}  {spec}")
  fraction = replicated_fraction(state_or_model, mesh, rules)
  mesh_desc = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
  lines.append(
    f"{len(lines)} parameters on mesh ({mesh_desc}); "
    f"{100 * fraction:.2f}% of parameter bytes replicated"
  )
  return "\n".join(lines)


def distributed_request(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """Arguments for `jax.distributed.initialize` when `env` asks for multi-process, else None.

  The environment asks when one of these holds (checked in this order):

  - JAX_COORDINATOR_ADDRESS=host:port, with JAX_NUM_PROCESSES and JAX_PROCESS_ID (or a cluster
    that JAX auto-detects for the rest);
  - RRVF_DISTRIBUTED=1 (JAX auto-detects the cluster: SLURM, Open MPI, Cloud TPU, Kubernetes);
  - a TPU pod slice: TPU_WORKER_HOSTNAMES lists more than one host, or
    MEGASCALE_COORDINATOR_ADDRESS is set;
  - SLURM: SLURM_JOB_ID with SLURM_NTASKS > 1;
  - Open MPI: OMPI_COMM_WORLD_SIZE > 1.
  """
  env = os.environ if env is None else env

  def integer(name: str) -> int:
    try:
      return int(env.get(name, "1"))
    except ValueError:
      raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None

  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs: dict[str, Any] = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
    if "JAX_NUM_PROCESSES" in env:
      kwargs["num_processes"] = integer("JAX_NUM_PROCESSES")
    if "JAX_PROCESS_ID" in env:
      kwargs["process_id"] = integer("JAX_PROCESS_ID")
    return kwargs
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if (
    env.get("RRVF_DISTRIBUTED", "") in ("1", "true", "True")
    or len(hosts) > 1
    or env.get("MEGASCALE_COORDINATOR_ADDRESS")
    or ("SLURM_JOB_ID" in env and integer("SLURM_NTASKS") > 1)
    or integer("OMPI_COMM_WORLD_SIZE") > 1
  ):
    return {}
  return None


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize` only when the environment asks for it; True if it did.

  A no-op on a single machine and when already initialised; see `distributed_request` for the
  variables that count as asking.
  """
  request = distributed_request(env)
  if request is None or jax.distributed.is_initialized():
    return False
  jax.distributed.initialize(**request)
  return True


def host_batch_slice(
  global_batch_size: int, *, process_index: int | None = None, process_count: int | None = None
) -> slice:
  """The rows of a global batch this host loads (contiguous, equal-sized, in process order)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size % count:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the {count} processes"
    )
  per_host = global_batch_size // count
  return slice(index * per_host, (index + 1) * per_host)


def host_local_to_global(local_tree: Any, shardings: Any) -> Any:
  """Global jax.Arrays from this host's slice of each leaf (`shardings`: a matching tree).

  Each leaf's leading sharded axis is the concatenation of the hosts' slices in process order, as
  `host_batch_slice` hands them out; replicated leaves must be equal on every host.
  """
  return jax.tree.map(
    lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local_tree, shardings
  )
