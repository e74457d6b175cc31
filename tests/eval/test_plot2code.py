"""Plot2Code scoring end to end: pass rate, text match with tick labels, judge rating."""

from __future__ import annotations

import pytest
from eval_programs import BAR_GT, FAILS, WRONG_TITLE

from rrvf_jax.env.judges import make_judge
from rrvf_jax.eval import (
  PLOT2CODE_JUDGE_PROMPT,
  Plot2CodeItem,
  aggregate_plot2code,
  score_plot2code,
)
from rrvf_jax.eval.judging import PLOT2CODE_SYSTEM_PROMPT
from rrvf_jax.testing import fake_judge_server
from rrvf_jax.testing.fake_judge_server import FakeJudgeServer

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 10.0, "api_key_env": None}
WHITE = "import matplotlib.pyplot as plt\nfig = plt.figure()\nfig.text(0.5, 0.5, ' ')\n"
MOVED_TITLE = BAR_GT.replace(
  'ax.set_title("Sales by Region")', 'ax.set_title("Sales by Region", y=40)'
)


def test_pass_rate_and_text_match(trace_pool):
  item = Plot2CodeItem("p0", BAR_GT)
  codes = [BAR_GT, WRONG_TITLE, MOVED_TITLE, FAILS, WHITE]
  same, title, moved, fails, white = score_plot2code([item] * len(codes), codes, pool=trace_pool)
  assert same.exec_ok and same.metrics["text"] == 1.0
  n = same.details["text_counts"]["reference"]
  assert n > 4  # tick labels count in Plot2Code (unlike ChartMimic)
  # One text differs: matched n - 1 of |R| + |G| - |M| = n + 1.
  assert title.metrics["text"] == pytest.approx((n - 1) / (n + 1))
  # Same string, but 39 axes-units away: outside the position gate.
  assert moved.metrics["text"] == pytest.approx((n - 1) / (n + 1))
  assert not fails.exec_ok and fails.metrics["text"] is None
  assert not white.exec_ok and white.status == "blank_image"
  agg = aggregate_plot2code([same, title, moved, fails, white])
  assert agg["exec_rate"] == pytest.approx(60.0)
  expected_pass = 100 * (1 + 2 * (n - 1) / (n + 1)) / 3
  assert agg["text_pass"] == pytest.approx(expected_pass)
  assert agg["text"] == pytest.approx(expected_pass * 0.6)
  assert agg["rating"] is None and agg["judge_items"] == 0


def test_rating_through_fake_server(trace_pool, monkeypatch):
  # The fake server answers in ChartMimic style; make it answer Plot2Code's format instead.
  monkeypatch.setattr(
    fake_judge_server,
    "_reply_text",
    lambda score, fmt, hint: f"Similar overall.\nRating: [[{max(1, round(score / 10))}]]",
  )
  with FakeJudgeServer() as server:
    judge = make_judge("openai", base_url=server.url, model="judge-model", **FAST)
    item = Plot2CodeItem("p0", BAR_GT)
    same, fails = score_plot2code([item, item], [BAR_GT, FAILS], pool=trace_pool, judge=judge)
    assert server.count() == 1  # failed items are not rated
    body = server.requests[0].body
  assert same.judge.score == 10.0 and same.metrics["rating"] == 10.0
  assert fails.metrics["rating"] is None
  messages = body["messages"]
  assert messages[0]["role"] == "system"
  assert messages[0]["content"][0]["text"] == PLOT2CODE_SYSTEM_PROMPT
  content = messages[1]["content"]
  assert [p["type"] for p in content] == ["text", "image_url", "image_url"]
  assert content[0]["text"] == PLOT2CODE_JUDGE_PROMPT
  agg = aggregate_plot2code([same, fails])
  assert agg["rating_pass"] == 10.0 and agg["rating"] == pytest.approx(5.0)


def test_unparsable_rating_is_left_out(trace_pool):
  # The stock fake server replies "Score: N": no "Rating: [[n]]", so the item has no rating.
  with FakeJudgeServer() as server:
    judge = make_judge("openai", base_url=server.url, model="m", **FAST)
    (r,) = score_plot2code([Plot2CodeItem("p0", BAR_GT)], [BAR_GT], pool=trace_pool, judge=judge)
  assert r.exec_ok and r.judge.score is None and not r.judge.parsed and r.judge.raw
  agg = aggregate_plot2code([r])
  assert agg["rating_pass"] is None and agg["judge_missing"] == 1
