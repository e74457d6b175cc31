"""Qwen3-VL vision tower: patch embedding with bias, a learned position table resampled to each
image's grid plus 2D rope, full attention per frame, the merger, and DeepStack mergers.

Shapes: P patches, D ViT width, M merged tokens (P / 4), E LM width, K DeepStack levels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from rrvf_jax.models.qwen_vl import remat, rope
from rrvf_jax.models.qwen_vl.config import VisionConfig
from rrvf_jax.models.qwen_vl.layers import Dense, param
from rrvf_jax.models.qwen_vl.vision import PatchMerger, VisionBlock


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisualFeatures:
  """Merged image features, one row per image token (images in order; token axis leads).

  Attributes:
    merged: `[M, E]` the merger's output, put on the image tokens' embeddings.
    deepstack: `[M, K, E]` the DeepStack mergers' outputs, added after decoder layers 0..K-1.
  """

  merged: jax.Array
  deepstack: jax.Array


class VisionTower(nnx.Module):
  """pixel_values `[P, C*T*p*p]` -> `VisualFeatures` (merger and DeepStack outputs)."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    # HF's Conv3d with stride == kernel (and a bias here) is exactly an affine map of the patch.
    self.patch_embed = Dense(
      (cfg.patch_dim,), (cfg.hidden_size,), ("vit_patch", "vit_embed"), use_bias=True, **kw
    )
    self.pos_embed = param(
      rngs,
      jax.nn.initializers.normal(0.02),
      (cfg.num_position_embeddings, cfg.hidden_size),
      ("vit_pos", "vit_embed"),
      param_dtype,
    )
    self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, **kw)
    self.deepstack = nnx.List(
      [PatchMerger(cfg, postshuffle_norm=True, **kw) for _ in cfg.deepstack_visual_indexes]
    )

  def position_embeddings(self, index: rope.VisionIndex) -> jax.Array:
    """`[P, D]` float32: each patch's bilinear blend of 4 rows of the learned position table."""
    rows = self.pos_embed[...][index.pos_embed_index].astype(jnp.float32)  # [P, 4, D]
    return jnp.sum(rows * index.pos_embed_weight[..., None], axis=1)

  def __call__(self, pixel_values: jax.Array, index: rope.VisionIndex) -> VisualFeatures:
    cfg = self.cfg
    with jax.named_scope("vision_tower"):
      x = self.patch_embed(pixel_values)
      x = x + self.position_embeddings(index).astype(x.dtype)
      cos, sin = rope.vision_cos_sin(index.positions, cfg.head_dim, cfg.rope_theta)
      levels = []
      for i, block in enumerate(self.blocks):
        x = remat.call_layer(block, x, cos, sin, index.frames)
        if i in cfg.deepstack_visual_indexes:
          merger = self.deepstack[cfg.deepstack_visual_indexes.index(i)]
          levels.append(merger(x))
      merged = self.merger(x)
      deepstack = (
        jnp.stack(levels, axis=1) if levels else jnp.zeros((merged.shape[0], 0, merged.shape[1]))
      )
      return VisualFeatures(merged, deepstack.astype(merged.dtype))
