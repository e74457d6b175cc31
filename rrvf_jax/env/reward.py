"""The RRVF episode reward: R = w_v·R_vision + w_f·R_format + w_t·R_tool.

- R_vision ∈ [0, 1]: the judge's score of the final answer's render; 0 when there is no closed
  answer (one cut off inside `<answer>` by a token limit earns nothing) or its code does not render.
- R_format ∈ {-1, 0}: -1 when any turn is malformed (tag structure, a tool call that is not strictly
  well formed, no closed <answer> with code) or the final code does not render — the paper's
  "improper output formatting and non-executable code".
- R_tool ∈ [0, 1]: min(successful tool calls, cap) / cap, granted only when R_vision > threshold. A
  successful call is well formed, its code rendered, and the policy saw its tool response (a call
  cut off by the episode's budget helped nothing). The cap and the gate keep it from being
  farmed: extra calls never add reward, and calls alone earn nothing without a good final render.

Defaults (DESIGN.md §4; the paper gives no numbers): w = (1.0, 0.2, 0.2), threshold 0.5, cap 1. Cap
1 with a 0.5 gate is the DeepEyes tool reward (1 if at least one tool call and the answer scores
above 0.5) that RRVF says it builds on; further turns pay off only through a better final render.

Inputs are plain data (parsed turns, render statuses, a score) so the GRPO loop can call this from
any process. Host-only, no JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from rrvf_jax.env.parsing import AnswerStatus, ParsedTurn, ToolCall, TurnIssue


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Weights and rules of the episode reward."""

  w_vision: float = 1.0
  w_format: float = 0.2
  w_tool: float = 0.2
  # R_tool is granted only when R_vision is strictly above this.
  tool_threshold: float = 0.5
  # Successful tool calls counted, at most; R_tool = min(n, cap) / cap.
  tool_cap: int = 1
  # Repaired tool calls (malformed JSON whose code was recovered) are format errors and do not count
  # as successful. Set False to only penalise calls that could not be run at all.
  strict_tool_calls: bool = True
  # A turn without <think> is a format error only when this is set.
  require_think: bool = False
  # TurnIssue values that are not format errors.
  tolerated_issues: frozenset[str] = frozenset()

  def __post_init__(self) -> None:
    if self.tool_cap < 1:
      raise ValueError(f"tool_cap must be >= 1, got {self.tool_cap}")


@dataclasses.dataclass(frozen=True)
class EpisodeSummary:
  """What the reward needs to know about one finished episode (plain data).

  `tool_render_statuses` has one entry per tool call, in order over all turns (see
  `episode_tool_calls`): the render status ('ok', 'runtime_error', …) or None when the call was not
  executed; `tool_calls_seen` says per call whether its tool response reached the policy (None:
  all did). `final_render_status` is None when the episode produced no answer to render.
  """

  turns: tuple[ParsedTurn, ...]
  tool_render_statuses: tuple[str | None, ...] = ()
  final_render_status: str | None = None
  final_score: float | None = None
  tool_calls_seen: tuple[bool, ...] | None = None

  def __post_init__(self) -> None:
    n_calls = len(episode_tool_calls(self.turns))
    if len(self.tool_render_statuses) != n_calls:
      n = len(self.tool_render_statuses)
      raise ValueError(f"tool_render_statuses has {n} entries for {n_calls} tool calls")
    if self.tool_calls_seen is not None and len(self.tool_calls_seen) != n_calls:
      n = len(self.tool_calls_seen)
      raise ValueError(f"tool_calls_seen has {n} entries for {n_calls} tool calls")
    if self.final_score is not None and not 0.0 <= self.final_score <= 1.0:
      raise ValueError(f"final_score must be in [0, 1], got {self.final_score}")

  @classmethod
  def from_results(
    cls,
    turns: Sequence[ParsedTurn],
    tool_renders: Sequence[Any | None],
    final_render: Any | None,
    final_judge: Any | None,
  ) -> EpisodeSummary:
    """Build a summary from render results (`.status`) and a judge result (`.score`), duck-typed."""
    return cls(
      turns=tuple(turns),
      tool_render_statuses=tuple(None if r is None else str(r.status) for r in tool_renders),
      final_render_status=None if final_render is None else str(final_render.status),
      final_score=None if final_judge is None else final_judge.score,
    )


