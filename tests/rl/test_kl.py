"""KL estimators: values against float64, sign, clamping, and that E_pi[k] is KL(pi || ref)."""

import jax.numpy as jnp
import numpy as np
import pytest

from rrvf_jax.rl import kl


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


@pytest.fixture
def logps():
  rng = np.random.default_rng(1)
  # Spread small enough that k3 stays below its clamp (tested separately).
  return rng.normal(-2, 0.6, size=(4, 9)), rng.normal(-2, 0.6, size=(4, 9))


def test_values_match_float64(logps):
  logp, ref = logps
  got = {
    name: np.asarray(fn(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32)))
    for name, fn in kl.KL_ESTIMATORS.items()
  }
  np.testing.assert_allclose(got["k1"], logp - ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["k2"], 0.5 * (logp - ref) ** 2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["k3"], np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-5, atol=1e-6)


def test_k3_is_nonnegative_even_for_tiny_differences():
  rng = np.random.default_rng(2)
  logp = rng.normal(-3, 1, size=20000).astype(np.float32)
  ref = (logp + rng.normal(0, 1e-3, size=logp.shape)).astype(np.float32)
  k3 = np.asarray(kl.kl_k3(jnp.asarray(logp), jnp.asarray(ref)))
  assert k3.min() >= 0.0
  d = ref.astype(np.float64) - logp.astype(np.float64)
  np.testing.assert_allclose(k3, np.expm1(d) - d, rtol=1e-3, atol=1e-9)


def test_k3_is_clamped():
  # ref much likelier than pi: exp(30) would dominate; verl clamps the value at 10.
  assert float(kl.kl_k3(jnp.float32(-40.0), jnp.float32(-10.0))) == kl.K3_MAX


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_expectation_under_the_policy_is_the_kl(name):
  """Sum over the vocabulary of pi(y) * k(y) equals KL(pi || ref) exactly (both unbiased)."""
  rng = np.random.default_rng(3)
  logp = _log_softmax(rng.normal(scale=0.5, size=50))  # k3 below its clamp everywhere
  ref = _log_softmax(rng.normal(scale=0.5, size=50))
  exact = np.sum(np.exp(logp) * (logp - ref))
  k = np.asarray(kl.get_kl_estimator(name)(jnp.asarray(logp), jnp.asarray(ref)), np.float64)
  np.testing.assert_allclose(np.sum(np.exp(logp) * k), exact, rtol=1e-5)


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_direction_is_pi_to_ref(name):
  """KL(pi || ref) = 0.368, not KL(ref || pi) = 0.511, for these two distributions."""
  p, ref = np.array([0.9, 0.05, 0.05]), np.array([0.5, 0.25, 0.25])
  k = np.asarray(kl.get_kl_estimator(name)(jnp.log(p), jnp.log(ref)), np.float64)
  np.testing.assert_allclose(np.sum(p * k), np.sum(p * np.log(p / ref)), rtol=1e-5)
  assert abs(np.sum(p * k) - np.sum(ref * np.log(ref / p))) > 0.1


def test_unknown_estimator_lists_known():
  with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; known: \['k1', 'k2', 'k3'\]"):
    kl.get_kl_estimator("k4")
