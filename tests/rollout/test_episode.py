"""The multi-turn episode driver: control flow, token-exact trajectories, and training arrays.

Control flow runs on `FakeSampler`, which returns scripted turns through the sampler interface and
records every token a row receives. The last test runs the real sampler on the tiny random policy
and checks the recorded log-probs against a full forward over `to_model_inputs`. A random policy
almost never writes a tool call, so there only the *text* the driver parses is scripted: the
tokens, log-probs and the KV cache are the sampler's own, every sampled token is a policy token,
and the appended tool responses (with rendered images) go through the real cache.
"""

import concurrent.futures
import dataclasses
import functools
import time

import jax
import numpy as np
import pytest

from rrvf_jax import env
from rrvf_jax.models.qwen_vl import model as model_lib
from rrvf_jax.processing import chat, tokens
from rrvf_jax.rollout import SamplerStats, SamplingParams, episode
from rrvf_jax.rollout import batch as rollout_batch
from rrvf_jax.rollout import budget as budget_lib
from rrvf_jax.rollout.paged import PoolExhaustedError
from rrvf_jax.rollout.sampler import Completion, bucket_length
from rrvf_jax.testing import checkpoints
from rrvf_jax.testing.prompts import random_image
from rrvf_jax.testing.scripted import (
  INVALID_CALL,
  NO_ACTION,
  TextScriptedPagedSampler,
  TextScriptedSampler,
  answer,
  call,
)

NEW_TOKENS = 64
FAKE_BUCKETS = (64, 128, 256, 512, 1024)
RENDER_SHAPE = (56, 84, 3)  # renders differ in size from the 56x56 targets: grid (1, 4, 6)


@dataclasses.dataclass
class FakeSession:
  offset: int
  batch_size: int


class FakeSampler:
  """Scripted turns through the sampler interface; records what each row receives, in order.

  `scripts[row][k]` is the text of the row's k-th turn; `<|im_end|>` is appended and the turn is
  cut at `max_new_tokens` ('length'). Cache slots are counted like the real sampler (bucketed
  appends, decode steps of the longest row) and overflow raises like it.
  """

  def __init__(self, tok, scripts, *, cache_length=4096, buckets=FAKE_BUCKETS):
    self.tokenizer = tok
    self.scripts = scripts
    self.cache_length = cache_length
    self.buckets = buckets
    self.stats = SamplerStats()
    self.im_end = tokens.token_id(tok, tokens.IM_END)
    self.image_pad = tokens.token_id(tok, tokens.IMAGE_PAD)
    self.received: list[list[np.ndarray]] = []
    self.sampled: list[list[Completion]] = []
    self.images: list[list[np.ndarray]] = []
    self.active_calls: list[np.ndarray] = []
    self.events: list[tuple[str, object]] = []  # shared with the renderer by `play`
    self._prompts = []

  def _room(self, needed):
    if needed > self.cache_length:
      raise ValueError(f"needs {needed} cache slots, cache_length={self.cache_length}")

  def _check_images(self, segment):
    pads = int(np.sum(np.asarray(segment.token_ids) == self.image_pad))
    if segment.image_grid_thw is None:
      assert pads == 0 and segment.pixel_values is None
      return []
    grids = np.asarray(segment.image_grid_thw).reshape(-1, 3)
    assert pads == int(grids.prod(axis=1).sum()) // 4
    assert segment.pixel_values.shape[0] == int(grids.prod(axis=1).sum())
    return list(grids)

  def prefill(self, prompts):
    self.stats.prefill_rows += len(prompts)
    self._prompts = list(prompts)
    for p in prompts:
      self._check_images(p)
    offset = bucket_length(max(len(p.token_ids) for p in prompts), self.buckets)
    self._room(offset)
    return FakeSession(offset, len(prompts))

  def fork(self, session, group_size):
    rows = [p for p in self._prompts for _ in range(group_size)]
    self.received = [[np.asarray(p.token_ids)] for p in rows]
    self.images = [self._check_images(p) for p in rows]
    self.sampled = [[] for _ in rows]
    return FakeSession(session.offset, len(rows))

  def generate(self, session, params, key, active=None, first_row=0):
    del key
    active = np.ones(session.batch_size, bool) if active is None else np.asarray(active)
    self.active_calls.append(active.copy())
    self.events.append(("generate", len(self.active_calls) - 1))
    self._room(session.offset + params.max_new_tokens)
    out, steps = [], 0
    for r in range(session.batch_size):
      if not active[r]:
        out.append(Completion(np.zeros(0, np.int32), np.zeros(0, np.float32), "", "inactive"))
        continue
      text = self.scripts[r][len(self.sampled[r])]
      ids = np.asarray([*tokens.encode_text(self.tokenizer, text), self.im_end], np.int32)
      reason = "stop"
      if len(ids) > params.max_new_tokens:
        ids, reason = ids[: params.max_new_tokens], "length"
      logprobs = -(0.5 + 0.001 * np.arange(len(ids)) + 0.01 * r).astype(np.float32)
      decoded = tokens.decode(self.tokenizer, ids, skip_special_tokens=False)
      completion = Completion(ids, logprobs, decoded, reason)
      self.sampled[r].append(completion)
      self.received[r].append(ids)
      out.append(completion)
      steps = max(steps, len(ids))
    return FakeSession(session.offset + steps, session.batch_size), out

  def append(self, session, segments):
    assert len(segments) == session.batch_size
    longest = max(len(s.token_ids) for s in segments)
    for r, s in enumerate(segments):
      if len(s.token_ids):
        self.received[r].append(np.asarray(s.token_ids))
        self.images[r] += self._check_images(s)
    if not longest:
      return session
    offset = session.offset + bucket_length(longest, self.buckets)
    self._room(offset)
    return FakeSession(offset, session.batch_size)


