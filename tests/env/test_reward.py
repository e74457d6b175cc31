"""Tests for rrvf_jax.env.reward: components, format errors, and the tool-reward cap and gate."""

import dataclasses
import json
import subprocess
import sys

import pytest

from rrvf_jax.env.parsing import parse_turn
from rrvf_jax.env.reward import (
  EpisodeSummary,
  RewardConfig,
  compute_reward,
  episode_tool_calls,
  final_answer,
)

CODE = "import matplotlib.pyplot as plt\nplt.bar([1, 2], [3, 4])"


def call_turn(code: str = CODE) -> str:
  """A well-formed tool-call turn."""
  body = json.dumps({"name": "render_chart", "arguments": {"code": code}})
  return f"<think>try</think>\n<tool_call>\n{body}\n</tool_call>"


def answer_turn(code: str = CODE) -> str:
  """A well-formed final-answer turn."""
  return f"<think>done</think>\n<answer>\n```python\n{code}\n```\n</answer>"


def episode(texts, tool_statuses=None, final_status="ok", score=0.8) -> EpisodeSummary:
  """Parse turn texts and build a summary; tool calls render 'ok' unless told otherwise."""
  turns = tuple(parse_turn(t) for t in texts)
  n = len(episode_tool_calls(turns))
  statuses = tuple(tool_statuses) if tool_statuses is not None else ("ok",) * n
  return EpisodeSummary(turns, statuses, final_status, score)


def test_clean_episode_with_one_tool_call():
  r = compute_reward(episode([call_turn(), answer_turn()], score=0.8))
  assert (r.vision, r.format, r.tool) == (0.8, 0.0, 1.0)
  assert r.total == pytest.approx(1.0 * 0.8 + 0.2 * 0.0 + 0.2 * 1.0)
  assert r.format_errors == () and r.n_tool_calls == 1 and r.n_successful_tool_calls == 1
  logged = r.as_dict()
  assert logged["reward/total"] == pytest.approx(r.total) and logged["reward/format_error"] == 0.0


def test_answer_without_tool_calls_gets_no_tool_reward():
  r = compute_reward(episode([answer_turn()], score=0.9))
  assert r.tool == 0.0 and r.format == 0.0 and r.total == pytest.approx(0.9)


def test_farming_tool_calls_does_not_raise_the_tool_reward_beyond_the_cap():
  one = compute_reward(episode([call_turn(), answer_turn()], score=0.7))
  many = compute_reward(
    episode([call_turn(f"x = {i}") for i in range(20)] + [answer_turn()], score=0.7)
  )
  assert many.n_successful_tool_calls == 20
  assert many.tool == one.tool == 1.0 and many.total == pytest.approx(one.total)
  cap2 = RewardConfig(tool_cap=2)
  assert compute_reward(episode([call_turn(), answer_turn()], score=0.7), cap2).tool == 0.5
  farm2 = compute_reward(episode([call_turn()] * 9 + [answer_turn()], score=0.7), cap2)
  assert farm2.tool == 1.0


def test_tool_reward_is_zero_when_the_final_score_is_at_or_below_the_threshold():
  texts = [call_turn(), call_turn(), answer_turn()]
  low = compute_reward(episode(texts, score=0.4))
  at = compute_reward(episode(texts, score=0.5))
  above = compute_reward(episode(texts, score=0.51))
  assert low.tool == at.tool == 0.0 and not low.tool_gate_passed
  assert above.tool == 1.0 and above.tool_gate_passed
  assert compute_reward(episode(texts, score=0.4), RewardConfig(tool_threshold=0.3)).tool == 1.0


def test_failed_tool_renders_do_not_count():
  texts = [call_turn(), call_turn(), answer_turn()]
  r = compute_reward(episode(texts, tool_statuses=("runtime_error", "timeout"), score=0.9))
  assert r.tool == 0.0 and r.n_successful_tool_calls == 0
  assert r.format == 0.0  # a tool call whose code crashed is well formed: the feedback teaches it
  r = compute_reward(episode(texts, tool_statuses=("runtime_error", "ok"), score=0.9))
  assert r.tool == 1.0


def test_final_code_that_does_not_render_gives_zero_vision_and_a_format_penalty():
  r = compute_reward(
    episode([call_turn(), answer_turn()], final_status="runtime_error", score=None)
  )
  assert r.vision == 0.0 and r.format == -1.0 and r.tool == 0.0
  assert "final_render:runtime_error" in r.format_errors
  assert r.total == pytest.approx(-0.2)


def test_no_answer_is_a_format_error():
  r = compute_reward(episode([call_turn(), call_turn()], final_status=None, score=None))
  assert r.format_errors == ("no_answer",) and r.vision == 0.0 and r.tool == 0.0
  assert r.total == pytest.approx(-0.2)


@pytest.mark.parametrize(
  "bad_turn, error",
  [
    ("{'name': 'render_chart', 'arguments': {'code': 'x = 1'}}", "turn0:tool_call:single_quotes"),
    (
      '{"name": "render_chart", "arguments": {"code": "a\nb"}}',
      "turn0:tool_call:raw_control_chars",
    ),
    ('{"name": "draw", "arguments": {"code": "x"}}', "turn0:tool_call:unknown_tool"),
  ],
)
def test_malformed_tool_calls_are_format_errors_and_do_not_earn_tool_reward(bad_turn, error):
  texts = [f"<think>a</think><tool_call>{bad_turn}</tool_call>", answer_turn()]
  r = compute_reward(episode(texts, tool_statuses=("ok",), score=0.9))
  assert error in r.format_errors and r.format == -1.0
  assert r.tool == 0.0 and r.vision == 0.9


