"""Named algorithms of the GRPO family: one config holding every choice, presets, and the loss.

Presets (`PRESETS`; override any field by keyword or in a mapping):
  "grpo":    GRPO as verl ran it for RRVF/DeepEyes: std-normalised group advantages, PPO clip
             0.2/0.2, token-mean, no KL. (The DeepSeekMath paper averages per sequence first:
             `loss_agg="seq-mean"`.)
  "dr_grpo": Dr.GRPO: mean-centred advantages (no std), each sequence's token sum divided by the
             constant `max_length` (required), mean over sequences; clip 0.2/0.2, no KL.
  "dapo":    DAPO: clip-higher 0.2/0.28, token-mean, no KL, dynamic sampling (drop groups with
             equal rewards) and soft overlong punishment (requires `max_length` and
             `overlong_buffer`, in tokens).
  "gspo":    GSPO: sequence-level ratio exp(mean token log-ratio), clipped at the sequence level
             with the paper's 3e-4/4e-4, mean over tokens then sequences, no KL.
A KL penalty to a frozen reference is off everywhere (`kl_coef=0`); set `kl_coef > 0` (and
`kl_estimator`, "k3" by default) to add it, which then needs reference log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from rrvf_jax.rl import advantages as advantages_lib
from rrvf_jax.rl import kl as kl_lib
from rrvf_jax.rl import losses, overlong

PolicyLossFn = Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Every algorithm choice of a GRPO-family run (lengths in tokens).

  Attributes:
    surrogate: policy surrogate, a name in `losses.POLICY_LOSSES` ("ppo_clip", "gspo").
    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    clip_ratio_c: dual-clip constant (> 1) for negative advantages, or None.
    loss_agg: "token-mean", "seq-mean" or "seq-sum-norm" (see `losses`).
    max_length: max response tokens: the "seq-sum-norm" normaliser and the overlong reference.
    kl_coef: weight of the KL-to-reference penalty (0 = no reference needed).
    kl_estimator: "k1", "k2" or "k3".
    scale_advantages_by_std: GRPO's division by the group std (False = Dr.GRPO).
    advantage_eps: added to the group std.
    dynamic_sampling: over-sample and keep groups with non-constant rewards (`dynamic_sampling`).
    mask_truncated: drop responses cut off at the length cap from the loss (overlong filtering).
    soft_overlong: add DAPO's soft overlong punishment to the rewards.
    overlong_buffer: L_cache, the tokens before `max_length` over which the penalty ramps.
    overlong_penalty: the penalty at `max_length` (DAPO's overlong_penalty_factor).
  """

  surrogate: str = "ppo_clip"
  clip_low: float = 0.2
  clip_high: float = 0.2
  clip_ratio_c: float | None = None
  loss_agg: str = "token-mean"
  max_length: int | None = None
  kl_coef: float = 0.0
  kl_estimator: str = "k3"
  scale_advantages_by_std: bool = True
  advantage_eps: float = advantages_lib.DEFAULT_EPS
  dynamic_sampling: bool = False
  mask_truncated: bool = False
  soft_overlong: bool = False
  overlong_buffer: int | None = None
  overlong_penalty: float = 1.0


PRESETS: dict[str, RLConfig] = {
  "grpo": RLConfig(),
  "dr_grpo": RLConfig(scale_advantages_by_std=False, loss_agg="seq-sum-norm"),
  "dapo": RLConfig(clip_high=0.28, dynamic_sampling=True, soft_overlong=True),
  "gspo": RLConfig(surrogate="gspo", clip_low=3e-4, clip_high=4e-4, loss_agg="seq-mean"),
}


