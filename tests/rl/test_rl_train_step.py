"""The losses inside `make_train_step`: two micro-batches update the parameters like one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rrvf_jax.rl import algorithms
from rrvf_jax.train import batch as batch_lib
from rrvf_jax.train import state as state_lib
from rrvf_jax.train import step as step_lib

VOCAB, B, T = 11, 8, 10


class Bigram(nnx.Module):
  """A next-token table: logits of token t+1 given token t."""

  def __init__(self, rngs: nnx.Rngs):
    self.table = nnx.Param(0.5 * jax.random.normal(rngs.params(), (VOCAB, VOCAB)))

  def logprobs(self, inputs, targets):
    logp = jax.nn.log_softmax(self.table[...][inputs], axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _batch():
  """Token rows, a mask of varied lengths, stale sampler log-probs, group advantages."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, size=(B, T + 1)).astype(np.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  mask = np.zeros((B, T), np.float32)
  for b in range(B):
    mask[b, 1 : 2 + (b * 3) % (T - 1)] = 1
  logp = np.asarray(Bigram(nnx.Rngs(0)).logprobs(inputs, targets))
  old = (logp + rng.normal(0, 0.3, size=logp.shape)).astype(np.float32)
  ref = (logp + rng.normal(0, 0.3, size=logp.shape)).astype(np.float32)
  rewards = rng.normal(size=B).astype(np.float32)
  adv = np.asarray(algorithms.compute_advantages(algorithms.get_rl_config("grpo"), rewards, 4))
  return dict(inputs=inputs, targets=targets, mask=mask, old=old, ref=ref, adv=adv)


CONFIGS = {
  "grpo": dict(kl_coef=0.05),
  "dr_grpo": dict(max_length=T),
  "dapo": dict(max_length=T, overlong_buffer=4),
  "gspo": dict(clip_low=0.05, clip_high=0.05),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_micro_batches_equal_one_batch(name):
  policy_loss = algorithms.make_policy_loss(name, **CONFIGS[name])

  def loss_fn(model, batch):
    logp = model.logprobs(batch["inputs"], batch["targets"])
    return policy_loss(logp, batch["old"], batch["adv"], batch["mask"], ref_logprobs=batch["ref"])

  batch = _batch()
  halves = batch_lib.stack_micro_batches(
    [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
  )
  tx = optax.sgd(1.0)
  results = []
  for micro, data in ((1, batch), (2, halves)):
    graphdef, state = state_lib.train_state_from_model(Bigram(nnx.Rngs(0)), tx)
    step = step_lib.make_train_step(graphdef, loss_fn, tx, micro_batches=micro)
    new_state, metrics = step(state, data)
    results.append((np.asarray(new_state.params["table"][...]), jax.device_get(metrics)))
  (one, m_one), (two, m_two) = results
  start = np.asarray(Bigram(nnx.Rngs(0)).table[...])
  assert np.abs(one - start).max() > 1e-3  # the step moved the parameters
  np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-7)
  for key in m_one:
    np.testing.assert_allclose(m_two[key], m_one[key], rtol=1e-5, atol=1e-7, err_msg=key)
  # The reported loss is the whole batch's loss_sum / weight.
  logp = Bigram(nnx.Rngs(0)).logprobs(batch["inputs"], batch["targets"])
  s, w, _ = policy_loss(logp, batch["old"], batch["adv"], batch["mask"], ref_logprobs=batch["ref"])
  np.testing.assert_allclose(m_one["loss"], s / w, rtol=1e-5)