def test_lenient_mode_accepts_repaired_calls():
  texts = [
    "<think>a</think><tool_call>{'name': 'render_chart', 'arguments': {'code': 'x'}}</tool_call>"
  ]
  summary = episode([*texts, answer_turn()], score=0.9)
  lenient = compute_reward(summary, RewardConfig(strict_tool_calls=False))
  assert lenient.format == 0.0 and lenient.tool == 1.0
  assert compute_reward(summary).format == -1.0


@pytest.mark.parametrize(
  "texts, error",
  [
    ([call_turn(), "<think>a</think><answer>x = 1"], "answer:unclosed"),
    ([call_turn(), "<think>a</think><answer></answer>"], "answer:empty"),
    (["<think>a<tool_call>{}</tool_call>", answer_turn()], "turn0:unbalanced_think"),
    ([call_turn() + "<answer>x</answer>"], "turn0:tool_call_and_answer"),
    (["<think>hmm</think> nothing", answer_turn()], "turn0:no_action"),
  ],
)
def test_turn_level_format_errors(texts, error):
  turns = tuple(parse_turn(t) for t in texts)
  statuses = tuple("ok" if c.executable else None for c in episode_tool_calls(turns))
  r = compute_reward(EpisodeSummary(turns, statuses, "ok", 0.7))
  assert error in r.format_errors and r.format == -1.0


def test_missing_think_only_counts_when_required():
  texts = [answer_turn().replace("<think>done</think>\n", "")]
  assert compute_reward(episode(texts)).format == 0.0
  assert compute_reward(episode(texts), RewardConfig(require_think=True)).format == -1.0


def test_weights_are_configurable():
  cfg = RewardConfig(w_vision=0.2, w_format=0.8, w_tool=1.0)
  r = compute_reward(episode([call_turn(), answer_turn()], score=0.6), cfg)
  assert r.total == pytest.approx(0.2 * 0.6 + 1.0)
  assert r.config is cfg


def test_summary_validation():
  turns = (parse_turn(call_turn()), parse_turn(answer_turn()))
  with pytest.raises(ValueError, match="tool_render_statuses"):
    EpisodeSummary(turns, (), "ok", 0.5)
  with pytest.raises(ValueError, match="final_score"):
    EpisodeSummary(turns, ("ok",), "ok", 1.5)
  with pytest.raises(ValueError, match="final_score is missing"):
    compute_reward(EpisodeSummary(turns, ("ok",), "ok", None))
  with pytest.raises(ValueError):
    RewardConfig(tool_cap=0)


@dataclasses.dataclass
class FakeRender:
  status: str


@dataclasses.dataclass
class FakeJudgement:
  score: float


def test_env_modules_do_not_import_jax():
  # DESIGN.md §2: env/ runs in host worker processes and must not pull in JAX.
  code = (
    "import sys, rrvf_jax.env.parsing, rrvf_jax.env.reward, rrvf_jax.env.judges, "
    "rrvf_jax.testing.fake_judge_server; sys.exit('jax' in sys.modules)"
  )
  assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_from_results_and_final_answer():
  turns = [parse_turn(call_turn()), parse_turn(call_turn()), parse_turn(answer_turn("y = 2"))]
  summary = EpisodeSummary.from_results(
    turns, [FakeRender("ok"), None], FakeRender("ok"), FakeJudgement(0.75)
  )
  assert summary.tool_render_statuses == ("ok", None)
  r = compute_reward(summary)
  assert r.vision == 0.75 and r.tool == 1.0 and r.n_successful_tool_calls == 1
  assert final_answer(turns) == "y = 2" and final_answer(turns[:1]) is None


def test_a_call_whose_response_the_policy_never_saw_earns_no_tool_reward():
  # Regression: a call rendered but cut at the budget (its response never appended) counted as a
  # successful tool use.
  turns = tuple(parse_turn(t) for t in (call_turn(), answer_turn()))
  unseen = EpisodeSummary(turns, ("ok",), "ok", 0.9, tool_calls_seen=(False,))
  seen = EpisodeSummary(turns, ("ok",), "ok", 0.9, tool_calls_seen=(True,))
  assert compute_reward(unseen).tool == 0.0 and compute_reward(unseen).n_successful_tool_calls == 0
  assert compute_reward(seen).tool == 1.0
  with pytest.raises(ValueError, match="tool_calls_seen"):
    EpisodeSummary(turns, ("ok",), "ok", 0.9, tool_calls_seen=())


def test_an_answer_cut_off_inside_answer_earns_no_vision_reward():
  # Regression: code cut off by the token limit inside <answer> still earned R_vision when it
  # happened to render.
  turns = (parse_turn("<think>a</think><answer>\nimport matplotlib.pyplot as plt\nplt.plot([1"),)
  assert turns[0].answer is not None and not turns[0].answer.ok
  r = compute_reward(EpisodeSummary(turns, (), "ok", 0.9))
  assert r.vision == 0.0 and r.format == -1.0 and "answer:unclosed" in r.format_errors
