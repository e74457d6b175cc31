"""ChartMimic scoring end to end in the sandbox: programs with known scores, determinism, hostile
programs, and the judge score against the fake OpenAI-compatible server."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from eval_programs import (
  BAR_GT,
  FAILS,
  HIST_INSTEAD,
  OFF_COLOUR,
  OFF_COLOUR_SIMILARITY,
  WRONG_TITLE,
  panels,
)

from rrvf_jax.env.judges import make_judge
from rrvf_jax.env.sandbox import SandboxResult
from rrvf_jax.env.types import Status
from rrvf_jax.eval import (
  CHARTMIMIC_JUDGE_PROMPT,
  ChartMimicConfig,
  ChartMimicItem,
  TraceCache,
  aggregate_chartmimic,
  score_chartmimic,
  trace_code,
)
from rrvf_jax.eval.report import results_document
from rrvf_jax.eval.trace import parse_trace
from rrvf_jax.testing.fake_judge_server import FakeJudgeServer

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 10.0, "api_key_env": None}


def f1s(result) -> tuple[float, ...]:
  """(text, layout, type, color) F1 of a result."""
  return tuple(result.metrics[m] for m in ("text", "layout", "type", "color"))


def test_known_scores_by_construction(trace_pool):
  item = ChartMimicItem("bar_1", BAR_GT)
  codes = [BAR_GT, WRONG_TITLE, OFF_COLOUR, HIST_INSTEAD, FAILS, None]
  same, title, colour, hist, fails, empty = score_chartmimic(
    [item] * len(codes), codes, pool=trace_pool
  )
  assert same.exec_ok and f1s(same) == (1.0, 1.0, 1.0, 1.0)
  # Title, x label, y label, legend entry: one of four strings differs.
  assert f1s(title) == (0.75, 1.0, 1.0, 1.0)
  assert f1s(colour)[:3] == (1.0, 1.0, 1.0)
  assert f1s(colour)[3] == pytest.approx(OFF_COLOUR_SIMILARITY, abs=2e-6)
  # hist is another plotting function: no type match, and its colour is in another group.
  assert f1s(hist) == (1.0, 1.0, 0.0, 0.0)
  for failed in (fails, empty):
    assert not failed.exec_ok and f1s(failed) == (0.0, 0.0, 0.0, 0.0)
  assert fails.status == "runtime_error" and "ValueError: boom" in fails.message
  assert empty.status == "no_code"
  # Nobody configured a judge: the score is skipped, and said so.
  assert same.judge.score is None and "no judge" in same.judge.note
  agg = aggregate_chartmimic([same, title, colour, hist, fails, empty])
  assert agg["exec_rate"] == pytest.approx(400 / 6)
  assert agg["text"] == pytest.approx(100 * 3.75 / 6)
  assert agg["type"] == pytest.approx(100 * 3 / 6)
  assert agg["overall"] is None and agg["judge_items"] == 0
  assert set(agg["by_category"]) == {"bar"}


def test_extra_subplot(trace_pool):
  item = ChartMimicItem("line_3", panels(3))
  (r,) = score_chartmimic([item], [panels(4)], pool=trace_pool)
  # 4 panels vs 3: layout, text (titles) and type (plot calls) all have P = 3/4, R = 1.
  assert r.metrics["layout"] == pytest.approx(6 / 7)
  assert r.metrics["text"] == pytest.approx(6 / 7)
  assert r.metrics["type"] == pytest.approx(6 / 7)
  assert r.metrics["color"] == 1.0  # every line is C0: one (function, colour) pair each side


def test_graph_layout_special_case(trace_pool):
  code = "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([0, 1])\n"
  ref = ChartMimicItem("graph_1", code)
  vlmevalkit, both = (
    score_chartmimic([ref], [code], pool=trace_pool, config=ChartMimicConfig(graph_layout=g))[0]
    for g in ("vlmevalkit", "both")
  )
  # VLMEvalKit gives only the reference its fixed networkx layout: an identical program misses.
  assert vlmevalkit.metrics["layout"] == 0.0
  assert both.metrics["layout"] == 1.0


def test_trace_contents(trace_pool):
  code = (
    "import matplotlib.pyplot as plt\nimport numpy as np\n"
    "fig, axs = plt.subplots(1, 2, figsize=(8, 3))\n"
    "axs[0].bar([1, 2], [3, 1], color=['#1f77b4', '#ff7f0e'])\naxs[0].set_title('Left')\n"
    "axs[1].plot([0, 1], [1, 0], color='red')\naxs[1].hist(np.arange(10.0))\n"
    "axs[1].set_xlabel('x $\\\\alpha$')\nfig.suptitle('Sup')\n"
  )
  t = trace_code(code, pool=trace_pool)
  assert t.ok and t.n_axes == 2 and t.image.shape == (300, 800, 3)
  assert sorted(t.texts) == sorted(["Left", "x $\\alpha$", "Sup"])  # no tick labels
  assert t.types == {
    "matplotlib.axes._axes-bar": 1,
    "matplotlib.axes._axes-hist": 1,  # hist's own bar calls are not counted
    "matplotlib.axes._axes-plot": 1,
  }
  # Lines come from matplotlib 3.10+'s _make_line (the benchmark's own tracer misses them).
  assert t.colors == ["bar--#1F77B4", "bar--#FF7F0E", "hist--#1F77B4", "line--#FF0000"]
  assert [d["col_start"] for d in t.layout] == [0, 1]
  # Plot2Code's labels include tick labels, lower-cased.
  assert ("left", 0.5, 1.0) in t.labels and any(text == "0.0" for text, _, _ in t.labels)


def test_later_color_changes_count(trace_pool):
  code = (
    "import matplotlib.pyplot as plt\nline, = plt.plot([0, 1], color='red')\n"
    "line.set_color('blue')\nplt.scatter([0], [1], c=[0.5], cmap='viridis')\n"
  )
  t = trace_code(code, pool=trace_pool)
  assert t.colors == ["line--#0000FF", "scatter--viridis"]


def test_determinism(trace_pool, tmp_path: Path):
  many = (
    "import matplotlib.pyplot as plt\nimport numpy as np\n"
    "colors = plt.cm.tab20(np.linspace(0, 1, 14))\n"
    "plt.bar(range(14), np.arange(1, 15), color=colors)\nplt.title('Fourteen')\n"
  )
  gen = many.replace("tab20", "tab20b")
  items = [ChartMimicItem("bar_1", BAR_GT), ChartMimicItem("bar_2", many)]
  codes = [OFF_COLOUR, gen]
  first = results_document(score_chartmimic(items, codes, pool=trace_pool))
  second = results_document(score_chartmimic(items, codes, pool=trace_pool, cache=TraceCache()))
  assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
  assert 0 < first["items"][1]["metrics"]["color"] < 1


def test_hostile_programs_fail_and_evaluation_continues(trace_pool):
  secret_file = Path(f"/tmp/eval_secret_{uuid.uuid4().hex}.txt")
  secret = f"sekrit-{uuid.uuid4().hex}"
  secret_file.write_text(secret)
  try:
    hostile = {
      "hang": "while True:\n  pass\n",
      "read_outside": (
        "import matplotlib.pyplot as plt\n"
        f"plt.title(open({str(secret_file)!r}).read())\nplt.plot([1, 2])\n"
      ),
      "kill_parent": "import os\ngetattr(os, 'ki' + 'll')(os.getppid(), 9)\n",
      "fork_bomb": "import os\nf = getattr(os, 'fo' + 'rk')\nwhile True:\n  f()\n",
      # Tampering with the tracer's own records gives an unreadable trace, not a crash or hang.
      "tamper": (
        "import _rrvf_driver\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\n"
        "_rrvf_driver._state.types = {'x': []}\n"
      ),
    }
    item = ChartMimicItem("bar_1", BAR_GT)
    codes = [*hostile.values(), BAR_GT]
    config = ChartMimicConfig(timeout_s=3.0)
    results = score_chartmimic([item] * len(codes), codes, pool=trace_pool, config=config)
  finally:
    secret_file.unlink()
  by_name = dict(zip([*hostile, "benign"], results))
  assert by_name["hang"].status == "timeout"
  for name in ("read_outside", "kill_parent", "fork_bomb"):
    assert by_name[name].status == "forbidden", (name, by_name[name].message)
  assert by_name["tamper"].status == "runtime_error"
  assert "unreadable trace" in by_name["tamper"].message
  for name in hostile:
    assert not by_name[name].exec_ok and f1s(by_name[name]) == (0.0, 0.0, 0.0, 0.0)
  assert by_name["benign"].exec_ok and f1s(by_name["benign"]) == (1.0, 1.0, 1.0, 1.0)
  assert secret not in json.dumps(results_document(results))
  assert len(trace_pool.worker_pids()) == 2  # the pool is still serving


@pytest.mark.parametrize(
  "payload",
  [b"", b"\x00\x00\x00\x05{bad}", b"\x00\x00\x00\x02[]", b"\x00\x00\x10\x00{}"],
)
def test_malformed_payloads_become_failed_traces(payload):
  t = parse_trace(SandboxResult(Status.OK, payload=payload))
  assert t.status == Status.RUNTIME_ERROR and "unreadable trace" in t.message


def test_judge_score_through_fake_server(trace_pool):
  with FakeJudgeServer() as server:
    judge = make_judge("openai", base_url=server.url, model="judge-model", **FAST)
    item = ChartMimicItem("bar_1", BAR_GT)
    same, fails = score_chartmimic(
      [item, item], [BAR_GT, FAILS], pool=trace_pool, judge=judge, max_workers=1
    )
    assert server.count() == 1  # a failed program is not sent: it scores 0
    request = server.requests[0]
  # Identical images: the fake judge answers "Score: 100" (its first reply format).
  assert same.judge.score == 100.0 and same.judge.parsed and "Score: 100" in same.judge.raw
  assert same.metrics["overall"] == pytest.approx(100.0)
  assert fails.judge.score == 0.0 and fails.metrics["overall"] == 0.0
  assert request.prompt == CHARTMIMIC_JUDGE_PROMPT and request.n_images == 2
  content = request.body["messages"][-1]["content"]
  assert [p["type"] for p in content] == ["image_url", "image_url", "text"]  # reference first
  assert content[0]["image_url"]["detail"] == "high"
  assert request.body["temperature"] == 0.0 and request.body["max_tokens"] == 1024
  agg = aggregate_chartmimic([same, fails])
  assert agg["judge_score"] == pytest.approx(50.0) and agg["judge_models"] == ["judge-model"]
  low = (100.0 + 0.0) / 2
  assert agg["overall"] == pytest.approx((low + 50.0) / 2)


def test_judge_reply_formats_are_parsed_as_vlmevalkit_does(trace_pool):
  # The fake server cycles reply formats: 'Score: s', '**Score**: s/100', 'Final score: [[s]]',
  # 'Score: s out of 100'. VLMEvalKit's parser reads the 1st and 4th, and scores the others 0.
  with FakeJudgeServer() as server:
    judge = make_judge("openai", base_url=server.url, model="m", **FAST)
    item = ChartMimicItem("bar_1", BAR_GT, target=np.full((40, 60, 3), 255, np.uint8))
    results = score_chartmimic(
      [item] * 4, [BAR_GT] * 4, pool=trace_pool, judge=judge, max_workers=1
    )
  scores = [r.judge.score for r in results]
  parsed = [r.judge.parsed for r in results]
  assert parsed == [True, False, False, True]
  assert scores[1] == scores[2] == 0.0 and scores[0] == scores[3] > 0
  assert all(r.judge.raw for r in results)


def test_unreachable_judge_gives_no_score(trace_pool):
  with FakeJudgeServer(mode="error", fail_first=None) as server:
    judge = make_judge("openai", base_url=server.url, model="m", max_retries=1, **FAST)
    (r,) = score_chartmimic(
      [ChartMimicItem("bar_1", BAR_GT)], [BAR_GT], pool=trace_pool, judge=judge
    )
  assert r.judge.score is None and "unavailable" in r.judge.note
  assert r.metrics["overall"] is None
  agg = aggregate_chartmimic([r])
  assert agg["judge_missing"] == 1 and agg["overall"] is None


def test_data_heavy_reference_runs(trace_pool):
  # 6000 numeric literals: over the training sandbox's static limit, fine for benchmark scripts.
  data = ", ".join(str(i % 97) for i in range(6000))
  code = (
    f"import matplotlib.pyplot as plt\nvalues = [{data}]\nplt.plot(values)\nplt.title('Long')\n"
  )
  (r,) = score_chartmimic([ChartMimicItem("line_9", code)], [code], pool=trace_pool)
  assert r.exec_ok and r.metrics["low_level"] == 1.0