@dataclasses.dataclass(frozen=True)
class RewardBreakdown:
  """The reward and each of its parts, for the update and for logging."""

  total: float
  vision: float
  format: float
  tool: float
  config: RewardConfig
  n_tool_calls: int
  n_successful_tool_calls: int
  tool_gate_passed: bool
  format_errors: tuple[str, ...]

  def as_dict(self, prefix: str = "reward/") -> dict[str, float]:
    """Flat numbers for metrics logging."""
    return {
      f"{prefix}total": self.total,
      f"{prefix}vision": self.vision,
      f"{prefix}format": self.format,
      f"{prefix}tool": self.tool,
      f"{prefix}n_tool_calls": float(self.n_tool_calls),
      f"{prefix}n_successful_tool_calls": float(self.n_successful_tool_calls),
      f"{prefix}tool_gate_passed": float(self.tool_gate_passed),
      f"{prefix}format_error": float(bool(self.format_errors)),
    }


def episode_tool_calls(turns: Iterable[ParsedTurn]) -> list[ToolCall]:
  """All tool calls of an episode, in order (the order of `tool_render_statuses`)."""
  return [call for turn in turns for call in turn.tool_calls]


def final_answer(turns: Sequence[ParsedTurn]) -> str | None:
  """The code of the episode's final answer (the last turn's), or None."""
  if not turns or turns[-1].answer is None:
    return None
  return turns[-1].answer.code


def _call_counts(call: ToolCall, config: RewardConfig) -> bool:
  """Whether a call is acceptable under the config (strictly well formed, or at least runnable)."""
  return call.ok if config.strict_tool_calls else call.executable


def format_errors(summary: EpisodeSummary, config: RewardConfig) -> tuple[str, ...]:
  """Every reason the episode's output is malformed or its final code is not executable."""
  errors: list[str] = []
  tolerated = set(config.tolerated_issues)
  if not config.require_think:
    tolerated.add(TurnIssue.MISSING_THINK.value)
  for i, turn in enumerate(summary.turns):
    errors.extend(f"turn{i}:{issue.value}" for issue in turn.issues if issue.value not in tolerated)
    errors.extend(
      f"turn{i}:tool_call:{call.status.value}"
      for call in turn.tool_calls
      if not _call_counts(call, config)
    )
  last = summary.turns[-1] if summary.turns else None
  if last is None or last.answer is None:
    errors.append("no_answer")
  else:
    if last.answer.status is not AnswerStatus.OK:
      errors.append(f"answer:{last.answer.status.value}")
    if summary.final_render_status != "ok":
      errors.append(f"final_render:{summary.final_render_status or 'not_rendered'}")
  return tuple(errors)


def compute_reward(summary: EpisodeSummary, config: RewardConfig | None = None) -> RewardBreakdown:
  """Compute R = w_v·R_vision + w_f·R_format + w_t·R_tool for one episode."""
  config = config or RewardConfig()
  answer = summary.turns[-1].answer if summary.turns else None
  # Only a closed answer counts: code cut off by a token limit is not what the policy answered.
  rendered = answer is not None and answer.ok and summary.final_render_status == "ok"
  if rendered and summary.final_score is None:
    raise ValueError(
      "the final render succeeded but final_score is missing (judge in 'score' mode)"
    )
  vision = float(summary.final_score) if rendered else 0.0

  errors = format_errors(summary, config)
  fmt = -1.0 if errors else 0.0

  calls = episode_tool_calls(summary.turns)
  seen = summary.tool_calls_seen or (True,) * len(calls)
  successes = sum(
    1
    for call, status, saw in zip(calls, summary.tool_render_statuses, seen, strict=True)
    if status == "ok" and saw and _call_counts(call, config)
  )
  gate = vision > config.tool_threshold
  tool = min(successes, config.tool_cap) / config.tool_cap if gate else 0.0

  total = config.w_vision * vision + config.w_format * fmt + config.w_tool * tool
  return RewardBreakdown(
    total=total,
    vision=vision,
    format=fmt,
    tool=tool,
    config=config,
    n_tool_calls=len(calls),
    n_successful_tool_calls=successes,
    tool_gate_passed=gate,
    format_errors=errors,
  )
