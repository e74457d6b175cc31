"""Per-token estimators of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

With d = log pi_ref(y) - log pi(y) (so r = exp(d) = pi_ref / pi):
  k1 = -d                 unbiased, high variance, can be negative per token;
  k2 = d^2 / 2            biased, low variance, >= 0;
  k3 = exp(d) - d - 1     unbiased and >= 0 (Schulman's "low-variance" estimator, verl low_var_kl).
k3 clamps d to [-20, 20] and its value to at most 10, as verl does, so one token whose reference
probability is vanishingly small cannot dominate the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

KLEstimator = Callable[[jax.Array, jax.Array], jax.Array]

LOG_RATIO_CLAMP = 20.0
K3_MAX = 10.0


def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """k1 = log pi - log pi_ref per token."""
  return logprobs - ref_logprobs


def kl_k2(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """k2 = (log pi - log pi_ref)^2 / 2 per token."""
  return 0.5 * jnp.square(logprobs - ref_logprobs)


def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """k3 = exp(d) - d - 1 with d = log pi_ref - log pi per token (>= 0, at most K3_MAX)."""
  d = jnp.clip(ref_logprobs - logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  # expm1(d) - d, not exp(d) - d - 1: for small |d| the latter loses every digit to rounding in
  # float32 and can come out negative.
  return jnp.minimum(jnp.expm1(d) - d, K3_MAX)


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def get_kl_estimator(name: str) -> KLEstimator:
  """The estimator registered as `name`; a ValueError listing the known names otherwise."""
  if name not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {name!r}; known: {sorted(KL_ESTIMATORS)}")
  return KL_ESTIMATORS[name]
