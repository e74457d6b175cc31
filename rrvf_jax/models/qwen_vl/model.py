"""The Qwen-VL policy: vision tower + M-RoPE decoder + LM head, with HF-equal inputs and logits.

`model(input_ids, attention_mask=..., pixel_values=..., image_grid_thw=...)` is the convenience
entry (host-side index preparation, then a jitted forward). Jitted callers use
`prepare_inputs(...)` on the host and `model.forward(inputs)` inside their own jit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrvf_jax import sharding
from rrvf_jax.models.qwen_vl import rope
from rrvf_jax.models.qwen_vl.config import ModelConfig
from rrvf_jax.models.qwen_vl.layers import param
from rrvf_jax.models.qwen_vl.text import TextModel
from rrvf_jax.models.qwen_vl.vision import VisionTower


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelInputs:
  """Everything the jitted forward needs; built on the host by `prepare_inputs`.

  Attributes:
    input_ids: `[B, L]` int32.
    attention_mask: `[B, L]` int32, 1 for real tokens.
    positions: `[3, B, L]` int32 M-RoPE positions.
    pixel_values: `[P, C*T*p*p]` float or None.
    vision_index: index arrays of the vision tower or None.
  """

  input_ids: jax.Array
  attention_mask: jax.Array
  positions: jax.Array
  pixel_values: jax.Array | None = None
  vision_index: rope.VisionIndex | None = None


def prepare_inputs(
  cfg: ModelConfig,
  input_ids,
  attention_mask=None,
  pixel_values=None,
  image_grid_thw=None,
) -> ModelInputs:
  """Validates HF-style inputs and computes positions and vision indices (host NumPy)."""
  input_ids = np.asarray(input_ids, np.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
  # Counted over the whole batch, padding included: features are scattered onto every image token.
  n_image_tokens = int((input_ids == cfg.image_token_id).sum())
  if (pixel_values is None) != (image_grid_thw is None):
    raise ValueError("pixel_values and image_grid_thw must be given together")
  index = None
  if image_grid_thw is not None:
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    _check_image_inputs(cfg, grid, np.shape(pixel_values), n_image_tokens)
    index = rope.make_vision_index(grid, cfg.vision)
  elif n_image_tokens:
    raise ValueError(f"input_ids has {n_image_tokens} image tokens but no pixel_values were given")
  positions, _ = rope.get_rope_index(
    input_ids,
    image_grid_thw,
    mask,
    image_token_id=cfg.image_token_id,
    spatial_merge_size=cfg.vision.spatial_merge_size,
  )
  pixels = None if pixel_values is None else np.asarray(pixel_values)
  return ModelInputs(input_ids, mask, positions, pixels, index)


def _check_image_inputs(cfg: ModelConfig, grid: np.ndarray, pixel_shape, n_image_tokens: int):
  """Raises ValueError when pixel_values, image_grid_thw and the image tokens disagree."""
  v = cfg.vision
  m = v.spatial_merge_size
  if np.any(grid <= 0) or np.any(grid[:, 1:] % m):
    raise ValueError(
      f"image_grid_thw rows must be positive with h, w divisible by {m}: {grid.tolist()}"
    )
  n_patches = int(np.prod(grid, axis=1).sum())
  if tuple(pixel_shape) != (n_patches, v.patch_dim):
    raise ValueError(
      f"pixel_values shape {tuple(pixel_shape)} does not match image_grid_thw "
      f"(expected ({n_patches}, {v.patch_dim}))"
    )
  if n_image_tokens != n_patches // v.merge_unit:
    raise ValueError(
      f"image token count mismatch: input_ids has {n_image_tokens} <|image_pad|> tokens but "
      f"image_grid_thw {grid.tolist()} gives {n_patches // v.merge_unit} image features"
    )


def image_slots(
  input_ids: jax.Array, image_id, num_features: int, *, per_row: bool
) -> tuple[jax.Array, jax.Array]:
  """(is_image `[B, L]`, slot `[B, L]`): which feature row each image token takes.

  Image token k in row-major order takes feature k (HF `masked_scatter`); `per_row` counts k within
  each row instead (features `[B, K, ...]`). Slots of other tokens are clipped, don't-care values.
  """
  is_image = input_ids == image_id
  if per_row:
    order = jnp.cumsum(is_image, axis=1) - 1
  else:
    order = (jnp.cumsum(is_image.reshape(-1)) - 1).reshape(is_image.shape)
  return is_image, jnp.clip(order, 0, num_features - 1)


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, image_id):
  """Puts image feature k on the k-th image token in row-major order (HF `masked_scatter`)."""
  is_image, slot = image_slots(input_ids, image_id, features.shape[0], per_row=False)
  return jnp.where(is_image[..., None], features[slot].astype(embeds.dtype), embeds)


def merge_row_image_features(
  embeds: jax.Array, input_ids: jax.Array, features: jax.Array, image_id
) -> jax.Array:
  """Puts feature k of row b (`features [B, K, E]`) on row b's k-th image token.

  The per-row form of `merge_image_features`: no index spans rows, so a batch sharded over rows
  (or built host by host) needs no batch-global image numbering.
  """
  is_image, slot = image_slots(input_ids, image_id, features.shape[1], per_row=True)
  gathered = jnp.take_along_axis(features, slot[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


def features_per_row(features, rows: int):
  """Image features of `[S, M, ...]` image slots regrouped as `[rows, S / rows * M, ...]`."""
  return jax.tree.map(lambda f: f.reshape(rows, -1, *f.shape[2:]), features)


class QwenVL(nnx.Module):
  """Qwen2.5-VL / Qwen2-VL for conditional generation.

  The methods below are the model protocol the sampler and the trainers use; other families
  (`rrvf_jax.models.qwen3_vl.Qwen3VL`) implement the same methods with their own modules.
  """

  vision_tower_cls = VisionTower
  text_model_cls = TextModel

  def __init__(
    self,
    config: ModelConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.config = config
    self.dtype = dtype
    kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    self.visual = self.vision_tower_cls(config.vision, **kw)
    self.text = self.text_model_cls(config.text, **kw)
    t = config.text
    self.lm_head = (
      None
      if t.tie_word_embeddings
      else param(
        rngs,
        jax.nn.initializers.normal(0.02),
        (t.hidden_size, t.vocab_size),
        ("embed", "vocab"),
        param_dtype,
      )
    )

  def __call__(self, input_ids, *, attention_mask=None, pixel_values=None, image_grid_thw=None):
    """Logits `[B, L, V]` for HF-style inputs (not for use under an outer jit)."""
    inputs = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw)
    return jit_forward(self, inputs)

  def encode_images(self, pixel_values: jax.Array, vision_index: rope.VisionIndex) -> jax.Array:
    """Merged image features `[N, E]`, one row per image token, images in order.

    Callers treat features as a pytree whose leaves all have the token axis first (they pad and
    regroup it), and pass them back to `embed_with_features` / `embed_with_row_features`.
    """
    return self.visual(pixel_values.astype(self.dtype), vision_index)

  def encode_canvas_images(
    self, pixel_values_npd: jax.Array, vision_index: rope.VisionIndex
  ) -> jax.Array:
    """Merged features `[N, M, E]` of N images of one canvas size: patches `[N, P, D]`, one index.

    The images form a batch axis (a vmap), sharded like rows over the mesh's batch axes, so each
    device encodes its own images. A loop over the images would run each of them on every device,
    and one flat batch with a batch-wide index makes XLA replicate the tower's activations (its
    gathers use global positions): at 7B on 32 chips either needs several times the HBM.
    """
    pixels = sharding.constrain(pixel_values_npd, ("batch", None, None))
    features = jax.vmap(lambda px: self.encode_images(px, vision_index))(pixels)
    # Features may be a pytree (Qwen3-VL's DeepStack levels): image axis first, embedding last.
    return jax.tree.map(
      lambda f: sharding.constrain(f, ("batch",) + (None,) * (f.ndim - 2) + ("act_embed",)),
      features,
    )

  def embed_with_features(self, input_ids: jax.Array, features: jax.Array | None) -> jax.Array:
    """Decoder input `[B, L, E]` with precomputed image features on the image tokens.

    Image token k in row-major order over the batch takes feature row k (extra rows are unused).
    """
    embeds = self.text.embed_tokens(input_ids)
    if features is None:
      return embeds
    return merge_image_features(embeds, input_ids, features, self.config.image_token_id)

  def embed_with_row_features(self, input_ids: jax.Array, features: jax.Array) -> jax.Array:
    """Decoder input `[B, L, E]`; features of `[S, M, ...]` image slots, S / B slots per row.

    Row b's k-th image token takes row b's k-th feature: no index spans rows.
    """
    rows = features_per_row(features, input_ids.shape[0])
    embeds = self.text.embed_tokens(input_ids)
    return merge_row_image_features(embeds, input_ids, rows, self.config.image_token_id)

  def embed(self, inputs: ModelInputs) -> jax.Array:
    """Token embeddings `[B, L, E]` with image features merged in."""
    features = None
    if inputs.pixel_values is not None:
      features = self.encode_images(inputs.pixel_values, inputs.vision_index)
    return self.embed_with_features(inputs.input_ids, features)

  def hidden_states(self, inputs: ModelInputs) -> jax.Array:
    """Final-norm hidden states `[B, L, E]`."""
    return self.text(self.embed(inputs), inputs.positions, inputs.attention_mask)

  def logits(self, hidden_ble: jax.Array) -> jax.Array:
    """LM head (tied to the embedding where the config says so)."""
    if self.lm_head is None:
      logits = jnp.einsum("ble,ve->blv", hidden_ble, self.text.embed[...].astype(hidden_ble.dtype))
    else:
      logits = jnp.einsum("ble,ev->blv", hidden_ble, self.lm_head[...].astype(hidden_ble.dtype))
    return sharding.constrain(logits, ("batch", "length", "act_vocab"))

  def forward(self, inputs: ModelInputs) -> jax.Array:
    """Pure forward pass: logits `[B, L, V]`."""
    return self.logits(self.hidden_states(inputs))


@nnx.jit
def jit_forward(model: QwenVL, inputs: ModelInputs) -> jax.Array:
  """`model.forward` compiled (one compilation per input shape)."""
  return model.forward(inputs)
