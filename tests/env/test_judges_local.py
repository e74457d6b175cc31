"""Properties of the local (model-free) judge on synthetic charts and pages."""

import io
import itertools

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw

from rrvf_jax.env.judges import JudgeRequest, JudgeResult, LocalJudge, available_judges, make_judge

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BASE_COLORS = np.array([[0x1F, 0x77, 0xB4], [0xFF, 0x7F, 0x0E], [0x2C, 0xA0, 0x2C]], dtype=float)
FAR_COLORS = np.array([[0xE3, 0x77, 0xC2], [0x17, 0xBE, 0xCF], [0x8C, 0x56, 0x4B]], dtype=float)


def bar_chart(colors=BASE_COLORS, title="Sales by region", kind="bar", size=480) -> np.ndarray:
  """Render a small grouped bar (or line) chart with matplotlib, in process."""
  fig = plt.figure(figsize=(size / 100, size / 100), dpi=100)
  ax = fig.add_subplot(111)
  x = np.arange(5)
  for i, c in enumerate(np.asarray(colors) / 255.0):
    y = np.array([3, 5, 2, 6, 4]) + i
    if kind == "bar":
      ax.bar(x + 0.25 * i, y, 0.25, color=c, label=f"S{i}")
    else:
      ax.plot(x, y, color=c, marker="o", label=f"S{i}")
  ax.set_title(title)
  ax.set_xlabel("Region")
  ax.set_ylabel("Sales")
  ax.legend()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  return np.asarray(Image.open(buf).convert("RGB"))


def shift(image: np.ndarray, dx: int, dy: int = 0) -> np.ndarray:
  """Translate an image by (dx, dy) pixels, filling with white."""
  out = np.full_like(image, 255)
  h, w = image.shape[:2]
  out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
    max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
  ]
  return out


def web_page(header="#1e3a8a", cols=3) -> np.ndarray:
  """A synthetic landing page: header bar with text, a button, feature cards, footer."""
  im = Image.new("RGB", (640, 480), "white")
  d = ImageDraw.Draw(im)
  d.rectangle([0, 0, 640, 60], fill=header)
  d.text((20, 22), "Welcome to Acme", fill="white")
  d.text((40, 90), "Build better products faster with our platform.", fill="black")
  d.rectangle([40, 120, 180, 150], fill="#f59e0b")
  cw = 560 // cols
  for c in range(cols):
    x = 40 + c * cw
    d.rectangle([x, 200, x + cw - 20, 380], outline="#cccccc", fill="#f3f4f6")
    for k in range(4):
      d.text((x + 10, 215 + 22 * k), f"Feature {c} line {k}", fill="#333333")
  d.rectangle([0, 440, 640, 480], fill="#111827")
  return np.asarray(im)


@pytest.fixture(scope="module")
def chart() -> np.ndarray:
  return bar_chart()


@pytest.fixture(scope="module")
def judge() -> LocalJudge:
  return LocalJudge()


def test_registry():
  assert {"local", "openai"} <= set(available_judges())
  assert isinstance(make_judge("local"), LocalJudge)
  assert make_judge("local", work_size=128).config.work_size == 128
  with pytest.raises(ValueError, match="unknown judge"):
    make_judge("nope")


def test_identical_images_score_one(judge, chart):
  result = judge.judge(chart, chart.copy())
  assert isinstance(result, JudgeResult)
  assert result.score == pytest.approx(1.0)
  assert all(v == pytest.approx(1.0) for v in result.aspects.values())
  assert result.source == "local" and result.raw is None


@pytest.mark.parametrize("fill", [255, 0, 128])
def test_blank_render_scores_low(judge, chart, fill):
  result = judge.judge(chart, np.full_like(chart, fill))
  assert result.score < 0.05


def test_wrong_chart_type_scores_below_the_same_chart_slightly_off(judge, chart):
  line = judge.judge(chart, bar_chart(kind="line")).score
  nudged = judge.judge(chart, shift(chart, 3)).score
  assert 0.05 < line < 0.6 < nudged < 1.0