class FakeRenderer:
  """Renders in a thread: code containing FAIL raises a NameError, other code draws a block."""

  def __init__(self, events=None):
    self.codes = []
    self.events = [] if events is None else events
    self.pool = concurrent.futures.ThreadPoolExecutor(2)

  def __call__(self, code):
    self.codes.append(code)
    self.events.append(("render", code))
    return self.pool.submit(self._render, code)

  def _render(self, code):
    time.sleep(0.005)
    if "FAIL" in code:
      return env.RenderResult("runtime_error", None, "NameError: name 'oops' is not defined")
    img = np.full(RENDER_SHAPE, 255, np.uint8)
    shade = sum(code.encode()) % 200
    img[10:40, 10 : 20 + len(code) % 50] = (shade, 90, 200 - shade)
    return env.RenderResult("ok", img)


@pytest.fixture(scope="module")
def judge():
  return env.LocalJudge()


def targets(n):
  return [random_image(100 + i, 56, 56) for i in range(n)]


def play(tok, judge, scripts, *, n_targets=1, group_size=1, cache_length=4096, **kw):
  """Runs episodes on a FakeSampler; returns (batch, sampler, renderer)."""
  sampler = FakeSampler(tok, scripts, cache_length=cache_length)
  renderer = FakeRenderer(sampler.events)
  kw.setdefault("sampling", episode.episode_sampling_params(tok, max_new_tokens=NEW_TOKENS))
  batch = episode.run_episodes(
    sampler,
    targets(n_targets),
    group_size=group_size,
    task="chart",
    render_submit=renderer,
    judge=judge,
    key=jax.random.key(0),
    **kw,
  )
  return batch, sampler, renderer


def check_token_exact(trajectory, received, sampled):
  """ids = everything the row received, in order; mask/log-probs exactly on sampled tokens."""
  np.testing.assert_array_equal(trajectory.token_ids, np.concatenate(received))
  assert trajectory.token_ids.dtype == np.int32
  policy = [s for s in trajectory.spans if s.source == "policy"]
  assert len(policy) == len(sampled) == trajectory.num_turns
  assert trajectory.num_policy_tokens == sum(len(c.token_ids) for c in sampled)
  expected_mask = np.zeros(trajectory.length, np.int32)
  expected_lp = np.zeros(trajectory.length, np.float32)
  for span, completion, turn in zip(policy, sampled, trajectory.turns, strict=True):
    assert (span.start, span.end) == (turn.start, turn.end)
    np.testing.assert_array_equal(trajectory.token_ids[span.start : span.end], completion.token_ids)
    expected_mask[span.start : span.end] = 1
    expected_lp[span.start : span.end] = completion.logprobs
  np.testing.assert_array_equal(trajectory.loss_mask, expected_mask)
  np.testing.assert_array_equal(trajectory.old_logprobs, expected_lp)
  # Spans tile [0, L): prompt first, then alternating policy turns and appended turns.
  assert trajectory.spans[0].source == "prompt" and trajectory.spans[0].start == 0
  for a, b in zip(trajectory.spans, trajectory.spans[1:], strict=False):
    assert a.end == b.start and (a.source == "policy") != (b.source == "policy")
  assert trajectory.spans[-1].end == trajectory.length


def span_text(tok, trajectory, span):
  ids = trajectory.token_ids[span.start : span.end]
  return tokens.decode(tok, ids, skip_special_tokens=False)


