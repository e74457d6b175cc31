"""Batches on the host and on the mesh: micro-batch stacking and data-parallel shardings.

A batch is any pytree of arrays; a `ModelInputs` inside it is recognised and sharded field by field
(its M-RoPE positions carry the batch on axis 1, its vision index arrays address the whole batch's
patches and stay replicated). Every other array leaf carries the batch on axis 0.

Gradient accumulation takes a batch whose leaves all have a leading micro-batch axis `[M, ...]`.
Micro-batches are built on the host, each with its own `prepare_inputs`, because a `ModelInputs`
cannot be split inside jit: its `pixel_values [P, D]` are flattened over the batch's images and its
vision index holds batch-global positions. Stacking needs equal shapes in every micro-batch, which
fixed length buckets and a fixed image canvas give.

Row image slots: when every image of a batch has one size (a fixed canvas), row b's j-th image sits
in slot `b * S + j` of `pixel_values [B * S, P, D]` (unused slots are zeros) and the vision index is
that of ONE image (`row_image_slots`); the forward encodes the slots one by one and puts each row's
features on its own image tokens (`row_slot_hidden_states`). Nothing then addresses the batch as a
whole, so such a batch splits along rows (micro-batches, shards, hosts) like every other field,
and conversations with different numbers of images share one shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrvf_jax import sharding as sharding_lib
from rrvf_jax.models.qwen_vl import rope
from rrvf_jax.models.qwen_vl.model import ModelInputs

Image = tuple[np.ndarray, np.ndarray]  # (pixel_values [P, D], image_grid_thw [1, 3]) of one image


def row_image_slots(
  images: Sequence[Sequence[Image]], images_per_row: int
) -> tuple[np.ndarray, np.ndarray]:
  """(slots `[rows * S, P, D]` float32, the images' one grid `[1, 3]`) of each row's images.

  ValueError when a row has more than S images or the images differ in size.
  """
  grids = [np.asarray(g).reshape(1, 3) for row in images for _, g in row]
  if not grids:
    raise ValueError("row_image_slots needs at least one image")
  grid = np.concatenate(grids)
  if np.any(grid != grid[0]):
    raise ValueError(
      f"row image slots need every image at one size; grids {np.unique(grid, axis=0).tolist()}"
    )
  patches = next(np.asarray(p) for row in images for p, _ in row)
  slots = np.zeros((len(images) * images_per_row, *patches.shape), np.float32)
  for b, row in enumerate(images):
    if len(row) > images_per_row:
      raise ValueError(f"row {b} has {len(row)} images, more than the {images_per_row} slots")
    for j, (pixels, _) in enumerate(row):
      slots[b * images_per_row + j] = pixels
  return slots, grid[:1]


def slot_inputs(cfg, ids, mask, images: Sequence[Sequence[Image]], images_per_row: int):
  """`ModelInputs` with row image slots (host NumPy): ids, mask, M-RoPE positions, slots, index."""
  slots, grid = row_image_slots(images, images_per_row)
  all_grids = np.concatenate([np.asarray(g).reshape(1, 3) for row in images for _, g in row])
  positions, _ = rope.get_rope_index(
    ids,
    all_grids,
    mask,
    image_token_id=cfg.image_token_id,
    spatial_merge_size=cfg.vision.spatial_merge_size,
  )
  return ModelInputs(ids, mask, positions, slots, rope.make_vision_index(grid, cfg.vision))


def row_slot_hidden_states(model, inputs: ModelInputs) -> jax.Array:
  """Final-norm hidden states `[B, L, E]` of a batch with row image slots (any model family)."""
  features = model.encode_canvas_images(inputs.pixel_values, inputs.vision_index)
  # Each row's image slots are its own: feature indices never span rows.
  embeds = model.embed_with_row_features(inputs.input_ids, features)
  return model.text(embeds, inputs.positions, inputs.attention_mask)


def stack_micro_batches(batches: Sequence[Any]) -> Any:
  """Stacks equal-shaped batches along a new leading micro-batch axis (host NumPy)."""
  if not batches:
    raise ValueError("stack_micro_batches needs at least one batch")
  first = jax.tree.structure(batches[0])
  for i, b in enumerate(batches[1:], start=1):
    if jax.tree.structure(b) != first:
      raise ValueError(f"micro-batch {i} has a different structure from micro-batch 0")
    for (path, x), y in zip(
      jax.tree_util.tree_leaves_with_path(batches[0]), jax.tree.leaves(b), strict=True
    ):
      if np.shape(x) != np.shape(y):
        raise ValueError(
          f"micro-batch {i}: {jax.tree_util.keystr(path)} has shape {np.shape(y)}, micro-batch 0 "
          f"has {np.shape(x)}; micro-batches need equal shapes (pad to one length bucket and use "
          "a fixed image size)"
        )
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)


def _batch_axis_sharding(
  shape: tuple[int, ...], axis: int, mesh: Mesh, rules: sharding_lib.Rules, what: str, strict: bool
) -> NamedSharding:
  """Sharding with `axis` over the rules' "batch" mesh axes (replicated where it cannot divide)."""
  if len(shape) <= axis:
    return NamedSharding(mesh, PartitionSpec())
  axes: list[str | None] = [None] * len(shape)
  axes[axis] = "batch"
  spec = sharding_lib.trim_spec(sharding_lib.logical_to_spec(axes, rules, mesh))
  sharding = NamedSharding(mesh, spec)
  if strict:
    sharding_lib.check_divisible(shape, sharding, what)
    return sharding
  try:
    sharding_lib.check_divisible(shape, sharding, what)
  except ValueError:
    return NamedSharding(mesh, PartitionSpec())
  return sharding


def _model_inputs_shardings(
  inputs: ModelInputs, mesh: Mesh, rules: sharding_lib.Rules, lead: int
) -> ModelInputs:
  """Per-field shardings of a ModelInputs; `lead` is 1 under a micro-batch axis, else 0."""
  replicated = NamedSharding(mesh, PartitionSpec())

  def rows(x: Any, axis: int, what: str, strict: bool = True) -> NamedSharding:
    return _batch_axis_sharding(np.shape(x), lead + axis, mesh, rules, what, strict)

  # Patches of equal-sized images are grouped by example, so they shard like rows when they divide.
  pixels = (
    None
    if inputs.pixel_values is None
    else rows(inputs.pixel_values, 0, "pixel_values", strict=False)
  )
  index = (
    None if inputs.vision_index is None else jax.tree.map(lambda _: replicated, inputs.vision_index)
  )
  return ModelInputs(
    input_ids=rows(inputs.input_ids, 0, "input_ids"),
    attention_mask=rows(inputs.attention_mask, 0, "attention_mask"),
    positions=rows(inputs.positions, 1, "positions"),
    pixel_values=pixels,
    vision_index=index,
  )


def batch_shardings(
  batch: Any, mesh: Mesh, rules: sharding_lib.Rules, *, micro_batches: int = 1
) -> Any:
  """A tree like `batch` of NamedShardings placing each example's data on its data-parallel shard.

  Works on host arrays, device arrays, ShapeDtypeStructs and tracers (only shapes are read). Raises
  a readable ValueError when the batch size does not divide by the data-parallel mesh size.
  """
  lead = 1 if micro_batches > 1 else 0

  def one(path: Any, x: Any) -> Any:
    if isinstance(x, ModelInputs):
      return _model_inputs_shardings(x, mesh, rules, lead)
    what = f"batch{jax.tree_util.keystr(path)}"
    return _batch_axis_sharding(np.shape(x), lead, mesh, rules, what, strict=True)

  return jax.tree_util.tree_map_with_path(one, batch, is_leaf=lambda x: isinstance(x, ModelInputs))


def shard_batch(
  batch: Any, mesh: Mesh, rules: sharding_lib.Rules, *, micro_batches: int = 1
) -> Any:
  """Puts a (single-host, global) batch on the mesh with `batch_shardings`."""
  return jax.device_put(batch, batch_shardings(batch, mesh, rules, micro_batches=micro_batches))


def _global_shapes(batch: Any, hosts: int, lead: int) -> Any:
  """ShapeDtypeStructs of the global batch whose host shares are `batch` (batch axes x hosts)."""

  def grow(x: Any, axis: int) -> jax.ShapeDtypeStruct:
    shape = list(np.shape(x))
    shape[axis] *= hosts
    return jax.ShapeDtypeStruct(tuple(shape), np.asarray(x).dtype)

  def one(x: Any) -> Any:
    if not isinstance(x, ModelInputs):
      return None if x is None else grow(x, lead)
    same = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype), x)
    return ModelInputs(
      input_ids=grow(x.input_ids, lead),
      attention_mask=grow(x.attention_mask, lead),
      positions=grow(x.positions, lead + 1),
      pixel_values=None if x.pixel_values is None else grow(x.pixel_values, lead),
      vision_index=same.vision_index,
    )

  return jax.tree.map(one, batch, is_leaf=lambda x: isinstance(x, ModelInputs))


