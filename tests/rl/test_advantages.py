"""Group advantages (GRPO with std, Dr.GRPO without) and the constant-group helper."""

import numpy as np
import pytest

from rrvf_jax.rl import advantages


def _reference(rewards, group_size, scale_by_std, eps):
  """float64 loop over groups: (r - mean) / (std_ddof1 + eps), or r - mean; 0 for equal groups."""
  out = np.zeros(len(rewards))
  for start in range(0, len(rewards), group_size):
    group = np.asarray(rewards[start : start + group_size], np.float64)
    if np.all(group == group[0]):
      continue
    centred = group - group.mean()
    if scale_by_std:
      centred = centred / (group.std(ddof=1) + eps)
    out[start : start + group_size] = centred
  return out


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_matches_float64_reference(scale_by_std):
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=24).astype(np.float32)
  rewards[8:12] = 0.5  # one constant group
  got = advantages.group_advantages(rewards, 4, scale_by_std=scale_by_std, eps=1e-6)
  want = _reference(rewards, 4, scale_by_std, 1e-6)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_std_scaling_differs_from_centring_only():
  rewards = np.array([0.0, 1.0, 0.0, 0.0, 4.0, 0.0], np.float32)
  with_std = np.asarray(advantages.group_advantages(rewards, 3))
  centred = np.asarray(advantages.group_advantages(rewards, 3, scale_by_std=False))
  np.testing.assert_allclose(centred, [-1 / 3, 2 / 3, -1 / 3, -4 / 3, 8 / 3, -4 / 3], rtol=1e-6)
  # With the std the two groups (same shape, scaled by 4) get the same advantages.
  np.testing.assert_allclose(with_std[:3], with_std[3:], rtol=1e-5)
  np.testing.assert_allclose(
    with_std[:3], [-1 / np.sqrt(3), 2 / np.sqrt(3), -1 / np.sqrt(3)], rtol=1e-5
  )


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_constant_groups_get_exactly_zero(scale_by_std):
  # Values whose float mean is not exactly themselves: (r - mean) / eps would not be small.
  rewards = np.repeat(np.array([0.1, 0.7, 1 / 3, -2.9], np.float32), 3)
  got = np.asarray(advantages.group_advantages(rewards, 3, scale_by_std=scale_by_std, eps=1e-8))
  assert np.all(got == 0.0)


def test_constant_groups_flags():
  rewards = np.array([1, 1, 1, 0, 1, 0, 2, 2, 2.0000002], np.float32)
  np.testing.assert_array_equal(advantages.constant_groups(rewards, 3), [True, False, False])


def test_bad_shapes_are_errors():
  with pytest.raises(ValueError, match="divisible by group_size=4"):
    advantages.group_advantages(np.zeros(6), 4)
  with pytest.raises(ValueError, match="group_size >= 2"):
    advantages.group_advantages(np.zeros(6), 1)
  # Dr.GRPO with G = 1 is allowed (and gives zeros).
  assert np.all(np.asarray(advantages.group_advantages(np.arange(3.0), 1, scale_by_std=False)) == 0)
