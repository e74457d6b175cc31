"""Plot2Code (matplotlib, Direct Asking) scoring: pass rate, text-match score, judge rating.

Mirrors `TencentARC/Plot2Code`:

- code: all ```python blocks of the response joined by newlines, else the whole response;
- pass (exec rate): the program runs and `plt.gcf()` saved at its own size is not entirely white
  (the benchmark writes an all-white image for a failure and counts non-white images);
- text match (pass items only): every visible non-empty Text of each figure after a draw —
  tick labels included — lower-cased, with its position in its own coordinates. Greedy over the
  reference texts: the first generated text with the same string whose position similarity
  exp(−‖p_ref − p_gen·(figsize_ref/figsize_gen)‖ / 100) exceeds 0.8 is matched and removed (the
  benchmark's minimum-Levenshtein search accepting only distance 0 is exactly this). Score =
  matched / (matched + unmatched_ref + unmatched_gen); 1 when both figures have no text;
- rating: the judge's 1–10 `Rating: [[n]]` on pass items; unparsable replies are left out.

Aggregates: exec_rate; text_pass / rating_pass = means over pass (rated) items — the original
paper's numbers; text / rating = those × exec rate — RRVF's headline columns (failures count 0).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from rrvf_jax.env.judges.base import Judge
from rrvf_jax.env.sandbox import SandboxPool
from rrvf_jax.eval import judging
from rrvf_jax.eval.results import ItemResult, by_category, check_benchmark, mean, scale, score_all
from rrvf_jax.eval.trace import CodeTrace, TraceCache, reference_trace, submit_trace

BENCHMARK = "plot2code"
PLOT2CODE_TIMEOUT_S = 30.0  # execute_generated_code.py joins the child process for 30 s
_PY_BLOCKS = re.compile(r"```python(.*?)```", re.DOTALL)
Label = tuple[str, float | None, float | None]
DEVIATIONS = (
  "Both programs run in separate sandboxed processes (the benchmark exec()s them in its own "
  "process, without a timeout for the text match).",
  "The figure scored is the one left open, else the last one saved or shown (the benchmark takes "
  "plt.gcf(), an empty figure if the code closed its own).",
  "Transparent figures are composited over white before the all-white test.",
)


@dataclasses.dataclass(frozen=True)
class Plot2CodeItem:
  """One benchmark item: id, ground-truth program, reference image (default: drawn here)."""

  item_id: str
  gt_code: str
  target: np.ndarray | None = None
  category: str | None = None


@dataclasses.dataclass(frozen=True)
class Plot2CodeConfig:
  """Scoring settings (defaults follow the benchmark)."""

  timeout_s: float = PLOT2CODE_TIMEOUT_S
  dpi: float = 100.0  # matplotlib's default savefig dpi, as the benchmark saves
  max_side_px: int = 2048
  position_threshold: float = 0.8


def extract_code(response: str) -> str:
  """Plot2Code's extract_code: all ```python blocks (stripped) joined by newlines, else all text."""
  matches = _PY_BLOCKS.findall(response)
  if matches:
    return "\n".join(m.strip() for m in matches)
  return response


def is_all_white(image: np.ndarray | None) -> bool:
  """Whether an image is missing or every pixel is pure white (the benchmark's failure marker)."""
  return image is None or bool((np.asarray(image) == 255).all())


def position_similarity(
  ref: tuple[float | None, float | None],
  gen: tuple[float | None, float | None],
  size_ratio: tuple[float, float],
) -> float:
  """exp(−‖ref − gen·size_ratio‖₂ / 100); 0 when a position is not numeric."""
  if None in ref or None in gen:
    return 0.0
  dx = ref[0] - gen[0] * size_ratio[0]
  dy = ref[1] - gen[1] * size_ratio[1]
  return math.exp(-math.hypot(dx, dy) / 100.0)


def text_match_score(
  reference: Sequence[Label],
  generated: Sequence[Label],
  size_ratio: tuple[float, float] = (1.0, 1.0),
  threshold: float = 0.8,
) -> float:
  """Plot2Code's match_texts: exact lower-cased text with the position gate, |M|/(|R|+|G|−|M|)."""
  remaining = list(generated)
  matched = 0
  for text, x, y in reference:
    for j, (text2, x2, y2) in enumerate(remaining):
      if text2 == text and position_similarity((x, y), (x2, y2), size_ratio) > threshold:
        remaining.pop(j)
        matched += 1
        break
  total = matched + (len(reference) - matched) + (len(generated) - matched)
  return 1.0 if total == 0 else matched / total


def size_ratio(ref: CodeTrace, gen: CodeTrace) -> tuple[float, float]:
  """figsize_ref / figsize_gen per axis (the benchmark's scaling of generated positions)."""
  (rw, rh), (gw, gh) = ref.figsize or (None, None), gen.figsize or (None, None)
  if None in (rw, rh, gw, gh) or gw == 0 or gh == 0:
    return (math.nan, math.nan)
  return (rw / gw, rh / gh)


