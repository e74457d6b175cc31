"""Multi-turn RRVF episodes: sample a turn, render and judge its tool call, append feedback, repeat.

`run_episodes` plays G episodes for each target image on either engine: the lock-step `Sampler`
(turn by turn: every active row decodes, then every row's next turn is appended at the shared
offset) or the `PagedSampler` (continuous batching: a row leaves its decode slot when its turn
ends and comes back when its renders are done, at its own position, with its own budget). What
happens to each row is the same on both:

1. Each prompt (system block with the task's render-tool schema, the target image, the instruction,
   the assistant header) is prefilled once and forked into G rows that share the prefill.
2. The rows decode their next assistant turn. Each reply is parsed (`env.parse_turn`):
   - an `<answer>` ends the episode; its code is rendered and judged in 'score' mode (R_vision) in
     the background while the other rows keep decoding. An answer cut off inside `<answer>` by the
     turn's token cap is a cut-off ('turn_length'), neither rendered nor rewarded;
   - neither a tool call nor an answer ends the episode (no answer: R_vision = 0, R_format = -1);
   - a tool call is rendered as soon as the reply is parsed (all of a turn's renders are queued
     before anything blocks), the render is judged in 'feedback' mode and preprocessed in a thread
     pool, and a tool-response turn is appended to the cache without re-prefilling: the rendered
     image and the judge's feedback, or the error text and no image when the render failed
     (DESIGN.md §4). Invalid calls get the parser's message. A response longer than
     `max_response_tokens` has its text cut in the middle (`chat.fit_appended_turn`), so every
     appended turn has a known bound and the budget's worst case is computable
     (`budget.worst_case`).
3. Limits. `max_turns` assistant turns per episode, and `max_total_tokens` tokens per trajectory
   (every trajectory fits it; on the lock-step engine the shared cache can also stop the tool
   loop of every row when another turn would not fit it, on the paged one nothing else can). A row
   that still calls the tool when a limit stops it is, per `on_budget`,
   - 'force_answer': given a short user turn asking for the final answer instead of the tool
     response (that last call is not run) and sampled once more. This extra turn is the only one
     beyond `max_turns`; room for it is reserved, so a normal turn only starts when the forced
     answer could still follow it;
   - 'fail': ended without an answer (scored like any episode without one).
4. Every finished episode gets its reward from `env.compute_reward`; only tool calls whose response
   the policy saw count toward R_tool.
5. Judge outages: with `judge_failure='raise'` a `JudgeUnavailableError` ends the call (the judge's
   own policy decides how long to wait first); with 'drop' the row is marked `judge_failed` (its
   group is then left out of the update by the GRPO stage) and the episode goes on without comments.

Trajectories are token-exact (DESIGN.md §3): `token_ids` are exactly the ids the sampler saw, in
order (prompt, each sampled turn with its stop token, each appended turn); `loss_mask` is 1 only on
sampled tokens; `old_logprobs` are the sampler's log-probs there (under the sampling temperature),
0 elsewhere. A turn cut at `max_new_tokens` before `<|im_end|>` is closed by an `<|im_end|>` at the
start of the next appended turn, which is not a policy token. `batch.to_model_inputs` pads
trajectories into next-token training arrays for the GRPO loss.

Timing: the sampler calls are synchronous on the host (`generate` fetches its tokens), so the wall
time outside them is time the device has no work; `EpisodeStats` reports it with the render and
judge times.

This module is the driver. What it returns (`Trajectory`, `EpisodeStats`, ...) is in
`rollout.records`, the episode budget in `rollout.budget`, the trainer's arrays in `rollout.batch`;
their names are re-exported here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np
from absl import logging

from rrvf_jax import env
from rrvf_jax.processing import chat, image, tokens
from rrvf_jax.rollout import answer_check, paged
from rrvf_jax.rollout import sampler as sampler_lib
from rrvf_jax.rollout import sampling as sampling_lib
from rrvf_jax.rollout.batch import PolicyBatch, to_model_inputs, token_arrays
from rrvf_jax.rollout.budget import Budget, force_answer_tokens, nudge_ids, worst_case
from rrvf_jax.rollout.records import (
  END_REASONS,
  EpisodeBatch,
  EpisodeStats,
  Span,
  SpanSource,
  ToolCallRecord,
  Trajectory,
  TurnRecord,
)

# The records, the budget and the batch building are re-exported: code that imports them from the
# driver's module, as all of it did before they moved, keeps working.
__all__ = [
  "END_REASONS",
  "JUDGE_FAILURE",
  "ON_BUDGET",
  "Budget",
  "EpisodeBatch",
  "EpisodeStats",
  "JudgeFailure",
  "OnBudget",
  "PolicyBatch",
  "RenderSubmit",
  "Span",
  "SpanSource",
  "ToolCallRecord",
  "Trajectory",
  "TurnRecord",
  "episode_sampling_params",
  "force_answer_tokens",
  "run_episodes",
  "to_model_inputs",
  "token_arrays",
  "worst_case",
]

OnBudget = Literal["force_answer", "fail"]
ON_BUDGET: tuple[str, ...] = ("force_answer", "fail")

# A renderer: code -> future of an env.RenderResult (env.submit_chart with a canvas, or
# env.HtmlRenderer(...).submit).
RenderSubmit = Callable[[str], "concurrent.futures.Future[env.RenderResult]"]

JudgeFailure = Literal["raise", "drop"]
JUDGE_FAILURE: tuple[str, ...] = ("raise", "drop")


def episode_sampling_params(
  tokenizer: tokens.Tokenizer,
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> sampling_lib.SamplingParams:
  """Sampling settings for episode turns: a turn ends at `<|im_end|>` (or `<|endoftext|>`)."""
  return sampling_lib.SamplingParams(
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    stop_token_ids=tokens.special_token_ids(tokenizer).eos_token_ids,
  )


# --------------------------------------------------------------------------------------------------
# Background work: render -> (judge, preprocess), chained on futures.


@dataclasses.dataclass(frozen=True)
class _Outcome:
  """A finished render and what was computed from it off the main thread."""

  render: env.RenderResult
  judge: env.JudgeResult | None
  pixels: image.ProcessedImages | None
  render_s: float
  judge_s: float
  draft_score: float | None = None  # 'score'-mode judgement of a tool call's render, if asked
  judge_error: str | None = None  # the judge was unavailable (judge_failure='drop')


def _then(
  first: concurrent.futures.Future, fn: Callable[[Any], Any], pool: concurrent.futures.Executor
) -> concurrent.futures.Future:
  """A future of `fn(first.result())`, run on `pool` once `first` is done (no thread waits)."""
  out: concurrent.futures.Future = concurrent.futures.Future()

  def copy(inner: concurrent.futures.Future) -> None:
    if inner.cancelled():
      out.cancel()
    elif inner.exception() is not None:
      out.set_exception(inner.exception())
    else:
      out.set_result(inner.result())

  def start(done: concurrent.futures.Future) -> None:
    if done.cancelled():
      out.cancel()
      return
    error = done.exception()
    if error is not None:
      out.set_exception(error)
      return
    try:
      pool.submit(fn, done.result()).add_done_callback(copy)
    except RuntimeError as e:  # the pool was shut down (the episode loop failed)
      out.set_exception(e)

  first.add_done_callback(start)
  return out


class _Host:
  """Submits renders and chains judging (and image preprocessing) on a thread pool."""

  def __init__(
    self,
    render_submit,
    judge,
    target_images,
    task,
    proc_cfg,
    workers: int,
    *,
    score_drafts: bool,
    judge_failure: JudgeFailure,
  ):
    self.render_submit = render_submit
    self.judge = judge
    self.targets = target_images
    self.task = task
    self.proc_cfg = proc_cfg
    self.score_drafts = score_drafts
    self.drop_on_failure = judge_failure == "drop"
    self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="episode-host")

  def submit(self, code: str, prompt_index: int, mode: str) -> concurrent.futures.Future:
    """Queues a render of `code`; the future resolves to an `_Outcome`."""
    submitted = time.perf_counter()
    render = self.render_submit(code)

    def after(result: env.RenderResult) -> _Outcome:
      render_s = time.perf_counter() - submitted
      if not result.ok or result.image is None:
        return _Outcome(result, None, None, render_s, 0.0)
      start = time.perf_counter()
      target = self.targets[prompt_index]
      try:
        verdict = self.judge.judge(target, result.image, kind=self.task, code=code, mode=mode)
        draft_score = None
        if mode == "feedback" and self.score_drafts:
          scored = self.judge.judge(target, result.image, kind=self.task, code=code, mode="score")
          draft_score = scored.score
      except env.JudgeUnavailableError as e:
        if not self.drop_on_failure:
          raise
        logging.warning("episode: judge unavailable, the episode's group is dropped: %s", e)
        verdict, draft_score = None, None
        error = str(e)
      else:
        error = None
      judge_s = time.perf_counter() - start
      pixels = (
        image.preprocess_images([result.image], self.proc_cfg) if mode == "feedback" else None
      )
      return _Outcome(result, verdict, pixels, render_s, judge_s, draft_score, error)

    return _then(render, after, self.pool)

  def close(self) -> None:
    """Waits for running judge calls and drops queued ones."""
    self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# Per-row state.


@dataclasses.dataclass
class _Piece:
  ids: np.ndarray
  source: SpanSource
  turn: int
  logprobs: np.ndarray | None = None  # set on policy pieces only


@dataclasses.dataclass
class _Turn:
  index: int
  start: int
  end: int
  completion: sampler_lib.Completion
  parsed: env.ParsedTurn
  forced: bool
  calls: list[ToolCallRecord]
  response: tuple[int, int] | None = None


@dataclasses.dataclass
class _Row:
  prompt_index: int
  group_index: int
  pieces: list[_Piece]
  images: list[tuple[np.ndarray, np.ndarray]]
  length: int
  turns: list[_Turn] = dataclasses.field(default_factory=list)
  # Render result (or None: not run) of each tool call, in order over the turns.
  tool_renders: list[env.RenderResult | None] = dataclasses.field(default_factory=list)
  state: Literal["sample", "forced", "done"] = "sample"
  # The turn's executable calls being rendered: (call index in the turn, future of _Outcome).
  pending: list[tuple[int, concurrent.futures.Future]] = dataclasses.field(default_factory=list)
  final: concurrent.futures.Future | None = None
  end_reason: str | None = None
  limit: str | None = None
  forced_answer: bool = False
  judge_failed: bool = False

  def add(self, ids: np.ndarray, source: SpanSource, turn: int, logprobs=None) -> tuple[int, int]:
    """Appends tokens to the trajectory; returns their `[start, end)`."""
    start = self.length
    self.pieces.append(_Piece(np.asarray(ids, np.int32), source, turn, logprobs))
    self.length += len(ids)
    return start, self.length


def _empty_segment() -> sampler_lib.Segment:
  """Nothing new for a row."""
  return sampler_lib.Segment(np.zeros((0,), np.int32))


def _append_segment(
  tok: tokens.Tokenizer,
  messages: Sequence[dict[str, Any]],
  pictures: Sequence[image.ProcessedImages],
  proc_cfg: image.ImageProcessorConfig,
  close_open_turn: bool,
  max_tokens: int | None = None,
) -> sampler_lib.Segment:
  """The tokens (and images) appended after an assistant turn, ending with the next header.

  With `max_tokens` the messages' text is cut in the middle until the segment fits.
  """
  grids = (
    np.concatenate([p.image_grid_thw for p in pictures]) if pictures else np.zeros((0, 3), np.int64)
  )
  kwargs = {
    "image_grids": grids,
    "merge_size": proc_cfg.merge_size,
    "close_open_turn": close_open_turn,
  }
  if max_tokens is None:
    piece = chat.append_turn_ids(tok, messages, **kwargs)
  else:
    _, piece = chat.fit_appended_turn(tok, messages, max_tokens=max_tokens, **kwargs)
  if not pictures:
    return sampler_lib.Segment(piece.input_ids)
  pixels = np.concatenate([p.pixel_values for p in pictures])
  return sampler_lib.Segment(piece.input_ids, pixels, grids)


def _check_target(target: Any, index: int) -> np.ndarray:
  """A target as uint8 HxWx3, or a ValueError naming it."""
  array = np.asarray(target)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
    raise ValueError(f"target {index} must be a uint8 HxWx3 image, got {array.dtype} {array.shape}")
  return array


# --------------------------------------------------------------------------------------------------
# The driver.


def run_episodes(
  sampler: sampler_lib.Sampler,
  targets: Sequence[np.ndarray],
  *,
  group_size: int,
  task: str,
  render_submit: RenderSubmit,
  judge: env.Judge,
  sampling: sampling_lib.SamplingParams,
  key: jax.Array,
  max_turns: int = 5,
  max_total_tokens: int | None = None,
  on_budget: OnBudget = "force_answer",
  instruction: str | None = None,
  system_prompt: str = chat.DEFAULT_SYSTEM_PROMPT,
  proc_cfg: image.ImageProcessorConfig | None = None,
  reward_config: env.RewardConfig | None = None,
  force_answer_prompt: str = env.FORCE_ANSWER_PROMPT,
  host_workers: int = 8,
  max_error_chars: int = 1500,
  max_response_tokens: int | None = None,
  score_drafts: bool = False,
  judge_failure: JudgeFailure = "raise",
  first_row: int = 0,
) -> EpisodeBatch:
  """Plays `group_size` episodes per target image and returns token-exact, rewarded trajectories.

  Args:
    sampler: the policy's sampler (`Sampler`, or anything with its prefill / fork / generate /
      append / tokenizer / cache_length / buckets interface).
    targets: uint8 HxWx3 target images, one prompt each.
    group_size: G samples per target; trajectory `b * G + g` is sample g of target b.
    task: 'chart' or 'web': the tool schema, the parser and the judge's kind.
    render_submit: code -> future of an `env.RenderResult` (the sandboxed renderer at the canvas).
    judge: compares renders with targets; 'feedback' mode for tool calls, 'score' for answers.
    sampling: how each turn is sampled (see `episode_sampling_params`); `max_new_tokens`
      caps one turn.
    key: PRNG key (turn t samples with `fold_in(key, t)`).
    max_turns: assistant turns per episode (a forced answer comes on top).
    max_total_tokens: tokens per trajectory at most (None: the sampler's cache length).
    on_budget: what happens to a row still calling the tool at a limit: 'force_answer' or 'fail'.
    instruction: the user instruction after the target image (None: `env.task_instruction(task)`).
    system_prompt: the system text; the tool schema is appended to it.
    proc_cfg: the image processor for the target and the rendered images (None: the defaults).
    reward_config: reward weights and rules (None: `env.RewardConfig()`).
    force_answer_prompt: the user turn that asks for the final answer.
    host_workers: threads that judge and preprocess renders.
    max_error_chars: render error text longer than this is cut in the middle.
    max_response_tokens: an appended tool response (images, text, the next header) has at most
      this many tokens; longer text is cut in the middle (None: no limit).
    score_drafts: also judge each tool call's render in 'score' mode (`ToolCallRecord.draft_score`,
      `Trajectory.first_draft_score`): the first draft's R_vision for evaluation tables.
    judge_failure: 'raise' (a `JudgeUnavailableError` ends the call) or 'drop' (the row goes on
      without comments and is marked `judge_failed`).
    first_row: the global id of this call's first row (multi-host: this host's offset). Row b
      samples with its own key, `fold_in(fold_in(key, turn), first_row + b)`, so the samples do not
      depend on how the rows are split over hosts.

  Returns:
    An `EpisodeBatch` of `len(targets) * group_size` trajectories and the call's `EpisodeStats`.
  """
  wall_start = time.perf_counter()
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  if max_turns < 1:
    raise ValueError(f"max_turns must be >= 1, got {max_turns}")
  if on_budget not in ON_BUDGET:
    raise ValueError(f"on_budget must be one of {ON_BUDGET}, got {on_budget!r}")
  if judge_failure not in JUDGE_FAILURE:
    raise ValueError(f"judge_failure must be one of {JUDGE_FAILURE}, got {judge_failure!r}")
  if not len(targets):
    raise ValueError("run_episodes needs at least one target image")
  env.tool_for_kind(task)  # a clear error for an unknown task
  target_images = [_check_target(t, i) for i, t in enumerate(targets)]
  proc_cfg = proc_cfg or image.ImageProcessorConfig()
  stats = EpisodeStats()

  start = time.perf_counter()
  prompts = [
    answer_check.prompt_segment(
      sampler.tokenizer,
      target,
      instruction=env.task_instruction(task) if instruction is None else instruction,
      proc_cfg=proc_cfg,
      system_prompt=system_prompt,
      tools=env.tool_schemas(task),
    )
    for target in target_images
  ]
  driver = _Driver(
    sampler=sampler,
    task=task,
    proc_cfg=proc_cfg,
    stats=stats,
    max_turns=max_turns,
    budget=sampler.cache_length if max_total_tokens is None else int(max_total_tokens),
    new_tokens=sampling.max_new_tokens,
    forcing=on_budget == "force_answer",
    force_answer_prompt=force_answer_prompt,
    max_error_chars=max_error_chars,
    max_response_tokens=max_response_tokens,
  )
  driver.check_first_turn(prompts)
  rows = [
    _Row(b, g, [_Piece(np.asarray(p.token_ids, np.int32), "prompt", -1)], [], len(p.token_ids))
    for b, p in enumerate(prompts)
    for g in range(group_size)
  ]
  for row in rows:
    p = prompts[row.prompt_index]
    row.images.append((p.pixel_values, np.asarray(p.image_grid_thw).reshape(-1, 3)))
  stats.prepare_s = time.perf_counter() - start

  host = _Host(
    render_submit,
    judge,
    target_images,
    task,
    proc_cfg,
    host_workers,
    score_drafts=score_drafts,
    judge_failure=judge_failure,
  )
  try:
    if isinstance(sampler, paged.PagedSampler):
      _play_paged(driver, sampler, prompts, rows, host, sampling, key, first_row, group_size)
    else:
      _play_lock_step(driver, sampler, prompts, rows, host, sampling, key, first_row, group_size)
    start = time.perf_counter()
    finals = [None if r.final is None else r.final.result() for r in rows]
    stats.host_wait_s += time.perf_counter() - start
  finally:
    host.close()
  config = reward_config or env.RewardConfig()
  trajectories = [
    _finish(row, final, config, stats) for row, final in zip(rows, finals, strict=True)
  ]
  stats.episodes = len(trajectories)
  stats.wall_s = time.perf_counter() - wall_start
  return EpisodeBatch(trajectories, stats, group_size)


def _play_lock_step(driver, sampler, prompts, rows, host, sampling, key, first_row, group_size):
  """Plays the rows turn by turn on the lock-step `Sampler`: every row decodes, then every row's
  next turn is appended (all at the session's shared offset)."""
  session = driver.timed(sampler.prefill, prompts)
  session = driver.timed(sampler.fork, session, group_size)
  turn = 0
  while any(r.state != "done" for r in rows):
    active = np.array([r.state != "done" for r in rows])
    turn_key = jax.random.fold_in(key, turn)
    session, completions = driver.timed(
      sampler.generate, session, sampling, turn_key, active=active, first_row=first_row
    )
    driver.stats.decode_calls += 1
    for row, completion in zip(rows, completions, strict=True):
      if row.state != "done":
        driver.take_turn(row, completion, turn, host)
    segments = driver.next_segments(rows, turn, session)
    session = driver.timed(sampler.append, session, segments)
    turn += 1
  driver.stats.kv_slots_peak = session.offset * session.batch_size


def _play_paged(driver, sampler, prompts, rows, host, sampling, key, first_row, group_size):
  """Plays the rows with continuous batching on the `PagedSampler`.

  A row takes a decode slot when its next turn is ready and leaves it when the turn ends; its
  renders and judge calls then run while the other rows decode, and its tool response is appended
  at its own position as soon as they are done. Each row has its own budget; none waits for or is
  cut by another. Row r's turn t samples with `fold_in(fold_in(key, t), first_row + r)`.

  With a pool smaller than every row's budget (`num_pages`), a row whose next step needs pages
  the pool does not have waits (its pages kept) until finished rows free some; when no row can
  move, a `PoolExhaustedError` says how many pages were missing.
  """
  total = len(rows)
  sampler.start(total)
  if driver.budget > sampler.cache_length:
    raise ValueError(
      f"max_total_tokens={driver.budget} but the PagedSampler's pool holds "
      f"{sampler.cache_length} tokens; build it with more pages"
    )
  loop = _PagedLoop(driver, sampler, rows, [0] * total, key, first_row, sampling.max_new_tokens)
  loop.prompts.extend(enumerate(prompts))
  loop.group_size = group_size
  while loop.prompts or loop.ready or loop.running or loop.waiting:
    loop.append_finished_renders()
    loop.start_prompts()
    loop.fill_slots()
    if loop.running:
      driver.timed(sampler.decode, loop.running, sampling, yield_on_done=True)
      driver.stats.decode_calls += 1
      loop.end_turns(host, sampling.stop_strings)
    elif any(f for r in loop.waiting for _, f in rows[r].pending if not f.done()):
      start = time.perf_counter()  # nothing to decode: wait for the first render to finish
      futures = [f for r in loop.waiting for _, f in rows[r].pending]
      concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
      driver.stats.host_wait_s += time.perf_counter() - start
    elif loop.prompts or loop.ready or loop.waiting:
      raise paged.PoolExhaustedError(
        f"no row can continue: the page pool ({sampler.num_pages} pages of {sampler.page_size}) "
        f"is full ({sampler.allocator.free} free); build the PagedSampler with more pages"
      )
  driver.stats.kv_slots_peak = sampler.allocator.peak_used * sampler.page_size


@dataclasses.dataclass
class _PagedLoop:
  """The continuous-batching loop's queues: turns ready to decode and decoding, rows waiting."""

  driver: Any
  sampler: Any
  rows: list
  turn_of: list[int]
  key: jax.Array
  first_row: int
  max_new_tokens: int
  ready: collections.deque = dataclasses.field(default_factory=collections.deque)
  running: list = dataclasses.field(default_factory=list)
  waiting: list[int] = dataclasses.field(default_factory=list)
  # Appended turns built (and recorded) but not yet in the pool, which had no pages for them.
  segments: dict = dataclasses.field(default_factory=dict)
  # Prompts not yet prefilled, (index, segment); the G rows of prompt b are b*G .. b*G+G-1.
  prompts: collections.deque = dataclasses.field(default_factory=collections.deque)
  group_size: int = 1

  def start_prompts(self) -> None:
    """Prefills (in one call) and forks the waiting prompts the pool has pages for."""
    free = self.sampler.allocator.free - sum(self.step_pages(t) for t in self.running)
    chosen = []
    while self.prompts:
      b, prompt = self.prompts[0]
      pages = -(-len(prompt.token_ids) // self.sampler.page_size) + self.group_size - 1
      if pages > free:
        break
      free -= pages
      chosen.append(self.prompts.popleft())
    if not chosen:
      return
    g = self.group_size
    self.driver.timed(self.sampler.prefill, [b * g for b, _ in chosen], [p for _, p in chosen])
    for b, _ in chosen:
      if g > 1:
        self.driver.timed(self.sampler.fork, b * g, list(range(b * g + 1, b * g + g)))
      for r in range(b * g, b * g + g):
        self.make_ready(r)

  def make_ready(self, r: int) -> None:
    """Queues the row's next turn (its key: the turn index and the row's global id)."""
    turn_key = self.sampler.turn_key(self.key, self.turn_of[r], self.first_row + r)
    self.ready.append(paged.TurnState(r, turn_key, self.max_new_tokens))

  def step_pages(self, turn) -> int:
    """Pages the turn's row needs for its next decode call."""
    steps = min(turn.budget - len(turn.token_ids), self.sampler.decode_steps)
    return self.sampler.pages_needed(turn.row, self.sampler.rows[turn.row].length + steps)

  def fill_slots(self) -> None:
    """Moves ready turns into free decode slots while the pool has pages for their next call."""
    needed = sum(self.step_pages(t) for t in self.running)
    while self.ready and len(self.running) < self.sampler.slots:
      if needed + self.step_pages(self.ready[0]) > self.sampler.allocator.free:
        break
      needed += self.step_pages(self.ready[0])
      self.running.append(self.ready.popleft())
    while needed > self.sampler.allocator.free:  # turns that cannot grow wait, keeping their pages
      turn = self.running.pop()
      needed -= self.step_pages(turn)
      self.ready.appendleft(turn)

  def end_turns(self, host, stop_strings) -> None:
    """Rows whose turn ended leave the slots: their renders start, or they end and free pages."""
    for t in [t for t in self.running if t.done]:
      row = self.rows[t.row]
      completion = self.sampler.completion(t, stop_strings)
      self.driver.take_turn(row, completion, self.turn_of[t.row], host)
      if row.state == "done":
        self.sampler.release(t.row)
      else:
        self.waiting.append(t.row)
    self.running = [t for t in self.running if not t.done]

  def append_finished_renders(self) -> None:
    """Appends the tool responses (or forced-answer requests) of rows whose renders are done."""
    finished = [r for r in self.waiting if all(f.done() for _, f in self.rows[r].pending)]
    appended, segments = [], []
    free = self.sampler.allocator.free
    for r in finished:
      if r not in self.segments:
        segment, _ = self.driver.row_segment(self.rows[r])
        if len(segment.token_ids):
          self.driver.record_appended(self.rows[r], segment, self.turn_of[r])
        self.segments[r] = segment
      length = self.sampler.rows[r].length + len(self.segments[r].token_ids)
      need = self.sampler.pages_needed(r, length)
      if need > free:
        continue  # the pool cannot hold it yet
      free -= need
      segment = self.segments.pop(r)
      self.waiting.remove(r)
      self.turn_of[r] += 1
      if self.rows[r].state == "done":
        self.sampler.release(r)
        continue
      appended.append(r)
      segments.append(segment)
    if appended:
      self.driver.timed(self.sampler.append, appended, segments)
      for r in appended:
        self.make_ready(r)


@dataclasses.dataclass
class _Driver:
  """The turn-by-turn decisions of `run_episodes`, with the limits they enforce."""

  sampler: Any
  task: str
  proc_cfg: image.ImageProcessorConfig
  stats: EpisodeStats
  max_turns: int
  budget: int  # tokens per trajectory
  new_tokens: int  # tokens per turn
  forcing: bool  # on_budget == 'force_answer'
  force_answer_prompt: str
  max_error_chars: int
  max_response_tokens: int | None

  def __post_init__(self) -> None:
    tok = self.sampler.tokenizer
    self.im_end = tokens.token_id(tok, tokens.IM_END)
    # The forced-answer request, after a turn that stopped at <|im_end|> (False) or did not (True).
    self.nudge_ids = {
      close: nudge_ids(tok, self.force_answer_prompt, close) for close in (False, True)
    }
    # Room a normal turn leaves for a forced answer after it: tokens, and cache slots.
    longest = len(self.nudge_ids[True])
    slots = sampler_lib.bucket_length(longest, self.sampler.buckets)
    self.reserve = longest + self.new_tokens if self.forcing else 0
    self.reserve_slots = slots + self.new_tokens if self.forcing else 0

  def timed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Runs a sampler call, counting its wall time as device time."""
    start = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      self.stats.sample_s += time.perf_counter() - start

  def check_first_turn(self, prompts: Sequence[sampler_lib.Segment]) -> None:
    """Raises a ValueError when even the first turn (and a forced answer) cannot fit."""
    for b, p in enumerate(prompts):
      need = len(p.token_ids) + self.new_tokens + self.reserve
      if need > self.budget:
        raise ValueError(
          f"prompt {b} has {len(p.token_ids)} tokens; with max_new_tokens={self.new_tokens} and "
          f"{self.reserve} tokens reserved for a forced answer it needs max_total_tokens >= "
          f"{need}, got {self.budget}"
        )
    if isinstance(self.sampler, paged.PagedSampler):
      return  # no shared cache: each row's pages hold its own budget (checked at the start)
    longest = max(len(p.token_ids) for p in prompts)
    buckets = self.sampler.buckets
    need = sampler_lib.bucket_length(longest, buckets) + self.new_tokens + self.reserve_slots
    if need > self.sampler.cache_length:
      raise ValueError(
        f"the first turn needs {need} cache slots (prompt bucket, max_new_tokens="
        f"{self.new_tokens}, {self.reserve_slots} reserved for a forced answer) but the sampler "
        f"has cache_length={self.sampler.cache_length}; build the Sampler with a larger "
        "cache_length"
      )

  def take_turn(self, row: _Row, completion: sampler_lib.Completion, turn: int, host) -> None:
    """Records a sampled turn, then ends the row or queues the renders of its tool calls."""
    logprobs = np.asarray(completion.logprobs, np.float32)
    start, end = row.add(completion.token_ids, "policy", turn, logprobs)
    parsed = env.parse_turn(completion.text, self.task)
    forced = row.state == "forced"
    record = _Turn(turn, start, end, completion, parsed, forced, [])
    row.turns.append(record)
    self.stats.turns += 1
    self.stats.policy_tokens += len(completion.token_ids)
    self.stats.tool_calls += len(parsed.tool_calls)
    row.forced_answer |= forced
    if parsed.action == "tool_call" and not forced and turn + 1 < self.max_turns:
      # Queued now, so renders run while the other rows' turns are still being parsed.
      for k, call in enumerate(parsed.tool_calls):
        if call.executable and call.status is not env.CallStatus.SKIPPED:
          row.pending.append((k, host.submit(call.code, row.prompt_index, "feedback")))
      return
    _not_run(row, record)
    if parsed.action == "answer" and not parsed.answer.ok and completion.finish_reason == "length":
      # Cut off inside <answer>: not the policy's answer, so not rendered (no R_vision).
      _end(row, "turn_length")
    elif parsed.action == "answer":
      _end(row, "answer")
      if parsed.answer.ok:
        row.final = host.submit(parsed.answer.code, row.prompt_index, "score")
    elif forced:  # the forced answer did not come: the episode ends at its limit
      _end(row, row.limit)
    elif parsed.action == "none":
      _end(row, "turn_length" if completion.finish_reason == "length" else "no_action")
    else:  # a tool call on the last allowed turn
      self.hit_limit(row, "max_turns")

  def hit_limit(self, row: _Row, limit: str) -> None:
    """A row still calling the tool reached `limit`: it gets a forced answer turn, or ends."""
    row.limit = limit
    if self.forcing:
      row.state = "forced"
    else:
      _end(row, limit)

  def next_segments(self, rows: list[_Row], turn: int, session) -> list[sampler_lib.Segment]:
    """What each row gets appended after `turn` (waits for its renders); records it on the row."""
    start = time.perf_counter()
    for row in rows:
      for _, future in row.pending:
        future.result()
    self.stats.host_wait_s += time.perf_counter() - start
    segments = [_empty_segment() for _ in rows]
    continuing: list[int] = []
    for i, row in enumerate(rows):
      if row.state == "done" or row.turns[-1].index != turn:
        continue
      segments[i], continues = self.row_segment(row)
      if continues:
        continuing.append(i)
    # The cache is shared: when another turn (and a forced answer after it) cannot fit, every row
    # still calling the tool stops at the budget.
    if continuing and self.slots(session, segments) > self.sampler.cache_length:
      logging.warning(
        "episode: the sampler's cache (cache_length=%d) cannot hold another turn; %d rows stop "
        "at the budget",
        self.sampler.cache_length,
        len(continuing),
      )
      for i in continuing:
        segments[i] = self.stop_tool_use(rows[i])
    for row, segment in zip(rows, segments, strict=True):
      if len(segment.token_ids):
        self.record_appended(row, segment, turn)
    return segments

  def row_segment(self, row: _Row) -> tuple[sampler_lib.Segment, bool]:
    """The turn appended after the row's last turn (its renders done), and whether the row goes
    on using the tool (False: it gets the forced-answer request, or nothing and ends)."""
    if row.state == "forced":  # the turn limit was hit while parsing
      return self.nudge(row), False
    segment = self.tool_response(row, self.closes_turn(row))
    if row.length + len(segment.token_ids) + self.new_tokens + self.reserve <= self.budget:
      return segment, True
    return self.stop_tool_use(row), False

  def closes_turn(self, row: _Row) -> bool:
    """Whether the row's last turn did not stop at `<|im_end|>` (the next turn closes it)."""
    last = row.turns[-1].completion.token_ids
    return not len(last) or int(last[-1]) != self.im_end

  def nudge(self, row: _Row) -> sampler_lib.Segment:
    """The forced-answer request after the row's last turn."""
    return sampler_lib.Segment(self.nudge_ids[self.closes_turn(row)])

  def slots(self, session, segments: Sequence[sampler_lib.Segment]) -> int:
    """Cache slots used once `segments` are appended, a turn decoded and a forced answer too."""
    longest = max(len(s.token_ids) for s in segments)
    appended = sampler_lib.bucket_length(longest, self.sampler.buckets) if longest else 0
    return session.offset + appended + self.new_tokens + self.reserve_slots

  def stop_tool_use(self, row: _Row) -> sampler_lib.Segment:
    """The row's tool response does not fit: it gets the forced-answer request, or ends."""
    row.turns[-1].calls = [
      dataclasses.replace(c, response_status=None, has_image=False) for c in row.turns[-1].calls
    ]
    self.hit_limit(row, "budget")
    return self.nudge(row) if self.forcing else _empty_segment()

  def tool_response(self, row: _Row, close: bool) -> sampler_lib.Segment:
    """The tool-response turn for the row's last turn (renders done); records each call."""
    record = row.turns[-1]
    outcomes = {k: future.result() for k, future in row.pending}
    row.pending = []
    messages, pictures = [], []
    for k, call in enumerate(record.parsed.tool_calls):
      outcome = outcomes.get(k)
      render = None if outcome is None else outcome.render
      verdict = None if outcome is None else outcome.judge
      if outcome is not None:
        self.stats.renders += 1
        self.stats.renders_ok += int(render.ok)
        self.stats.render_s += outcome.render_s
        self.stats.judge_s += outcome.judge_s
        self.stats.judge_calls += int(verdict is not None)
        self.stats.judge_failures += int(outcome.judge_error is not None)
        row.judge_failed |= outcome.judge_error is not None
      feedback = None if verdict is None else verdict.feedback
      response = env.make_tool_response(
        call, render, feedback, max_error_chars=self.max_error_chars
      )
      messages.append(response.to_message())
      if response.has_image:
        pictures.append(outcome.pixels)
      row.tool_renders.append(render)
      record.calls.append(
        ToolCallRecord(
          code=call.code,
          call_status=call.status.value,
          render_status=None if render is None else str(render.status),
          render_message="" if render is None else render.message,
          feedback=feedback,
          feedback_score=None if verdict is None else verdict.score,
          response_status=response.status,
          has_image=response.has_image,
          draft_score=_draft_score(outcome),
        )
      )
    return _append_segment(
      self.sampler.tokenizer, messages, pictures, self.proc_cfg, close, self.max_response_tokens
    )

  def record_appended(self, row: _Row, segment: sampler_lib.Segment, turn: int) -> None:
    """Adds an appended turn's tokens and images to the row's trajectory."""
    row.turns[-1].response = row.add(
      segment.token_ids, "nudge" if row.state == "forced" else "tool", turn
    )
    self.stats.appended_tokens += len(segment.token_ids)
    if segment.pixel_values is not None:
      grids = np.asarray(segment.image_grid_thw).reshape(-1, 3)
      pixels = np.split(segment.pixel_values, np.cumsum(grids.prod(axis=1))[:-1])
      row.images += [(p, g[None]) for p, g in zip(pixels, grids, strict=True)]


def _draft_score(outcome: _Outcome | None) -> float | None:
  """A tool call's 'score'-mode judgement: 0 when its code did not render, None when not asked."""
  if outcome is None:
    return None
  if not outcome.render.ok:
    return 0.0
  return outcome.draft_score


def _not_run(row: _Row, record: _Turn) -> None:
  """Records the turn's tool calls as not run."""
  for call in record.parsed.tool_calls:
    record.calls.append(ToolCallRecord(call.code, call.status.value))
    row.tool_renders.append(None)


def _end(row: _Row, reason: str) -> None:
  """Marks the row finished, for `reason` (one of END_REASONS)."""
  row.state, row.end_reason = "done", reason


def _finish(row: _Row, final: _Outcome | None, config: env.RewardConfig, stats) -> Trajectory:
  """The trajectory of a finished row, with its reward."""
  ids = np.concatenate([p.ids for p in row.pieces]).astype(np.int32)
  mask = np.concatenate(
    [np.full(len(p.ids), int(p.source == "policy"), np.int32) for p in row.pieces]
  )
  logprobs = np.concatenate(
    [p.logprobs if p.logprobs is not None else np.zeros(len(p.ids), np.float32) for p in row.pieces]
  ).astype(np.float32)
  spans, offset = [], 0
  for p in row.pieces:
    spans.append(Span(offset, offset + len(p.ids), p.source, p.turn))
    offset += len(p.ids)
  render = None if final is None else final.render
  verdict = None if final is None else final.judge
  if final is not None:
    stats.final_renders += 1
    stats.final_renders_ok += int(render.ok)
    stats.render_s += final.render_s
    stats.judge_s += final.judge_s
    stats.judge_calls += int(verdict is not None)
    stats.judge_failures += int(final.judge_error is not None)
    row.judge_failed |= final.judge_error is not None
  parsed = [t.parsed for t in row.turns]
  score = None
  if render is not None and render.ok:
    # A judge that could not read a score in 'score' mode gives no reward rather than an error.
    score = 0.0 if verdict is None or verdict.score is None else float(verdict.score)
  summary = env.EpisodeSummary(
    turns=tuple(parsed),
    tool_render_statuses=tuple(None if r is None else str(r.status) for r in row.tool_renders),
    final_render_status=None if render is None else str(render.status),
    final_score=score,
    # A call counts toward R_tool only if its response reached the policy (not cut at a limit).
    tool_calls_seen=tuple(c.response_status is not None for t in row.turns for c in t.calls),
  )
  turns = tuple(
    TurnRecord(
      index=t.index,
      start=t.start,
      end=t.end,
      text=t.completion.text,
      finish_reason=t.completion.finish_reason,
      parsed=t.parsed,
      forced=t.forced,
      tool_calls=tuple(t.calls),
      response=t.response,
    )
    for t in row.turns
  )
  trajectory = Trajectory(
    token_ids=ids,
    loss_mask=mask,
    old_logprobs=logprobs,
    images=tuple(row.images),
    spans=tuple(spans),
    turns=turns,
    prompt_index=row.prompt_index,
    group_index=row.group_index,
    reward=env.compute_reward(summary, config),
    end_reason=row.end_reason,
    limit=row.limit,
    forced_answer=row.forced_answer,
    final_render=render,
    final_judge=verdict,
    judge_failed=row.judge_failed,
  )
  stats.forced_answers += int(trajectory.forced_answer)
  stats.hit_max_turns += int(trajectory.limit == "max_turns")
  stats.hit_budget += int(trajectory.limit == "budget")
  stats.truncated += int(trajectory.truncated)
  return trajectory
