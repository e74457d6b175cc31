"""Memory-efficient attention in pure JAX: an online softmax over key blocks, recomputed backward.

The dense path (`layers.attention`) keeps `[B, N, T, S]` float32 scores; at the paper preset's
32,768-token trajectories that is 7 GiB per row and layer for one block of queries, and the
backward keeps every block's probabilities (compile_check). Here a query block walks the key
blocks with a running max and sum (the FlashAttention recurrence), so the largest buffer is one
`[B, K, G, block_q, block_k]` tile; the forward saves only the output and the log-sum-exp, and the
custom backward recomputes each tile twice (once for dq, once for dk and dv). Causal calls skip the
tiles above the diagonal: query block i is paired with block n-1-i, and the pair visits n+1 tiles
whatever i is, so every loop has a static trip count (the compile check scales the compiler's
FLOPs and estimate by it) and the work is balanced. It runs on every backend (XLA loops; no
Pallas), so CPU tests check the same code a TPU compiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_MASKED = float(jnp.finfo(jnp.float32).min)


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array,
  *,
  scale: float,
  block_q: int = 512,
  block_k: int = 512,
) -> jax.Array:
  """`layers.attention(q, k, v, mask)` for every query that sees at least one key.

  Args:
    q: `[B, T, N, H]` queries; N a multiple of the K key/value heads (query head n uses kv head
      n // (N/K)).
    k: `[B, S, K, H]` keys; v likewise.
    mask: boolean `[B, T, S]`; True where a query may attend.
    scale: multiplier of the scores.
    block_q, block_k: tile sizes; they must divide T and S.

  A query that sees no key gets the mean of the values of the tiles it visited (finite, as in the
  dense path, but not the same mean); its gradient is not meaningful (padding queries have none).
  """
  b, t, n, h = q.shape
  _check(q, k, block_q, block_k)
  mask = jnp.broadcast_to(mask, (b, t, k.shape[1]))
  grouped = q.reshape(b, t, k.shape[2], n // k.shape[2], h)
  return _flash(grouped, k, v, mask, scale, block_q, block_k, False).reshape(b, t, n, h)


def causal_flash_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, *, scale: float, block: int = 512
) -> jax.Array:
  """Causal attention: query t sees key s when s <= t and `key_valid[b, s]`; upper tiles skipped.

  The same result as `flash_attention` with `layers.causal_mask(key_valid)`, but each tile's mask
  is made inside the loop from the block offsets and `key_valid [B, S]`: the dense `[B, T, S]`
  mask is never built (1 GiB per row of 32,768 tokens).

  Args:
    q, k, v: as `flash_attention`, with as many queries as keys.
    key_valid: `[B, S]`, nonzero where the key is a real token (the batch's `attention_mask`).
    scale: multiplier of the scores.
    block: tile size; it must divide the length into an even number of blocks.
  """
  b, t, n, h = q.shape
  _check(q, k, block, block)
  if t != k.shape[1] or (t // block) % 2:
    raise ValueError(
      f"flash_attention: causal needs as many queries as keys ({t}, {k.shape[1]}) in an even "
      f"number of blocks of {block}"
    )
  key_valid = jnp.broadcast_to(key_valid, (b, t)) != 0
  grouped = q.reshape(b, t, k.shape[2], n // k.shape[2], h)
  return _flash(grouped, k, v, key_valid, scale, block, block, True).reshape(b, t, n, h)


def _check(q: jax.Array, k: jax.Array, block_q: int, block_k: int) -> None:
  t, n, s, kv_heads = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
  if t % block_q or s % block_k or n % kv_heads:
    raise ValueError(
      f"flash_attention: blocks ({block_q}, {block_k}) must divide the lengths ({t}, {s}) and "
      f"{kv_heads} kv heads the {n} query heads"
    )


def _tile_mask(mask, i, j, block_q: int, block_k: int, causal: bool):
  """Boolean `[B, bq, bk]` of tile (i, j): `mask`'s slice, or (causal) made from key validity."""
  if not causal:
    return _slice(_slice(mask, i * block_q, block_q, 1), j * block_k, block_k, 2)
  query = i * block_q + jnp.arange(block_q)[:, None]
  key = j * block_k + jnp.arange(block_k)[None, :]
  return (key <= query)[None] & _slice(mask, j * block_k, block_k, 1)[:, None, :]


def _schedule(num_q: int, num_k: int, causal: bool, by_query: bool):
  """(outer trips, inner trips, slots, visit): which tiles each loop iteration computes.

  An outer iteration `p` owns `slots` blocks (query blocks when `by_query`, else key blocks) and
  its inner iteration `t` visits tile `visit(p, t) = (slot, owner, partner)`. Non-causal: one
  owner per iteration, every partner. Causal (num_q == num_k = n, even): owners p and n-1-p; query
  block i sees key blocks [0, i], key block j is seen by query blocks [j, n), so the pair visits
  n + 1 tiles in all.
  """
  if not causal:
    inner = num_k if by_query else num_q
    outer = num_q if by_query else num_k
    return outer, inner, 1, lambda p, t: (0, p, t)
  n = num_q

  def visit(p, t):
    first = p + 1 if by_query else n - p  # tiles of the first owner
    slot = (t >= first).astype(jnp.int32)
    owner = jnp.where(slot == 0, p, n - 1 - p)
    if by_query:  # key blocks 0..owner
      partner = jnp.where(slot == 0, t, t - first)
    else:  # query blocks owner..n-1
      partner = jnp.where(slot == 0, p + t, n - 1 - p + t - first)
    return slot, owner, partner

  return n // 2, n + 1, 2, visit


def _unpair(x, slots: int, num: int):
  """`[outer, slots, ...]` results per owner back to block order `[num, ...]`."""
  if slots == 1:
    return x[:, 0]
  owners = np.asarray([(p, num - 1 - p) for p in range(num // 2)]).reshape(-1)
  return x.reshape(num, *x.shape[2:])[np.argsort(owners)]


def _loop(trips: int, step, init):
  """`fori_loop(0, trips, step, init)` as a `while_loop`, opaque to JAX's partial evaluation.

  A fixed-trip `fori_loop` is a `scan`; under a checkpointed layer scan (`remat.call_layers`) JAX
  split it into a forward scan that stacked every tile's key/value slices and masks for the
  backward: `[32, 65, ...]` buffers, 9 GiB per row of 32,768 tokens at 3B (compile_check). A while
  loop is recomputed whole instead. XLA still sees the constant trip count.
  """

  def body(carry):
    t, value = carry
    return t + 1, step(t, value)

  return jax.lax.while_loop(lambda carry: carry[0] < trips, body, (jnp.int32(0), init))[1]


def _tile(q_blk, k_blk, mask_blk, scale):
  """Masked float32 scores `[B, K, G, bq, bk]` of one tile."""
  scores = jnp.einsum("bqkgh,bskh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
  return jnp.where(mask_blk[:, None, None], scores * scale, _MASKED)


def _slice(x, start, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _at(x, slot):
  return jax.lax.dynamic_index_in_dim(x, slot, 0, keepdims=False)


def _set(x, slot, value):
  return jax.lax.dynamic_update_index_in_dim(x, value, slot, 0)


def _forward(q, k, v, mask, scale, block_q, block_k, causal):
  """(out `[B, T, K, G, H]`, log-sum-exp `[B, K, G, T]` float32)."""
  b, t, kv, g, h = q.shape
  num_q, num_k = t // block_q, k.shape[1] // block_k
  outer, inner, slots, visit = _schedule(num_q, num_k, causal, by_query=True)

  def owner_blocks(p):
    def step(t, carry):
      m, total, acc = carry
      slot, i, j = visit(p, t)
      q_blk = _slice(q, i * block_q, block_q, 1)
      mask_blk = _tile_mask(mask, i, j, block_q, block_k, causal)
      scores = _tile(q_blk, _slice(k, j * block_k, block_k, 1), mask_blk, scale)
      m_old, total_old, acc_old = _at(m, slot), _at(total, slot), _at(acc, slot)
      m_new = jnp.maximum(m_old, scores.max(-1))
      p_tile = jnp.exp(scores - m_new[..., None])
      correction = jnp.exp(m_old - m_new)
      pv = jnp.einsum(
        "bkgqs,bskh->bkgqh",
        p_tile.astype(v.dtype),
        _slice(v, j * block_k, block_k, 1),
        preferred_element_type=jnp.float32,
      )
      return (
        _set(m, slot, m_new),
        _set(total, slot, total_old * correction + p_tile.sum(-1)),
        _set(acc, slot, acc_old * correction[..., None] + pv),
      )

    init = (
      jnp.full((slots, b, kv, g, block_q), -jnp.inf, jnp.float32),
      jnp.zeros((slots, b, kv, g, block_q), jnp.float32),
      jnp.zeros((slots, b, kv, g, block_q, h), jnp.float32),
    )
    m, total, acc = _loop(inner, step, init)
    return (acc / total[..., None]).astype(q.dtype), m + jnp.log(total)

  out, lse = jax.lax.map(owner_blocks, jnp.arange(outer))
  out, lse = _unpair(out, slots, num_q), _unpair(lse, slots, num_q)
  # [nq, B, K, G, bq, H] -> [B, T, K, G, H]; [nq, B, K, G, bq] -> [B, K, G, T]
  out = jnp.moveaxis(out, 0, 3).reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv, g, t)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, mask, scale, block_q, block_k, causal):
  return _forward(q, k, v, mask, scale, block_q, block_k, causal)[0]


def _flash_fwd(q, k, v, mask, scale, block_q, block_k, causal):
  out, lse = _forward(q, k, v, mask, scale, block_q, block_k, causal)
  return out, (q, k, v, mask, out, lse)


def _probs(q_blk, k_blk, mask_blk, lse_blk, scale):
  """The forward's softmax probabilities of one tile, from its saved log-sum-exp."""
  scores = _tile(q_blk, k_blk, mask_blk, scale)
  return jnp.where(mask_blk[:, None, None], jnp.exp(scores - lse_blk[..., None]), 0.0)


def _flash_bwd(scale, block_q, block_k, causal, residuals, d_out):
  q, k, v, mask, out, lse = residuals
  b, t, kv, g, h = q.shape
  s = k.shape[1]
  num_q, num_k = t // block_q, s // block_k
  # D_i = sum_h dO_ih O_ih: the softmax backward's row term, [B, K, G, T].
  delta = jnp.einsum("btkgh,btkgh->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def tile_grads(i, j):
    """(q, dO, k, p, dS) of tile (i, j), float32 probabilities and score gradients."""
    q_blk = _slice(q, i * block_q, block_q, 1)
    do_blk = _slice(d_out, i * block_q, block_q, 1)
    k_blk = _slice(k, j * block_k, block_k, 1)
    v_blk = _slice(v, j * block_k, block_k, 1)
    mask_blk = _tile_mask(mask, i, j, block_q, block_k, causal)
    p = _probs(q_blk, k_blk, mask_blk, _slice(lse, i * block_q, block_q, 3), scale)
    dp = jnp.einsum("bqkgh,bskh->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
    ds = p * (dp - _slice(delta, i * block_q, block_q, 3)[..., None])
    return q_blk, do_blk, k_blk, p, ds

  outer, inner, slots, visit = _schedule(num_q, num_k, causal, by_query=True)

  def dq_blocks(p):
    def step(t, dq):
      slot, i, j = visit(p, t)
      _, _, k_blk, _, ds = tile_grads(i, j)
      grad = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_blk, preferred_element_type=jnp.float32)
      return _set(dq, slot, _at(dq, slot) + grad)

    dq = _loop(inner, step, jnp.zeros((slots, b, block_q, kv, g, h), jnp.float32))
    return (dq * scale).astype(q.dtype)

  outer_k, inner_k, slots_k, visit_k = _schedule(num_q, num_k, causal, by_query=False)

  def dkv_blocks(p):
    def step(t, carry):
      dk, dv = carry
      slot, j, i = visit_k(p, t)
      q_blk, do_blk, _, probs, ds = tile_grads(i, j)
      dv_tile = jnp.einsum(
        "bkgqs,bqkgh->bskh", probs.astype(do_blk.dtype), do_blk, preferred_element_type=jnp.float32
      )
      dk_tile = jnp.einsum("bkgqs,bqkgh->bskh", ds, q_blk, preferred_element_type=jnp.float32)
      return _set(dk, slot, _at(dk, slot) + dk_tile), _set(dv, slot, _at(dv, slot) + dv_tile)

    zeros = jnp.zeros((slots_k, b, block_k, kv, h), jnp.float32)
    dk, dv = _loop(inner_k, step, (zeros, zeros))
    return (dk * scale).astype(k.dtype), dv.astype(v.dtype)

  dq = _unpair(jax.lax.map(dq_blocks, jnp.arange(outer)), slots, num_q)
  dq = jnp.moveaxis(dq, 0, 1).reshape(b, t, kv, g, h)
  dk, dv = jax.lax.map(dkv_blocks, jnp.arange(outer_k))
  dk, dv = _unpair(dk, slots_k, num_k), _unpair(dv, slots_k, num_k)
  dk = jnp.moveaxis(dk, 0, 1).reshape(b, s, kv, h)
  dv = jnp.moveaxis(dv, 0, 1).reshape(b, s, kv, h)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
