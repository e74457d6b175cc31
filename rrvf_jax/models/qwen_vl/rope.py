"""Rotary embeddings and position indices: M-RoPE (sectioned and interleaved), `get_rope_index`,
vision 2D rope, windows, and the resampling of Qwen3-VL's learned position table.

Index arrays depend only on token ids and image grids, so they are computed on the host with NumPy
(once per grid) and passed to the jitted model as arrays. The cos/sin tables are computed in JAX, in
float32, with elementwise products (never a matmul, which may run at reduced precision on TPU/GPU).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------
# Language model: M-RoPE positions (host) and cos/sin (device).
# ----------------------------------------------------------------------------------------------


def get_rope_index(
  input_ids: np.ndarray,
  image_grid_thw: np.ndarray | None,
  attention_mask: np.ndarray | None,
  *,
  image_token_id: int,
  spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
  """3D (t, h, w) positions `[3, B, L]` and per-row rope deltas `[B]` (transformers v5 rules).

  Text runs advance all three axes by one per token; the k-th run of image tokens (counted over the
  whole batch in row order) takes grid k and occupies `cur + (t, i, j)`, after which `cur` advances
  by `max(lh, lw)`. Padded positions get 0. The delta is `max(position) + 1 - n_real`.
  """
  input_ids = np.asarray(input_ids)
  batch, length = input_ids.shape
  mask = (
    np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask) != 0
  )
  grids = iter(
    np.asarray(image_grid_thw).reshape(-1, 3).tolist() if image_grid_thw is not None else []
  )
  positions = np.zeros((3, batch, length), np.int32)
  deltas = np.zeros((batch,), np.int32)
  for b in range(batch):
    is_image = input_ids[b][mask[b]] == image_token_id
    row, cur = [], 0
    for image, run in itertools.groupby(is_image.tolist()):
      n = len(list(run))
      if not image:
        row.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
        cur += n
        continue
      try:
        t, h, w = next(grids)
      except StopIteration:
        raise ValueError(
          "more runs of image tokens in input_ids than images in image_grid_thw"
        ) from None
      lh, lw = h // spatial_merge_size, w // spatial_merge_size
      if t * lh * lw != n:
        raise ValueError(
          f"an image run has {n} image tokens but its grid {(t, h, w)} needs {t * lh * lw}"
        )
      row.append(cur + image_grid_positions(t, lh, lw))
      cur += max(lh, lw)
    if row:
      pos = np.concatenate(row, axis=1)
      positions[:, b, mask[b]] = pos
      deltas[b] = pos.max() + 1 - pos.shape[1]
  if next(grids, None) is not None:
    raise ValueError(
      "image_grid_thw has more images than there are runs of image tokens in input_ids"
    )
  return positions, deltas


def image_grid_positions(t: int, lh: int, lw: int) -> np.ndarray:
  """Relative (t, h, w) positions `[3, t*lh*lw]` of an image's merged tokens in raster order."""
  tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
  return np.stack([tt.ravel(), hh.ravel(), ww.ravel()])


