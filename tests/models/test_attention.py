"""Causal attention in query blocks equals the full masked attention, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrvf_jax.models.qwen_vl import layers
from rrvf_jax.models.qwen_vl.layers import causal_mask


@pytest.mark.parametrize("length", [40, 333, 256])  # one block; six, a ragged last one; flash
def test_causal_blocks_equal_full_attention(length, monkeypatch):
  # From FLASH_MIN_LENGTH tokens on the flash tiles take over (lowered here to reach them).
  monkeypatch.setattr(layers, "FLASH_MIN_LENGTH", 256)
  monkeypatch.setattr(layers, "FLASH_BLOCK", 64)
  calls = []
  tiled = layers.flash.causal_flash_attention
  monkeypatch.setattr(
    layers.flash, "causal_flash_attention", lambda *a, **kw: calls.append(kw) or tiled(*a, **kw)
  )
  b, n, kv, h = 2, 4, 2, 8
  keys = jax.random.split(jax.random.key(length), 3)
  q = jax.random.normal(keys[0], (b, length, n, h))
  k = jax.random.normal(keys[1], (b, length, kv, h))
  v = jax.random.normal(keys[2], (b, length, kv, h))
  # Row 1 is right-padded: its padding queries see no key at all and must stay finite.
  lengths = np.array([length, length // 2 + 3])
  valid = jnp.asarray(np.arange(length)[None] < lengths[:, None], jnp.int32)
  mask = causal_mask(valid)

  def full(q, k, v):
    return layers.attention(q, k, v, mask, scale=0.3)

  def blocked(q, k, v):
    return layers.causal_attention(q, k, v, valid, scale=0.3)

  out = jax.jit(blocked)(q, k, v)
  assert [c["block"] for c in calls] == ([64] if length == 256 else [])
  np.testing.assert_allclose(out, jax.jit(full)(q, k, v), atol=2e-6, rtol=0)
  assert np.isfinite(np.asarray(out)).all()
  weights = jax.random.normal(jax.random.key(7), (b, length, n, h))

  def grads(fn):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * weights), argnums=(0, 1, 2)))(q, k, v)

  for got, want in zip(grads(blocked), grads(full), strict=True):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
