"""Dynamic sampling: a fixed number of groups, informative first, deterministic filler."""

import numpy as np
import pytest

from rrvf_jax.rl import dynamic_sampling

# Six over-sampled groups of 3: groups 0, 2, 5 are constant.
REWARDS = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0.2, 0.3, 0.2, 1, 0, 0, 0.5, 0.5, 0.5])


def test_picks_informative_groups_in_order():
  sel = dynamic_sampling.select_groups(REWARDS, 3, 2)
  np.testing.assert_array_equal(sel.groups, [1, 3])
  np.testing.assert_array_equal(sel.rows, [3, 4, 5, 9, 10, 11])
  assert sel.informative.all() and sel.num_informative == 2
  assert np.ptp(REWARDS[sel.rows].reshape(2, 3), axis=1).min() > 0


def test_falls_back_to_constant_groups_deterministically():
  sel = dynamic_sampling.select_groups(REWARDS, 3, 5)
  # All three informative groups (1, 3, 4) plus the first two constant ones (0, 2).
  np.testing.assert_array_equal(sel.groups, [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(sel.informative, [False, True, False, True, True])
  assert sel.num_informative == 3 and sel.rows.shape == (15,)
  again = dynamic_sampling.select_groups(REWARDS, 3, 5)
  np.testing.assert_array_equal(again.groups, sel.groups)


def test_constant_flags_and_errors():
  np.testing.assert_array_equal(
    dynamic_sampling.constant_groups_np(REWARDS, 3), [True, False, True, False, False, True]
  )
  with pytest.raises(ValueError, match="cannot select 7 groups from 6"):
    dynamic_sampling.select_groups(REWARDS, 3, 7)
  with pytest.raises(ValueError, match="divisible by group_size=4"):
    dynamic_sampling.select_groups(REWARDS, 4, 1)