def test_tool_call_appends_render_and_feedback_then_answer_ends(tok, judge):
  code_1, code_2 = "plt.bar([1, 2], [3, 4])", "plt.bar([1, 2], [3, 5])"
  batch, sampler, renderer = play(tok, judge, [[call(code_1), answer(code_2)]])
  (t,) = batch.trajectories
  check_token_exact(t, sampler.received[0], sampler.sampled[0])
  assert [s.source for s in t.spans] == ["prompt", "policy", "tool", "policy"]
  assert renderer.codes == [code_1, code_2]

  record = t.turns[0].tool_calls[0]
  assert (record.render_status, record.response_status, record.has_image) == ("ok", "ok", True)
  assert record.feedback and record.code == code_1
  response = span_text(tok, t, t.spans[2])
  assert response.startswith("\n<|im_start|>user\n<tool_response>\n<|vision_start|>")
  assert record.feedback in response
  assert response.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
  assert response.count("<|image_pad|>") == 6  # the 56x84 render: grid (1, 4, 6) / 4
  assert len(t.images) == 2
  np.testing.assert_array_equal(t.images[1][1], [[1, 4, 6]])
  assert t.images[1][0].shape == (24, 1176)

  assert (t.end_reason, t.limit, t.forced_answer, t.truncated) == ("answer", None, False, False)
  assert t.final_render.ok and t.reward.vision == pytest.approx(t.final_judge.score)
  assert t.reward.n_successful_tool_calls == 1 and t.reward.format == 0.0
  assert batch.stats.renders == 1 and batch.stats.final_renders == 1
  assert batch.stats.judge_calls == 2 and batch.stats.decode_calls == 2


def test_render_failure_returns_error_text_and_no_image(tok, judge):
  batch, sampler, _ = play(tok, judge, [[call("plt.FAIL()"), answer("plt.plot([1])")]])
  (t,) = batch.trajectories
  check_token_exact(t, sampler.received[0], sampler.sampled[0])
  record = t.turns[0].tool_calls[0]
  assert (record.render_status, record.response_status, record.has_image) == (
    "runtime_error",
    "render_error",
    False,
  )
  assert record.feedback is None
  response = span_text(tok, t, t.spans[2])
  assert "Execution failed (runtime_error): NameError: name 'oops' is not defined" in response
  assert "<|image_pad|>" not in response and "<|vision_start|>" not in response
  assert len(t.images) == 1  # the target only
  assert t.reward.n_tool_calls == 1 and t.reward.n_successful_tool_calls == 0


def test_mixed_batch_shares_prefill_and_keeps_rows_apart(tok, judge):
  """Rows end at different turns; ended rows are inactive; every row stays token-exact."""
  scripts = [
    [answer("plt.plot([1])")],  # prompt 0
    [call("plt.plot([2])"), call("plt.FAIL()"), answer("plt.plot([3])")],
    [INVALID_CALL, NO_ACTION],  # prompt 1
    [NO_ACTION],
  ]
  batch, sampler, renderer = play(tok, judge, scripts, n_targets=2, group_size=2)
  assert sampler.stats.prefill_rows == 2  # one prefill per prompt, not per row
  trajectories = batch.trajectories
  assert [(t.prompt_index, t.group_index) for t in trajectories] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  for r, t in enumerate(trajectories):
    check_token_exact(t, sampler.received[r], sampler.sampled[r])
  np.testing.assert_array_equal(
    trajectories[0].token_ids[: trajectories[0].prompt_length],
    trajectories[1].token_ids[: trajectories[1].prompt_length],
  )
  assert trajectories[0].prompt_length == trajectories[1].prompt_length
  assert not np.array_equal(trajectories[1].images[0][0], trajectories[2].images[0][0])
  # Who decoded in each call: rows that ended are inactive afterwards.
  np.testing.assert_array_equal(
    np.stack(sampler.active_calls), [[1, 1, 1, 1], [0, 1, 1, 0], [0, 1, 0, 0]]
  )
  assert [t.end_reason for t in trajectories] == ["answer", "answer", "no_action", "no_action"]
  assert [t.num_turns for t in trajectories] == [1, 3, 2, 1]
  invalid = trajectories[2].turns[0].tool_calls[0]
  assert (invalid.response_status, invalid.render_status) == ("invalid_call", None)
  assert "Invalid tool call (invalid_json)" in span_text(
    tok, trajectories[2], trajectories[2].spans[2]
  )
  assert [len(t.images) for t in trajectories] == [1, 2, 1, 1]
  assert sorted(renderer.codes) == sorted(
    ["plt.plot([1])", "plt.plot([2])", "plt.FAIL()", "plt.plot([3])"]
  )
  assert trajectories[3].reward.format == -1.0 and trajectories[3].reward.vision == 0.0
  # Row 0's final answer was queued for rendering before the next decode, not after the batch.
  events = sampler.events
  assert events.index(("render", "plt.plot([1])")) < events.index(("generate", 1))
  np.testing.assert_array_equal(batch.rewards, [t.reward.total for t in trajectories])
  np.testing.assert_array_equal(batch.truncated, [False] * 4)
  stats = batch.stats
  assert (stats.episodes, stats.renders, stats.renders_ok, stats.final_renders) == (4, 2, 1, 2)
  assert stats.policy_tokens == sum(t.num_policy_tokens for t in trajectories)
  assert 0.0 <= stats.device_idle_fraction <= 1.0 and stats.render_s > 0
  assert set(stats.as_dict()) >= {"rollout/sample_s", "rollout/device_idle_fraction"}