def _reference_trace(
  item: Plot2CodeItem,
  pool: SandboxPool | None,
  config: Plot2CodeConfig,
  cache: TraceCache | None,
) -> CodeTrace:
  """The ground-truth trace of `item` (cached; its image is dropped when it has its own target)."""
  return reference_trace(
    "plot2code-ref",
    item.gt_code,
    own_target=item.target is not None,
    pool=pool,
    timeout_s=config.timeout_s,
    dpi=config.dpi,
    max_side_px=config.max_side_px,
    cache=cache,
  )


def score_plot2code_item(
  item: Plot2CodeItem,
  code: str | None,
  *,
  pool: SandboxPool | None = None,
  judge: Judge | None = None,
  config: Plot2CodeConfig = Plot2CodeConfig(),
  cache: TraceCache | None = None,
) -> ItemResult:
  """Scores one generated program (see `extract_code`) against an item; never raises for it."""
  code = code or ""
  gen_future = None
  if code.strip():
    gen_future = submit_trace(
      code, pool=pool, timeout_s=config.timeout_s, dpi=config.dpi, max_side_px=config.max_side_px
    )
  ref = _reference_trace(item, pool, config, cache)
  gen = gen_future.result() if gen_future is not None else None
  target = item.target if item.target is not None else ref.image
  details: dict[str, Any] = {"reference": ref.summary()}
  if not ref.ok:
    details["reference_error"] = f"{ref.status}: {ref.message}"
  if gen is None:
    status, message = "no_code", "No code to run."
  else:
    details["generated"] = gen.summary()
    status, message = str(gen.status), gen.message
    if gen.ok and is_all_white(gen.image):
      status, message = "blank_image", "The figure is entirely white (a failure for Plot2Code)."
  passed = status == "ok"
  text = None
  if passed:
    ratio = size_ratio(ref, gen)
    text = text_match_score(ref.labels, gen.labels, ratio, config.position_threshold)
    details["text_counts"] = {"reference": len(ref.labels), "generated": len(gen.labels)}
  if target is None:
    outcome = judging.JudgeOutcome(None, note="no reference image to judge against")
  else:
    outcome = judging.judge_plot2code(judge, target, gen.image if passed else None)
  return ItemResult(
    benchmark=BENCHMARK,
    item_id=item.item_id,
    category=item.category,
    exec_ok=passed,
    status=status,
    message=message,
    metrics={"text": text, "rating": outcome.score},
    judge=outcome,
    primary=None if text is None else 100.0 * text,
    code=code,
    details=details,
    target=target,
    render=gen.image if gen is not None else None,
  )


def score_plot2code(
  items: Sequence[Plot2CodeItem],
  codes: Sequence[str | None],
  *,
  pool: SandboxPool | None = None,
  judge: Judge | None = None,
  config: Plot2CodeConfig = Plot2CodeConfig(),
  cache: TraceCache | None = None,
  max_workers: int = 8,
) -> list[ItemResult]:
  """Scores many items concurrently; results in input order."""
  if len(items) != len(codes):
    raise ValueError(f"got {len(items)} Plot2Code items but {len(codes)} generated programs")
  judging.require_openai_judge(judge, "Plot2Code")
  kwargs = {"pool": pool, "judge": judge, "config": config, "cache": cache}
  return score_all(
    score_plot2code_item, items, codes, kwargs, max_workers=max_workers, name="plot2code"
  )


def aggregate_plot2code(results: Sequence[ItemResult], *, breakdown: bool = True) -> dict[str, Any]:
  """Exec rate, pass-only means (the paper's) and × exec-rate variants (RRVF's), per category."""
  check_benchmark(results, BENCHMARK)
  n = len(results)
  passed = [r for r in results if r.exec_ok]
  exec_rate = scale(mean([float(r.exec_ok) for r in results]), 100.0)
  out: dict[str, Any] = {"benchmark": BENCHMARK, "n_items": n, "n_passed": len(passed)}
  out["exec_rate"] = exec_rate
  out["text_pass"] = scale(mean([r.metrics["text"] for r in passed]), 100.0)
  out["text"] = scale(mean([r.metrics["text"] or 0.0 for r in results], n=n), 100.0)
  ratings = [r.metrics["rating"] for r in passed if r.metrics["rating"] is not None]
  # Plot2Code rates pass items only: "missing" are pass items without a readable rating.
  out["judge_items"] = len(ratings)
  out["judge_missing"] = len(passed) - len(ratings)
  out["rating_pass"] = mean(ratings)
  out["rating"] = (
    None
    if out["rating_pass"] is None or exec_rate is None
    else out["rating_pass"] * exec_rate / 100
  )
  out["judge_models"] = sorted(
    {r.judge.model for r in results if r.judge is not None and r.judge.model}
  )
  out["reference_failures"] = sum(1 for r in results if "reference_error" in r.details)
  if breakdown:
    out["by_category"] = by_category(results, aggregate_plot2code)
    out["deviations"] = list(DEVIATIONS)
  return out
