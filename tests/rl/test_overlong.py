"""Overlong handling in tokens: DAPO's soft punishment values and filtering truncated rows."""

import numpy as np
import pytest

from rrvf_jax.rl import overlong


def test_soft_penalty_values():
  # L = 100, L_cache = 20: free up to 80 tokens, then linear down to -1 at 100.
  lengths = np.array([0, 50, 80, 81, 90, 95, 100, 130])
  got = overlong.soft_overlong_penalty(lengths, max_length=100, buffer=20)
  np.testing.assert_allclose(got, [0, 0, 0, -0.05, -0.5, -0.75, -1.0, -1.0])
  scaled = overlong.soft_overlong_penalty(lengths, max_length=100, buffer=20, penalty=0.5)
  np.testing.assert_allclose(scaled, got * 0.5)


def test_soft_penalty_bad_settings():
  with pytest.raises(ValueError, match="0 < buffer <= max_length"):
    overlong.soft_overlong_penalty(np.array([1]), max_length=10, buffer=20)
  with pytest.raises(ValueError, match="0 < buffer <= max_length"):
    overlong.soft_overlong_penalty(np.array([1]), max_length=10, buffer=0)


def test_filter_truncated_zeroes_rows():
  mask = np.ones((3, 4), np.float32)
  mask[2, 3] = 0
  got = overlong.filter_truncated(mask, np.array([False, True, False]))
  np.testing.assert_array_equal(got, [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]])
  assert got.dtype == np.float32
  with pytest.raises(ValueError, match="one flag per row"):
    overlong.filter_truncated(mask, np.array([True, False]))
