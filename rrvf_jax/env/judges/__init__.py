"""Judges: compare a render with its target and return a score and feedback (see base.py)."""

from rrvf_jax.env.judges import local, openai  # noqa: F401  (register 'local' and 'openai')
from rrvf_jax.env.judges.base import (
  Judge,
  JudgeRequest,
  JudgeResult,
  JudgeUnavailableError,
  available_judges,
  make_judge,
  register_judge,
)
from rrvf_jax.env.judges.local import LocalJudge, LocalJudgeConfig
from rrvf_jax.env.judges.openai import (
  JudgeParseError,
  OpenAIJudge,
  OpenAIJudgeConfig,
  parse_score,
)

__all__ = [
  "Judge",
  "JudgeParseError",
  "JudgeRequest",
  "JudgeResult",
  "JudgeUnavailableError",
  "LocalJudge",
  "LocalJudgeConfig",
  "OpenAIJudge",
  "OpenAIJudgeConfig",
  "available_judges",
  "make_judge",
  "parse_score",
  "register_judge",
]
