"""Policy-gradient losses of the GRPO family as `(loss_sum, weight, aux)` for `make_train_step`.

Inputs are per-token arrays `[B, T]`: the current policy's log-probs (differentiated), the
sampler's (behaviour / old) log-probs, optionally a frozen reference's log-probs, a `loss_mask`
that is 1 only on the policy's own tokens, and one advantage per sequence `[B]` (broadcast over
its tokens).

Surrogates (registry `POLICY_LOSSES`, chosen by name):
  "ppo_clip": per-token ratio r = pi / pi_old and
    loss = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)
    (PPO/GRPO; clip_high > clip_low is DAPO's clip-higher). Optional dual clip (`clip_ratio_c`,
    verl): for A < 0 the loss is capped at -c A, so a huge ratio cannot push it without bound.
  "gspo": one ratio per sequence, s = exp(mean over its tokens of log(pi / pi_old)), clipped like
    PPO at the sequence level and applied to all its tokens (GSPO). With one advantage per
    sequence this equals GSPO-token in value and gradient.
Token log-ratios are clamped to [-20, 20] before `exp` (as verl) so one stale token cannot overflow.

Aggregation (`loss_agg`), with how `make_train_step` accumulates it over micro-batches. The step
sums `loss_sum` and `weight` over micro-batches and divides once, so every mode below gives exactly
the gradient of one batch holding all micro-batches:
  "token-mean": sum over all policy tokens / number of policy tokens (DAPO; verl's token-mean).
    weight = token count.
  "seq-mean": mean over each sequence's tokens, then mean over sequences (original GRPO).
    loss_sum = sum of per-sequence means, weight = number of sequences with >= 1 policy token.
  "seq-sum-norm": each sequence's token sum divided by the constant `max_length`, then mean over
    sequences (Dr.GRPO; verl seq-mean-token-sum-norm, TRL dr_grpo = sum / (B * max_length)).
    loss_sum = total token sum / max_length, weight = number of sequences with >= 1 policy token.
Rows without policy tokens (padding rows, filtered truncations) count in no denominator.

Aux values are sums too; the train step reports each divided by the total weight. Intensive
metrics (clip fractions, ratio, KL, entropy) are therefore summed per token under "token-mean"
(reported: mean over tokens) and as per-sequence token means under the sequence modes (reported:
mean over sequences). "pg_loss" is aggregated exactly like the loss. Extremes (ratio min/max) are
not sums and are not reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rrvf_jax.rl import kl as kl_lib

AGG_MODES = ("token-mean", "seq-mean", "seq-sum-norm")
LOG_RATIO_CLAMP = 20.0


class Surrogate(NamedTuple):
  """Per-token outputs `[B, T]` float32 of a surrogate (meaningful only where the mask is set).

  Attributes:
    loss: the per-token policy loss (to be aggregated).
    ratio: the importance ratio used (per token, or the sequence's ratio for GSPO).
    clipped_low: 1 where the lower clip binds (A < 0 and ratio < 1 - clip_low): zero gradient.
    clipped_high: 1 where the upper clip binds (A > 0 and ratio > 1 + clip_high): zero gradient.
    clipped_dual: 1 where the dual clip binds (A < 0 and ratio > clip_ratio_c).
  """

  loss: jax.Array
  ratio: jax.Array
  clipped_low: jax.Array
  clipped_high: jax.Array
  clipped_dual: jax.Array


SurrogateFn = Callable[..., Surrogate]
POLICY_LOSSES: dict[str, SurrogateFn] = {}


def register_policy_loss(name: str) -> Callable[[SurrogateFn], SurrogateFn]:
  """Decorator registering `fn(log_ratio, adv, mask, *, clip_low, clip_high, clip_ratio_c)`."""

  def register(fn: SurrogateFn) -> SurrogateFn:
    if name in POLICY_LOSSES:
      raise ValueError(f"policy loss {name!r} is already registered")
    POLICY_LOSSES[name] = fn
    return fn

  return register


def get_policy_loss(name: str) -> SurrogateFn:
  """The surrogate registered as `name`; a ValueError listing the known names otherwise."""
  if name not in POLICY_LOSSES:
    raise ValueError(f"unknown policy loss {name!r}; known: {sorted(POLICY_LOSSES)}")
  return POLICY_LOSSES[name]


@register_policy_loss("ppo_clip")
def ppo_clip_surrogate(
  log_ratio: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  clip_low: float,
  clip_high: float,
  clip_ratio_c: float | None = None,
) -> Surrogate:
  """PPO clipped surrogate per token with separate low/high clip (and optional dual clip).

  Args:
    log_ratio: `[B, T]` log(pi / pi_old), zero where masked.
    advantages: `[B, T]` advantages broadcast over tokens.
    mask: `[B, T]` loss mask (unused here: the surrogate is per token).
    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    clip_ratio_c: dual-clip constant (> 1), or None for no dual clip.
  """
  del mask
  ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  # max of the two losses = min of the two objectives; where the clipped branch wins its gradient
  # with respect to the ratio is zero.
  loss = jnp.maximum(unclipped, clipped)
  clipped_dual = jnp.zeros_like(loss)
  if clip_ratio_c is not None:
    cap = -advantages * clip_ratio_c
    clipped_dual = ((advantages < 0) & (loss > cap)).astype(jnp.float32)
    loss = jnp.where(advantages < 0, jnp.minimum(loss, cap), loss)
  return Surrogate(
    loss=loss,
    ratio=ratio,
    clipped_low=((advantages < 0) & (ratio < 1.0 - clip_low)).astype(jnp.float32),
    clipped_high=((advantages > 0) & (ratio > 1.0 + clip_high)).astype(jnp.float32),
    clipped_dual=clipped_dual,
  )


@register_policy_loss("gspo")
def gspo_surrogate(
  log_ratio: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  clip_low: float,
  clip_high: float,
  clip_ratio_c: float | None = None,
) -> Surrogate:
  """GSPO: the PPO surrogate on each sequence's ratio exp(mean log-ratio), on all its tokens."""
  count = jnp.sum(mask, axis=-1, keepdims=True)
  seq_log_ratio = jnp.sum(log_ratio * mask, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
  return ppo_clip_surrogate(
    jnp.broadcast_to(seq_log_ratio, log_ratio.shape),
    advantages,
    mask,
    clip_low=clip_low,
    clip_high=clip_high,
    clip_ratio_c=clip_ratio_c,
  )


def _masked(values: jax.Array, mask: jax.Array) -> jax.Array:
  """values * mask, exactly 0 where the mask is 0 (whatever the value there)."""
  return jnp.where(mask > 0, values * mask, 0.0)


def aggregate(
  values: jax.Array, mask: jax.Array, mode: str, *, max_length: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """(sum, weight) of per-token `values [B, T]` under aggregation `mode` (see the module doc)."""
  if mode not in AGG_MODES:
    raise ValueError(f"unknown loss aggregation {mode!r}; known: {list(AGG_MODES)}")
  mask = mask.astype(jnp.float32)
  summed = _masked(values, mask)
  if mode == "token-mean":
    return jnp.sum(summed), jnp.sum(mask)
  count = jnp.sum(mask, axis=-1)
  sequences = jnp.sum((count > 0).astype(jnp.float32))
  if mode == "seq-mean":
    return jnp.sum(jnp.sum(summed, axis=-1) / jnp.maximum(count, 1.0)), sequences
  if max_length is None or max_length <= 0:
    raise ValueError(f"loss aggregation 'seq-sum-norm' needs max_length > 0, got {max_length}")
  return jnp.sum(summed) / max_length, sequences


def metric_sum(values: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
  """Sum of per-token `values` that gives their mean once divided by `aggregate`'s weight."""
  # Under both sequence modes the weight counts sequences, so a metric is a sum of sequence means.
  return aggregate(values, mask, "token-mean" if mode == "token-mean" else "seq-mean")[0]


def _check_shapes(
  logprobs: jax.Array,
  old_logprobs: jax.Array,
  advantages: jax.Array,
  loss_mask: jax.Array,
  **optional: jax.Array | None,
) -> None:
  """Raises a ValueError naming the first input whose shape does not fit `logprobs [B, T]`."""
  if logprobs.ndim != 2:
    raise ValueError(f"logprobs must be [B, T], got shape {logprobs.shape}")
  named = {"old_logprobs": old_logprobs, "loss_mask": loss_mask, **optional}
  for name, x in named.items():
    if x is not None and x.shape != logprobs.shape:
      raise ValueError(f"{name} has shape {x.shape}, logprobs has {logprobs.shape}")
  if advantages.shape != logprobs.shape[:1]:
    raise ValueError(
      f"advantages must be one per sequence, shape {logprobs.shape[:1]}; got {advantages.shape}"
    )


def policy_loss(
  logprobs: jax.Array,
  old_logprobs: jax.Array,
  advantages: jax.Array,
  loss_mask: jax.Array,
  *,
  ref_logprobs: jax.Array | None = None,
  entropy: jax.Array | None = None,
  surrogate: str = "ppo_clip",
  clip_low: float = 0.2,
  clip_high: float = 0.2,
  clip_ratio_c: float | None = None,
  loss_agg: str = "token-mean",
  max_length: int | None = None,
  kl_coef: float = 0.0,
  kl_estimator: str = "k3",
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(loss_sum, weight, aux) of one (micro-)batch; loss = surrogate + kl_coef * KL to the reference.

  Args:
    logprobs: `[B, T]` log-probs of the sampled tokens under the policy being trained.
    old_logprobs: `[B, T]` the sampler's (behaviour policy's) log-probs of the same tokens.
    advantages: `[B]` one advantage per sequence.
    loss_mask: `[B, T]` 1 on the policy's own tokens, 0 elsewhere (prompt, tool responses, padding).
    ref_logprobs: `[B, T]` a frozen reference's log-probs; required when kl_coef > 0.
    entropy: `[B, T]` per-token entropy of the policy, reported as the "entropy" metric.
    surrogate: a name in POLICY_LOSSES ("ppo_clip", "gspo").
    clip_low, clip_high: ratio clip range [1 - clip_low, 1 + clip_high].
    clip_ratio_c: dual-clip constant (> 1) or None.
    loss_agg: one of AGG_MODES.
    max_length: the constant normaliser of "seq-sum-norm" (max response tokens).
    kl_coef: weight of the KL penalty; the KL is computed only when it is > 0.
    kl_estimator: a name in kl.KL_ESTIMATORS ("k1", "k2", "k3").

  Returns:
    loss_sum and weight (see the module doc for each mode) and aux sums: pg_loss, clip_frac_low,
    clip_frac_high, approx_kl (k3 estimate of KL(pi_old || pi)), ratio_mean, ratio_abs_dev
    (mean |ratio - 1|), plus kl (when kl_coef > 0), entropy (when given) and clip_frac_dual
    (when clip_ratio_c is set).
  """
  surrogate_fn = get_policy_loss(surrogate)
  if clip_low < 0 or clip_high < 0 or clip_low >= 1:
    raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
  if clip_ratio_c is not None and clip_ratio_c <= 1:
    raise ValueError(f"clip_ratio_c must be > 1 (or None), got {clip_ratio_c}")
  if kl_coef < 0:
    raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
  if kl_coef > 0 and ref_logprobs is None:
    raise ValueError(f"kl_coef={kl_coef} > 0 needs ref_logprobs")
  if loss_agg not in AGG_MODES:
    raise ValueError(f"unknown loss aggregation {loss_agg!r}; known: {list(AGG_MODES)}")
  _check_shapes(
    logprobs, old_logprobs, advantages, loss_mask, ref_logprobs=ref_logprobs, entropy=entropy
  )
  mask = loss_mask.astype(jnp.float32)
  on = mask > 0
  # Zero the inputs off the mask first: a padded position's -inf log-prob must not reach exp()
  # (or its gradient) anywhere below.
  new = jnp.where(on, logprobs.astype(jnp.float32), 0.0)
  old = jnp.where(on, old_logprobs.astype(jnp.float32), 0.0)
  adv = jnp.broadcast_to(advantages.astype(jnp.float32)[:, None], new.shape)
  terms = surrogate_fn(
    new - old, adv, mask, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c
  )
  pg_sum, weight = aggregate(terms.loss, mask, loss_agg, max_length=max_length)
  loss_sum = pg_sum
  metric = lambda x: metric_sum(x, mask, loss_agg)
  aux = {
    "pg_loss": pg_sum,
    "clip_frac_low": metric(terms.clipped_low),
    "clip_frac_high": metric(terms.clipped_high),
    # Tokens were sampled from pi_old, so k3 with ratio pi / pi_old estimates KL(pi_old || pi).
    "approx_kl": metric(kl_lib.kl_k3(old, new)),
    "ratio_mean": metric(terms.ratio),
    "ratio_abs_dev": metric(jnp.abs(terms.ratio - 1.0)),
  }
  if clip_ratio_c is not None:
    aux["clip_frac_dual"] = metric(terms.clipped_dual)
  if kl_coef > 0:
    ref = jnp.where(on, ref_logprobs.astype(jnp.float32), 0.0)
    kl_tokens = kl_lib.get_kl_estimator(kl_estimator)(new, ref)
    loss_sum = loss_sum + kl_coef * aggregate(kl_tokens, mask, loss_agg, max_length=max_length)[0]
    aux["kl"] = metric(kl_tokens)
  if entropy is not None:
    aux["entropy"] = metric(entropy.astype(jnp.float32))
  return loss_sum, weight, aux
