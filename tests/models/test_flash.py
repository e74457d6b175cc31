"""Memory-efficient attention (flash.py) against the dense path: outputs and gradients."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from rrvf_jax.models.qwen_vl import flash, layers
from rrvf_jax.models.qwen_vl.layers import causal_mask


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
  if causal:  # the tile masks come from the keys' validity alone
    tiled = lambda q, k, v: flash.causal_flash_attention(
      q, k, v, real, scale=scale, block=blocks[0]
    )
  else:
    tiled = lambda q, k, v: flash.flash_attention(
      q, k, v, mask, scale=scale, block_q=blocks[0], block_k=blocks[1]
    )
  np.testing.assert_allclose(tiled(q, k, v) * weights, dense(q, k, v) * weights, atol=2e-6)
  want = jax.grad(_loss(dense, d_out, weights), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(_loss(tiled, d_out, weights), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")


def test_flash_matches_a_float64_reference_in_bfloat16():
  # bf16 inputs: the tiles' float32 softmax keeps the error at the dense path's own.
  q, k, v, _ = _inputs(2, b=1, t=128, s=128, dtype=jnp.bfloat16)
  real = jnp.ones((1, 128), jnp.int32)
  mask = causal_mask(real)
  got = flash.causal_flash_attention(q, k, v, real, scale=0.3, block=32)
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


def test_causal_flash_skips_the_tiles_above_the_diagonal(monkeypatch):
  # With the causal cut taken out of the tile masks (every key visible), each query block still
  # stops at its diagonal tile: query block i sees keys [0, 16 (i + 1)) and nothing after (those
  # tiles are never computed).
  q, k, v, _ = _inputs(3, b=1, t=128, s=128)
  real = jnp.ones((1, 128), jnp.int32)
  keys_only = lambda valid, i, j, bq, bk, causal: jnp.broadcast_to(
    jax.lax.dynamic_slice_in_dim(valid, j * bk, bk, 1)[:, None, :], (valid.shape[0], bq, bk)
  )
  monkeypatch.setattr(flash, "_tile_mask", keys_only)
  got = flash.causal_flash_attention(q, k, v, real, scale=1.0, block=16)
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
  with pytest.raises(ValueError, match="must divide"):
    flash.causal_flash_attention(q, k, v, True, scale=1.0, block=48)
  # Fewer keys than queries; an odd number of blocks.
  for tq, tk, block in [(64, 32, 16), (48, 48, 16)]:
    with pytest.raises(ValueError, match="causal needs"):
      flash.causal_flash_attention(q[:, :tq], k[:, :tk], v[:, :tk], True, scale=1.0, block=block)


def _largest_value(jaxpr) -> int:
  """Elements of the largest value anywhere in `jaxpr`, its loops and calls included."""
  sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars]
  for eqn in jaxpr.eqns:
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      sizes.append(_largest_value(sub))
  return max(sizes, default=0)


def test_a_checkpointed_layer_scan_stacks_nothing_per_tile():
  # Regression: with fixed-trip fori_loops (scans), JAX split the tile loops under a remat layer
  # scan and stacked every tile's key slices and masks for the backward, [pairs, tiles, ...]
  # (compile_check: 8.1 GiB of masks per row of 32,768 tokens at 3B on v6e). No value of the
  # gradient may be much larger than the layers' stacked inputs.
  q, k, v, _ = _inputs(5, b=1, t=512, s=512, n=4, kv=2, h=8)
  real = jnp.ones((1, 512), jnp.int32)

  def loss(q, k, v):
    @jax.checkpoint
    def layer(x, w):
      return x + w * flash.causal_flash_attention(x, k, v, real, scale=0.3, block=32), None

    out, _ = jax.lax.scan(layer, q, jnp.ones(2))
    return jnp.sum(out)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
  # 16 blocks: the stacked tile masks are 8 pairs x 17 tiles x 2 x 2 x 32 x 32 values, 34 q's
  # with fori_loops (measured); with the while loops the largest value is 2 q's.
  assert _largest_value(jaxpr) <= 8 * q.size
