"""Key/value cache of the decoder: per-layer key and value slots and a `[B, S]` validity mask.

Keys are stored `[B, K, H, S]` and values `[B, K, S, H]`: the layouts the two attention matmuls
consume directly, so a decode step never transposes the cache (on CPU that copy dominated).

Slots are written left to right at a shared offset; rows of different lengths leave invalid slots
(padding, tokens after a row stopped), which the attention mask hides. Positions are not stored:
M-RoPE is applied to keys before they are written.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rrvf_jax.models.qwen_vl.config import TextConfig

# Logical axes of the key and value slot arrays, for `rrvf_jax.sharding`.
K_AXES = ("batch", "act_heads", None, "length")
V_AXES = ("batch", "act_heads", "length", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Decoder cache: layer i's keys `k[i]` `[B, K, H, S]`, values `v[i]` `[B, K, S, H]`, `valid`."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array

  @property
  def batch_size(self) -> int:
    return self.valid.shape[0]

  @property
  def length(self) -> int:
    return self.valid.shape[1]


def init(cfg: TextConfig, batch: int, length: int, dtype) -> KVCache:
  """An empty cache of `length` slots per row."""
  k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, length)
  v_shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
  k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers))
  v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers))
  return KVCache(k, v, jnp.zeros((batch, length), bool))


def write(k_cache, v_cache, k_btkh: jax.Array, v_btkh: jax.Array, offset: jax.Array):
  """Writes T new keys/values `[B, T, K, H]` to slots `offset + [0, T)` of one layer's cache."""
  k_new = jnp.transpose(k_btkh, (0, 2, 3, 1)).astype(k_cache.dtype)
  v_new = jnp.transpose(v_btkh, (0, 2, 1, 3)).astype(v_cache.dtype)
  k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k_new, offset, axis=3)
  v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v_new, offset, axis=2)
  return k_cache, v_cache


def write_valid(cache: KVCache, valid_bt: jax.Array, offset: jax.Array) -> KVCache:
  """Marks slots `[offset, offset + T)` valid where `valid_bt` is True (and invalid elsewhere)."""
  valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid_bt.astype(bool), offset, axis=1)
  return dataclasses.replace(cache, valid=valid)


def attention_mask(cache: KVCache, offset: jax.Array, num_queries: int) -> jax.Array:
  """Boolean `[B, T, S]`: the query in slot `offset + i` sees valid slots up to its own."""
  query_slot = offset + jnp.arange(num_queries)
  key_slot = jnp.arange(cache.length)
  causal = key_slot[None, :] <= query_slot[:, None]
  return causal[None] & cache.valid[:, None, :]


# Queries of an appended turn attended at once. The float32 scores of a block over the whole cache
# (rows x heads x block x cache slots) are the largest buffer of an append: all 1024 queries of a
# turn at once needed 84 GiB per v5p chip for 256 rows on an 8192-slot cache (compile_check).
QUERY_BLOCK = 256


def cached_attention(
  q_btnh: jax.Array,
  k_cache: jax.Array,
  v_cache: jax.Array,
  mask_bts: jax.Array,
  *,
  scale: float,
  block: int | None = None,
) -> jax.Array:
  """GQA attention of `[B, T, N, H]` queries over one layer's cache; scores and softmax in f32.

  Query head n reads kv head n // (N/K), as HF's repeat-interleave. Fully masked rows (padding
  queries) come out finite. More than `block` (default QUERY_BLOCK) queries go `block` at a time
  (each query's softmax is its own, so the result is the same).
  """
  attend = lambda q, mask: _attend(q, k_cache, v_cache, mask, scale=scale)
  return in_query_blocks(attend, q_btnh, mask_bts, block or QUERY_BLOCK)


def in_query_blocks(attend, q_btnh: jax.Array, mask_bts: jax.Array, block: int) -> jax.Array:
  """`attend(q, mask)` of `[B, T, N, H]` queries, `block` queries at a time when T is a multiple.

  Each query's softmax is its own, so the result is that of all at once; the largest buffer, the
  f32 scores, shrinks to a block's.
  """
  b, t, n, h = q_btnh.shape
  if t <= block or t % block:
    return attend(q_btnh, mask_bts)
  blocks = t // block
  q = q_btnh.reshape(b, blocks, block, n, h).swapaxes(0, 1)
  mask = mask_bts.reshape(b, blocks, block, mask_bts.shape[-1]).swapaxes(0, 1)
  out = jax.lax.map(lambda qm: attend(qm[0], qm[1]), (q, mask))
  return out.swapaxes(0, 1).reshape(b, t, n, h)


def _attend(q_btnh, k_cache, v_cache, mask_bts, *, scale: float) -> jax.Array:
  """`cached_attention` of all the queries at once."""
  b, t, n, h = q_btnh.shape
  kv_heads = k_cache.shape[1]
  q = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("btkgh,bkhs->bkgts", q, k_cache.astype(q.dtype))
  scores = scores.astype(jnp.float32) * scale
  scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
  out = jnp.einsum("bkgts,bksh->btkgh", probs, v_cache)
  return out.reshape(b, t, n, h).astype(q_btnh.dtype)
