"""Logical axis names, rule presets mapping them to the mesh ('data', 'fsdp', 'tensor'), helpers.

Model code only names logical axes (on each `nnx.Param` as `axes=`); which mesh axis shards a
logical axis is decided here, by a rules table chosen by name.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
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


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint from logical `axes`; a no-op outside `activation_rules`.

  The rules are read when a function is traced, so trace (first call) inside the context.
  """
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(axes, rules, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


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
