"""Token selection: greedy, temperature, top-k / top-p sets, stop-sequence matching, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrvf_jax.rollout import sampling

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def draw(probs, params: sampling.SamplingParams, n: int = 20000) -> np.ndarray:
  """Empirical token frequencies of n draws (fixed key: deterministic)."""
  logits = jnp.log(jnp.tile(jnp.asarray(probs, jnp.float32), (n, 1)))
  tokens, _ = sampling.sample(logits, jax.random.key(0), params)
  return np.bincount(np.asarray(tokens), minlength=len(probs)) / n


@pytest.mark.parametrize(
  ("top_k", "top_p", "kept"),
  [(0, 1.0, [0, 1, 2, 3]), (2, 1.0, [0, 1]), (0, 0.8, [0, 1]), (0, 0.81, [0, 1, 2]), (1, 0.9, [0])],
)
def test_top_k_top_p_draw_from_the_renormalised_set(top_k, top_p, kept):
  freq = draw(PROBS, sampling.SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p))
  want = np.zeros_like(PROBS)
  want[kept] = PROBS[kept] / PROBS[kept].sum()
  np.testing.assert_allclose(freq, want, atol=0.015)
  assert np.all(freq[[i for i in range(4) if i not in kept]] == 0)


def test_temperature_sharpens_and_logprobs_are_of_the_scaled_law():
  logits = jnp.log(jnp.asarray([PROBS], jnp.float32))
  params = sampling.SamplingParams(temperature=0.5)
  scaled = PROBS**2 / (PROBS**2).sum()
  np.testing.assert_allclose(draw(PROBS, params), scaled, atol=0.015)
  token, logprob = sampling.sample(logits, jax.random.key(3), params)
  np.testing.assert_allclose(logprob, np.log(scaled[int(token[0])]), rtol=1e-5)


def test_greedy_takes_argmax_with_raw_logprob():
  logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
  tokens, logprobs = sampling.sample(
    logits, jax.random.key(0), sampling.SamplingParams(temperature=0.0)
  )
  np.testing.assert_array_equal(tokens, [1, 0])
  expected = jax.nn.log_softmax(logits)[jnp.arange(2), tokens]
  np.testing.assert_allclose(logprobs, expected, rtol=1e-6)


def test_stop_sequences_match_suffixes_only():
  table = sampling.stop_sequence_table([[7, 8, 9], [5], []])
  np.testing.assert_array_equal(table, [[7, 8, 9], [-1, -1, 5]])
  history = jnp.asarray([[1, 7, 8, 9], [7, 8, 9, 1], [0, 0, 0, 5], [5, 0, 0, 0]])[:, 1:]
  np.testing.assert_array_equal(sampling.ends_with_any(history, table), [True, False, True, False])
  assert sampling.stop_sequence_table([[]]) is None


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
  ],
)
def test_invalid_params_name_the_field(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sampling.SamplingParams(**kwargs)


def test_row_keys_make_samples_independent_of_the_batch_split():
  logits = jax.random.normal(jax.random.key(1), (8, 50))
  params = sampling.SamplingParams(temperature=1.0, top_k=20)
  key = jax.random.key(7)
  whole, whole_lp = sampling.sample(logits, key, params, row_ids=jnp.arange(8))
  parts = [
    sampling.sample(logits[i : i + 4], key, params, row_ids=i + jnp.arange(4)) for i in (0, 4)
  ]
  np.testing.assert_array_equal(whole, np.concatenate([p[0] for p in parts]))
  np.testing.assert_allclose(whole_lp, np.concatenate([p[1] for p in parts]), rtol=1e-6)
  # Rows with equal logits but different ids still draw differently.
  same = jnp.tile(logits[:1], (64, 1))
  tokens, _ = sampling.sample(same, key, params, row_ids=jnp.arange(64))
  assert len(np.unique(np.asarray(tokens))) > 1