def text_inv_freq(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies `[head_dim/2]` of the language model's rope."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def mrope_axis_of_freq(mrope_section: tuple[int, ...], interleaved: bool = False) -> np.ndarray:
  """Which position axis (0 t, 1 h, 2 w) each rope frequency `j < sum(mrope_section)` rotates by.

  Sectioned (Qwen2/2.5-VL): the first `section[0]` frequencies take t, the next h, the rest w.
  Interleaved (Qwen3-VL): frequency j takes h when `j % 3 == 1 and j < 3 * section[1]`, w when
  `j % 3 == 2 and j < 3 * section[2]`, and t otherwise.
  """
  if not interleaved:
    return np.repeat(np.arange(len(mrope_section)), mrope_section)
  j = np.arange(sum(mrope_section))
  axis = np.zeros_like(j)
  for a in (1, 2):
    axis[(j % 3 == a) & (j < 3 * mrope_section[a])] = a
  return axis


def mrope_cos_sin(
  positions: jax.Array,
  *,
  head_dim: int,
  theta: float,
  mrope_section: tuple[int, ...],
  interleaved: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """cos/sin `[B, L, head_dim]` (float32) from M-RoPE positions `[3, B, L]`.

  Frequency j takes its position from the axis `mrope_axis_of_freq` assigns it.
  """
  inv_freq = text_inv_freq(head_dim, theta)
  axis_of_freq = mrope_axis_of_freq(mrope_section, interleaved)
  pos = positions.astype(jnp.float32)[axis_of_freq]  # [F, B, L]
  angles = jnp.moveaxis(pos, 0, -1) * inv_freq  # [B, L, F]
  emb = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
  """[a, b] -> [-b, a] over the two halves of the last axis (NeoX / HF convention)."""
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-b, a], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x [..., L, N, H]` by cos/sin `[..., L, H]` broadcast over heads."""
  return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


# ----------------------------------------------------------------------------------------------
# Vision tower: 2D positions, window permutation and attention segments (host).
# ----------------------------------------------------------------------------------------------


def vision_position_ids(grid_thw: np.ndarray, merge: int) -> np.ndarray:
  """(h, w) grid coordinates `[N, 2]` of every patch, in the processor's block-major order."""
  out = []
  for t, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist():
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    hw = np.stack([hh, ww], axis=-1).reshape(h // merge, merge, w // merge, merge, 2)
    out.append(np.tile(hw.transpose(0, 2, 1, 3, 4).reshape(-1, 2), (t, 1)))
  return np.concatenate(out).astype(np.int32)


def vision_window_index(
  grid_thw: np.ndarray, merge: int, window_size: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Window permutation of merged tokens and window boundaries in patch units (HF semantics).

  Windows are `ws x ws` merged tokens (`ws = window_size / merge / patch_size`), laid out
  row-major per frame; the grid is padded bottom/right to whole windows (by a whole extra window
  when it already divides, as HF does), and empty windows are dropped.
  """
  ws = window_size // merge // patch_size
  index, cu, offset = [], [0], 0
  for t, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist():
    lh, lw = h // merge, w // merge
    pad_h, pad_w = ws - lh % ws, ws - lw % ws
    grid = np.full((t, lh + pad_h, lw + pad_w), -1, np.int64)
    grid[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    nh, nw = (lh + pad_h) // ws, (lw + pad_w) // ws
    windows = grid.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(-1, ws * ws)
    sizes = (windows >= 0).sum(-1)
    index.append(windows[windows >= 0] + offset)
    cu.extend((np.cumsum(sizes) * merge * merge + cu[-1]).tolist())
    offset += t * lh * lw
  cu_arr = np.asarray(cu, np.int64)
  keep = np.concatenate([[True], np.diff(cu_arr) != 0])  # Drops empty windows (unique_consecutive).
  return np.concatenate(index), cu_arr[keep]


def vision_cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
  """Boundaries (patch units) of per-frame full attention."""
  g = np.asarray(grid_thw).reshape(-1, 3)
  return np.concatenate([[0], np.cumsum(np.repeat(g[:, 1] * g[:, 2], g[:, 0]))])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentLayout:
  """Packs variable-length attention segments into a dense `[G, S]` grid, and back.

  Attributes:
    gather: `[G, S]` int32 position of each slot (0 for padding slots).
    valid: `[G, S]` bool, False on padding slots.
    scatter: `[N]` int32 flat slot (`g * S + s`) of each position.
  """

  gather: jax.Array
  valid: jax.Array
  scatter: jax.Array


def segment_layout(cu_seqlens: np.ndarray) -> SegmentLayout:
  """Dense layout of the segments `[cu[i], cu[i+1])`; attention then costs sum(S^2), not N^2."""
  cu = np.asarray(cu_seqlens, np.int64)
  sizes = np.diff(cu)
  width = int(sizes.max())
  slot = np.arange(width)
  valid = slot[None, :] < sizes[:, None]
  gather = np.where(valid, cu[:-1, None] + slot[None, :], 0)
  scatter = np.flatnonzero(valid.ravel())  # Row-major slots of valid entries are in position order.
  return SegmentLayout(gather.astype(np.int32), valid, scatter.astype(np.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionIndex:
  """Per-batch index arrays for the vision tower, all in the (window-)permuted patch order.

  Attributes:
    positions: `[N, 2]` int32 (h, w) rope coordinates of each patch.
    windows: segments of the windowed attention blocks.
    frames: segments of the full attention blocks (one per image frame).
    merged_order: `[N/m^2]` int32 permutation of merged units (window order).
    merged_restore: `[N/m^2]` int32 inverse permutation, applied after the merger.
    pos_embed_index: `[N, 4]` int32 rows of the learned position table each patch interpolates
      (Qwen3-VL; None for towers without one).
    pos_embed_weight: `[N, 4]` float32 bilinear weights of those rows.
  """

  positions: jax.Array
  windows: SegmentLayout
  frames: SegmentLayout
  merged_order: jax.Array
  merged_restore: jax.Array
  pos_embed_index: jax.Array | None = None
  pos_embed_weight: jax.Array | None = None


def make_vision_index(grid_thw: np.ndarray, vision_cfg) -> VisionIndex:
  """Builds the VisionIndex for a batch of images (host NumPy)."""
  grid_thw = np.asarray(grid_thw).reshape(-1, 3)
  merge, unit = vision_cfg.spatial_merge_size, vision_cfg.merge_unit
  n = int(np.prod(grid_thw, axis=1).sum())
  positions = vision_position_ids(grid_thw, merge)
  cu_frames = vision_cu_seqlens(grid_thw)
  if vision_cfg.uses_windows:
    order, cu_windows = vision_window_index(
      grid_thw, merge, vision_cfg.window_size, vision_cfg.patch_size
    )
  else:
    order, cu_windows = np.arange(n // unit), cu_frames
  patch_order = (order[:, None] * unit + np.arange(unit)).ravel()
  interp_index = interp_weight = None
  if getattr(vision_cfg, "num_position_embeddings", 0):
    # Towers with a learned position table do not permute (no windows): patch order is kept.
    side = math.isqrt(vision_cfg.num_position_embeddings)
    interp_index, interp_weight = pos_embed_interpolation(grid_thw, side, merge)
  return VisionIndex(
    positions=positions[patch_order],
    windows=segment_layout(cu_windows),
    # Frames stay contiguous under the in-image permutation, so their boundaries are unchanged.
    frames=segment_layout(cu_frames),
    merged_order=order.astype(np.int32),
    merged_restore=np.argsort(order).astype(np.int32),
    pos_embed_index=interp_index,
    pos_embed_weight=interp_weight,
  )


def _bilinear_taps(coord: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows (floor, floor + 1, clamped) and weights `[n, 2]` of `align_corners=True` resampling.

  Target coordinate i of an axis of `size` maps to `i * (side - 1) / max(size - 1, 1)` in the
  table; all arithmetic is float32 in transformers' order, so the weights agree bit for bit.
  """
  src = coord.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
  floor = np.floor(src)
  offsets = np.arange(2, dtype=np.float32)
  taps = np.clip(floor[:, None].astype(np.int64) + offsets.astype(np.int64), 0, side - 1)
  weights = np.clip(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets), 0, None)
  return taps, weights.astype(np.float32)


def pos_embed_interpolation(
  grid_thw: np.ndarray, side: int, merge: int
) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear (`align_corners=True`) resampling of a `side x side` position table to each grid.

  Returns rows `[N, 4]` of the flattened table and weights `[N, 4]` for every patch, patches in
  the processor's block-major order and frames repeated (transformers'
  `get_vision_interpolation_indices_and_weights`).
  """
  grid = np.asarray(grid_thw).reshape(-1, 3)
  coords = vision_position_ids(grid, merge)  # (row, col) of every patch, block-major
  counts = np.prod(grid, axis=1)
  h_taps, h_weights = _bilinear_taps(coords[:, 0], np.repeat(grid[:, 1], counts), side)
  w_taps, w_weights = _bilinear_taps(coords[:, 1], np.repeat(grid[:, 2], counts), side)
  index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
  weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
  return index.astype(np.int32), weight.astype(np.float32)


def vision_cos_sin(
  positions: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
  """cos/sin `[N, head_dim]` of the axial 2D rope, laid out [h-freqs | w-freqs] twice."""
  spatial = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, head_dim/4]
  hw = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
  emb = jnp.concatenate([hw, hw], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)