def validate(config: RLConfig) -> RLConfig:
  """Returns `config` unchanged, or raises one ValueError naming the first bad field."""
  c = config
  if c.surrogate not in losses.POLICY_LOSSES:
    raise ValueError(
      f"rl.surrogate={c.surrogate!r} is unknown; known: {sorted(losses.POLICY_LOSSES)}"
    )
  if c.loss_agg not in losses.AGG_MODES:
    raise ValueError(f"rl.loss_agg={c.loss_agg!r} is unknown; known: {list(losses.AGG_MODES)}")
  if c.kl_estimator not in kl_lib.KL_ESTIMATORS:
    raise ValueError(
      f"rl.kl_estimator={c.kl_estimator!r} is unknown; known: {sorted(kl_lib.KL_ESTIMATORS)}"
    )
  if not 0 <= c.clip_low < 1 or c.clip_high < 0:
    raise ValueError(
      f"rl.clip_low must be in [0, 1) and rl.clip_high >= 0; got {c.clip_low}, {c.clip_high}"
    )
  if c.clip_ratio_c is not None and c.clip_ratio_c <= 1:
    raise ValueError(f"rl.clip_ratio_c must be > 1 or None, got {c.clip_ratio_c}")
  if c.kl_coef < 0:
    raise ValueError(f"rl.kl_coef must be >= 0, got {c.kl_coef}")
  if c.advantage_eps < 0:
    raise ValueError(f"rl.advantage_eps must be >= 0, got {c.advantage_eps}")
  if c.max_length is not None and c.max_length <= 0:
    raise ValueError(f"rl.max_length must be > 0 tokens, got {c.max_length}")
  if c.loss_agg == "seq-sum-norm" and c.max_length is None:
    raise ValueError("rl.loss_agg='seq-sum-norm' needs rl.max_length (max response tokens)")
  if c.soft_overlong:
    if c.max_length is None or c.overlong_buffer is None:
      raise ValueError(
        "rl.soft_overlong needs rl.max_length and rl.overlong_buffer (tokens); got "
        f"max_length={c.max_length}, overlong_buffer={c.overlong_buffer}"
      )
    if not 0 < c.overlong_buffer <= c.max_length:
      raise ValueError(
        f"rl.overlong_buffer must be in (0, max_length={c.max_length}], got {c.overlong_buffer}"
      )
    if c.overlong_penalty < 0:
      raise ValueError(f"rl.overlong_penalty must be >= 0, got {c.overlong_penalty}")
  return c


def get_rl_config(name_or_config: str | RLConfig | Mapping[str, Any], **overrides: Any) -> RLConfig:
  """A validated RLConfig from a preset name, an RLConfig, or a mapping, plus `overrides`.

  A mapping (e.g. `ConfigDict.to_dict()`) may name its preset under "algorithm" (default "grpo");
  its other keys override fields, as do `overrides`.
  """
  if hasattr(name_or_config, "to_dict"):
    name_or_config = name_or_config.to_dict()
  if isinstance(name_or_config, Mapping):
    mapping = dict(name_or_config)
    name_or_config = mapping.pop("algorithm", "grpo")
    overrides = {**mapping, **overrides}
  if isinstance(name_or_config, str):
    if name_or_config not in PRESETS:
      raise ValueError(f"unknown RL algorithm {name_or_config!r}; known: {sorted(PRESETS)}")
    config = PRESETS[name_or_config]
  elif isinstance(name_or_config, RLConfig):
    config = name_or_config
  else:
    raise ValueError(
      f"expected an algorithm name, RLConfig or mapping, got {type(name_or_config).__name__}"
    )
  fields = {f.name for f in dataclasses.fields(RLConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown RL config keys {unknown}; known: {sorted(fields)}")
  return validate(dataclasses.replace(config, **overrides))


def make_policy_loss(
  name_or_config: str | RLConfig | Mapping[str, Any], **overrides: Any
) -> PolicyLossFn:
  """`losses.policy_loss` with the config's loss fields bound.

  The result is `(logprobs, old_logprobs, advantages, loss_mask, *, ref_logprobs=None,
  entropy=None) -> (loss_sum, weight, aux)`; call it inside a train step's `loss_fn`.
  """
  c = get_rl_config(name_or_config, **overrides)
  return functools.partial(
    losses.policy_loss,
    surrogate=c.surrogate,
    clip_low=c.clip_low,
    clip_high=c.clip_high,
    clip_ratio_c=c.clip_ratio_c,
    loss_agg=c.loss_agg,
    max_length=c.max_length,
    kl_coef=c.kl_coef,
    kl_estimator=c.kl_estimator,
  )


def compute_advantages(config: RLConfig, rewards: jax.Array, group_size: int) -> jax.Array:
  """Group advantages `[N]` of `rewards [N]` with the config's std normalisation and eps."""
  return advantages_lib.group_advantages(
    rewards,
    group_size,
    scale_by_std=config.scale_advantages_by_std,
    eps=config.advantage_eps,
  )


def shape_rewards(config: RLConfig, rewards: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """float64 rewards plus the soft overlong penalty of `lengths` tokens when the config asks."""
  rewards = np.asarray(rewards, np.float64)
  if not config.soft_overlong:
    return rewards
  penalty = overlong.soft_overlong_penalty(
    lengths, config.max_length, config.overlong_buffer, config.overlong_penalty
  )
  if penalty.shape != rewards.shape:
    raise ValueError(f"lengths shape {penalty.shape} != rewards shape {rewards.shape}")
  return rewards + penalty


def loss_mask_for(config: RLConfig, loss_mask: np.ndarray, truncated: np.ndarray) -> np.ndarray:
  """`loss_mask` with truncated rows zeroed when the config filters overlong responses."""
  if not config.mask_truncated:
    return np.asarray(loss_mask)
  return overlong.filter_truncated(loss_mask, truncated)
