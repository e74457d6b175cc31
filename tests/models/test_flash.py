"""Memory-efficient attention (flash.py) against the dense path: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrvf_jax.models.qwen_vl import flash, layers
from rrvf_jax.models.qwen_vl.model import causal_mask


def _inputs(seed, b=2, t=64, s=64, n=4, kv=2, h=8, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), dtype)
  k = jax.random.normal(keys[1], (b, s, kv, h), dtype)
  v = jax.random.normal(keys[2], (b, s, kv, h), dtype)
  d_out = jax.random.normal(keys[3], (b, t, n, h), dtype)
  return q, k, v, d_out


def _loss(attend, d_out, weights):
  # A weighted sum of the outputs of the queries that see a key: its gradient is dO there.
  return lambda q, k, v: jnp.sum(attend(q, k, v) * d_out * weights)


@pytest.mark.parametrize(
  "causal, blocks",
  [(True, (16, 16)), (True, (8, 8)), (True, (32, 32)), (False, (16, 16)), (False, (32, 8)),
   (False, (8, 32))],
)  # fmt: skip
def test_flash_equals_dense_attention_and_its_gradients(causal, blocks):
  q, k, v, d_out = _inputs(0)
  real = jnp.asarray([[1] * 64, [1] * 50 + [0] * 14])  # row 1 right-padded
  if causal:
    mask = causal_mask(real)
  else:  # a general mask: padding keys hidden and a random pattern, every query sees a key
    pattern = jax.random.bernoulli(jax.random.key(1), 0.6, (2, 64, 64)).at[:, :, 0].set(True)
    mask = pattern & (real[:, None, :] != 0)
  weights = real[:, :, None, None].astype(jnp.float32)
  scale = 0.35
  dense = lambda q, k, v: layers.attention(q, k, v, mask, scale=scale)
  tiled = lambda q, k, v: flash.flash_attention(
    q, k, v, mask, scale=scale, block_q=blocks[0], block_k=blocks[1], causal=causal
  )
  np.testing.assert_allclose(tiled(q, k, v) * weights, dense(q, k, v) * weights, atol=2e-6)
  want = jax.grad(_loss(dense, d_out, weights), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(_loss(tiled, d_out, weights), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")


def test_flash_matches_a_float64_reference_in_bfloat16():
  # bf16 inputs: the tiles' float32 softmax keeps the error at the dense path's own.
  q, k, v, _ = _inputs(2, b=1, t=128, s=128, dtype=jnp.bfloat16)
  mask = causal_mask(jnp.ones((1, 128), jnp.int32))
  got = flash.flash_attention(q, k, v, mask, scale=0.3, block_q=32, block_k=32, causal=True)
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  k64, v64 = np.repeat(k64, 2, axis=2), np.repeat(v64, 2, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q64, k64) * 0.3
  scores = np.where(np.asarray(mask)[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum("bnts,bsnh->btnh", probs, v64)
  dense = layers.attention(q, k, v, mask, scale=0.3)
  dense_err = np.abs(np.asarray(dense, np.float64) - want).max()
  assert np.abs(np.asarray(got, np.float64) - want).max() <= max(dense_err, 1e-2)


def test_causal_flash_skips_the_tiles_above_the_diagonal():
  # With every key visible, causal=True still stops each query block at its diagonal tile: query
  # block i sees keys [0, 16 (i + 1)) and nothing after (those tiles are never computed).
  q, k, v, _ = _inputs(3, b=1, t=128, s=128)
  everything = jnp.ones((1, 128, 128), bool)
  got = flash.flash_attention(q, k, v, everything, scale=1.0, block_q=16, block_k=16, causal=True)
  block_end = (jnp.arange(128) // 16 + 1) * 16
  visited = jnp.arange(128)[None, :] < block_end[:, None]
  want = layers.attention(q, k, v, visited[None], scale=1.0)
  np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("by_query", [True, False])
def test_causal_schedule_visits_each_lower_tile_once_in_static_loops(by_query):
  # 8 blocks: 4 pairs of owners, 9 tiles each = the 36 tiles on and below the diagonal.
  outer, inner, slots, visit = flash._schedule(8, 8, True, by_query)
  assert (outer, inner, slots) == (4, 9, 2)
  tiles = []
  for p in range(outer):
    for t in range(inner):
      slot, owner, partner = (int(x) for x in visit(jnp.int32(p), jnp.int32(t)))
      assert owner == (p if slot == 0 else 7 - p)
      tiles.append((owner, partner) if by_query else (partner, owner))  # (query, key) block
  assert sorted(tiles) == [(i, j) for i in range(8) for j in range(i + 1)]


def test_bad_blocks_are_an_error():
  q, k, v, _ = _inputs(4, t=64, s=64)
  with pytest.raises(ValueError, match="must divide"):
    flash.flash_attention(q, k, v, True, scale=1.0, block_q=48, block_k=16)
  # Fewer keys than queries, unequal blocks, an odd number of blocks.
  for tq, tk, blocks in [(64, 32, (16, 16)), (64, 64, (32, 16)), (48, 48, (16, 16))]:
    with pytest.raises(ValueError, match="causal needs"):
      flash.flash_attention(
        q[:, :tq],
        k[:, :tk],
        v[:, :tk],
        True,
        scale=1.0,
        block_q=blocks[0],
        block_k=blocks[1],
        causal=True,
      )
