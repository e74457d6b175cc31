"""Vision tower of Qwen2.5-VL (windowed, RMSNorm, SwiGLU) and Qwen2-VL (LayerNorm, GELU MLP).

Its blocks and merger are shared with Qwen3-VL's tower (`rrvf_jax.models.qwen3_vl.vision`).

Shapes: P patches, D ViT width, N heads, H head dim, F MLP width, M merged tokens (P / 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rrvf_jax.models.qwen_vl import flash, remat, rope
from rrvf_jax.models.qwen_vl.config import VisionConfig
from rrvf_jax.models.qwen_vl.layers import Dense, LayerNorm, RMSNorm, attention

_NORM_EPS = 1e-6  # Hard-coded in HF's vision tower, independent of the text config.


def _norm(cfg: VisionConfig, dim: int, axis: str, param_dtype, rngs) -> nnx.Module:
  norm_cls = RMSNorm if cfg.model_type == "qwen2_5_vl" else LayerNorm
  return norm_cls(dim, axis, eps=_NORM_EPS, param_dtype=param_dtype, rngs=rngs)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


def tanh_gelu(x: jax.Array) -> jax.Array:
  """GELU with the tanh approximation (HF `gelu_pytorch_tanh`)."""
  return jax.nn.gelu(x, approximate=True)


# Activation of the ungated ViT MLP (fc1 -> act -> fc2) per model type.
_MLP_ACTIVATION = {"qwen2_vl": quick_gelu, "qwen3_vl": tanh_gelu}


# From this many slots per segment on, a segment's attention takes the flash tiles: the dense
# `[G, N, S, S]` float32 scores of a 2304-patch frame are 340 MB per image and layer, and the
# update and the sampler's encode run tens of images at once (compile_check, 3B GRPO micro-batch
# on v6e-8: seven 1.9 GiB score buffers). Tiles are the largest of VISION_FLASH_BLOCKS dividing S.
VISION_FLASH_MIN = 1024
VISION_FLASH_BLOCKS = (512, 256, 128)


def flash_block(length: int) -> int | None:
  """The flash tile for segments of `length` slots, or None for the dense path."""
  if length < VISION_FLASH_MIN:
    return None
  return next((b for b in VISION_FLASH_BLOCKS if length % b == 0), None)


class VisionAttention(nnx.Module):
  """Bidirectional attention restricted to segments (windows or whole frames)."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    kw = {"use_bias": True, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    self.qkv = Dense((d,), (3, n, h), ("vit_embed", None, "vit_heads", "vit_head_dim"), **kw)
    self.proj = Dense((n, h), (d,), ("vit_heads", "vit_head_dim", "vit_embed"), **kw)
    self.scale = h**-0.5

  def __call__(self, x_pd, cos, sin, segments: rope.SegmentLayout):
    q, k, v = jnp.moveaxis(self.qkv(x_pd), 1, 0)  # Each [P, N, H].
    # HF rotates q and k in float32, then casts back.
    q = rope.apply_rope(q.astype(jnp.float32), cos, sin).astype(x_pd.dtype)
    k = rope.apply_rope(k.astype(jnp.float32), cos, sin).astype(x_pd.dtype)
    # Attend inside each segment on a dense [G, S] grid: sum(S^2) work instead of P^2.
    g, mask = segments.gather, segments.valid[:, None, :]
    block = flash_block(g.shape[1])
    if block is None:
      out_gsnh = attention(q[g], k[g], v[g], mask, scale=self.scale)
    else:
      out_gsnh = flash.flash_attention(
        q[g], k[g], v[g], mask, scale=self.scale, block_q=block, block_k=block
      )
    out = out_gsnh.reshape(-1, *out_gsnh.shape[2:])[segments.scatter]
    return self.proj(out)


class VisionMLP(nnx.Module):
  """SwiGLU with biases (Qwen2.5-VL) or fc1 -> GELU -> fc2 (Qwen2-VL quick, Qwen3-VL tanh GELU)."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = {"use_bias": True, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    self.gated = cfg.model_type == "qwen2_5_vl"
    self.up = Dense((d,), (f,), ("vit_embed", "vit_mlp"), **kw)
    self.gate = Dense((d,), (f,), ("vit_embed", "vit_mlp"), **kw) if self.gated else None
    self.down = Dense((f,), (d,), ("vit_mlp", "vit_embed"), **kw)
    self.model_type = cfg.model_type

  def __call__(self, x):
    if self.gated:
      return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
    return self.down(_MLP_ACTIVATION[self.model_type](self.up(x)))


class VisionBlock(nnx.Module):
  """Pre-norm ViT block."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.norm1 = _norm(cfg, cfg.hidden_size, "vit_embed", param_dtype, rngs)
    self.norm2 = _norm(cfg, cfg.hidden_size, "vit_embed", param_dtype, rngs)
    self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = VisionMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, segments):
    x = x + self.attn(self.norm1(x), cos, sin, segments)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """Norm per patch, concatenate each 2x2 block, then Linear -> exact GELU -> Linear.

  With `postshuffle_norm` (Qwen3-VL's DeepStack mergers) the blocks are concatenated first and
  the norm runs over the concatenation.
  """

  def __init__(
    self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, postshuffle_norm: bool = False
  ):
    d, unit = cfg.hidden_size, cfg.merge_unit
    kw = {"use_bias": True, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    self.unit = unit
    self.postshuffle_norm = postshuffle_norm
    if postshuffle_norm:
      self.norm = _norm(cfg, unit * d, "vit_merged", param_dtype, rngs)
    else:
      self.norm = _norm(cfg, d, "vit_embed", param_dtype, rngs)
    self.fc1 = Dense((unit * d,), (unit * d,), ("vit_merged", "vit_merged_out"), **kw)
    self.fc2 = Dense((unit * d,), (cfg.out_hidden_size,), ("vit_merged_out", "embed"), **kw)

  def __call__(self, x_pd):
    shuffle = lambda x: x.reshape(x.shape[0] // self.unit, -1)
    x = self.norm(shuffle(x_pd)) if self.postshuffle_norm else shuffle(self.norm(x_pd))
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
  """pixel_values `[P, C*T*p*p]` -> image token embeddings `[M, E]` in input (raster) order."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    # The HF Conv3d with stride == kernel is exactly a matmul over flattened patches.
    self.patch_embed = Dense(
      (cfg.patch_dim,),
      (cfg.hidden_size,),
      ("vit_patch", "vit_embed"),
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.blocks = nnx.List(
      [VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.depth)]
    )
    self.merger = PatchMerger(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array, index: rope.VisionIndex) -> jax.Array:
    cfg = self.cfg
    with jax.named_scope("vision_tower"):
      x = self.patch_embed(pixel_values)
      # Permute merged units into window order so that windows are contiguous segments.
      x = x.reshape(-1, cfg.merge_unit, cfg.hidden_size)[index.merged_order].reshape(x.shape)
      cos, sin = rope.vision_cos_sin(index.positions, cfg.head_dim, cfg.rope_theta)
      for i, block in enumerate(self.blocks):
        full = i in cfg.fullatt_block_indexes or not cfg.uses_windows
        x = remat.call_layer(block, x, cos, sin, index.frames if full else index.windows)
      return self.merger(x)[index.merged_restore]
