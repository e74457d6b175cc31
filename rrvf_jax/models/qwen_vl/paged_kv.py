"""Paged key/value cache: a pool of fixed-size pages per layer, read through per-row page tables.

Layout (per layer): keys and values `[K, P, page_size, H]`, kv heads first, the layout of JAX's TPU
paged-attention kernel (`jax.experimental.pallas.ops.tpu.paged_attention`), so the heads shard
over `tensor` and a row's pages are wherever the host allocator put them. Page 0 is the null page:
writes of padding tokens land there and no row ever reads it.

A `PageView` says, for each row of a call, which pages are its own (`page_table`, in order), where
its new tokens start (`starts`: tokens already in its pages) and how many of the call's T tokens
are real (`q_lens`). Token t of row b goes to position `starts[b] + t`, and attends to the row's
positions `<=` its own. Rows never see each other's pages, so rows of any lengths share one call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rrvf_jax.models.qwen_vl.config import TextConfig

# Logical axes of a layer's key and value pages, for `rrvf_jax.sharding`.
PAGE_AXES = ("act_heads", None, None, None)
NULL_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageView:
  """Which pages each row of a call owns, and where its new tokens go.

  Attributes:
    page_table: `[B, Pmax]` int32 page ids of each row, in order (unused entries: `NULL_PAGE`).
    starts: `[B]` int32 tokens already in the row's pages (its first new token's position).
    q_lens: `[B]` int32 real new tokens of the row (the rest of the call's T are padding).
  """

  page_table: jax.Array
  starts: jax.Array
  q_lens: jax.Array

  @property
  def kv_lens(self) -> jax.Array:
    """`[B]` tokens in each row's pages once the call's tokens are written."""
    return self.starts + self.q_lens


def init(cfg: TextConfig, num_pages: int, page_size: int, dtype) -> tuple[tuple, tuple]:
  """Empty key and value pools of `num_pages` pages (page 0 included) per layer."""
  shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
  k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return k, v


def _slots(view: PageView, num_tokens: int, page_size: int) -> tuple[jax.Array, jax.Array]:
  """Page id and in-page offset `[B, T]` of each new token (padding tokens: the null page)."""
  t = jnp.arange(num_tokens, dtype=jnp.int32)[None, :]
  position = view.starts[:, None] + t
  column = jnp.clip(position // page_size, 0, view.page_table.shape[1] - 1)
  page = jnp.take_along_axis(view.page_table, column, axis=1)
  real = t < view.q_lens[:, None]
  return jnp.where(real, page, NULL_PAGE), position % page_size


def write(k_pages, v_pages, k_btkh: jax.Array, v_btkh: jax.Array, view: PageView):
  """Writes T new keys/values `[B, T, K, H]` of each row to its positions `starts + [0, T)`."""
  page, offset = _slots(view, k_btkh.shape[1], k_pages.shape[2])
  k_new = jnp.transpose(k_btkh, (2, 0, 1, 3)).astype(k_pages.dtype)
  v_new = jnp.transpose(v_btkh, (2, 0, 1, 3)).astype(v_pages.dtype)
  return k_pages.at[:, page, offset].set(k_new), v_pages.at[:, page, offset].set(v_new)


# Queries of an append attended at once (as `kv_cache.QUERY_BLOCK`: bounds the f32 scores).
QUERY_BLOCK = 256


def attention(
  q_btnh: jax.Array, k_pages, v_pages, view: PageView, *, scale: float, block: int | None = None
) -> jax.Array:
  """GQA attention of each row's `[T, N, H]` queries over its own pages; f32 scores and softmax.

  The pure-JAX ragged paged attention: every row gathers the pages of its table (the table is as
  wide as the call's longest row, bucketed by the host), so no row reads another's pages and no
  row reads more than the call's widest row. Query head n reads kv head n // (N/K) (HF's
  repeat-interleave). Padding queries come out finite.
  """
  b, t, n, h = q_btnh.shape
  block = block or QUERY_BLOCK
  kv_heads = k_pages.shape[0]
  # [K, B, Pmax, page, H] -> [K, B, S, H]: each row's keys and values in position order.
  k = k_pages[:, view.page_table].reshape(kv_heads, b, -1, h)
  v = v_pages[:, view.page_table].reshape(kv_heads, b, -1, h)
  key_position = jnp.arange(k.shape[2], dtype=jnp.int32)
  query_position = view.starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  mask = (key_position[None, None, :] <= query_position[:, :, None]) & (
    key_position[None, None, :] < view.kv_lens[:, None, None]
  )
  if t <= block or t % block:
    return _attend(q_btnh, k, v, mask, scale=scale)
  blocks = t // block
  q = q_btnh.reshape(b, blocks, block, n, h).swapaxes(0, 1)
  mask = mask.reshape(b, blocks, block, mask.shape[-1]).swapaxes(0, 1)
  out = jax.lax.map(lambda qm: _attend(qm[0], k, v, qm[1], scale=scale), (q, mask))
  return out.swapaxes(0, 1).reshape(b, t, n, h)


def _attend(q_btnh, k_kbsh, v_kbsh, mask_bts, *, scale: float) -> jax.Array:
  """Attention of all the queries at once over gathered `[K, B, S, H]` keys and values."""
  b, t, n, h = q_btnh.shape
  kv_heads = k_kbsh.shape[0]
  q = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("btkgh,kbsh->bkgts", q, k_kbsh.astype(q.dtype))
  scores = scores.astype(jnp.float32) * scale
  scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_kbsh.dtype)
  out = jnp.einsum("bkgts,kbsh->btkgh", probs, v_kbsh)
  return out.reshape(b, t, n, h).astype(q_btnh.dtype)


def copy_pages(k_pages, v_pages, source: jax.Array, target: jax.Array):
  """Copies pages `source[i]` to `target[i]` (a forked row's own copy of a partly filled page)."""
  return k_pages.at[:, target].set(k_pages[:, source]), v_pages.at[:, target].set(
    v_pages[:, source]
  )