def host_batch_to_global(
  batch: Any, mesh: Mesh, rules: sharding_lib.Rules, *, micro_batches: int = 1
) -> Any:
  """The global batch on the mesh from this host's share (every host calls it with its own).

  On one host this is `shard_batch`. On several, the global batch is the hosts' shares
  concatenated along the batch axes in process order (`host_batch_slice`), which needs a mesh
  whose batch axes run over hosts in process order. Replicated leaves (a `ModelInputs`' vision
  index) must be the same on every host, so the image layout must not depend on the host: one
  index per image of a fixed canvas (GRPO), or an index built for the global batch (SFT).
  """
  hosts = jax.process_count()
  if hosts == 1:
    return shard_batch(batch, mesh, rules, micro_batches=micro_batches)
  lead = 1 if micro_batches > 1 else 0
  shapes = _global_shapes(batch, hosts, lead)
  shardings = batch_shardings(shapes, mesh, rules, micro_batches=micro_batches)

  def place(x: Any, shape: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.Array:
    if sharding.is_fully_replicated and shape.shape != np.shape(x):
      raise ValueError(
        f"a batch leaf of global shape {shape.shape} does not divide over the mesh's batch axes; "
        "make the per-host batch a multiple of the data-parallel devices per host"
      )
    return jax.make_array_from_process_local_data(sharding, np.asarray(x), shape.shape)

  return jax.tree.map(place, batch, shapes, shardings)