@pytest.mark.parametrize("on_budget", ["force_answer", "fail"])
def test_max_turns(tok, judge, on_budget):
  scripts = [
    [call("plt.plot([1])"), call("plt.plot([2])"), answer("plt.plot([3])")],
    [call("plt.plot([4])"), call("plt.plot([5])"), call("plt.plot([6])")],
  ]
  batch, sampler, renderer = play(
    tok, judge, scripts, group_size=2, max_turns=2, on_budget=on_budget
  )
  for r, t in enumerate(batch.trajectories):
    check_token_exact(t, sampler.received[r], sampler.sampled[r])
    assert t.limit == "max_turns"
    assert t.turns[1].tool_calls[0].render_status is None  # the last call is not run
  first, second = batch.trajectories
  if on_budget == "fail":
    assert [t.num_turns for t in batch.trajectories] == [2, 2]
    assert all(t.end_reason == "max_turns" and t.truncated for t in batch.trajectories)
    assert all(t.reward.format == -1.0 and t.reward.vision == 0.0 for t in batch.trajectories)
    assert sorted(renderer.codes) == ["plt.plot([1])", "plt.plot([4])"]
    return
  assert [s.source for s in first.spans] == [
    "prompt",
    "policy",
    "tool",
    "policy",
    "nudge",
    "policy",
  ]
  nudge = span_text(tok, first, first.spans[4])
  assert nudge == (
    f"\n<|im_start|>user\n{env.FORCE_ANSWER_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
  )
  assert first.turns[2].forced and first.forced_answer
  assert (first.end_reason, first.truncated) == ("answer", False)
  assert first.final_render.ok and first.reward.vision > 0
  # The forced turn called the tool again: the episode ends at its limit without an answer.
  assert (second.end_reason, second.truncated, second.forced_answer) == ("max_turns", True, True)
  assert second.turns[2].tool_calls[0].render_status is None
  assert sorted(renderer.codes) == ["plt.plot([1])", "plt.plot([3])", "plt.plot([4])"]
  assert batch.stats.forced_answers == 2 and batch.stats.hit_max_turns == 2


def test_with_the_sandboxed_chart_renderer(tok, judge):
  """The real renderer's futures plug in as `render_submit`: image on success, traceback if not."""
  good = "import matplotlib.pyplot as plt\nplt.bar([1, 2, 3], [3, 1, 2], color='red')"
  bad = "import matplotlib.pyplot as plt\nplt.plot(oops)"
  canvas = env.ChartCanvas(112, 84, dpi=56)
  with env.create_chart_pool(num_workers=1) as pool:
    batch = episode.run_episodes(
      FakeSampler(tok, [[call(good), call(bad), answer(good)]]),
      targets(1),
      group_size=1,
      task="chart",
      render_submit=functools.partial(env.submit_chart, canvas=canvas, pool=pool),
      judge=judge,
      sampling=episode.episode_sampling_params(tok, max_new_tokens=NEW_TOKENS),
      key=jax.random.key(0),
    )
  (t,) = batch.trajectories
  first, second = (turn.tool_calls[0] for turn in t.turns[:2])
  assert (first.render_status, first.has_image) == ("ok", True)
  assert (second.render_status, second.has_image) == ("runtime_error", False)
  assert "NameError: name 'oops' is not defined" in span_text(tok, t, t.spans[4])
  np.testing.assert_array_equal(t.images[1][1], [[1, 6, 8]])  # 84x112 px
  assert t.final_render.ok and t.final_render.image.shape == (84, 112, 3)
  assert t.reward.vision == pytest.approx(t.final_judge.score)


class BrokenJudge(env.LocalJudge):
  """A judge whose service is down."""

  def judge(self, *args, **kwargs):
    raise env.JudgeUnavailableError("judge endpoint unreachable")


def test_judge_failure_propagates(tok):
  with pytest.raises(env.JudgeUnavailableError, match="unreachable"):
    play(tok, BrokenJudge(), [[call("plt.plot([1])"), answer("plt.plot([2])")]])


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(on_budget="retry"), "on_budget must be one of"),
    (dict(max_turns=0), "max_turns must be >= 1"),
    (dict(group_size=0), "group_size must be >= 1"),
    (dict(task="slides"), "unknown task kind 'slides'"),
    (dict(targets=[np.zeros((8, 8), np.uint8)]), r"target 0 must be a uint8 HxWx3 image"),
  ],
)
def test_bad_arguments_are_clear_errors(tok, judge, kwargs, message):
  args = dict(
    targets=targets(1),
    group_size=1,
    task="chart",
    render_submit=FakeRenderer(),
    judge=judge,
    sampling=episode.episode_sampling_params(tok, max_new_tokens=NEW_TOKENS),
    key=jax.random.key(0),
  )
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    episode.run_episodes(FakeSampler(tok, [[NO_ACTION]]), **args)


