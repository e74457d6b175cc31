"""The evaluation run: generate, extract, score, resume, report; in-process and via the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from chartmimic_fixture import PROGRAMS, write_chartmimic_fixture

from rrvf_jax import data, env
from rrvf_jax.eval import run
from rrvf_jax.models import qwen_vl
from rrvf_jax.processing import tokens
from rrvf_jax.rollout import sampler as sampler_lib
from rrvf_jax.testing import checkpoints, scripted
from rrvf_jax.train import sft

ROOT = Path(__file__).resolve().parents[2]
SPLIT = "direct_600"
SCREENSHOT = Path("/tmp/evalrun_report.png")
CHARTMIMIC_KEYS = {"exec_rate", "text", "layout", "type", "color", "judge_score", "overall"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """The fixture benchmark: its manual_dir and the built split."""
  root = tmp_path_factory.mktemp("bench")
  write_chartmimic_fixture(root / "manual", SPLIT)
  source = data.load("chartmimic", SPLIT, data_dir=root / "data", manual_dir=root / "manual")
  return root / "manual", source


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
  return checkpoints.make_tiny_policy_dir(tmp_path_factory.mktemp("policy"), seed=1)


@pytest.fixture(scope="module")
def policy(policy_dir):
  return qwen_vl.from_hf(policy_dir), tokens.load_tokenizer(policy_dir)


class Generations:
  """Counts the sampler's decode calls and rows; optionally replaces the texts it returns.

  Tokens and log-probs stay the sampler's own; `script(call_index)` gives the text every row of
  that call gets (as rrvf_jax.testing.scripted does for episodes).
  """

  def __init__(self, monkeypatch, script=None):
    self.calls = 0
    self.rows = 0
    original = sampler_lib.Sampler.generate

    def generate(sampler, session, params, key, active=None, first_row=0):
      session, completions = original(sampler, session, params, key, active)
      if script is not None:
        text = script(self.calls)
        completions = [dataclasses.replace(c, text=text) for c in completions]
      self.calls += 1
      self.rows += len(completions)
      return session, completions

    monkeypatch.setattr(sampler_lib.Sampler, "generate", generate)


def evaluate(policy, source, out_dir, pool, **kwargs):
  model, tok = policy
  settings = dict(
    benchmark="chartmimic", out_dir=out_dir, instruction=sft.DEFAULT_INSTRUCTION,
    max_new_tokens=32, batch_size=2, trace_pool=pool,
  )  # fmt: skip
  return run.evaluate(model, tok, source, **{**settings, **kwargs})


def ids_of(source) -> list[str]:
  return [source[i]["id"] for i in range(len(source))]


def test_code_from_response():
  code = "import matplotlib.pyplot as plt\nplt.plot([1, 2])"
  assert run.code_from_response(scripted.answer(code), "chartmimic") == (code, "answer")
  assert run.code_from_response(f"<answer>\n{code}", "chartmimic") == (code, "answer_unclosed")
  assert run.code_from_response(scripted.call(code), "chartmimic") == (code, "tool_call")
  last_turn = run.code_from_response(scripted.call(code), "chartmimic", allow_tool_call=False)
  assert last_turn == (None, "tool_call_not_run")
  # Without <answer>: the benchmark's own extraction (ChartMimic: the first ```python block).
  fenced = f"Here:\n```python\n{code}\n```<|im_end|>"
  assert run.code_from_response(fenced, "chartmimic") == (f"\n{code}\n", "benchmark")
  assert run.code_from_response("no code here<|im_end|>", "chartmimic") == (None, "none")
  # Plot2Code runs the whole reply when it has no python block; the end-of-turn token is not code.
  assert run.code_from_response("x = 1<|im_end|>", "plot2code") == ("x = 1", "benchmark")
  with pytest.raises(ValueError, match="unknown benchmark 'chartqa'"):
    run.code_from_response("", "chartqa")


def test_scores_answers_resumes_and_skips_finished_items(
  policy, bench, trace_pool, tmp_path, monkeypatch
):
  _, source = bench
  ids = ids_of(source)
  out = tmp_path / "out"
  # Every reply answers with bar_1's ground truth: bar_1 matches exactly, the others execute.
  gens = Generations(monkeypatch, lambda call: scripted.answer(PROGRAMS["bar_1"]))
  seen = []
  evaluate(policy, source, out, trace_pool, max_items=3, progress=lambda *a: seen.append(a))
  # Two calls of 2 rows: the last batch is padded with a copy (dropped).
  assert (gens.calls, gens.rows) == (2, 4) and seen == [(2, 3), (3, 3)]
  lines = (out / "items.jsonl").read_text().splitlines()
  assert [json.loads(line)["id"] for line in lines] == ids[:3]
  first_lines = (out / "items.jsonl").read_text()

  agg = evaluate(policy, source, out, trace_pool)  # the rest: one more item
  assert (gens.calls, gens.rows) == (3, 6)
  assert (out / "items.jsonl").read_text().startswith(first_lines)  # finished lines untouched
  doc = json.loads((out / "results.json").read_text())
  assert [item["id"] for item in doc["items"]] == ids
  assert doc["meta"]["generated_this_run"] == 1 and doc["meta"]["resumed"] == 3
  assert doc["meta"]["code_sources"] == {"answer": 4}
  assert set(agg) >= CHARTMIMIC_KEYS and agg["exec_rate"] == 100.0
  assert agg["overall"] is None and "judge score" in agg["overall_note"]
  assert doc["aggregate"]["exec_rate"] == 100.0
  items = {item["id"]: item for item in doc["items"]}
  assert all(
    items[i]["exec_ok"] and items[i]["code"].strip() == PROGRAMS["bar_1"].strip() for i in ids
  )
  bar = items["bar_1"]["metrics"]
  assert [bar[m] for m in ("text", "layout", "type", "color")] == [1.0, 1.0, 1.0, 1.0]
  assert items["pie_1"]["metrics"]["type"] == 0.0  # bars instead of a pie
  assert items["bar_1"]["details"]["generation"]["finish_reason"] in ("stop", "length")
  page = (out / "report.html").read_text()
  assert "bar_1" in page and "Best items" in page and "alt='render'" in page
  _check_in_chromium(out / "report.html", SCREENSHOT)

  # A kill mid-write leaves a cut line; a lost line is an unfinished item. Both are redone.
  lines = (out / "items.jsonl").read_text().splitlines(keepends=True)
  (out / "items.jsonl").write_text(lines[0] + lines[2] + lines[3][: len(lines[3]) // 2])
  evaluate(policy, source, out, trace_pool)
  assert (gens.calls, gens.rows) == (4, 8)  # the two missing items, in one call
  doc = json.loads((out / "results.json").read_text())
  assert [item["id"] for item in doc["items"]] == ids
  assert doc["meta"]["generated_this_run"] == 2
  reread = [json.loads(line)["id"] for line in (out / "items.jsonl").read_text().splitlines()]
  assert sorted(reread) == sorted(ids)

  # Same items, nothing left to generate; other settings are refused instead of mixed in.
  evaluate(policy, source, out, trace_pool)
  assert gens.calls == 4
  with pytest.raises(ValueError, match=r"another evaluation \(max_new_tokens: 64 now, 32 there\)"):
    evaluate(policy, source, out, trace_pool, max_new_tokens=64)


def test_tool_loop_scores_the_final_answer(policy, bench, trace_pool, tmp_path, monkeypatch):
  _, source = bench
  # Turn 1 calls the render tool with the first item's program, turn 2 answers with it.
  code = PROGRAMS[ids_of(source)[0]]
  gens = Generations(
    monkeypatch, lambda call: scripted.call(code) if call == 0 else scripted.answer(code)
  )
  canvas = env.ChartCanvas(112, 112, dpi=56)
  agg = evaluate(
    policy,
    source,
    tmp_path / "loop",
    trace_pool,
    max_items=1,
    batch_size=1,
    tool_loop=True,
    max_turns=2,
    max_total_tokens=1024,
    render_submit=lambda code: env.submit_chart(code, canvas=canvas),
    feedback_judge=env.LocalJudge(),
  )
  assert gens.calls == 2 and agg["n_items"] == 1 and agg["exec_rate"] == 100.0
  (item,) = json.loads((tmp_path / "loop" / "results.json").read_text())["items"]
  generation = item["details"]["generation"]
  assert generation["code_source"] == "answer" and generation["end_reason"] == "answer"
  assert len(generation["turns"]) == 2 and generation["tool_calls_ok"] == 1
  assert item["metrics"]["text"] == 1.0 and item["metrics"]["type"] == 1.0


def test_plot2code_and_websight(policy, bench, trace_pool, tmp_path, monkeypatch):
  _, source = bench
  first = ids_of(source)[0]
  gens = Generations(monkeypatch, lambda call: scripted.answer(PROGRAMS[first]))
  agg = evaluate(policy, source, tmp_path / "p2c", trace_pool, benchmark="plot2code", max_items=1)
  assert agg["benchmark"] == "plot2code" and agg["exec_rate"] == 100.0
  assert agg["text"] == 100.0 and agg["rating"] is None  # the same program; no judge
  # WebSight from plain dicts (the target as an array), answered with the page itself.
  pytest.importorskip("playwright")
  from rrvf_jax.env.web import HtmlRenderer, WebCanvas, find_chromium

  if find_chromium() is None:
    pytest.skip("no Chromium installed")
  page = "<html><body><h1>Hello</h1><p style='color:#c00'>A red paragraph.</p></body></html>"
  examples = [{"id": "page_1", "image": np.full((60, 80, 3), 255, np.uint8), "code": page}]
  gens = Generations(monkeypatch, lambda call: f"<answer>\n```html\n{page}\n```\n</answer>")
  with HtmlRenderer(WebCanvas(width=320, height=240, max_height=480)) as renderer:
    agg = evaluate(
      policy, examples, tmp_path / "web", None, benchmark="websight", batch_size=1,
      html_renderer=renderer,
    )  # fmt: skip
  assert gens.calls == 1 and agg["exec_rate"] == 100.0 and agg["text"] == 100.0
  doc = json.loads((tmp_path / "web" / "results.json").read_text())
  assert doc["items"][0]["code"].strip() == page and doc["meta"]["dataset"] is None


def _cli(*args: str) -> subprocess.CompletedProcess:
  env_vars = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  command = [sys.executable, "-m", "rrvf_jax.evaluate", "--config=configs/chart.py:demo", *args]
  return subprocess.run(
    command, cwd=ROOT, env=env_vars, capture_output=True, text=True, timeout=300
  )


def test_cli_evaluates_a_checkpoint(policy_dir, bench, tmp_path):
  manual, source = bench
  proc = _cli(
    f"--workdir={tmp_path / 'work'}",
    f"--checkpoint={policy_dir}",
    "--benchmark=chartmimic",
    f"--config.data.manual_dir={manual}",
    "--max_new_tokens=32",
    "--batch_size=2",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "work" / "eval" / f"chartmimic-{SPLIT}"
  doc = json.loads((out / "results.json").read_text())
  assert [item["id"] for item in doc["items"]] == ids_of(source)
  agg = doc["aggregate"]
  assert set(agg) >= CHARTMIMIC_KEYS and agg["overall"] is None and agg["overall_note"]
  assert doc["meta"]["checkpoint"] == str(policy_dir) and doc["meta"]["generated_this_run"] == 4
  assert doc["meta"]["random_weights"] is False and doc["meta"]["checkpoint_fingerprint"]
  assert "exec_rate" in proc.stdout and "note: Overall needs a judge score" in proc.stdout
  _check_in_chromium(out / "report.html")


def test_cli_errors_are_one_line(policy_dir, tmp_path):
  missing = tmp_path / "missing"
  proc = _cli(f"--workdir={tmp_path}", f"--checkpoint={missing}", "--benchmark=chartmimic")
  assert proc.returncode != 0
  assert (
    proc.stderr.strip()
    .splitlines()[-1]
    .startswith(
      f"rrvf_jax.evaluate: error: --checkpoint {missing} is not an HF checkpoint directory"
    )
  )
  proc = _cli(
    f"--workdir={tmp_path}",
    f"--checkpoint={policy_dir}",
    "--benchmark=chartmimic",
    f"--config.data.manual_dir={missing}",
  )
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(
    f"rrvf_jax.evaluate: error: chartmimic: manual_dir {missing} does not exist"
  )


def _check_in_chromium(html: Path, screenshot: Path | None = None) -> None:
  """Opens a report in headless Chromium: no errors, nothing fetched, images loaded, not blank."""
  pytest.importorskip("playwright")
  from playwright.sync_api import sync_playwright

  from rrvf_jax.env.web import find_chromium

  if find_chromium() is None:
    pytest.skip("no Chromium installed")
  errors, requests = [], []
  with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=find_chromium(), args=["--disable-gpu"])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("request", lambda r: requests.append(r.url))
    page.goto(html.as_uri(), wait_until="load")
    images_ok = page.evaluate(
      "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
    )
    n_images = page.evaluate("document.images.length")
    png = page.screenshot(full_page=True)
    browser.close()
  assert errors == []
  assert all(u.startswith(("file:", "data:")) for u in requests), requests
  assert images_ok and n_images >= 2
  import io

  from PIL import Image

  pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
  assert pixels.shape[0] >= 900 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
  if screenshot is not None:
    screenshot.write_bytes(png)


class _RecordingSamplers:
  """Stands in for the per-cache-length samplers: records the prompts, answers with one text."""

  def __init__(self, tok):
    self.tokenizer, self.prompts = tok, []

  def get(self, cache_length):
    return self

  def sample(self, prompts, params, key):
    self.prompts += prompts
    ids = np.asarray(tokens.encode_text(self.tokenizer, "```python\nx = 1\n```"), np.int32)
    return [sampler_lib.Completion(ids, np.zeros(len(ids)), "```python\nx = 1\n```", "stop")] * len(
      prompts
    )


@pytest.mark.parametrize("benchmark", ["chartmimic", "plot2code"])
def test_single_turn_uses_the_benchmarks_own_prompt(benchmark):
  from rrvf_jax.eval import prompts as benchmark_prompts
  from rrvf_jax.processing import image
  from rrvf_jax.testing import tokenizer as tiny_tokenizer

  tok = tiny_tokenizer.build_tiny_tokenizer()
  samplers = _RecordingSamplers(tok)
  setup = run._GenerationSetup(
    benchmark=benchmark, task="chart", instruction=None, system_prompt="You are helpful.",
    proc_cfg=image.ImageProcessorConfig(), max_turns=1, max_new_tokens=8, max_total_tokens=None,
    on_budget="force_answer", render_submit=None, feedback_judge=None,
  )  # fmt: skip
  target = np.full((480, 640, 3), 255, np.uint8)
  (generation,) = run._single_turn(samplers, [target], setup)
  assert generation.code.strip() == "x = 1"  # the benchmark's own extraction of the fence
  text = tokens.decode(tok, samplers.prompts[0].token_ids, skip_special_tokens=False)
  expected = benchmark_prompts.benchmark_prompt(benchmark, target.shape)
  assert expected in text and "# Tools" not in text and "render_chart" not in text
  if benchmark == "chartmimic":
    assert "figsize=(6.4, 4.8)" in expected  # the target's size at matplotlib's 100 dpi
