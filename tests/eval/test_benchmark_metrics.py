"""Pure metric functions: known-by-construction values, the published aggregates, parsers."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from rrvf_jax.eval import chartmimic, judging, plot2code, results, websight
from rrvf_jax.eval.chartmimic import (
  ChartMimicConfig,
  color_prf,
  color_similarity,
  layout_prf,
  overall_score,
  prepare_colors,
  text_prf,
  truncate_for_execution,
  type_prf,
)
from rrvf_jax.eval.judging import JudgeOutcome, extract_chartmimic_score, parse_plot2code_rating
from rrvf_jax.eval.plot2code import aggregate_plot2code, extract_code, text_match_score
from rrvf_jax.eval.results import ItemResult
from rrvf_jax.eval.websight import TextBlock, block_scores


def test_rrvf_published_chartmimic_overall():
  # RRVF README: Text 62.47, Layout 80.97, Type 53.56, Color 46.41, GPT-4o score 67.87 -> 64.36.
  assert round(overall_score(62.47, 80.97, 53.56, 46.41, 67.87), 2) == 64.36
  # Other rows of the same table, as a check that the formula is not tuned to one row. Their
  # inputs are rounded to 0.01, so the recomputed value may differ by up to 0.005 + 0.005.
  assert abs(overall_score(66.55, 79.31, 71.83, 60.84, 82.50) - 76.06) <= 0.01  # GPT-4o
  assert abs(overall_score(34.44, 61.71, 45.49, 35.12, 50.41) - 47.30) <= 0.01  # Qwen2.5-VL-72B
  assert abs(overall_score(30.01, 55.79, 36.50, 26.91, 39.04) - 38.17) <= 0.01  # Qwen2.5-VL-7B


def _cm_item(i: int, f1s: tuple[float, ...], judge: float) -> ItemResult:
  """A synthetic ChartMimic result with given F1s and judge score."""
  metrics = dict(zip(chartmimic.METRICS, f1s))
  return ItemResult(
    "chartmimic",
    f"bar_{i}",
    "bar",
    True,
    "ok",
    "",
    metrics,
    JudgeOutcome(judge, parsed=True, model="m"),
    None,
    "",
  )


def test_aggregate_reproduces_rrvf_overall_from_item_scores():
  # Two items whose means are RRVF's published sub-scores.
  published = (0.6247, 0.8097, 0.5356, 0.4641)
  a = tuple(v + 0.1 for v in published)
  b = tuple(v - 0.1 for v in published)
  agg = chartmimic.aggregate_chartmimic([_cm_item(0, a, 70.87), _cm_item(1, b, 64.87)])
  assert agg["judge_score"] == pytest.approx(67.87)
  assert round(agg["overall"], 2) == 64.36
  assert agg["judge_items"] == 2 and agg["judge_missing"] == 0


def test_aggregate_without_judge_has_no_overall_and_says_why():
  item = _cm_item(0, (1, 1, 1, 1), 0)
  item.judge = JudgeOutcome(None, note=judging.NO_JUDGE_NOTE)
  agg = chartmimic.aggregate_chartmimic([item])
  assert agg["overall"] is None and agg["judge_items"] == 0 and agg["judge_missing"] == 1
  assert "judge" in agg["overall_note"]
  assert agg["low_level_average"] == pytest.approx(100.0)


def test_plot2code_rrvf_columns_are_pass_means_times_exec_rate():
  # 4 items, 3 pass (exec 75%): text 0.4, 0.5, 0.6 -> pass mean 50, x exec 37.5; rating 4, 6,
  # unparsable -> pass mean 5, x exec 3.75.
  def item(i, passed, text, rating):
    outcome = JudgeOutcome(rating, parsed=rating is not None)
    return ItemResult(
      "plot2code",
      str(i),
      None,
      passed,
      "ok" if passed else "runtime_error",
      "",
      {"text": text, "rating": rating},
      outcome,
      None,
      "",
    )

  agg = aggregate_plot2code(
    [
      item(0, True, 0.4, 4.0),
      item(1, True, 0.5, 6.0),
      item(2, True, 0.6, None),
      item(3, False, None, None),
    ]
  )
  assert agg["exec_rate"] == pytest.approx(75.0)
  assert agg["text_pass"] == pytest.approx(50.0)
  assert agg["text"] == pytest.approx(37.5)
  assert agg["rating_pass"] == pytest.approx(5.0)
  assert agg["rating"] == pytest.approx(3.75)
  assert agg["judge_items"] == 2 and agg["judge_missing"] == 1
  # RRVF's published Plot2Code row: 41.46 x 96.21% = 39.89 and 4.61 x 96.21% = 4.44.
  assert round(41.46 * 0.9621, 2) == 39.89 and round(4.61 * 0.9621, 2) == 4.44


def test_text_f1_is_a_multiset_match():
  ref = ["Sales by Region", "Region", "Units", "sales"]
  assert text_prf(ref, ref).f1 == 1.0
  wrong = text_prf(["Sales per Region", "Region", "Units", "sales"], ref)
  assert (wrong.precision, wrong.recall, wrong.f1) == (0.75, 0.75, 0.75)
  dup = text_prf(["a", "a"], ["a"])  # a duplicate matches once
  assert (dup.precision, dup.recall) == (0.5, 1.0)
  assert text_prf([], ref).f1 == 0.0 and text_prf(ref, []).f1 == 0.0


def test_layout_f1_extra_subplot():
  cell = lambda r, c: {
    "nrows": 2,
    "ncols": 2,
    "row_start": r,
    "row_end": r,
    "col_start": c,
    "col_end": c,
  }
  ref = [cell(0, 0), cell(0, 1), cell(1, 0)]
  prf = layout_prf([*ref, cell(1, 1)], ref)
  assert (prf.precision, prf.recall) == (0.75, 1.0)
  assert prf.f1 == pytest.approx(6 / 7)


def test_type_f1_counts_calls():
  bar = "matplotlib.axes._axes-bar"
  hist = "matplotlib.axes._axes-hist"
  assert type_prf({hist: 1}, {bar: 1}).f1 == 0.0
  prf = type_prf({bar: 3, hist: 1}, {bar: 2})
  assert (prf.precision, prf.recall) == (0.5, 1.0)
  assert type_prf({}, {bar: 1}).f1 == 0.0


@pytest.mark.parametrize(
  "a, b, delta_e",
  [  # CIEDE2000 values from colormath 3.0.0 (what ChartMimic and Design2Code use)
    ("#1F77B4", "#FF7F0E", 52.433617500387),
    ("#1F77B4", "#2F77B4", 1.495595558781),
    ("#FF0000", "#00FF00", 86.608380887685),
    ("#1F77B4", "#1F77C8", 3.164317313177),
    ("#808080", "#7F7F7F", 0.380552497180),
  ],
)
def test_color_similarity_matches_colormath(a, b, delta_e):
  assert color_similarity(a, b) == pytest.approx(1 - delta_e / 100, abs=2e-6)


def test_color_similarity_names_and_mixed():
  assert color_similarity("viridis", "viridis") == 1.0
  assert color_similarity("viridis", "plasma") == 0.0
  assert color_similarity("viridis", "#000000") == 0.0


def test_color_f1_best_assignment_within_function():
  ref = ["bar--#FF0000", "bar--#0000FF"]
  # Listed in the "wrong" order: the assignment must pair red with red.
  gen = ["bar--#0000FF", "bar--#FF0000"]
  assert color_prf(gen, ref).f1 == pytest.approx(1.0)
  # The same colours under another function do not count.
  assert color_prf(["line--#FF0000", "line--#0000FF"], ref).f1 == 0.0
  off = color_prf(["bar--#1F77C8"], ["bar--#1F77B4"])
  assert off.f1 == pytest.approx(1 - 3.164317313177 / 100, abs=2e-6)
  extra = color_prf(["bar--#FF0000", "bar--#0000FF", "bar--#00FF00"], ref)
  assert (extra.precision, extra.recall) == pytest.approx((2 / 3, 1.0))


def test_color_handling_has_no_ordering_effects():
  # 12 colours (> 10: the benchmark's similarity filter runs). Any input order gives one answer.
  palette = [f"bar--#{r:02X}{g:02X}40" for r in (0, 90, 180, 255) for g in (0, 128, 255)]
  near = [c[:-2] + "48" for c in palette]
  config = ChartMimicConfig()
  expected = prepare_colors(palette + near, config)
  assert len(expected) < 24  # the filter removed the near-duplicates
  for perm in itertools.islice(itertools.permutations(range(6)), 0, 720, 97):
    order = [palette[i] for i in perm] + palette[6:] + near[::-1]
    assert prepare_colors(order, config) == expected
  gen, ref = prepare_colors(near, config), prepare_colors(palette, config)
  assert color_prf(gen, ref) == color_prf(gen[::-1], ref[::-1])


def test_truncation_and_extraction_follow_vlmevalkit():
  code = "import matplotlib.pyplot as plt\nplt.plot([1])\nplt.savefig('a.png')\nplt.title('x')\n"
  assert truncate_for_execution(code) == "import matplotlib.pyplot as plt\nplt.plot([1])"
  assert truncate_for_execution("plt.plot([1])\nplt.show()\nprint(1)") == "plt.plot([1])"
  response = "text\n```python\nA = 1\n```\nmore\n```python\nB = 2\n```"
  assert chartmimic.extract_python_code(response) == "\nA = 1\n"  # first block only
  assert chartmimic.response_to_code("no code here") == ""
  assert chartmimic.clean_escape_chars("a\\\\nb") == "a\nb"
  assert extract_code(response) == "A = 1\nB = 2"  # Plot2Code: all blocks
  assert extract_code("plain code") == "plain code"


@pytest.mark.parametrize(
  "text, expected",
  [
    ("Comments: ...\n\nScore: 87", (87, True)),
    ("Score: 91/100", (91, True)),
    ("Score: **91/100**", (91, True)),
    ("Score: 10 then revised\nScore: 70", (70, True)),
    ("Score: 87 out of 100", (87, True)),
    ("**Score**: 87/100", (0, False)),  # VLMEvalKit's parser misses this: counted 0
    ("Final score: [[87]]", (0, False)),
    ("no number", (0, False)),
  ],
)
def test_chartmimic_score_parser_is_vlmevalkits(text, expected):
  assert extract_chartmimic_score(text) == expected


@pytest.mark.parametrize(
  "text, expected",
  [
    ("Good.\nRating: [[7]]", 7),
    ("Rating: [[10]] and Rating: [[2]]", 10),
    ("Rating: [7]", None),
    ("rating: [[7]]", None),
    ("[[7]]", None),
  ],
)
def test_plot2code_rating_parser(text, expected):
  assert parse_plot2code_rating(text) == expected


def test_text_match_exact_text_and_position_gate():
  ref = [("title", 0.5, 1.0), ("x", 10.0, 0.0), ("y", 0.0, 10.0)]
  assert text_match_score(ref, list(ref)) == 1.0
  # One text changed: matched 2 of |R| + |G| - |M| = 4.
  assert text_match_score(ref, [("title!", 0.5, 1.0), *ref[1:]]) == pytest.approx(0.5)
  # Same text but 30 units away (similarity exp(-0.3) < 0.8): not matched.
  assert text_match_score(ref, [("title", 30.5, 1.0), *ref[1:]]) == pytest.approx(0.5)
  # 20 units away (exp(-0.2) > 0.8): matched.
  assert text_match_score(ref, [("title", 20.5, 1.0), *ref[1:]]) == 1.0
  # Generated positions are scaled by figsize_ref / figsize_gen before comparing.
  doubled = [(t, x * 2, y * 2) for t, x, y in ref]
  assert text_match_score(ref, doubled, (0.5, 0.5)) == 1.0
  assert text_match_score([("a", None, None)], [("a", None, None)]) == 0.0
  assert text_match_score([], []) == 1.0


def test_block_scores_known_values():
  a = TextBlock("acme widgets", (0.1, 0.1, 0.4, 0.1), (20.0, 60.0, 140.0))
  b = TextBlock("fast and reliable", (0.1, 0.3, 0.6, 0.05), (50.0, 50.0, 50.0))
  same = block_scores([a, b], [a, b])
  assert same == {"block": 1.0, "text": 1.0, "position": 1.0, "color": 1.0}
  moved = TextBlock(a.text, (0.3, 0.1, 0.4, 0.1), a.color)  # centre 0.2 to the right
  scores = block_scores([moved, b], [a, b])
  assert scores["position"] == pytest.approx((0.8 + 1.0) / 2)
  extra = TextBlock("unrelated words", (0.0, 0.9, 0.5, 0.1), a.color)
  scores = block_scores([a, b, extra], [a, b])
  matched = 2 * (0.04 + 0.03)
  assert scores["block"] == pytest.approx(matched / (matched + 0.05))
  assert block_scores([], [a]) == dict.fromkeys(websight.BLOCK_METRICS, 0.0)


def test_prf_helpers():
  assert results.PRF.from_counts(0, 0, 3).f1 == 0.0
  assert results.PRF.from_pr(0.5, 1.0).f1 == pytest.approx(2 / 3)
  assert results.mean([1.0, None, 3.0]) == 2.0
  assert results.mean([1.0, None], n=4) == 0.25
  assert results.mean([]) is None


def test_judge_prompts_are_verbatim():
  import hashlib

  # sha256 of VLMEvalKit's high_level_eval_prompt["instruction"] (vlmeval/dataset/chartmimic.py).
  digest = hashlib.sha256(judging.CHARTMIMIC_JUDGE_PROMPT.encode()).hexdigest()
  assert digest == "463b62a432da41c753d85c1129038c11121322c32a62d01d37bc3f44af92c0d7"
  assert judging.PLOT2CODE_JUDGE_PROMPT.endswith('for example: "Rating: [[5]]".')


def test_eval_package_does_not_import_jax():
  code = (
    "import sys, rrvf_jax.eval; print(any(m == 'jax' or m.startswith('jax.') for m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_misuse_gives_clear_errors():
  with pytest.raises(ValueError, match="graph_layout"):
    ChartMimicConfig(graph_layout="sideways")
  with pytest.raises(ValueError, match="2 ChartMimic items but 1"):
    items = [chartmimic.ChartMimicItem("a", ""), chartmimic.ChartMimicItem("b", "")]
    chartmimic.score_chartmimic(items, ["x"])
  with pytest.raises(ValueError, match="exactly one benchmark"):
    from rrvf_jax.eval.report import aggregate

    aggregate([])
  with pytest.raises(ValueError, match="OpenAI-compatible"):
    from rrvf_jax.env.judges import LocalJudge

    judging.judge_chartmimic(LocalJudge(), None, None)
  assert plot2code.is_all_white(None)
