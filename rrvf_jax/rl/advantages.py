"""Group-relative advantages: rows b*G .. b*G+G-1 are G samples of prompt b.

GRPO scores each sample against its own group: A = (r - mean_group) / (std_group + eps), with the
unbiased std (ddof=1, as verl and TRL). Dr.GRPO drops the division: A = r - mean_group.

A group whose rewards are all equal carries no learning signal. Its advantages are set to exactly
zero: computing them as (r - mean) / (std + eps) would not be, because the float mean of equal
values can differ from them by an ulp (three 0.1s average to 0.10000000000000002), and that
rounding error divided by eps is not small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_EPS = 1e-6


def _grouped(rewards: jax.Array, group_size: int) -> jax.Array:
  """Rewards `[N]` reshaped to `[N // G, G]`, after checking the shapes."""
  rewards = jnp.asarray(rewards, jnp.float32)
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  if rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise ValueError(
      f"rewards must be 1-D with a length divisible by group_size={group_size}; got shape "
      f"{rewards.shape}"
    )
  return rewards.reshape(-1, group_size)


def constant_groups(rewards: jax.Array, group_size: int) -> jax.Array:
  """bool `[N // G]`: True where all G rewards of the group are exactly equal (no signal)."""
  groups = _grouped(rewards, group_size)
  return jnp.max(groups, axis=1) == jnp.min(groups, axis=1)


def group_advantages(
  rewards: jax.Array,
  group_size: int,
  *,
  scale_by_std: bool = True,
  eps: float = DEFAULT_EPS,
) -> jax.Array:
  """Advantages `[N]` float32 of rewards `[N]` in consecutive groups of `group_size`.

  Args:
    rewards: `[N]` scalar reward per sample, N a multiple of `group_size`.
    group_size: G, the samples per prompt.
    scale_by_std: True for GRPO (divide by the group's unbiased std + eps), False for Dr.GRPO
      (mean-centred only).
    eps: added to the std so near-constant groups do not blow up.

  Returns:
    One advantage per sample; exactly 0 for every sample of a constant group.
  """
  if scale_by_std and group_size < 2:
    raise ValueError(f"std-normalised advantages need group_size >= 2, got {group_size}")
  if eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  groups = _grouped(rewards, group_size)
  centred = groups - jnp.mean(groups, axis=1, keepdims=True)
  if scale_by_std:
    centred = centred / (jnp.std(groups, axis=1, ddof=1, keepdims=True) + eps)
  constant = constant_groups(rewards, group_size)[:, None]
  return jnp.where(constant, 0.0, centred).reshape(-1)