def nudge_length(tok) -> int:
  """Tokens of the forced-answer request after a turn that did not stop at <|im_end|>."""
  message = {"role": "user", "content": env.FORCE_ANSWER_PROMPT}
  return len(chat.append_turn_ids(tok, [message], close_open_turn=True))


@pytest.mark.parametrize("on_budget", ["force_answer", "fail"])
def test_token_budget(tok, judge, on_budget):
  scripts = [[call("plt.plot([1])"), answer("plt.plot([2])")]]
  probe, _, _ = play(tok, judge, [[answer("x")]])
  reserve = nudge_length(tok) + NEW_TOKENS if on_budget == "force_answer" else 0
  # The smallest budget that admits the first turn (and a forced answer after it).
  budget = probe.trajectories[0].prompt_length + NEW_TOKENS + reserve
  with pytest.raises(ValueError, match="needs max_total_tokens >="):
    play(tok, judge, scripts, max_total_tokens=budget - 1, on_budget=on_budget)
  batch, sampler, renderer = play(tok, judge, scripts, max_total_tokens=budget, on_budget=on_budget)
  (t,) = batch.trajectories
  check_token_exact(t, sampler.received[0], sampler.sampled[0])
  assert t.length <= budget and t.limit == "budget"
  # The call rendered, but its response did not fit: it was never shown to the policy.
  record = t.turns[0].tool_calls[0]
  assert (record.render_status, record.response_status, record.has_image) == ("ok", None, False)
  if on_budget == "fail":
    assert (t.num_turns, t.end_reason, t.truncated) == (1, "budget", True)
    assert renderer.codes == ["plt.plot([1])"]
  else:
    assert [s.source for s in t.spans] == ["prompt", "policy", "nudge", "policy"]
    assert (t.num_turns, t.end_reason, t.forced_answer) == (2, "answer", True)
    assert t.reward.vision > 0 and batch.stats.hit_budget == 1


def test_full_cache_stops_rows_at_budget_without_overflow(tok, judge):
  scripts = [[call("plt.plot([1])"), answer("plt.plot([2])")]]
  probe, _, _ = play(tok, judge, [[answer("x")]])
  prompt_slots = bucket_length(probe.trajectories[0].prompt_length, FAKE_BUCKETS)
  nudge_slots = bucket_length(nudge_length(tok), FAKE_BUCKETS)
  smallest = prompt_slots + NEW_TOKENS + nudge_slots + NEW_TOKENS
  with pytest.raises(ValueError, match="larger cache_length"):
    play(tok, judge, scripts, cache_length=smallest - 1)
  # Room for the first turn and a forced answer, not for a tool response and another turn.
  batch, sampler, _ = play(tok, judge, scripts, cache_length=smallest)
  (t,) = batch.trajectories
  check_token_exact(t, sampler.received[0], sampler.sampled[0])
  assert (t.limit, t.forced_answer, t.end_reason, t.num_turns) == ("budget", True, "answer", 2)


def test_to_model_inputs_shifts_for_next_token_training(tok, judge):
  scripts = [[call("plt.plot([1])"), answer("plt.plot([2])")], [NO_ACTION]]
  batch, _, _ = play(tok, judge, scripts, group_size=2)
  trajectories = batch.trajectories
  cfg = checkpoints.config_for_tokenizer("tiny", tok)
  length = max(t.length for t in trajectories) + 5
  pad = tokens.special_token_ids(tok).pad_token_id
  out = rollout_batch.to_model_inputs(cfg, trajectories, length, pad_id=pad)
  assert out.targets.shape == out.loss_mask.shape == out.old_logprobs.shape == (2, length)
  for i, t in enumerate(trajectories):
    n = t.length
    np.testing.assert_array_equal(out.inputs.input_ids[i, :n], t.token_ids)
    np.testing.assert_array_equal(out.inputs.attention_mask[i], np.arange(length) < n)
    np.testing.assert_array_equal(out.targets[i, : n - 1], t.token_ids[1:])
    np.testing.assert_array_equal(out.loss_mask[i, : n - 1], t.loss_mask[1:])
    np.testing.assert_array_equal(out.old_logprobs[i, : n - 1], t.old_logprobs[1:])
    assert not out.loss_mask[i, n - 1 :].any() and not out.old_logprobs[i, n - 1 :].any()
    # Every sampled token is some position's target; the first prompt token never is.
    assert out.loss_mask[i].sum() == t.num_policy_tokens
  assert out.inputs.pixel_values.shape[0] == sum(
    p.shape[0] for t in trajectories for p, _ in t.images
  )
  with pytest.raises(ValueError, match=r"trajectory 0 \(prompt 0, sample 0\) has \d+ tokens"):
    rollout_batch.to_model_inputs(cfg, trajectories, trajectories[0].length - 1)


