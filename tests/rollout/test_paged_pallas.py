"""The paged sampler with JAX's TPU paged-attention kernel (interpreted on CPU) for its decode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rrvf_jax import models
from rrvf_jax.components import config_for_tokenizer
from rrvf_jax.rollout import PagedSampler, SamplingParams
from rrvf_jax.testing.prompts import image_prompt, random_image


@pytest.fixture(scope="module")
def model128(tok):
  """The tiny policy with heads of 128 dims (the kernel's lane width; Qwen2.5-VL-7B's too)."""
  cfg = config_for_tokenizer("tiny", tok)
  text = dataclasses.replace(cfg.text, explicit_head_dim=128, mrope_section=(16, 24, 24))
  return models.build_model(cfg.replace(text=text), dtype=jnp.float32, rngs=nnx.Rngs(4))


def sample(model, tok, impl, prompts, params, key):
  sampler = PagedSampler(
    model, tok, row_tokens=256, page_size=16, decode_slots=2, decode_steps=5,
    cache_dtype=jnp.bfloat16, attention_impl=impl,
  )  # fmt: skip
  return sampler.sample(prompts, params, key, group_size=2), sampler


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kernel_decode_gives_the_xla_tokens(model128, tok, temperature):
  """Forked rows stream through 2 slots in calls of 5 steps; every decode step runs the kernel."""
  prompts = [image_prompt(tok, t, random_image(i)) for i, t in enumerate(["draw", "a bar chart"])]
  params = SamplingParams(max_new_tokens=12, temperature=temperature)
  key = jax.random.key(0)
  want, _ = sample(model128, tok, "xla", prompts, params, key)
  got, sampler = sample(model128, tok, "pallas_interpret", prompts, params, key)
  assert sampler.stats.decode_calls >= 6  # 4 rows through 2 slots, 5 steps a call
  assert len({tuple(c.token_ids) for c in want}) >= 2
  for a, b in zip(want, got, strict=True):
    assert len(a.token_ids) == params.max_new_tokens
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    # With a bfloat16 cache the 'xla' path rounds the softmax weights and its output to bfloat16
    # (2^-8 relative); the kernel keeps both float32. So log-probs agree to that rounding (7e-4
    # measured here), not to float32's.
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-3, rtol=0)


def test_the_kernel_needs_heads_of_128_and_a_bfloat16_cache(model, model128, tok):
  with pytest.raises(ValueError, match="multiple of 128, got 16"):
    PagedSampler(model, tok, row_tokens=64, cache_dtype=jnp.bfloat16, attention_impl="pallas")
  with pytest.raises(ValueError, match="the pages are float32; use a bfloat16 cache"):
    PagedSampler(model128, tok, row_tokens=64, attention_impl="pallas")
  with pytest.raises(ValueError, match="unknown paged attention implementation 'cuda'"):
    PagedSampler(model128, tok, row_tokens=64, attention_impl="cuda")