def test_score_falls_monotonically_with_shift(judge, chart):
  scores = [judge.judge(chart, shift(chart, d, d // 2)).score for d in (0, 2, 5, 10, 20, 40)]
  assert all(a > b for a, b in itertools.pairwise(scores)), scores
  assert scores[-1] > 0.05  # still far from blank: the content is all there


def test_score_falls_monotonically_with_recolouring(judge, chart):
  scores = []
  for t in (0.0, 0.15, 0.35, 0.6, 1.0):
    colors = (1 - t) * BASE_COLORS + t * FAR_COLORS
    scores.append(judge.judge(chart, bar_chart(colors=colors)).score)
  assert scores[0] == pytest.approx(1.0)
  assert all(a > b for a, b in itertools.pairwise(scores)), scores
  colour = [judge.judge(chart, bar_chart(colors=c)).aspects["color"] for c in (FAR_COLORS,)]
  assert colour[0] < 0.8


def test_deterministic_across_calls_and_instances(chart):
  render = shift(bar_chart(kind="line"), 4)
  a = LocalJudge().judge(chart, render)
  b = LocalJudge().judge(chart, render)
  c = LocalJudge(cache_size=0).judge(chart, render)
  assert a == b == c


def test_target_cache_does_not_change_results(chart):
  judge = LocalJudge(cache_size=2)
  renders = [shift(chart, d) for d in (1, 7, 15)]
  first = [judge.judge(chart, r) for r in renders]
  second = [judge.judge(chart, r) for r in renders]
  assert first == second
  assert judge.metrics()["cache_hits"] >= 5


def test_feedback_names_the_colours_when_recoloured(judge, chart):
  result = judge.judge(chart, bar_chart(colors=FAR_COLORS))
  assert result.feedback.startswith("---Comments:")
  assert "**Colour**" in result.feedback
  assert "#1f77b4" in result.feedback  # the reference's blue is reported missing
  assert "#e377c2" in result.feedback  # and the render's pink as extra


def test_feedback_for_blank_and_for_a_match(judge, chart):
  blank = judge.judge(chart, np.full_like(chart, 255)).feedback
  assert "almost no" in blank
  match = judge.judge(chart, chart).feedback
  assert "closely matches" in match


def test_feedback_reports_different_proportions(judge, chart):
  wide = np.asarray(Image.fromarray(chart).resize((720, 360)))
  result = judge.judge(chart, wide)
  assert result.aspects["layout"] < 0.6
  assert result.score < judge.judge(chart, chart).score - 0.05
  assert "proportions differ" in result.feedback and "720x360" in result.feedback


def test_different_size_same_content_scores_high(judge):
  big, small = bar_chart(size=480), bar_chart(size=400)
  assert judge.judge(big, small).score > 0.8


def test_web_page_properties(judge):
  page = web_page()
  assert judge.judge(page, page, kind="web").score == pytest.approx(1.0)
  assert judge.judge(page, np.full_like(page, 255), kind="web").score < 0.05
  recoloured = judge.judge(page, web_page(header="#991b1b"), kind="web")
  fewer_cols = judge.judge(page, web_page(cols=2), kind="web")
  assert 0.5 < recoloured.score < 1.0 and 0.5 < fewer_cols.score < 1.0
  assert recoloured.aspects["color"] < fewer_cols.aspects["color"]
  assert fewer_cols.aspects["layout"] < recoloured.aspects["layout"]


def test_inputs_are_validated_and_normalised(judge, chart):
  gray = chart.mean(axis=2).astype(np.uint8)
  rgba = np.concatenate([chart, np.full((*chart.shape[:2], 1), 255, np.uint8)], axis=2)
  assert judge.judge(chart, rgba).score == pytest.approx(1.0)
  assert 0.0 <= judge.judge(chart, gray).score <= 1.0
  with pytest.raises(ValueError, match="uint8"):
    judge.judge(chart, chart.astype(np.float32))


def test_judge_many_keeps_order(judge, chart):
  renders = [chart, np.full_like(chart, 255), shift(chart, 10)]
  results = judge.judge_many([JudgeRequest(chart, r) for r in renders])
  assert [r.score for r in results] == [judge.judge(chart, r).score for r in renders]


def test_weights_are_validated():
  with pytest.raises(ValueError):
    LocalJudge(weights=(("structure", 1.0),))


def test_perfect_renders_score_at_most_one_and_make_a_valid_reward(judge):
  """Regression: a perfect render's weighted score rounded to 1.0000000000000002 and the reward
  (EpisodeSummary) rejected it, crashing a GRPO step."""
  from rrvf_jax.env import reward

  rng = np.random.default_rng(0)
  images = [np.full((56, 56, 3), 255, np.uint8), rng.integers(0, 255, (56, 56, 3), np.uint8)]
  for side in (56, 224, 336):
    fig, ax = plt.subplots(figsize=(side / 100, side / 100), dpi=100)
    ax.bar(["a", "b", "c"], [3, 1, 2], color="tab:blue")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    images.append(np.asarray(Image.open(buf).convert("RGB")))
  for img in images:
    score = judge.judge(img, img).score
    assert 0.0 <= score <= 1.0
    reward.EpisodeSummary(turns=(), final_render_status="ok", final_score=score)