def log_softmax(logits) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_real_sampler_logprobs_equal_full_forward_over_training_arrays(model, tok, judge):
  scripts = [
    [answer("plt.plot([1])")],
    [call("plt.plot([2])"), answer("plt.plot([3])")],
    # Render ok, render failure, a call on the last turn (not run), a forced answer.
    [call("plt.plot([4])"), call("plt.FAIL()"), call("plt.plot([5])"), answer("plt.plot([6])")],
    [NO_ACTION],
  ]
  sampler = TextScriptedSampler(
    model, tok, cache_length=1536, buckets=(64, 128, 256, 512), scripts=scripts
  )
  renderer = FakeRenderer()
  params = SamplingParams(
    max_new_tokens=10, temperature=1.0, stop_token_ids=tokens.special_token_ids(tok).eos_token_ids
  )
  batch = episode.run_episodes(
    sampler,
    targets(2),
    group_size=2,
    task="chart",
    render_submit=renderer,
    judge=judge,
    sampling=params,
    key=jax.random.key(4),
    max_turns=3,
    instruction="Reproduce this chart.",
  )
  trajectories = batch.trajectories
  assert sampler.stats.prefill_rows == 2
  for r, t in enumerate(trajectories):
    check_token_exact(t, sampler.received[r], sampler.sampled[r])
  assert [t.num_turns for t in trajectories] == [1, 2, 4, 1]
  assert [len(t.images) for t in trajectories] == [1, 2, 2, 1]
  assert trajectories[2].forced_answer and trajectories[2].spans[-2].source == "nudge"

  length = bucket_length(max(t.length for t in trajectories), (256, 512, 1024))
  pad = tokens.special_token_ids(tok).pad_token_id
  data = rollout_batch.to_model_inputs(model.config, trajectories, length, pad_id=pad)
  log_probs = log_softmax(model_lib.jit_forward(model, data.inputs))
  current = np.take_along_axis(log_probs, data.targets[..., None].astype(np.int64), -1)[..., 0]
  mask = data.loss_mask > 0
  assert mask.sum() == sum(t.num_policy_tokens for t in trajectories)
  np.testing.assert_allclose(current[mask], data.old_logprobs[mask], atol=1e-4, rtol=0)
  # Multi-turn rows have policy tokens after an appended image, and those match too.
  for i in (1, 2):
    after = trajectories[i].spans[2].end
    assert mask[i, after - 1 :].sum() > 0


def test_a_call_cut_at_the_budget_earns_no_tool_reward(tok, judge):
  # Regression: the rendered call whose response did not fit counted toward R_tool.
  scripts = [[call("plt.plot([1])"), answer("plt.plot([2])")]]
  probe, _, _ = play(tok, judge, [[answer("x")]])
  budget = probe.trajectories[0].prompt_length + NEW_TOKENS + nudge_length(tok) + NEW_TOKENS
  gate_open = env.RewardConfig(tool_threshold=-1.0)  # any final render passes the R_tool gate
  batch, _, _ = play(tok, judge, scripts, max_total_tokens=budget, reward_config=gate_open)
  (t,) = batch.trajectories
  assert t.limit == "budget" and t.turns[0].tool_calls[0].render_status == "ok"
  assert t.reward.tool == 0.0 and t.reward.n_successful_tool_calls == 0
  seen, _, _ = play(tok, judge, scripts, reward_config=gate_open)
  assert seen.trajectories[0].reward.tool == 1.0  # the same call, answered: it counts


def test_an_answer_cut_off_by_the_turn_cap_is_truncated_and_not_rendered(tok, judge):
  # Regression: code cut off inside <answer> was rendered, earned R_vision and was not counted
  # as truncated.
  long_code = "plt.plot([" + ", ".join(str(i) for i in range(80)) + "])"
  batch, _, renderer = play(tok, judge, [[answer(long_code)]])
  (t,) = batch.trajectories
  assert t.turns[0].finish_reason == "length" and t.turns[0].action == "answer"
  assert (t.end_reason, t.truncated, t.final_render) == ("turn_length", True, None)
  assert t.reward.vision == 0.0 and t.reward.format == -1.0 and renderer.codes == []
  np.testing.assert_array_equal(batch.truncated, [True])


def test_long_feedback_is_cut_to_max_response_tokens(tok):
  class WordyJudge(env.LocalJudge):
    def judge(self, *args, **kwargs):
      result = super().judge(*args, **kwargs)
      return dataclasses.replace(result, feedback="Comments: " + "colours differ; " * 200)

  scripts = [[call("plt.plot([1])"), answer("plt.plot([2])")]]
  batch, _, _ = play(tok, WordyJudge(), scripts, max_response_tokens=96)
  (t,) = batch.trajectories
  tool = next(s for s in t.spans if s.source == "tool")
  assert tool.end - tool.start <= 96
  text = span_text(tok, t, tool)
  assert "Comments: colours differ" in text and "[...]" in text and "<|image_pad|>" in text
  with pytest.raises(ValueError, match="images and template alone"):
    play(tok, WordyJudge(), scripts, max_response_tokens=8)


