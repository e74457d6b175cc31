"""Key/value cache of the decoder: per-layer `[B, S, K, H]` slots and a `[B, S]` validity mask.

Slots are written left to right at a shared offset; rows of different lengths leave invalid slots
(padding, tokens after a row stopped), which the attention mask hides. Positions are not stored:
M-RoPE is applied to keys before they are written.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rrvf_jax.models.qwen_vl.config import TextConfig

# Logical axes of a cache slot array, for `rrvf_jax.sharding`.
KV_AXES = ("batch", "length", "act_heads", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Decoder cache; `k[i]`, `v[i]` are layer i's `[B, S, K, H]`, `valid` is `[B, S]` bool."""

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
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return KVCache(zeros, zeros, jnp.zeros((batch, length), bool))


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


def repeat_rows(cache: KVCache, repeats: int) -> KVCache:
  """Each row repeated `repeats` times in place (row b becomes rows b*G .. b*G + G - 1)."""
  return jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=0), cache)
