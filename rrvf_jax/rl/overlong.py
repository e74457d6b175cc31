"""Overlong responses, measured in tokens: filtering truncated ones, DAPO's soft length penalty.

Host-side NumPy: rewards and loss masks are assembled on the host from the sampler's output.
Lengths are token counts (the quantity the sampler caps at `max_length`), never characters: a
penalty measured in characters against a token limit fires at the wrong length.

- Overlong filtering: a response cut off at the length cap has no final answer, so its reward says
  nothing about its tokens; its loss mask is zeroed and it leaves the loss entirely.
- Soft overlong punishment (DAPO): with L = max_length and a buffer of L_cache tokens,
    penalty(len) = 0                               if len <= L - L_cache
                 = (L - L_cache - len) / L_cache   if L - L_cache < len <= L   (0 down to -1)
                 = -1                              if len > L
  times `penalty` (DAPO's overlong_penalty_factor), added to the reward.
"""

from __future__ import annotations

import numpy as np


def soft_overlong_penalty(
  lengths: np.ndarray, max_length: int, buffer: int, penalty: float = 1.0
) -> np.ndarray:
  """float64 `[N]` reward shaping (<= 0) for responses of `lengths` tokens (DAPO, see above)."""
  if max_length <= 0 or not 0 < buffer <= max_length:
    raise ValueError(
      f"soft overlong punishment needs max_length > 0 and 0 < buffer <= max_length; got "
      f"max_length={max_length}, buffer={buffer}"
    )
  if penalty < 0:
    raise ValueError(f"overlong penalty must be >= 0, got {penalty}")
  lengths = np.asarray(lengths, np.float64)
  return penalty * np.clip((max_length - buffer - lengths) / buffer, -1.0, 0.0)


def filter_truncated(loss_mask: np.ndarray, truncated: np.ndarray) -> np.ndarray:
  """`loss_mask [B, T]` with the rows of truncated responses (`truncated [B]` bool) zeroed.

  `truncated` should come from the sampler (the response hit its token cap without finishing),
  not from `length == max_length`, which cannot tell a cut-off response from one that ended there.
  """
  loss_mask = np.asarray(loss_mask)
  truncated = np.asarray(truncated, bool)
  if truncated.shape != loss_mask.shape[:1]:
    raise ValueError(
      f"truncated must be one flag per row, shape {loss_mask.shape[:1]}; got {truncated.shape}"
    )
  return np.where(truncated[:, None], np.zeros_like(loss_mask), loss_mask)
