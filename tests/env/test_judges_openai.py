"""The OpenAI-compatible judge against a real HTTP server on 127.0.0.1 (fake_judge_server)."""

import base64
import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from rrvf_jax.env.judges import (
  JudgeParseError,
  JudgeRequest,
  JudgeUnavailableError,
  OpenAIJudge,
  make_judge,
  parse_score,
)
from rrvf_jax.env.judges.openai import chat_completions_url, parse_aspects, strip_scores
from rrvf_jax.env.judges.prompts import CHART_RUBRIC, CHART_SCORE_PROMPT, WEB_SCORE_PROMPT
from rrvf_jax.testing.fake_judge_server import FakeJudgeServer

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, "api_key_env": None}


def image(value: int, size: int = 24) -> np.ndarray:
  """A small uniform RGB image."""
  return np.full((size, size, 3), value, dtype=np.uint8)


@pytest.fixture
def server():
  with FakeJudgeServer() as s:
    yield s


def make(server: FakeJudgeServer, **kw) -> OpenAIJudge:
  """An openai judge pointed at the fake server with fast retry settings."""
  judge = make_judge("openai", base_url=server.url, **{"model": "judge-model", **FAST, **kw})
  assert isinstance(judge, OpenAIJudge)
  return judge


# ------------------------------------------------------------------------------------------------
# Score parsing.


@pytest.mark.parametrize(
  "text, value",
  [
    ("Score: 85", 0.85),
    ("**Score**: 85/100", 0.85),
    ("[[85]]", 0.85),
    ("Rating: [[7/10]]", 0.7),
    ("85 out of 100", 0.85),
    ("Final Score: 8.5/10", 0.85),
    ("## Score - 90 out of 100", 0.90),
    ("The final score is 72.", 0.72),
    ("Comments:\n- Data: close, 15/20\n\nScore: 64", 0.64),
    ("Score: 10\n...revised...\nScore: 70", 0.70),
  ],
)
def test_parse_score_formats(text, value):
  assert parse_score(text).value == pytest.approx(value)


@pytest.mark.parametrize("text", ["Score: N/A", "no number here", "Score: 150", "Score: 12/10", ""])
def test_parse_score_failures_are_explicit(text):
  parsed = parse_score(text)
  assert parsed.value is None and parsed.error


def test_parse_aspects_and_strip_scores():
  text = (
    "Comments:\n- Chart Types: same, 20/20\n- Layout: one subplot missing, 5 out of 10\n"
    "- Text Content: title differs, subscore 12\n- Data: ok\n\n**Score**: 77/100"
  )
  assert parse_aspects(text, CHART_RUBRIC) == {
    "chart_types": 1.0,
    "layout": 0.5,
    "text_content": 0.6,
  }
  stripped = strip_scores(text)
  assert "77" not in stripped and "Layout: one subplot missing" in stripped


def test_url_normalisation():
  assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
  assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
  full = "http://h/api/v1/chat/completions"
  assert chat_completions_url(full) == full


# ------------------------------------------------------------------------------------------------
# Against the server.


def test_answers_well_and_sends_the_expected_request(server):
  judge = make(server)
  same = judge.judge(image(10), image(10))
  half = judge.judge(image(0), image(255 // 2 + 1), kind="web")
  assert same.score == pytest.approx(1.0) and same.source == "openai" and same.parse_ok
  assert same.aspects["chart_types"] == pytest.approx(1.0)
  assert half.score == pytest.approx(0.5)
  assert "Score" not in half.feedback and "Comments:" in half.feedback
  req = server.requests[0]
  assert req.model == "judge-model" and req.n_images == 2
  assert req.prompt == CHART_SCORE_PROMPT and server.requests[1].prompt == WEB_SCORE_PROMPT
  assert req.body["temperature"] == 0.0 and req.body["max_tokens"] == 1024
  # Reference first, then the render, as data URLs of PNGs.
  first = req.body["messages"][0]["content"][0]["image_url"]["url"]
  assert first.startswith("data:image/png;base64,")
  decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(first.split(",", 1)[1]))))
  assert (decoded == image(10)).all()


def test_cache_hit_on_repeat(server):
  judge = make(server)
  first = judge.judge(image(0), image(50))
  second = judge.judge(image(0), image(50))
  assert server.count() == 1
  assert second.cached and not first.cached and second.score == first.score
  judge.judge(image(0), image(50), mode="feedback")  # another prompt: not a hit
  judge.judge(image(0), image(51))  # another image: not a hit
  assert server.count() == 3
  m = judge.metrics()
  assert m["cache_hits"] == 1 and m["requests"] == 3 and m["calls"] == 4


def test_cache_size_bounds_entries(server):
  judge = make(server, cache_size=1)
  judge.judge(image(0), image(1))
  judge.judge(image(0), image(2))
  judge.judge(image(0), image(1))
  assert server.count() == 3


