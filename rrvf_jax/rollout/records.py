"""What RRVF episodes leave: token-exact trajectories, their turns, tool calls and spans, stats.

`run_episodes` (`rollout.episode`) returns them as an `EpisodeBatch`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from rrvf_jax import env

# Why an episode ended. The last three are cut-offs (see `Trajectory.truncated`).
END_REASONS = ("answer", "no_action", "turn_length", "max_turns", "budget")
SpanSource = Literal["prompt", "policy", "tool", "nudge"]


@dataclasses.dataclass(frozen=True)
class Span:
  """A run of trajectory tokens `[start, end)` and where they came from.

  `source`: 'prompt' (system, target image, instruction, first assistant header), 'policy' (one
  sampled turn, stop token included), 'tool' (an appended tool-response turn and the next header),
  'nudge' (the appended forced-answer request). `turn` is the turn the span belongs to (-1: prompt).
  """

  start: int
  end: int
  source: SpanSource
  turn: int


@dataclasses.dataclass(frozen=True)
class ToolCallRecord:
  """What happened to one tool call of a turn.

  Attributes:
    code: the code the parser recovered (None: not executable).
    call_status: the parser's `CallStatus` value ('ok', a repair, or an error).
    render_status: the render's status ('ok', 'runtime_error', ...), or None when it was not run
      (not executable, skipped, or the episode stopped at a limit).
    render_message: the renderer's message (error text; empty on success).
    feedback: the judge's feedback text given to the policy (None when not judged).
    feedback_score: the judge's score in feedback mode, for logging (never shown to the policy
      unless the judge writes it into `feedback`).
    draft_score: the judge's 'score'-mode judgement of the render (only when the episodes were
      played with `score_drafts`; 0 for a draft that did not render).
    response_status: the appended tool response's status ('ok', 'render_error', 'invalid_call',
      'skipped'), or None when no response was appended (limit reached).
    has_image: whether the appended response carries the rendered image.
  """

  code: str | None
  call_status: str
  render_status: str | None = None
  render_message: str = ""
  feedback: str | None = None
  feedback_score: float | None = None
  response_status: str | None = None
  has_image: bool = False
  draft_score: float | None = None


@dataclasses.dataclass(frozen=True)
class TurnRecord:
  """One assistant turn of an episode.

  Attributes:
    index: turn number (0-based).
    start, end: the turn's sampled tokens are `token_ids[start:end]`.
    text: the decoded turn (special tokens kept), as parsed.
    finish_reason: the sampler's 'stop' or 'length' (the per-turn token cap).
    parsed: `env.parse_turn`'s result.
    forced: the turn was sampled after the forced-answer request.
    tool_calls: one record per parsed tool call.
    response: `[start, end)` of the turn appended after this one (tool response or nudge), or None.
  """

  index: int
  start: int
  end: int
  text: str
  finish_reason: str
  parsed: env.ParsedTurn
  forced: bool
  tool_calls: tuple[ToolCallRecord, ...]
  response: tuple[int, int] | None

  @property
  def action(self) -> str:
    """The parsed action: 'answer', 'tool_call' or 'none'."""
    return self.parsed.action


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectory:
  """One finished episode, token-exact.

  Attributes:
    token_ids: `[L]` int32, the whole conversation as the sampler saw it.
    loss_mask: `[L]` int32, 1 exactly on sampled tokens (each turn's tokens and its stop token).
    old_logprobs: `[L]` float32, the sampler's log-probs (at the sampling temperature) where
      `loss_mask` is 1, else 0.
    images: `(pixel_values [P, D], image_grid_thw [1, 3])` per image in order of appearance: the
      target first, then each rendered image shown in a tool response.
    spans: every token's origin, contiguous and covering `[0, L)`.
    turns: one record per assistant turn.
    prompt_index, group_index: the sample is row `prompt_index * G + group_index`.
    reward: the episode reward and its parts.
    end_reason: one of END_REASONS ('answer' also after a forced answer).
    limit: 'max_turns' or 'budget' when the episode ran into a limit (forced or not), else None.
    forced_answer: a forced-answer turn was sampled.
    final_render: the render of the final answer's code (None without a closed answer with code).
    final_judge: the judge's 'score' result on it (None when it did not render).
    judge_failed: a judge call of this episode failed (`judge_failure='drop'`): its rewards are not
      on the judge's scale, so its group must not be trained on.
  """

  token_ids: np.ndarray
  loss_mask: np.ndarray
  old_logprobs: np.ndarray
  images: tuple[tuple[np.ndarray, np.ndarray], ...]
  spans: tuple[Span, ...]
  turns: tuple[TurnRecord, ...]
  prompt_index: int
  group_index: int
  reward: env.RewardBreakdown
  end_reason: str
  limit: str | None
  forced_answer: bool
  final_render: env.RenderResult | None
  final_judge: env.JudgeResult | None
  judge_failed: bool = False

  @property
  def length(self) -> int:
    """Number of tokens."""
    return int(self.token_ids.shape[0])

  @property
  def num_turns(self) -> int:
    """Assistant turns sampled (a forced answer included)."""
    return len(self.turns)

  @property
  def num_policy_tokens(self) -> int:
    """Sampled tokens (the loss mask's sum)."""
    return int(self.loss_mask.sum())

  @property
  def prompt_length(self) -> int:
    """Tokens of the prompt (the first span)."""
    return self.spans[0].end

  @property
  def truncated(self) -> bool:
    """Cut off by a limit without a final answer (a turn's token cap, max_turns or the budget)."""
    return self.end_reason in ("turn_length", "max_turns", "budget")

  @property
  def tool_calls(self) -> int:
    """Tool calls written over the episode."""
    return sum(len(t.tool_calls) for t in self.turns)

  @property
  def first_draft_score(self) -> float | None:
    """R_vision of the first turn's code: its tool call's 'score'-mode judgement, or the answer's.

    None when the first turn called the tool but the episode was not played with `score_drafts`.
    A first turn with neither a runnable call nor an answer scores 0.
    """
    first = self.turns[0] if self.turns else None
    if first is None or first.action == "none":
      return 0.0
    if first.action == "answer":
      return self.reward.vision
    record = first.tool_calls[0]
    if record.code is None or record.render_status is None:
      return 0.0 if record.code is None else record.draft_score
    return record.draft_score if record.render_status == "ok" else 0.0


@dataclasses.dataclass
class EpisodeStats:
  """Counters and per-stage timings of one `run_episodes` call.

  Wall seconds: `wall_s` the whole call; `sample_s` inside sampler calls (prefill, fork, decode,
  append: the device's work); `host_wait_s` blocked on renders/judges with the device idle;
  `prepare_s` building prompts. `render_s` and `judge_s` are summed over all renders / judge calls
  (submit to result for renders, queueing included), so with concurrency they can exceed `wall_s`.
  """

  episodes: int = 0
  decode_calls: int = 0
  turns: int = 0
  policy_tokens: int = 0
  appended_tokens: int = 0
  tool_calls: int = 0
  renders: int = 0
  renders_ok: int = 0
  final_renders: int = 0
  final_renders_ok: int = 0
  judge_calls: int = 0
  forced_answers: int = 0
  hit_max_turns: int = 0
  hit_budget: int = 0
  truncated: int = 0
  judge_failures: int = 0
  # KV cache slots held at the peak: the lock-step cache's rows x offset; the paged pool's pages.
  kv_slots_peak: int = 0
  wall_s: float = 0.0
  prepare_s: float = 0.0
  sample_s: float = 0.0
  host_wait_s: float = 0.0
  render_s: float = 0.0
  judge_s: float = 0.0

  @property
  def device_idle_fraction(self) -> float:
    """Share of the wall time the device had no sampler work (host work and waiting)."""
    return max(0.0, 1.0 - self.sample_s / self.wall_s) if self.wall_s > 0 else 0.0

  @property
  def host_wait_fraction(self) -> float:
    """Share of the wall time the driver blocked on renders / judges with the device idle."""
    return self.host_wait_s / self.wall_s if self.wall_s > 0 else 0.0

  def as_dict(self, prefix: str = "rollout/") -> dict[str, float]:
    """Flat numbers for metrics logging."""
    out = {f"{prefix}{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self)}
    out[f"{prefix}device_idle_fraction"] = self.device_idle_fraction
    out[f"{prefix}host_wait_fraction"] = self.host_wait_fraction
    return out


@dataclasses.dataclass(frozen=True)
class EpisodeBatch:
  """What `run_episodes` returns: trajectories (row `b * G + g`) and the call's stats."""

  trajectories: list[Trajectory]
  stats: EpisodeStats
  group_size: int

  @property
  def rewards(self) -> np.ndarray:
    """float64 `[N]` total rewards, in row order (groups of `group_size` consecutive rows)."""
    return np.asarray([t.reward.total for t in self.trajectories], np.float64)

  @property
  def truncated(self) -> np.ndarray:
    """bool `[N]` rows cut off by a limit without a final answer (for overlong filtering)."""
    return np.asarray([t.truncated for t in self.trajectories], bool)
