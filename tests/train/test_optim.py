"""Optimiser: schedule values, clipping, the weight-decay mask and config handling."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from rrvf_jax.train import optim


def test_constant_schedule_with_warmup():
  sched = optim.make_schedule(1e-3, schedule="constant", warmup_steps=4)
  got = [float(sched(s)) for s in (0, 1, 2, 4, 100)]
  np.testing.assert_allclose(got, [0.0, 2.5e-4, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_constant_schedule_without_warmup():
  sched = optim.make_schedule(2e-6)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 7)], [2e-6, 2e-6], rtol=1e-6)


def test_cosine_schedule():
  sched = optim.make_schedule(
    1.0, schedule="cosine", warmup_steps=10, total_steps=110, end_value=0.1
  )
  # Halfway through the decay the cosine is at the mean of peak and end.
  got = [float(sched(s)) for s in (0, 5, 10, 60, 110, 500)]
  np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"schedule": "linear"}, "schedule 'linear' is unknown"),
    ({"schedule": "cosine", "warmup_steps": 10, "total_steps": 10}, "total_steps"),
    ({"schedule": "cosine"}, "total_steps"),
    ({"warmup_steps": -1}, "warmup_steps"),
  ],
)
def test_schedule_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.make_schedule(1e-3, **kwargs)


class _Toy(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.ones((2, 3)), axes=("embed", "mlp"))
    self.b = nnx.Param(jnp.ones((3,)), axes=("mlp",))


def _update(tx, grads_value):
  _, params = nnx.split(_Toy(), nnx.Param)
  grads = jax.tree.map(lambda p: jnp.full_like(p, grads_value), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_weight_decay_skips_vectors_by_default():
  tx, _ = optim.make_optimizer(0.1, weight_decay=0.5)
  new = _update(tx, 0.0)
  np.testing.assert_allclose(new["w"][...], np.full((2, 3), 1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(new["b"][...], np.ones(3), rtol=0)
  tx, _ = optim.make_optimizer(0.1, weight_decay=0.5, decay_vectors=True)
  np.testing.assert_allclose(_update(tx, 0.0)["b"][...], np.full(3, 0.95), rtol=1e-6)


def test_global_norm_clipping():
  # Adam normalises the step, so clipping shows in the first moment: m = (1 - b1) * clipped grad.
  tx, _ = optim.make_optimizer(0.1, max_grad_norm=0.5)
  _, params = nnx.split(_Toy(), nnx.Param)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)  # global norm 2 * 3 = 6
  _, opt_state = tx.update(grads, tx.init(params), params)
  mu = opt_state[1][0].mu
  np.testing.assert_allclose(mu["w"][...], np.full((2, 3), 0.1 * 2.0 * 0.5 / 6.0), rtol=1e-5)


def test_optimizer_from_config():
  section = ml_collections.ConfigDict(
    {"learning_rate": 1e-3, "schedule": "cosine", "warmup_steps": 2, "total_steps": 12}
  )
  _, sched = optim.optimizer_from_config(section)
  np.testing.assert_allclose(float(sched(1)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(12)), 0.0, atol=1e-12)
  section.learning_rat = 1.0
  with pytest.raises(ValueError, match=r"unknown keys \['learning_rat'\]"):
    optim.optimizer_from_config(section)