def test_identical_concurrent_requests_are_sent_once(server):
  server.mode, server.delay_s = "slow", 0.3
  judge = make(server, max_concurrency=4)
  results = judge.judge_many([JudgeRequest(image(0), image(9)) for _ in range(4)])
  assert server.count() == 1
  assert len({r.score for r in results}) == 1
  assert judge.metrics()["deduplicated"] + judge.metrics()["cache_hits"] == 3


def test_500s_are_retried_until_recovery(server):
  server.mode, server.fail_first = "error", 3
  judge = make(server, max_retries=4)
  result = judge.judge(image(0), image(0))
  assert result.source == "openai" and result.score == pytest.approx(1.0)
  m = judge.metrics()
  assert m["retries"] == 3 and m["http_errors"] == 3 and m["requests"] == 4
  assert m["failures"] == 0 and m["fallbacks"] == 0
  assert server.count() == 4


def test_backoff_grows_exponentially(server):
  server.mode, server.fail_first = "error", 3
  judge = make(server, backoff_initial_s=0.1, backoff_max_s=10, backoff_jitter=0.0)
  start = time.monotonic()
  judge.judge(image(0), image(0))
  # Delays 0.1 + 0.2 + 0.4 before the fourth (successful) request.
  assert 0.65 < time.monotonic() - start < 3.0


def test_500s_forever_fall_back_to_local_and_are_counted(server):
  server.mode, server.fail_first = "error", None
  judge = make(server, max_retries=2, on_unavailable="fallback_local")
  result = judge.judge(image(0), image(0))
  assert result.source == "fallback_local" and result.score == pytest.approx(1.0)
  assert "HTTP 500" in result.error
  m = judge.metrics()
  assert m["requests"] == 3 and m["retries"] == 2 and m["failures"] == 1 and m["fallbacks"] == 1
  # Fallback answers are not cached: the next call asks the server again.
  judge.judge(image(0), image(0))
  assert server.count() == 6


def test_fail_policy_raises_a_clear_error(server):
  server.mode, server.fail_first = "error", None
  judge = make(server, max_retries=1, on_unavailable="fail")
  with pytest.raises(JudgeUnavailableError, match="HTTP 500"):
    judge.judge(image(0), image(0))
  assert judge.metrics()["failures"] == 1 and judge.metrics()["fallbacks"] == 0


def test_wait_policy_keeps_retrying_past_max_retries(server):
  server.mode, server.fail_first = "error", 6
  judge = make(server, max_retries=1, on_unavailable="wait", max_wait_s=30)
  result = judge.judge(image(0), image(0))
  assert result.source == "openai"
  assert judge.metrics()["retries"] == 6


def test_the_default_policy_waits_and_never_answers_with_another_judge(server):
  # A training run must never mix two judges' scales in one group: the default waits it out.
  server.mode, server.fail_first = "error", 3
  judge = make(server, max_retries=1)
  assert judge.config.on_unavailable == "wait"
  result = judge.judge(image(0), image(0))
  assert result.source == "openai" and judge.metrics()["fallbacks"] == 0


def test_wait_policy_gives_up_after_max_wait(server):
  server.mode, server.fail_first = "error", None
  judge = make(server, on_unavailable="wait", max_wait_s=0.4, backoff_max_s=0.1)
  start = time.monotonic()
  with pytest.raises(JudgeUnavailableError):
    judge.judge(image(0), image(0))
  assert 0.25 < time.monotonic() - start < 3.0
  assert judge.metrics()["retries"] >= 3


def test_timeouts_are_respected_and_retried(server):
  server.mode, server.delay_s = "slow", 2.0
  judge = make(server, timeout_s=0.3, max_retries=1, on_unavailable="fallback_local")
  start = time.monotonic()
  result = judge.judge(image(0), image(0))
  elapsed = time.monotonic() - start
  assert elapsed < 1.5, elapsed  # two attempts of 0.3 s, not the server's 2 s
  assert result.source == "fallback_local" and "timed out" in result.error
  m = judge.metrics()
  assert m["timeouts"] == 2 and m["retries"] == 1 and m["fallbacks"] == 1


def test_malformed_json_is_retried_then_handled_by_policy(server):
  server.mode = "malformed"
  judge = make(server, max_retries=2, on_unavailable="fail")
  with pytest.raises(JudgeUnavailableError, match="malformed response body"):
    judge.judge(image(0), image(0))
  m = judge.metrics()
  assert m["bad_responses"] == 3 and m["retries"] == 2 and m["failures"] == 1


def test_client_errors_are_not_retried(server):
  server.mode = "reject"
  judge = make(server, on_unavailable="fail")
  with pytest.raises(JudgeUnavailableError, match="HTTP 400"):
    judge.judge(image(0), image(0))
  assert server.count() == 1 and judge.metrics()["retries"] == 0
  # A 400 is about one request, so 'fallback_local' may answer it.
  fallback = make(server, on_unavailable="fallback_local")
  assert fallback.judge(image(0), image(0)).source == "fallback_local"


def test_wrong_url_raises_even_with_fallback(server):
  judge = make_judge("openai", base_url=server.url.replace("/v1", "/nope"), **FAST)
  with pytest.raises(JudgeUnavailableError, match="404"):
    judge.judge(image(0), image(0))