def test_worst_case_budget_gives_every_row_all_its_feedback_rounds(tok, judge):
  # Every turn calls the tool with a full-length reply and every response is as long as allowed:
  # with the computed budget, no row stops its tool loop for room before max_turns.
  max_turns, cap = 4, 96
  filler = "x = 1\n" * 40  # longer than NEW_TOKENS: each call is cut at the turn cap
  scripts = [[call(f"plt.plot([{k}])\n{filler}") for k in range(max_turns + 1)]] * 2
  probe, _, _ = play(tok, judge, [[answer("x")]])
  budget = budget_lib.worst_case(
    prompt_tokens=probe.trajectories[0].prompt_length,
    max_turns=max_turns,
    max_new_tokens=NEW_TOKENS,
    max_response_tokens=cap,
    force_answer_tokens=budget_lib.force_answer_tokens(tok),
    buckets=FAKE_BUCKETS,
  )
  batch, _, _ = play(
    tok,
    judge,
    scripts,
    group_size=2,
    max_turns=max_turns,
    max_response_tokens=cap,
    max_total_tokens=budget.tokens,
    cache_length=budget.cache_slots,
  )
  for t in batch.trajectories:
    assert t.limit == "max_turns" and t.forced_answer and t.length <= budget.tokens
    assert t.num_turns == max_turns + 1
    assert all(len(turn.text) and turn.finish_reason == "length" for turn in t.turns[:-1])
  # The slot count is exact: one slot less and the last round no longer fits.
  short, _, _ = play(
    tok,
    judge,
    scripts,
    group_size=2,
    max_turns=max_turns,
    max_response_tokens=cap,
    max_total_tokens=budget.tokens,
    cache_length=budget.cache_slots - 1,
  )
  assert all(t.limit == "budget" for t in short.trajectories)


def test_judge_outage_marks_rows_with_drop(tok):
  batch, _, _ = play(
    tok,
    BrokenJudge(),
    [[call("plt.plot([1])"), answer("plt.plot([2])")]],
    judge_failure="drop",
  )
  (t,) = batch.trajectories
  assert t.judge_failed and batch.stats.judge_failures == 2
  record = t.turns[0].tool_calls[0]
  assert record.has_image and record.feedback is None  # the render is still shown
  assert t.end_reason == "answer" and t.reward.vision == 0.0


def test_score_drafts_gives_the_first_drafts_r_vision(tok, judge):
  scripts = [
    [call("plt.plot([1])"), answer("plt.plot([2])")],
    [call("plt.FAIL()"), answer("plt.plot([2])")],
    [answer("plt.plot([3])")],
    [NO_ACTION],
  ]
  batch, _, _ = play(tok, judge, scripts, group_size=4, score_drafts=True)
  first, failed, direct, nothing = batch.trajectories
  expected = judge.judge(targets(1)[0], FakeRenderer()._render("plt.plot([1])").image).score
  assert first.first_draft_score == pytest.approx(expected) and expected > 0
  assert failed.first_draft_score == 0.0
  assert direct.first_draft_score == direct.reward.vision > 0
  assert nothing.first_draft_score == 0.0
  plain, _, _ = play(tok, judge, scripts[:1])
  assert plain.trajectories[0].first_draft_score is None  # not asked for


def paged_play(model, tok, judge, scripts, n_targets, group_size, **kw):
  """Episodes on the paged engine (scripted texts, real tokens): (batch, sampler)."""
  engine = {"row_tokens": 1536, "page_size": 8, "decode_slots": 2, "decode_steps": 4}
  engine |= kw.pop("engine", {})
  sampler = TextScriptedPagedSampler(model, tok, scripts=scripts, buckets=(64, 128, 256), **engine)
  params = SamplingParams(
    max_new_tokens=10, temperature=1.0, stop_token_ids=tokens.special_token_ids(tok).eos_token_ids
  )
  batch = episode.run_episodes(
    sampler,
    targets(n_targets),
    group_size=group_size,
    task="chart",
    render_submit=FakeRenderer(),
    judge=judge,
    sampling=params,
    key=jax.random.key(4),
    instruction="Reproduce this chart.",
    **kw,
  )
  return batch, sampler


