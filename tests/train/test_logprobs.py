"""Chunked log-probs: equal to a float64 log-softmax, and no `[B, L, V]` array anywhere."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rrvf_jax.models.qwen_vl import QwenVL, get_preset
from rrvf_jax.train.logprobs import token_logprobs

B, L = 2, 40  # with V = 512: B * L * V = 40960 > every weight (the LM head is 64 x 512 = 32768)


@pytest.fixture(scope="module")
def setup():
  model = QwenVL(get_preset("tiny"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  # Large hidden values give peaked distributions, where a float32 log-softmax loses precision.
  hidden = rng.normal(0, 8.0, (B, L, 64)).astype(np.float32)
  targets = rng.integers(0, 512, (B, L)).astype(np.int32)
  return model, hidden, targets


def _reference(model, hidden, targets):
  """float64 NumPy log-softmax over the full logits, and entropies."""
  w = np.asarray(model.lm_head[...], np.float64)
  logits = hidden.astype(np.float64) @ w
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  entropy = -(np.exp(logp) * logp).sum(-1)
  return np.take_along_axis(logp, targets[..., None], -1)[..., 0], entropy


@pytest.mark.parametrize("chunk_size", [8, 16, 64])  # divides L, does not (padding), exceeds L
def test_equals_float64_reference(setup, chunk_size):
  model, hidden, targets = setup
  fn = nnx.jit(lambda m, h, t: token_logprobs(m, h, t, chunk_size=chunk_size, with_entropy=True))
  logp, entropy = fn(model, hidden, targets)
  ref_logp, ref_entropy = _reference(model, hidden, targets)
  assert logp.shape == (B, L) and logp.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logp), ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(entropy), ref_entropy, rtol=1e-5, atol=1e-5)


def _largest_array(fn, *args) -> int:
  """Most elements of any array in the optimised HLO of `fn(*args)`."""
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  sizes = [
    int(np.prod([int(d) for d in dims.split(",") if d]))
    for dims in re.findall(r"(?:f32|f64|bf16|f16)\[([0-9,]*)\]", hlo)
  ]
  return max(sizes)


def _loss_and_grads(logprob_fn):
  """value_and_grad of the summed log-probs w.r.t. the parameters and the hidden states."""

  def f(params, graphdef, hidden, targets):
    return logprob_fn(nnx.merge(graphdef, params), hidden, targets).sum()

  return lambda params, graphdef, hidden, targets: jax.value_and_grad(f, argnums=(0, 2))(
    params, graphdef, hidden, targets
  )


def test_no_full_logits_in_forward_or_backward(setup):
  model, hidden, targets = setup
  graphdef, params = nnx.split(model)
  full = B * L * 512
  chunked = _loss_and_grads(lambda m, h, t: token_logprobs(m, h, t, chunk_size=8))
  fn = lambda p, h, t: chunked(p, graphdef, h, t)
  assert _largest_array(fn, params, hidden, targets) < full

  # Control: the naive full-logits version does hold a [B, L, V]-sized array, so the check bites.
  def naive(m, h, t):
    logp = jax.nn.log_softmax(m.logits(h).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, t[..., None], -1)[..., 0]

  naive_fn = lambda p, h, t: _loss_and_grads(naive)(p, graphdef, h, t)
  assert _largest_array(naive_fn, params, hidden, targets) >= full


def test_rejects_mismatched_targets(setup):
  model, hidden, targets = setup
  with pytest.raises(ValueError, match="targets shape"):
    token_logprobs(model, hidden, targets[:, :-1], chunk_size=8)