def test_connection_refused_counts_and_falls_back():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # closed again before use: nothing listens there
  judge = make_judge(
    "openai",
    base_url=f"http://127.0.0.1:{port}/v1",
    **{**FAST, "max_retries": 1, "on_unavailable": "fallback_local"},
  )
  result = judge.judge(image(0), image(0))
  assert result.source == "fallback_local"
  assert judge.metrics()["connection_errors"] == 2 and judge.metrics()["fallbacks"] == 1


def test_unparsable_scores_are_explicit_failures(server):
  server.mode = "unparsable"
  judge = make(server, parse_retries=1)
  result = judge.judge(image(0), image(0))
  assert result.score == 0.0 and not result.parse_ok and result.source == "openai"
  assert "no score found" in result.error and "hard to say" in result.raw
  assert judge.metrics()["parse_failures"] == 2 and server.count() == 2
  # Unparsable replies are not cached.
  judge.judge(image(0), image(0))
  assert server.count() == 4


def test_unparsable_scores_with_other_policies(server):
  server.mode = "unparsable"
  fallback = make(server, parse_retries=0, on_parse_failure="fallback_local")
  result = fallback.judge(image(0), image(0))
  assert result.source == "fallback_local" and result.score == pytest.approx(1.0)
  assert fallback.metrics()["fallbacks"] == 1 and fallback.metrics()["parse_failures"] == 1
  strict = make(server, parse_retries=0, on_parse_failure="raise")
  with pytest.raises(JudgeParseError):
    strict.judge(image(0), image(0))


def test_feedback_mode_has_no_score_and_is_not_reparsed(server):
  server.mode = "unparsable"
  judge = make(server)
  result = judge.judge(image(0), image(0), mode="feedback")
  assert result.score is None and result.parse_ok and "hard to say" in result.feedback
  assert judge.metrics()["parse_failures"] == 0
  assert "Do not give any score" in server.requests[0].prompt


def test_concurrency_limit_is_respected(server):
  server.mode, server.delay_s = "slow", 0.15
  judge = make(server, max_concurrency=2)
  requests = [JudgeRequest(image(0), image(i)) for i in range(8)]
  results = judge.judge_many(requests)
  assert [round(r.score, 2) for r in results] == [round(1 - i / 255, 2) for i in range(8)]
  assert server.max_concurrent == 2
  # The limit also holds across threads that each call judge() directly.
  server.wait_idle()
  server.reset()
  threads = [
    threading.Thread(target=judge.judge, args=(image(1), image(100 + i))) for i in range(6)
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert server.max_concurrent == 2 and server.count() == 6


def test_circuit_opens_after_repeated_failures(server):
  server.mode, server.fail_first = "error", None
  judge = make(
    server, max_retries=0, circuit_after=2, circuit_cooldown_s=60, on_unavailable="fallback_local"
  )
  for i in range(4):
    assert judge.judge(image(0), image(i)).source == "fallback_local"
  m = judge.metrics()
  assert server.count() == 2 and m["short_circuits"] == 2 and m["fallbacks"] == 4


def test_api_key_is_sent_and_never_exposed(server, monkeypatch):
  secret = "sk-test-0123456789"
  monkeypatch.setenv("RRVF_TEST_JUDGE_KEY", secret)
  server.api_key = secret
  judge = make(server, api_key_env="RRVF_TEST_JUDGE_KEY")
  assert judge.judge(image(0), image(0)).source == "openai"
  assert server.requests[0].authorization == f"Bearer {secret}"
  assert secret not in repr(judge) and secret not in repr(judge.config)
  assert secret not in str(judge.metrics())
  # A wrong key raises even under fallback_local (it would hide a misconfiguration); key not shown.
  monkeypatch.setenv("RRVF_TEST_JUDGE_KEY", "sk-wrong")
  bad = make(server, api_key_env="RRVF_TEST_JUDGE_KEY", on_unavailable="fallback_local")
  with pytest.raises(JudgeUnavailableError) as info:
    bad.judge(image(0), image(0))
  assert "401" in str(info.value) and "sk-wrong" not in str(info.value)


def test_per_request_mode_by_model_name(server):
  judge = make(server, model="fake-judge/unparsable", parse_retries=0)
  assert not judge.judge(image(0), image(0)).parse_ok
  assert server.requests[-1].mode == "unparsable"


def test_include_code_puts_the_code_in_the_prompt(server):
  judge = make(server, include_code=True)
  judge.judge(image(0), image(0), code="plt.plot([1, 2])")
  assert "plt.plot([1, 2])" in server.requests[0].prompt
  make(server).judge(image(0), image(0), code="plt.plot([1, 2])")
  assert "plt.plot" not in server.requests[1].prompt


def test_config_validation():
  with pytest.raises(ValueError):
    OpenAIJudge(on_unavailable="retry")
  with pytest.raises(ValueError):
    OpenAIJudge(max_concurrency=0)