def test_paged_engine_trajectories_are_token_exact_and_match_a_full_forward(model, tok, judge):
  # Four rows through two decode slots, four tokens per call: rows leave for renders and come back.
  scripts = [
    [answer("plt.plot([1])")],
    [call("plt.plot([2])"), answer("plt.plot([3])")],
    [call("plt.plot([4])"), call("plt.FAIL()"), call("plt.plot([5])"), answer("plt.plot([6])")],
    [NO_ACTION],
  ]
  batch, sampler = paged_play(model, tok, judge, scripts, 2, 2, max_turns=3)
  trajectories = batch.trajectories
  assert sampler.stats.prefill_rows == 2 and sampler.paged.forked_rows == 2
  for r, t in enumerate(trajectories):
    check_token_exact(t, sampler.received[r], sampler.sampled[r])
  assert [t.num_turns for t in trajectories] == [1, 2, 4, 1]
  assert [len(t.images) for t in trajectories] == [1, 2, 2, 1]
  assert trajectories[2].forced_answer and trajectories[2].spans[-2].source == "nudge"
  assert sampler.allocator.used == 0  # every finished row gave its pages back
  assert batch.stats.kv_slots_peak > 0

  length = bucket_length(max(t.length for t in trajectories), (256, 512, 1024))
  pad = tokens.special_token_ids(tok).pad_token_id
  data = episode.to_model_inputs(model.config, trajectories, length, pad_id=pad)
  log_probs = log_softmax(model_lib.jit_forward(model, data.inputs))
  current = np.take_along_axis(log_probs, data.targets[..., None].astype(np.int64), -1)[..., 0]
  mask = data.loss_mask > 0
  assert mask.sum() == sum(t.num_policy_tokens for t in trajectories)
  np.testing.assert_allclose(current[mask], data.old_logprobs[mask], atol=1e-4, rtol=0)


def test_paged_engine_gives_every_row_its_rounds_with_a_pool_of_tokens(model, tok, judge):
  # Every turn calls the tool. With a pool of max_total_tokens = the worst case in *tokens* per
  # row, each row of the paged engine gets all max_turns - 1 feedback rounds. The lock-step engine
  # pads every append to a bucket in its shared cache and needs `cache_slots` (with one slot less
  # it stops every row's tool loop: test_worst_case_budget_gives_every_row_all_its_feedback_rounds).
  max_turns = 3
  scripts = [[call(f"plt.plot([{k}, {r}])") for k in range(max_turns + 1)] for r in range(2)]
  probe, _ = paged_play(model, tok, judge, [[answer("x")]], 1, 1)
  budget = episode.worst_case(
    prompt_tokens=probe.trajectories[0].prompt_length,
    max_turns=max_turns,
    max_new_tokens=10,
    max_response_tokens=48,
    force_answer_tokens=episode.force_answer_tokens(tok),
    buckets=(64, 128, 256),
  )
  assert budget.tokens < budget.cache_slots
  limits = {"max_turns": max_turns, "max_response_tokens": 48, "max_total_tokens": budget.tokens}
  batch, _ = paged_play(
    model, tok, judge, scripts, 1, 2, engine={"row_tokens": budget.tokens}, **limits
  )
  for t in batch.trajectories:
    assert (t.limit, t.num_turns, t.forced_answer) == ("max_turns", max_turns + 1, True)
    assert sum(c.response_status is not None for turn in t.turns for c in turn.tool_calls) == 2
    assert t.length <= budget.tokens


def test_a_small_pool_makes_rows_wait_not_change(model, tok, judge):
  # A pool for about one of the four rows: rows wait for pages that finished rows free, and every
  # row's trajectory is what it is with room for all (each row samples with its own keys).
  scripts = [
    [call("plt.plot([1])"), answer("plt.plot([2])")],
    [call("plt.plot([3])"), call("plt.plot([4])"), answer("plt.plot([5])")],
    [answer("plt.plot([6])")],
    [call("plt.plot([7])"), answer("plt.plot([8])")],
  ]
  limits = {"max_turns": 3, "max_total_tokens": 300}
  roomy, _ = paged_play(model, tok, judge, scripts, 2, 2, **limits)
  lengths = [t.length for t in roomy.trajectories]
  assert max(lengths) <= 300 and sum(lengths) > 2 * 320  # the small pool holds 320 tokens
  small, sampler = paged_play(model, tok, judge, scripts, 2, 2, engine={"num_pages": 41}, **limits)
  for a, b in zip(roomy.trajectories, small.trajectories, strict=True):
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    # Other batch and page-table shapes round differently (the tokens are the same).
    np.testing.assert_allclose(a.old_logprobs, b.old_logprobs, atol=1e-5, rtol=0)
  assert small.stats.kv_slots_peak <= 320 < roomy.stats.kv_slots_peak
  assert sampler.allocator.used == 0


def test_rows_stuck_on_a_full_pool_are_a_clear_error(model, tok, judge):
  # One row's budget fits the pool, but four rows grow at once and none can finish (rows are
  # not preempted and recomputed: they wait for pages, and here none is ever freed).
  scripts = [[call("plt.plot([1])"), call("plt.plot([2])"), answer("plt.plot([3])")]] * 4
  with pytest.raises(PoolExhaustedError, match="no row can continue: the page pool"):
    paged_play(
      model, tok, judge, scripts, 1, 4, engine={"num_pages": 39}, max_turns=3, max_total_tokens=300
    )
