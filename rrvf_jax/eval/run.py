"""Benchmark evaluation of a policy: greedy generation, code extraction, scoring, resume, report.

`evaluate(model, tokenizer, examples, benchmark=..., out_dir=...)` answers every example's target
image with the policy (greedy; one turn, or the RRVF tool loop), takes the program from each reply
(`code_from_response`), scores it with the benchmark's scorer (`score_chartmimic`,
`score_plot2code`, `score_websight`) and writes, in `out_dir`:

  settings.json  what was evaluated and how; a re-run with other settings is refused
  items.jsonl    one line per finished item (its ItemResult as JSON, the policy's reply included),
                 appended and synced batch by batch; a re-run skips the ids already there, so a
                 killed run resumes where it stopped (a line cut by the kill is dropped and redone)
  images/        each item's target and render, downscaled for the report
  results.json   per-item results and the aggregate (eval.report), written at the end
  report.html    the self-contained report

Batches have one shape: the last one is padded with copies of its last example (dropped after
generation), so the sampler compiles once per length bucket and rows divide the mesh's batch axes.
Scoring (sandboxed programs, judge calls) of one batch overlaps the generation of the next.
Multi-host: every process generates (the sampler is SPMD); process 0 alone scores and writes
(`out_dir` must be on a filesystem every process reads).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from PIL import Image

from rrvf_jax import env, sharding
from rrvf_jax.data.images import decode_image
from rrvf_jax.env.judges.base import Judge
from rrvf_jax.env.parsing import extract_code as extract_fenced
from rrvf_jax.eval import prompts as prompts_lib
from rrvf_jax.eval import report
from rrvf_jax.eval.chartmimic import (
  ChartMimicConfig,
  ChartMimicItem,
  response_to_code,
  score_chartmimic,
)
from rrvf_jax.eval.judging import JudgeOutcome
from rrvf_jax.eval.plot2code import Plot2CodeConfig, Plot2CodeItem, extract_code, score_plot2code
from rrvf_jax.eval.results import ItemResult
from rrvf_jax.eval.trace import TraceCache, create_trace_pool, eval_sandbox_config
from rrvf_jax.eval.websight import WebItem, WebSightConfig, score_websight
from rrvf_jax.processing import chat, image, tokens
from rrvf_jax.rollout import answer_check, episode
from rrvf_jax.rollout import sampler as sampler_lib
from rrvf_jax.rollout import sampling as sampling_lib
from rrvf_jax.train import grpo

BENCHMARKS = ("chartmimic", "plot2code", "websight")
# The environment (tool schema, answer parser, renderer) each benchmark's programs belong to.
TASKS = {"chartmimic": "chart", "plot2code": "chart", "websight": "web"}
SETTINGS_NAME = "settings.json"
ITEMS_NAME = "items.jsonl"
IMAGES_DIR = "images"
_IMAGE_SIDE = 480  # the report shows images at most this large
_SINGLE_TURN_STOPS = ("</answer>", "</tool_call>")
# How the benchmark itself turns a whole reply into a program (the fallback without <answer>).
_BENCHMARK_EXTRACT: dict[str, Callable[[str], str]] = {
  "chartmimic": response_to_code,
  "plot2code": extract_code,
  "websight": lambda text: extract_fenced(text, "html"),
}
ScorerConfig = ChartMimicConfig | Plot2CodeConfig | WebSightConfig
Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Generation:
  """What the policy wrote for one item and the program taken from it.

  text: the reply the code comes from (the last turn in the tool loop); code: the program scored
  (None: nothing usable); source: where it was found (see `code_from_response`); info: JSON-able
  facts about the generation (finish reason, tokens, turns, ...).
  """

  text: str
  code: str | None
  source: str
  info: dict[str, Any]


def check_benchmark(benchmark: str) -> str:
  """The benchmark name, or a ValueError listing the known ones."""
  if benchmark not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
  return benchmark


def code_from_response(
  text: str, benchmark: str, *, allow_tool_call: bool = True
) -> tuple[str | None, str]:
  """The program to score from one reply, and where it was found.

  In order: the `<answer>` ('answer'; 'answer_unclosed' when the reply was cut inside it); the
  first tool call's code ('tool_call': in a single turn that is the policy's first draft;
  with `allow_tool_call=False`, as for the last turn of a tool loop, (None, 'tool_call_not_run'));
  the benchmark's own extraction from the whole reply ('benchmark': ChartMimic's first ```python
  block, Plot2Code's python blocks or else the whole reply, WebSight's first fenced block or else
  the whole reply); else (None, 'none').
  """
  parsed = env.parse_turn(text, TASKS[check_benchmark(benchmark)])
  if parsed.answer is not None and parsed.answer.code is not None:
    return parsed.answer.code, "answer" if parsed.answer.ok else "answer_unclosed"
  if parsed.tool_calls:
    if not allow_tool_call:
      return None, "tool_call_not_run"
    if parsed.tool_calls[0].code:
      return parsed.tool_calls[0].code, "tool_call"
  code = _BENCHMARK_EXTRACT[benchmark](parsed.text)
  return (code, "benchmark") if code and code.strip() else (None, "none")


def target_image(example: Mapping[str, Any]) -> np.ndarray:
  """An example's target as uint8 HxWx3 (PNG bytes are decoded; arrays are taken as they are)."""
  value = example["image"]
  if isinstance(value, np.ndarray):
    return value
  return decode_image(value, str(example["id"]))


def benchmark_item(benchmark: str, example: Mapping[str, Any], target: np.ndarray):
  """The scorer's item for one dataset example (id, ground-truth code, target image)."""
  item_id, code = str(example["id"]), str(example["code"])
  if benchmark == "chartmimic":
    return ChartMimicItem(item_id, code, target=target, chart_type=example.get("chart_type"))
  if benchmark == "plot2code":
    return Plot2CodeItem(item_id, code, target=target, category=example.get("category"))
  return WebItem(item_id, code, target=target, category=example.get("category"))


# ------------------------------------------------------------------------------------- generation


class _Samplers:
  """One sampler per cache length (each compiles its own decode loop), made on first use."""

  def __init__(self, model, tokenizer, mesh: Mesh | None, rules) -> None:
    self.model, self.tokenizer, self.mesh, self.rules = model, tokenizer, mesh, rules
    self._by_length: dict[int, sampler_lib.Sampler] = {}

  def get(self, cache_length: int) -> sampler_lib.Sampler:
    """The sampler with this cache length."""
    if cache_length not in self._by_length:
      self._by_length[cache_length] = sampler_lib.Sampler(
        self.model, self.tokenizer, cache_length=cache_length, mesh=self.mesh, rules=self.rules
      )
    return self._by_length[cache_length]


@dataclasses.dataclass(frozen=True)
class _GenerationSetup:
  """Everything generation needs besides the targets."""

  benchmark: str
  task: str
  instruction: str | None  # None: the benchmark's own prompt (single turn), the RRVF one (loop)
  system_prompt: str | None
  proc_cfg: image.ImageProcessorConfig
  max_turns: int
  max_new_tokens: int
  max_total_tokens: int | None
  on_budget: str
  render_submit: episode.RenderSubmit | None
  feedback_judge: Judge | None
  max_response_tokens: int | None = None
  cache_length: int | None = None  # the tool loop's sampler (None: max_total_tokens)


def _single_turn(samplers: _Samplers, targets, setup: _GenerationSetup) -> list[Generation]:
  """One greedy turn per target: the benchmark's own prompt, or a given one with the tool schema."""
  tok = samplers.tokenizer
  prompts = [
    answer_check.prompt_segment(
      tok,
      target,
      instruction=setup.instruction or prompts_lib.benchmark_prompt(setup.benchmark, target.shape),
      proc_cfg=setup.proc_cfg,
      system_prompt=setup.system_prompt,
      tools=env.tool_schemas(setup.task) if setup.instruction else None,
    )
    for target in targets
  ]
  longest = max(len(p.token_ids) for p in prompts)
  cache = sampler_lib.bucket_length(longest, sampler_lib.DEFAULT_BUCKETS) + setup.max_new_tokens
  params = sampling_lib.SamplingParams(
    max_new_tokens=setup.max_new_tokens,
    temperature=0.0,
    stop_token_ids=tokens.special_token_ids(tok).eos_token_ids,
    stop_strings=_SINGLE_TURN_STOPS,
    banned_token_ids=grpo.banned_token_ids(tok),
  )
  completions = samplers.get(cache).sample(prompts, params, jax.random.key(0))
  out = []
  for c, p in zip(completions, prompts, strict=True):
    code, source = code_from_response(c.text, setup.benchmark)
    info = {
      "finish_reason": c.finish_reason,
      "tokens": len(c.token_ids),
      "prompt_tokens": len(p.token_ids),
    }
    out.append(Generation(c.text, code, source, info))
  return out


def _tool_loop(samplers: _Samplers, targets, setup: _GenerationSetup) -> list[Generation]:
  """One greedy RRVF episode per target (render tool + judge feedback); the final turn's code."""
  tok = samplers.tokenizer
  params = episode.episode_sampling_params(tok, max_new_tokens=setup.max_new_tokens, temperature=0)
  params = dataclasses.replace(params, banned_token_ids=grpo.banned_token_ids(tok))
  played = episode.run_episodes(
    samplers.get(setup.cache_length or setup.max_total_tokens),
    targets,
    group_size=1,
    task=setup.task,
    render_submit=setup.render_submit,
    judge=setup.feedback_judge,
    sampling=params,
    key=jax.random.key(0),
    max_turns=setup.max_turns,
    max_total_tokens=setup.max_total_tokens,
    on_budget=setup.on_budget,
    instruction=setup.instruction,
    system_prompt=setup.system_prompt,
    proc_cfg=setup.proc_cfg,
    max_response_tokens=setup.max_response_tokens,
  )
  out = []
  for t in played.trajectories:
    last = t.turns[-1].text if t.turns else ""
    code, source = code_from_response(last, setup.benchmark, allow_tool_call=False)
    info = {
      "end_reason": t.end_reason,
      "turns": [turn.text for turn in t.turns],
      "tool_calls": int(t.reward.n_tool_calls),
      "tool_calls_ok": int(t.reward.n_successful_tool_calls),
      "forced_answer": bool(t.forced_answer),
      "tokens": t.num_policy_tokens,
      "prompt_tokens": t.prompt_length,
    }
    out.append(Generation(last, code, source, info))
  return out


# ---------------------------------------------------------------------------------------- storage


def _file_stem(item_id: str) -> str:
  """A file-name-safe, collision-free stem for an item id."""
  digest = hashlib.sha1(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
  return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', item_id)[:80]}-{digest}"


def _save_png(array: np.ndarray, path: Path) -> None:
  """Writes an RGB image downscaled to the report's size."""
  pil = Image.fromarray(np.ascontiguousarray(np.asarray(array)[..., :3]).astype(np.uint8))
  if max(pil.size) > _IMAGE_SIDE:
    ratio = _IMAGE_SIDE / max(pil.size)
    pil = pil.resize((max(1, round(pil.width * ratio)), max(1, round(pil.height * ratio))))
  buf = io.BytesIO()
  pil.save(buf, format="PNG")
  path.write_bytes(buf.getvalue())


def result_from_json(doc: Mapping[str, Any]) -> ItemResult:
  """An ItemResult back from its `to_json` form (no images)."""
  judge = doc.get("judge")
  return ItemResult(
    benchmark=doc["benchmark"],
    item_id=doc["id"],
    category=doc.get("category"),
    exec_ok=bool(doc["exec_ok"]),
    status=doc["status"],
    message=doc.get("message", ""),
    metrics=dict(doc["metrics"]),
    judge=None if judge is None else JudgeOutcome(**judge),
    primary=doc.get("primary"),
    code=doc.get("code"),
    details=dict(doc.get("details") or {}),
  )


class ItemStore:
  """The resumable per-item record of an evaluation in `out_dir` (settings, items, images)."""

  def __init__(self, out_dir: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    self.out_dir = Path(out_dir)
    self.items_path = self.out_dir / ITEMS_NAME
    self.images_dir = self.out_dir / IMAGES_DIR
    self.settings = json.loads(json.dumps(dict(settings), sort_keys=True, default=str))
    self.done: dict[str, tuple[ItemResult, dict[str, str]]] = {}

  def open(self, write: bool = True) -> dict[str, tuple[ItemResult, dict[str, str]]]:
    """Checks the settings against a previous run's, loads its finished items; returns them.

    `write=False` (processes other than 0) only reads: no settings file, no repair.
    """
    path = self.out_dir / SETTINGS_NAME
    if path.is_file():
      previous = json.loads(path.read_text())
      changed = sorted(
        k for k in set(previous) | set(self.settings) if previous.get(k) != self.settings.get(k)
      )
      if changed:
        k = changed[0]
        raise ValueError(
          f"{self.out_dir} holds results of another evaluation ({k}: "
          f"{_short(self.settings.get(k))} now, {_short(previous.get(k))} there); "
          "use another out_dir, or delete that one to start over"
        )
    elif write:
      self.images_dir.mkdir(parents=True, exist_ok=True)
      _write_atomic(path, json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
    self.done = self._load(repair=write)
    return self.done

  def _load(self, repair: bool) -> dict[str, tuple[ItemResult, dict[str, str]]]:
    """Finished items from items.jsonl; a line cut by a kill is dropped (and the file repaired)."""
    if not self.items_path.is_file():
      return {}
    raw = self.items_path.read_text(encoding="utf-8")
    done: dict[str, tuple[ItemResult, dict[str, str]]] = {}
    good: list[str] = []
    dropped = 0
    for number, line in enumerate(raw.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        doc = json.loads(line)
        result = result_from_json(doc["result"])
      except (ValueError, KeyError, TypeError) as e:
        where = f"{self.items_path}:{number}"
        logging.warning("%s is unreadable (%s); that item is evaluated again", where, e)
        dropped += 1
        continue
      done[result.item_id] = (result, dict(doc.get("images") or {}))
      good.append(line)
    if repair and (dropped or (raw and not raw.endswith("\n"))):
      _write_atomic(self.items_path, "".join(line + "\n" for line in good))
    return done

  def append(self, results: Sequence[ItemResult]) -> None:
    """Saves the images and appends one line per result (synced: a kill loses no finished item)."""
    self.images_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in results:
      images = {}
      stem = _file_stem(r.item_id)
      for kind, array in (("target", r.target), ("render", r.render)):
        if array is not None:
          name = f"{IMAGES_DIR}/{stem}.{kind}.png"
          _save_png(array, self.out_dir / name)
          images[kind] = name
      doc = {"id": r.item_id, "result": report._clean(r.to_json()), "images": images}
      lines.append(json.dumps(doc, sort_keys=True, allow_nan=False) + "\n")
      self.done[r.item_id] = (_without_images(r), images)
    with open(self.items_path, "a", encoding="utf-8") as f:
      f.writelines(lines)
      f.flush()
      os.fsync(f.fileno())

  def with_images(self, result: ItemResult) -> ItemResult:
    """The result with its saved target and render images loaded back."""
    _, images = self.done[result.item_id]
    loaded = {}
    for kind in ("target", "render"):
      path = self.out_dir / images[kind] if kind in images else None
      loaded[kind] = (
        np.asarray(Image.open(path).convert("RGB")) if path and path.is_file() else None
      )
    return dataclasses.replace(result, **loaded)


def _write_atomic(path: Path, text: str) -> None:
  """Replaces a file at once (a reader sees the old or the new content, never a part)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def _without_images(result: ItemResult) -> ItemResult:
  """The result without its (large) images, as kept in memory until the report."""
  return dataclasses.replace(result, target=None, render=None)


def _judge_name(judge: Judge | None) -> str | None:
  """The judge's model name (OpenAI-compatible judges) or its registry name; None without one."""
  if judge is None:
    return None
  return getattr(getattr(judge, "config", None), "model", None) or judge.name


def _short(value: Any, limit: int = 60) -> str:
  """A setting for an error message, cut to `limit` characters."""
  text = json.dumps(value, sort_keys=True, default=str)
  return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------- the loop


def _batches(
  examples: Sequence[Mapping[str, Any]],
  n: int,
  done: Mapping[str, Any],
  batch_size: int,
  seen: list[str],
) -> Iterator[list[Mapping[str, Any]]]:
  """Batches of the first `n` examples not in `done`, in source order; ids go to `seen` as read."""
  batch: list[Mapping[str, Any]] = []
  unique: set[str] = set()
  for i in range(n):
    example = examples[i]
    item_id = str(example["id"])
    if item_id in unique:
      raise ValueError(f"example id {item_id!r} occurs twice in the evaluated examples")
    unique.add(item_id)
    seen.append(item_id)
    if item_id in done:
      continue
    batch.append(example)
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def _check_batch_size(batch_size: int, mesh: Mesh | None, rules) -> None:
  """batch_size must be positive and divide the mesh axes the batch is sharded over."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if mesh is not None:
    spec = sharding.logical_to_spec(("batch",), rules or sharding.FSDP_TP, mesh)
    sharding.check_divisible((batch_size,), NamedSharding(mesh, spec), "evaluation batch_size")


def _score(
  benchmark: str,
  items: Sequence[Any],
  generations: Sequence[Generation],
  *,
  pool,
  html_renderer,
  judge: Judge | None,
  config: ScorerConfig | None,
  cache: TraceCache,
) -> list[ItemResult]:
  """Scores one batch with the benchmark's scorer; the generation goes into each item's details."""
  codes = [g.code for g in generations]
  if benchmark == "chartmimic":
    results = score_chartmimic(
      items, codes, pool=pool, judge=judge, config=config or ChartMimicConfig(), cache=cache
    )
  elif benchmark == "plot2code":
    results = score_plot2code(
      items, codes, pool=pool, judge=judge, config=config or Plot2CodeConfig(), cache=cache
    )
  else:
    results = score_websight(
      items, codes, renderer=html_renderer, judge=judge, config=config or WebSightConfig(),
      cache=cache,
    )  # fmt: skip
  for r, g in zip(results, generations, strict=True):
    r.details["generation"] = {"text": g.text, "code_source": g.source, **g.info}
  return results


def evaluate(
  model,
  tokenizer: tokens.Tokenizer,
  examples: Sequence[Mapping[str, Any]],
  *,
  benchmark: str,
  out_dir: str | os.PathLike,
  instruction: str | None = None,
  task: str | None = None,
  proc_cfg: image.ImageProcessorConfig | None = None,
  system_prompt: str | None = chat.DEFAULT_SYSTEM_PROMPT,
  tool_loop: bool = False,
  max_turns: int = 5,
  max_new_tokens: int = 1024,
  max_total_tokens: int | None = None,
  max_response_tokens: int | None = None,
  cache_length: int | None = None,
  on_budget: str = "force_answer",
  batch_size: int = 8,
  max_items: int | None = None,
  judge: Judge | None = None,
  render_submit: episode.RenderSubmit | None = None,
  feedback_judge: Judge | None = None,
  mesh: Mesh | None = None,
  rules: sharding.Rules | None = None,
  scorer_config: ScorerConfig | None = None,
  trace_pool=None,
  html_renderer=None,
  meta: Mapping[str, Any] | None = None,
  n_examples: int = 3,
  progress: Progress | None = None,
) -> dict[str, Any]:
  """Evaluates a policy on a benchmark split, resumably; returns the aggregate (see module doc).

  Args:
    model: the policy (QwenVL). tokenizer: its tokenizer.
    examples: dataset examples (dicts with 'id', 'image' PNG bytes or uint8 HxWx3, 'code' the
      ground truth; e.g. an `rrvf_jax.data.ExampleSource`); the first `max_items` are evaluated.
    benchmark: 'chartmimic', 'plot2code' or 'websight' (the scorer and its aggregate).
    out_dir: where items.jsonl, images/, results.json and report.html go (resumed if present).
    instruction, system_prompt, proc_cfg: the prompt. instruction None: one turn uses the
      benchmark's own prompt (`eval.prompts`, no tools), the tool loop the RRVF task prompt
      (`env.task_instruction`, the one trained on); a given instruction is used for both, with the
      task's tool schema in the system prompt. task: 'chart' or 'web' (default: the benchmark's).
    tool_loop: False: one greedy turn (stops at `</answer>` or `</tool_call>`); True: a greedy RRVF
      episode per item (`render_submit` renders tool calls, `feedback_judge` writes the feedback,
      at most `max_turns` turns, `max_total_tokens` tokens, tool responses cut to
      `max_response_tokens`, `on_budget` at a limit, a sampler cache of `cache_length` slots); the
      final turn's code is scored.
    max_new_tokens: tokens per turn. batch_size: rows per sampler call (must divide the mesh's batch
      axes). max_items: evaluate only the first N examples (None: all).
    judge: the benchmark judge (an OpenAIJudge for ChartMimic / Plot2Code; None skips the judge
      score: ChartMimic's Overall is then None, with a note).
    mesh, rules: sharding of the sampler. scorer_config: ChartMimicConfig / Plot2CodeConfig /
      WebSightConfig. trace_pool: the sandbox pool for ChartMimic / Plot2Code programs (default:
      one made and closed here). html_renderer: WebSight's renderer (default: the shared one).
    meta: extra facts for results.json (e.g. the checkpoint); part of the resume check.
    n_examples: best / worst / failed items shown in the report. progress: called with
      (items finished, items in total) after each batch.
  """
  check_benchmark(benchmark)
  task = task or TASKS[benchmark]
  if task != TASKS[benchmark]:
    raise ValueError(f"benchmark {benchmark} needs task {TASKS[benchmark]!r}, got {task!r}")
  _check_batch_size(batch_size, mesh, rules)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  if tool_loop and (render_submit is None or feedback_judge is None or max_total_tokens is None):
    raise ValueError("tool_loop=True needs render_submit, feedback_judge and max_total_tokens")
  n = len(examples) if max_items is None else min(max(max_items, 0), len(examples))
  if n == 0:
    raise ValueError(f"no examples to evaluate ({len(examples)} given, max_items={max_items})")
  setup = _GenerationSetup(
    benchmark=benchmark,
    task=task,
    instruction=instruction,
    system_prompt=system_prompt,
    proc_cfg=proc_cfg or image.ImageProcessorConfig(),
    max_turns=max_turns,
    max_new_tokens=max_new_tokens,
    max_total_tokens=max_total_tokens,
    on_budget=on_budget,
    render_submit=render_submit,
    feedback_judge=feedback_judge,
    max_response_tokens=max_response_tokens,
    cache_length=cache_length,
  )
  settings = _settings(setup, examples, tool_loop, judge, scorer_config, meta)
  writer = jax.process_index() == 0
  store = ItemStore(out_dir, settings)
  done = store.open(write=writer)
  if jax.process_count() > 1:
    # Every process must skip the same items (the sampler calls are collective).
    multihost_utils.sync_global_devices(f"evaluate {out_dir}: finished items read")
  logging.info("%s: %d items; %d finished items found in %s", benchmark, n, len(done), out_dir)

  samplers = _Samplers(model, tokenizer, mesh, rules)
  generate = _tool_loop if tool_loop else _single_turn
  own_pool = trace_pool is None and benchmark != "websight" and writer
  pool = create_trace_pool(config=eval_sandbox_config()) if own_pool else trace_pool
  scorer = functools.partial(
    _score, benchmark, pool=pool, html_renderer=html_renderer, judge=judge, config=scorer_config,
    cache=TraceCache(),
  )  # fmt: skip
  seen: list[str] = []
  background = _Background(store, scorer, seen, n, progress) if writer else None
  generation_s, new_tokens = 0.0, 0
  try:
    for batch in _batches(examples, n, done, batch_size, seen):
      targets = [target_image(ex) for ex in batch]
      # One compiled shape: the last batch is padded with copies of its last target (dropped).
      padded = targets + [targets[-1]] * (batch_size - len(targets))
      t = time.perf_counter()
      generations = generate(samplers, padded, setup)[: len(batch)]
      generation_s += time.perf_counter() - t
      new_tokens += sum(int(g.info.get("tokens") or 0) for g in generations)
      if background is not None:
        items = [benchmark_item(benchmark, ex, tg) for ex, tg in zip(batch, targets, strict=True)]
        background.submit(items, generations)  # scored while the next batch generates
  finally:
    if background is not None:
      background.close()  # waits for the last batch (also when generation failed)
    if own_pool:
      pool.close()
  if background is None:
    return {}
  results = [store.done[i][0] for i in seen]
  sources = collections.Counter(r.details.get("generation", {}).get("code_source") for r in results)
  run_meta = {
    **{k: v for k, v in settings.items() if k != "meta"},
    **settings["meta"],
    "items": len(results),
    "generated_this_run": background.generated,
    "resumed": len(results) - background.generated,
    "code_sources": {str(k): v for k, v in sources.items()},
    "generated_tokens_this_run": new_tokens,
    "seconds_this_run": {
      "generation": round(generation_s, 1),
      "scoring": round(background.scoring_s, 1),
      "total": round(time.perf_counter() - background.start, 1),
    },
  }
  return _write_outputs(store, results, n_examples=n_examples, meta=run_meta)


def _settings(setup, examples, tool_loop, judge, scorer_config, meta) -> dict[str, Any]:
  """What a resumed run must share with the run that wrote out_dir (and results.json's meta)."""
  settings = {
    "benchmark": setup.benchmark,
    "dataset": getattr(examples, "name", None),
    "split": getattr(examples, "split", None),
    "instruction": setup.instruction,
    "system_prompt": setup.system_prompt,
    "image_processor": setup.proc_cfg.to_dict(),
    "tool_loop": tool_loop,
    "max_new_tokens": setup.max_new_tokens,
    "judge": _judge_name(judge),
    "scorer": None if scorer_config is None else dataclasses.asdict(scorer_config),
    "meta": dict(meta or {}),
  }
  if tool_loop:
    settings["tool_loop_settings"] = {
      "max_turns": setup.max_turns,
      "max_total_tokens": setup.max_total_tokens,
      "max_response_tokens": setup.max_response_tokens,
      "on_budget": setup.on_budget,
      "feedback_judge": _judge_name(setup.feedback_judge),
    }
  return settings


class _Background:
  """Scores one batch at a time in a thread and appends it to the store when it is done.

  `seen` is the list of evaluated ids read so far (filled by `_batches`), for the progress count.
  """

  def __init__(self, store: ItemStore, scorer, seen: list[str], total: int, progress) -> None:
    self.store, self.scorer, self.seen, self.total = store, scorer, seen, total
    self.progress: Progress | None = progress
    self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eval-score")
    self.pending: concurrent.futures.Future | None = None
    self.generated = 0
    self.scoring_s = 0.0
    self.start = time.perf_counter()

  def _score(self, items, generations) -> list[ItemResult]:
    """The scorer, timed (runs in the thread)."""
    t = time.perf_counter()
    results = self.scorer(items, generations)
    self.scoring_s += time.perf_counter() - t
    return results

  def submit(self, items, generations) -> None:
    """Records the previous batch (waiting for it), then starts scoring this one."""
    self.wait()
    self.pending = self.executor.submit(self._score, items, generations)

  def wait(self) -> None:
    """Waits for the batch being scored, appends it to the store and reports progress."""
    if self.pending is None:
      return
    pending, self.pending = self.pending, None
    results = pending.result()
    self.store.append(results)
    self.generated += len(results)
    finished = [self.store.done[i][0] for i in self.seen if i in self.store.done]
    logging.info(
      "%s: %d/%d items done (%d generated in %.1f s this run), exec rate so far %.1f%%",
      results[0].benchmark, len(finished), self.total, self.generated,
      time.perf_counter() - self.start, 100.0 * sum(r.exec_ok for r in finished) / len(finished),
    )  # fmt: skip
    if self.progress is not None:
      self.progress(len(finished), self.total)

  def close(self) -> None:
    """Records the last batch, also while an error propagates (what was scored is kept)."""
    try:
      self.wait()
    finally:
      self.executor.shutdown(wait=True)


def _write_outputs(
  store: ItemStore, results: list[ItemResult], *, n_examples: int, meta: Mapping[str, Any]
) -> dict[str, Any]:
  """results.json and report.html (images loaded only for the items the report shows)."""
  shown = {r.item_id for group in report.pick_examples(results, n_examples).values() for r in group}
  results = [store.with_images(r) if r.item_id in shown else r for r in results]
  agg = report.aggregate(results)
  report.write_results_json(results, store.out_dir / report.RESULTS_NAME, aggregate_=agg, meta=meta)
  dataset = "/".join(str(meta[k]) for k in ("dataset", "split") if meta.get(k))
  title = f"{agg['benchmark']} evaluation" + (f" ({dataset})" if dataset else "")
  report.write_report_html(
    results, store.out_dir / report.REPORT_NAME, aggregate_=agg, title=title,
    n_examples=n_examples,
  )  # fmt: skip
  logging.info("%s: results in %s", agg["benchmark"], store.out_dir / report.RESULTS_NAME)
  return agg
