"""results.json and report.html: content, per-category breakdown, self-contained HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from eval_programs import BAR_GT, FAILS, HIST_INSTEAD, WRONG_TITLE, panels

from rrvf_jax.eval import ChartMimicItem, ItemResult, JudgeOutcome, score_chartmimic, write_report
from rrvf_jax.eval.report import pick_examples, report_html


@pytest.fixture(scope="module")
def results(trace_pool):
  items = [ChartMimicItem(f"bar_{i}", BAR_GT) for i in range(4)]
  items.append(ChartMimicItem("line_1", panels(3)))
  codes = [BAR_GT, WRONG_TITLE, HIST_INSTEAD, FAILS, panels(4)]
  return score_chartmimic(items, codes, pool=trace_pool)


def test_results_json(results, tmp_path: Path):
  json_path, html_path = write_report(results, tmp_path / "out", meta={"step": 7})
  doc = json.loads(json_path.read_text())
  assert doc["meta"] == {"step": 7}
  assert [item["id"] for item in doc["items"]] == ["bar_0", "bar_1", "bar_2", "bar_3", "line_1"]
  agg = doc["aggregate"]
  assert agg["n_items"] == 5 and agg["exec_rate"] == pytest.approx(80.0)
  assert set(agg["by_category"]) == {"bar", "line"}
  assert agg["by_category"]["bar"]["n_items"] == 4
  assert agg["by_category"]["line"]["layout"] == pytest.approx(100 * 6 / 7)
  failed = doc["items"][3]
  assert failed["exec_ok"] is False and "boom" in failed["message"]
  assert failed["judge"]["score"] is None and failed["code"] == FAILS
  assert html_path.exists()


def test_report_is_self_contained(results):
  page = report_html(results)
  assert "<table>" in page and "By category" in page and "Score distributions" in page
  # Every image is inline; nothing is fetched from anywhere.
  sources = re.findall(r"src='([^']*)'", page)
  assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
  assert not re.search(r"(href|src)=['\"]?(https?:|//)", page)
  for section in ("Best items", "Worst items", "Failed items"):
    assert section in page
  assert "raise ValueError(&#x27;boom&#x27;)" in page  # the failed item's code, escaped


def test_examples_are_ranked(results):
  # Low-level averages: bar_0 100, bar_1 93.75 (title), line_1 89.3 (extra panel), bar_2 50 (hist).
  picked = pick_examples(results, n=2)
  assert [r.item_id for r in picked["best"]] == ["bar_0", "bar_1"]
  assert [r.item_id for r in picked["worst"]] == ["bar_2", "line_1"]
  assert [r.item_id for r in picked["failed"]] == ["bar_3"]


def _result(benchmark: str, item_id: str, metrics: dict, **kw) -> ItemResult:
  """A synthetic result (no images)."""
  fields = {"category": None, "exec_ok": True, "status": "ok", "message": "", "judge": None,
            "primary": None, "code": ""}  # fmt: skip
  return ItemResult(benchmark, item_id, metrics=metrics, **{**fields, **kw})


def test_reports_for_the_other_benchmarks(tmp_path: Path):
  p2c = [
    _result("plot2code", "0", {"text": 0.5, "rating": 7.0}, category="bar", primary=50.0,
            judge=JudgeOutcome(7.0, "Rating: [[7]]", True, model="m")),
    _result("plot2code", "1", {"text": None, "rating": None}, exec_ok=False, status="timeout",
            message="Execution timed out after 30 s.", code="while True: pass"),
  ]  # fmt: skip
  json_path, html_path = write_report(p2c, tmp_path / "p2c")
  agg = json.loads(json_path.read_text())["aggregate"]
  assert agg["exec_rate"] == 50.0 and agg["text"] == 25.0 and agg["rating"] == 3.5
  assert set(agg["by_category"]) == {"bar", "uncategorised"}
  page = html_path.read_text()
  assert "Rating: [[7]]" in page and "no target" in page and "timed out" in page
  visual = {f"visual_{a}": 80.0 for a in ("structure", "color", "edges", "layout", "text")}
  metrics = {"visual": 80.0, "judge": None, **visual}
  metrics.update(dict.fromkeys(("block", "text", "position", "color", "clip", "design2code")))
  json_path, _ = write_report([_result("websight", "w", metrics, primary=80.0)], tmp_path / "web")
  agg = json.loads(json_path.read_text())["aggregate"]
  assert agg["visual"] == 80.0 and agg["block"] is None and agg["clip_items"] == 0
