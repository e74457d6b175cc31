"""Procedural chart and page generators: deterministic, short when simple, and always render."""

from __future__ import annotations

import random

import pytest

from rrvf_jax.data import chart_gen, web_gen
from rrvf_jax.env import ChartCanvas, render_charts
from rrvf_jax.env.web import find_chromium


def _charts(complexity: str, count: int, chart_type: str | None = None, tag: str = "t"):
  """`count` generated charts, each from its own seeded RNG."""
  return [
    chart_gen.generate_chart(random.Random(f"{tag}:{i}"), complexity, chart_type)
    for i in range(count)
  ]


def test_charts_are_deterministic_by_seed():
  a = chart_gen.generate_chart(random.Random("seed-1"), "full")
  b = chart_gen.generate_chart(random.Random("seed-1"), "full")
  c = chart_gen.generate_chart(random.Random("seed-2"), "full")
  assert a == b
  assert a.code != c.code


def test_simple_charts_are_short_single_plots_with_a_title():
  charts = _charts("simple", 300)
  lengths = [len(c.code) for c in charts]
  assert max(lengths) <= 250, max(lengths)
  assert sum(lengths) / len(lengths) <= 200
  assert {c.chart_type for c in charts} == set(chart_gen.CHART_TYPES)
  for c in charts:
    assert c.num_subplots == 1
    assert c.code.startswith("import matplotlib.pyplot as plt\n")
    assert "plt.title(" in c.code
    compile(c.code, "<chart>", "exec")


def test_full_charts_vary_subplots_and_types():
  charts = _charts("full", 200)
  assert {c.num_subplots for c in charts} == {1, 2, 3, 4}
  for c in charts:
    types = c.chart_type.split("+")
    assert len(types) == c.num_subplots
    assert set(types) <= set(chart_gen.CHART_TYPES)
  assert any("ax.legend(" in c.code for c in charts)
  assert any("ax.set_xlabel(" in c.code for c in charts)
  assert len({c.code for c in charts}) == len(charts)


def test_forced_chart_type_and_bad_arguments():
  for chart in _charts("full", 5, "pie"):
    assert chart.chart_type == "+".join(["pie"] * chart.num_subplots)
  with pytest.raises(ValueError, match="unknown chart type 'donut'"):
    chart_gen.generate_chart(random.Random(0), "simple", "donut")
  with pytest.raises(ValueError, match="unknown chart complexity 'medium'"):
    chart_gen.generate_chart(random.Random(0), "medium")


def test_every_chart_type_renders(chart_pool):
  """A sample of every type, simple and full, executes and draws a non-blank chart."""
  charts = []
  for chart_type in chart_gen.CHART_TYPES:
    charts += _charts("simple", 2, chart_type, tag=f"s-{chart_type}")
    charts += _charts("full", 2, chart_type, tag=f"f-{chart_type}")
  charts += _charts("full", 12, tag="mixed")
  results = render_charts([c.code for c in charts], canvas=ChartCanvas(224, 224), pool=chart_pool)
  failures = [(c.chart_type, r.status, r.message) for c, r in zip(charts, results) if not r.ok]
  assert not failures, failures
  assert all(r.image.shape == (224, 224, 3) for r in results)


def test_pages_are_deterministic_and_simple_ones_short():
  pages = [web_gen.generate_page(random.Random(f"p{i}"), "simple") for i in range(200)]
  assert pages[3] == web_gen.generate_page(random.Random("p3"), "simple")
  lengths = [len(p.code) for p in pages]
  assert max(lengths) <= 250, max(lengths)
  assert {p.page_type for p in pages} == set(web_gen.SIMPLE_TYPES)
  full = [web_gen.generate_page(random.Random(f"f{i}"), "full") for i in range(50)]
  assert {p.page_type for p in full} == set(web_gen.PAGE_TYPES)
  for p in full:
    assert p.code.startswith("<!DOCTYPE html>")
    assert "http" not in p.code  # nothing to fetch: the renderer has no network
    assert p.num_sections == p.code.count("<header>") + p.code.count("<section") + p.code.count(
      "<footer>"
    )
  with pytest.raises(ValueError, match="unknown full page type 'box'"):
    web_gen.generate_page(random.Random(0), "full", "box")


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium installed")
def test_every_page_type_renders():
  from rrvf_jax.env import HtmlRenderer, WebCanvas

  pages = [web_gen.generate_page(random.Random(f"r{t}"), "full", t) for t in web_gen.PAGE_TYPES] + [
    web_gen.generate_page(random.Random(f"r{t}"), "simple", t) for t in web_gen.SIMPLE_TYPES
  ]
  with HtmlRenderer(WebCanvas(width=320, height=240, max_height=240)) as renderer:
    results = [renderer.render(p.code) for p in pages]
  failures = [(p.page_type, r.status, r.message) for p, r in zip(pages, results) if not r.ok]
  assert not failures, failures
  assert all(r.image.shape == (240, 320, 3) for r in results)
