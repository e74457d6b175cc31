"""DAPO dynamic sampling on the host: keep a fixed number of groups whose rewards are not all equal.

A group whose G rewards are equal has zero advantage everywhere and adds nothing but tokens to the
loss denominator. The sampler over-samples groups; `select_groups` keeps `num_groups` of them so
the train batch keeps one static shape. Selection is deterministic: the first `num_groups`
informative groups in sampled order; when there are too few, the remaining slots go to the first
constant groups, flagged in `informative` so the caller can zero their loss mask (they would
otherwise dilute a token-mean) or sample more.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class GroupSelection(NamedTuple):
  """Which over-sampled groups go into the train batch.

  Attributes:
    groups: int64 `[num_groups]` indices of the chosen groups among the over-sampled ones, in
      ascending (sampled) order.
    rows: int64 `[num_groups * G]` the chosen sample rows (group g holds rows g*G .. g*G+G-1).
    informative: bool `[num_groups]` True for a group with non-constant rewards, False for filler.
  """

  groups: np.ndarray
  rows: np.ndarray
  informative: np.ndarray

  @property
  def num_informative(self) -> int:
    """How many chosen groups carry a learning signal."""
    return int(np.sum(self.informative))


def constant_groups_np(rewards: np.ndarray, group_size: int) -> np.ndarray:
  """bool `[N // G]`: True where all G rewards of a group are exactly equal (host NumPy)."""
  rewards = np.asarray(rewards, np.float64)
  if group_size < 1 or rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise ValueError(
      f"rewards must be 1-D with a length divisible by group_size={group_size}; got shape "
      f"{rewards.shape}"
    )
  groups = rewards.reshape(-1, group_size)
  return groups.max(axis=1) == groups.min(axis=1)


def select_groups(rewards: np.ndarray, group_size: int, num_groups: int) -> GroupSelection:
  """Chooses `num_groups` groups of the over-sampled `rewards [N]`, informative ones first.

  Args:
    rewards: `[N]` rewards of N // group_size over-sampled groups (consecutive rows).
    group_size: G, samples per prompt.
    num_groups: groups in the train batch; at most N // group_size.

  Returns:
    A GroupSelection; `informative` is all True when enough groups had non-constant rewards.
  """
  constant = constant_groups_np(rewards, group_size)
  if not 0 < num_groups <= constant.shape[0]:
    raise ValueError(
      f"cannot select {num_groups} groups from {constant.shape[0]} sampled groups of "
      f"{group_size}; need 0 < num_groups <= sampled groups"
    )
  order = np.concatenate([np.flatnonzero(~constant), np.flatnonzero(constant)])
  groups = np.sort(order[:num_groups]).astype(np.int64)
  rows = (groups[:, None] * group_size + np.arange(group_size)).reshape(-1)
  return GroupSelection(groups=groups, rows=rows, informative=~constant[groups])
