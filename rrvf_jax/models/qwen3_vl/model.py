"""Qwen3-VL (dense) for conditional generation, behind the same model protocol as `QwenVL`.

DeepStack lives inside the protocol: `encode_images` returns `VisualFeatures` (merger output and
DeepStack levels, token axis first), `embed_with_features` / `embed_with_row_features` return
`Embeddings` (token embeddings plus the DeepStack residuals' gather indices), and the decoder adds
level i's features at the image positions after its layer i. Callers never look inside.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rrvf_jax.models.qwen3_vl.vision import VisionTower, VisualFeatures
from rrvf_jax.models.qwen_vl import kv_cache
from rrvf_jax.models.qwen_vl.model import QwenVL, features_per_row, image_slots
from rrvf_jax.models.qwen_vl.text import TextModel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeepStack:
  """Visual residuals of the first decoder layers, gathered lazily per layer.

  Attributes:
    features: `[R, K, levels, E]` DeepStack features; R = 1 numbers image tokens across the
      batch (row-major), R = B within each row.
    slot: `[B, L]` int32, the feature (along K) of each image token.
    is_image: `[B, L]` bool, the image token positions (the only ones that get a residual).
  """

  features: jax.Array
  slot: jax.Array
  is_image: jax.Array

  @property
  def levels(self) -> int:
    return self.features.shape[2]

  def residual(self, level: int) -> jax.Array:
    """`[B, L, E]`: level `level`'s feature at image tokens, zero elsewhere."""
    gathered = jnp.take_along_axis(self.features[:, :, level], self.slot[..., None], axis=1)
    return jnp.where(self.is_image[..., None], gathered, 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Embeddings:
  """Decoder input of a Qwen3-VL sequence with images: embeddings `[B, L, E]` and DeepStack."""

  tokens: jax.Array
  deepstack: DeepStack


class Qwen3TextModel(TextModel):
  """The Qwen3 decoder, taking plain embeddings or `Embeddings` (then with DeepStack)."""

  def __call__(self, x, positions_3bl, valid_bl):
    if isinstance(x, Embeddings):
      return super().__call__(x.tokens, positions_3bl, valid_bl, x.deepstack)
    return super().__call__(x, positions_3bl, valid_bl)

  def cached(
    self, x, positions_3bt, cache: kv_cache.KVCache, offset
  ) -> tuple[jax.Array, kv_cache.KVCache]:
    if isinstance(x, Embeddings):
      return super().cached(x.tokens, positions_3bt, cache, offset, x.deepstack)
    return super().cached(x, positions_3bt, cache, offset)

  def paged(self, x, positions_3bt, k_pages, v_pages, view):
    if isinstance(x, Embeddings):
      return super().paged(x.tokens, positions_3bt, k_pages, v_pages, view, x.deepstack)
    return super().paged(x, positions_3bt, k_pages, v_pages, view)


class Qwen3VL(QwenVL):
  """Qwen3-VL (dense): Qwen3 decoder with interleaved M-RoPE, DeepStack, Qwen3-VL vision tower.

  `encode_images` (inherited) returns the tower's `VisualFeatures`.
  """

  vision_tower_cls = VisionTower
  text_model_cls = Qwen3TextModel

  def _embeddings(self, input_ids, features: VisualFeatures, *, per_row: bool) -> Embeddings:
    """Token embeddings with `features` on the image tokens, and the DeepStack gather indices."""
    embeds = self.text.embed_tokens(input_ids)
    merged, deepstack = features.merged, features.deepstack
    if not per_row:  # One numbering across the batch: a single "row" of features.
      merged, deepstack = merged[None], deepstack[None]
    is_image, slot = image_slots(
      input_ids, self.config.image_token_id, merged.shape[1], per_row=per_row
    )
    gathered = jnp.take_along_axis(merged, slot[..., None], axis=1)
    tokens = jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)
    return Embeddings(tokens, DeepStack(deepstack, slot, is_image))

  def embed_with_features(self, input_ids, features: VisualFeatures | None):
    """Decoder input: embeddings, or `Embeddings` with DeepStack when `features` are given.

    Image token k in row-major order over the batch takes feature row k (extra rows are unused).
    """
    if features is None:
      return self.text.embed_tokens(input_ids)
    return self._embeddings(input_ids, features, per_row=False)

  def embed_with_row_features(self, input_ids, features: VisualFeatures) -> Embeddings:
    """Decoder input; features of `[S, M]` image slots, S / B slots per row (row-local indices)."""
    rows = features_per_row(features, input_ids.shape[0])
    return self._embeddings(input_ids, rows, per_row=True)
