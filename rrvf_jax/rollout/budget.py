"""The episode budget: the most tokens and KV-cache slots one RRVF episode can take, worst case.

The sampler's cache is made as long as `worst_case` says (`components.episode_budget`), so that
`run_episodes` (`rollout.episode`) never stops a row's tool loop for room. `nudge_ids` is the
forced-answer request that the driver appends and the budget counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rrvf_jax import env
from rrvf_jax.processing import chat, tokens
from rrvf_jax.rollout import sampler as sampler_lib


@dataclasses.dataclass(frozen=True)
class Budget:
  """The most one episode can take: trajectory tokens, and slots of the lock-step KV cache."""

  tokens: int
  cache_slots: int


def worst_case(
  *,
  prompt_tokens: int,
  max_turns: int,
  max_new_tokens: int,
  max_response_tokens: int,
  force_answer_tokens: int,
  buckets: Sequence[int] = sampler_lib.DEFAULT_BUCKETS,
  forcing: bool = True,
) -> Budget:
  """What an episode needs so that all `max_turns - 1` feedback rounds always happen.

  The worst case: every turn calls the tool and uses all `max_new_tokens`, every tool response
  uses all `max_response_tokens`, and the last call is answered by a forced-answer turn
  (`force_answer_tokens` for the request). Cache slots count the lock-step sampler's padding: the
  prompt and every appended turn take a whole length bucket. `run_episodes` with
  `max_total_tokens >= tokens` and a sampler of `cache_length >= cache_slots` never stops a row's
  tool loop for room.
  """
  rounds = max_turns - 1
  appended = max(max_response_tokens, force_answer_tokens)
  force = force_answer_tokens + max_new_tokens if forcing else 0
  force_slots = sampler_lib.bucket_length(force_answer_tokens, buckets) + max_new_tokens
  return Budget(
    tokens=prompt_tokens + max_turns * max_new_tokens + rounds * max_response_tokens + force,
    cache_slots=sampler_lib.bucket_length(prompt_tokens, buckets)
    + max_turns * max_new_tokens
    + rounds * sampler_lib.bucket_length(appended, buckets)
    + (force_slots if forcing else 0),
  )


def force_answer_tokens(tok: tokens.Tokenizer, prompt: str = env.FORCE_ANSWER_PROMPT) -> int:
  """Tokens appended for a forced answer, at most (after a turn cut before `<|im_end|>`)."""
  return len(nudge_ids(tok, prompt, True))


def nudge_ids(tok: tokens.Tokenizer, prompt: str, close_open_turn: bool) -> np.ndarray:
  """Tokens of the forced-answer request appended after a turn (and the next header)."""
  nudge = [{"role": "user", "content": prompt}]
  piece = chat.append_turn_ids(tok, nudge, close_open_turn=close_open_turn)
  return piece.input_ids
