"""WebSight / Design2Code-style scoring with the offline Chromium renderer and the fake judge."""

from __future__ import annotations

import difflib

import numpy as np
import pytest

pytest.importorskip("playwright")

from rrvf_jax.env.judges import make_judge
from rrvf_jax.env.web import HtmlRenderer, find_chromium
from rrvf_jax.eval import WebItem, aggregate_websight, score_websight
from rrvf_jax.eval.websight import BLOCK_METRICS, find_text_blocks, recolor_html
from rrvf_jax.testing.fake_judge_server import FakeJudgeServer

if find_chromium() is None:
  pytest.skip("no Chromium installed", allow_module_level=True)

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 10.0, "api_key_env": None}
REF = """<html><body style="font-family: sans-serif; margin: 24px">
<h1 style="color: #1a4d8f">Acme Widgets</h1>
<p style="color: #333333">Fast, reliable widgets for <b>every</b> workshop.</p>
<div><button style="background: #22aa77; color: white; padding: 8px">Buy now</button></div>
</body></html>"""
RENAMED = REF.replace("Acme Widgets", "Acme Gadgets")
BLANK = "<html><body></body></html>"


def grid_embedding(image: np.ndarray) -> np.ndarray:
  """A stand-in image encoder: mean colour of an 8x8 grid (deterministic, no weights)."""
  h, w = image.shape[0] // 8 * 8, image.shape[1] // 8 * 8
  cells = image[:h, :w].reshape(8, h // 8, 8, w // 8, 3).astype(np.float64)
  return cells.mean(axis=(1, 3)).ravel()


@pytest.fixture(scope="module")
def renderer():
  with HtmlRenderer(timeout_s=10.0) as r:
    yield r


def test_recolor_keeps_structure_and_collects_own_text():
  html, texts = recolor_html('<div class="x">Hi <em>there</em><p>para &amp; more</p></div>', 0)
  assert texts == ["hi there", "para & more"]  # <em> has no colour of its own: text goes to div
  assert 'class="x"' in html and "&amp;" in html and "!important" in html


def test_blocks_are_found_without_ocr(renderer):
  page = renderer.render(REF)
  blocks = find_text_blocks(renderer, REF, page.image)
  assert [b.text for b in blocks] == [
    "acme widgets",
    "fast, reliable widgets for workshop.",  # <b> is a text tag of its own (Design2Code's list)
    "every",
    "buy now",
  ]
  heading = blocks[0]
  assert heading.color == pytest.approx((0x1A, 0x4D, 0x8F), abs=2)  # colour of the real text
  assert 0 < heading.bbox[0] < 0.1 and heading.bbox[2] > 0.05


def test_scores_known_by_construction(renderer):
  item = WebItem("w0", REF)
  same, renamed, empty, blank = score_websight(
    [item] * 4, [REF, RENAMED, "", BLANK], renderer=renderer, embed=grid_embedding
  )
  assert same.exec_ok and same.metrics["visual"] == pytest.approx(100.0)
  assert [same.metrics[m] for m in BLOCK_METRICS] == [1.0, 1.0, 1.0, 1.0]
  assert same.metrics["clip"] == pytest.approx(100.0)
  assert same.metrics["design2code"] == pytest.approx(100.0)
  # One of four blocks has new text: text = mean of its SequenceMatcher ratio and three 1s.
  ratio = difflib.SequenceMatcher(None, "acme gadgets", "acme widgets").ratio()
  assert renamed.metrics["text"] == pytest.approx((ratio + 3) / 4)
  assert renamed.metrics["block"] == pytest.approx(1.0, abs=0.05)
  parts = [renamed.metrics[m] for m in BLOCK_METRICS]
  assert renamed.metrics["design2code"] == pytest.approx(
    20 * (sum(parts) + renamed.metrics["clip"] / 100)
  )
  assert 50 < renamed.metrics["visual"] < 100
  for failed, status in ((empty, "no_code"), (blank, "blank_image")):
    assert not failed.exec_ok and failed.status == status
    assert failed.metrics["visual"] == 0.0 and failed.metrics["block"] == 0.0
  agg = aggregate_websight([same, renamed, empty, blank])
  assert agg["exec_rate"] == pytest.approx(50.0) and agg["clip_items"] == 4
  assert agg["judge_score"] is None and agg["judge_items"] == 0


def test_without_embedding_or_reference_html(renderer):
  target = renderer.render(REF).image
  (r,) = score_websight([WebItem("w1", None, target=target)], [REF], renderer=renderer)
  assert r.metrics["clip"] is None and "no embedding" in r.details["clip_note"]
  assert r.metrics["block"] is None and "not computable" in r.details["blocks_note"]
  assert r.metrics["visual"] == pytest.approx(100.0)
  agg = aggregate_websight([r])
  assert agg["block"] is None and agg["block_items"] == 0 and agg["clip"] is None


def test_web_judge_score(renderer):
  with FakeJudgeServer() as server:
    judge = make_judge("openai", base_url=server.url, model="judge-model", **FAST)
    (r,) = score_websight([WebItem("w0", REF)], [REF], renderer=renderer, judge=judge)
    assert "web page" in server.requests[0].prompt
  assert r.judge.score == pytest.approx(100.0) and r.metrics["judge"] == pytest.approx(100.0)
  assert aggregate_websight([r])["judge_items"] == 1
