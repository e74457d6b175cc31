"""Shared building blocks: parameters with logical axes, norms, dense layers, attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rrvf_jax.models.qwen_vl import flash

Dtype = jnp.dtype | type


def param(rngs: nnx.Rngs, init, shape, axes: tuple[str | None, ...], dtype: Dtype) -> nnx.Param:
  """A parameter carrying its logical axis names (mapped to mesh axes by `rrvf_jax.sharding`)."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


_normal = jax.nn.initializers.normal(0.02)
_zeros = jax.nn.initializers.zeros
_ones = jax.nn.initializers.ones


class Dense(nnx.Module):
  """y = x @ W (+ b), with W of shape `in_shape + out_shape` contracted over `in_shape`."""

  def __init__(
    self,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    *,
    use_bias: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
  ):
    self.n_in = len(in_shape)
    self.dtype = dtype
    self.kernel = param(rngs, _normal, (*in_shape, *out_shape), axes, param_dtype)
    self.bias = param(rngs, _zeros, out_shape, axes[self.n_in :], param_dtype) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    y = jnp.tensordot(x.astype(self.dtype), kernel, axes=self.n_in)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """HF-order RMSNorm: float32 statistics, cast back to the input dtype, then scale."""

  def __init__(self, dim: int, axis: str, *, eps: float, param_dtype: Dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, _ones, (dim,), (axis,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with a two-pass variance (as torch), statistics in float32."""

  def __init__(self, dim: int, axis: str, *, eps: float, param_dtype: Dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, _ones, (dim,), (axis,), param_dtype)
    self.bias = param(rngs, _zeros, (dim,), (axis,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float
) -> jax.Array:
  """Grouped-query softmax attention (XLA's fused implementation; cuDNN on GPUs where it applies).

  Args:
    q: `[B, T, N, H]` queries; N must be a multiple of the K key/value heads.
    k: `[B, S, K, H]` keys.
    v: `[B, S, K, H]` values.
    mask: boolean `[B, T, S]` or broadcastable; True where a query may attend.
    scale: multiplier of the scores.

  Returns:
    `[B, T, N, H]`. Query head n uses key/value head n // (N/K) (HF's repeat-interleave). Rows with
    no visible key (padding queries) come out finite, as in HF.
  """
  mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[1], k.shape[1]))[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


# Causal attention in at most this many query blocks: each block computes scores only up to its
# last position, about half of the full square, and its scores are a block-size slice of it.
CAUSAL_BLOCKS = 16
_MIN_BLOCK = 64
# From this length on (an even number of FLASH_BLOCKs), causal attention is `flash.flash_attention`:
# the dense blocks' scores grow with the square of the length (at 32,768 tokens the backward of
# one 7B layer keeps tens of GiB of them per row), the flash tiles do not.
FLASH_MIN_LENGTH = 4096
FLASH_BLOCK = 512


def uses_flash(length: int) -> bool:
  """Whether causal attention over `length` tokens takes the flash tiles (an even count of them)."""
  return length >= FLASH_MIN_LENGTH and length % (2 * FLASH_BLOCK) == 0


def causal_mask(attention_mask: jax.Array) -> jax.Array:
  """Boolean `[B, L, L]`: query i sees key j when j <= i and j is a real token."""
  length = attention_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return causal[None] & (attention_mask[:, None, :] != 0)


def causal_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, *, scale: float
) -> jax.Array:
  """`attention` under `causal_mask(key_valid)`, skipping the upper triangle.

  `key_valid` is `[B, S]`, nonzero for real tokens (the batch's `attention_mask`). From
  FLASH_MIN_LENGTH tokens on it is `flash.causal_flash_attention` (tiles of FLASH_BLOCK), which
  never builds the `[B, T, S]` mask. Below, the queries are cut into at most CAUSAL_BLOCKS blocks;
  block [a, b) attends to keys [0, b) only. The keys left out are the ones the mask hides, so the
  result is `attention`'s (up to float rounding); the work and the largest temporary, `[B, N, T, S]`
  scores, roughly halve.
  """
  length = q.shape[1]
  if length == k.shape[1] and uses_flash(length):
    return flash.causal_flash_attention(q, k, v, key_valid, scale=scale, block=FLASH_BLOCK)
  mask = jnp.broadcast_to(causal_mask(key_valid), (q.shape[0], length, k.shape[1]))
  if length != k.shape[1] or length <= _MIN_BLOCK:
    return attention(q, k, v, mask, scale=scale)
  blocks = min(CAUSAL_BLOCKS, -(-length // _MIN_BLOCK))
  size = -(-length // blocks)
  outs = []
  for start in range(0, length, size):
    end = min(start + size, length)
    outs.append(
      attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end], scale=scale)
    )
  return jnp.concatenate(outs, axis=1)
