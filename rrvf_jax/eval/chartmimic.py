"""ChartMimic (Direct Mimic) scoring: exec rate, Text/Layout/Type/Color F1, judge score, Overall.

Mirrors VLMEvalKit's `vlmeval/dataset/chartmimic.py` (the evaluator RRVF most likely ran):

- the generated program is cut at its first `plt.savefig(` / `plt.show(` (the benchmark drops
  everything from there on) and run once in the sandbox; exec success = it ran and its figure was
  drawn (the benchmark: its PDF exists). Ground truth runs unchanged, in the same interpreter.
- Text: strings drawn to PDF after removing x/y ticks (so tick labels are excluded), multiset exact
  match. Layout: (nrows, ncols, row/col start/end) of each axes with a subplotspec, multiset exact
  match; networkx items ('graph_*') get ChartMimic's fixed layout on the reference side only, as in
  VLMEvalKit. Type: outermost plotting-call counts, Σ min(gen, ref). Color: unique
  (function, colour) pairs re-read after the program ran, filtered when more than 10, best
  one-to-one assignment within each function with similarity max(0, 1 − ΔE2000 / 100)
  (Hungarian algorithm = the benchmark's brute force over permutations), P = S / |gen|,
  R = S / |ref|.
- Each is an F1 in [0, 1] per item; failures count 0; the benchmark value is the mean × 100 over all
  items. Judge score 0–100 per item (failures 0), mean over all items.
  Overall = (mean(Text, Layout, Type, Color) + judge score) / 2.

Deviations (all deterministic; see `DEVIATIONS`) are listed so a report can state them.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.color import deltaE_ciede2000

from rrvf_jax.env.judges.base import Judge
from rrvf_jax.env.sandbox import SandboxPool
from rrvf_jax.env.types import Status
from rrvf_jax.eval import judging
from rrvf_jax.eval.results import (
  PRF,
  ItemResult,
  by_category,
  check_benchmark,
  judge_counts,
  mean,
  scale,
  score_all,
)
from rrvf_jax.eval.trace import (  # noqa: F401  (eval_sandbox_config is re-exported)
  DEFAULT_TIMEOUT_S,
  CodeTrace,
  TraceCache,
  code_key,
  eval_sandbox_config,
  reference_trace,
  submit_trace,
)

BENCHMARK = "chartmimic"
METRICS = ("text", "layout", "type", "color")
DEVIATIONS = (
  "Type keys are the unwrapped defining module + function name: on matplotlib 3.8.4 the "
  "benchmark's inspect.getfile keys put Axes.bar/Axes3D.bar and Axes.scatter/Axes3D.scatter "
  "under one key.",
  "Colours are sorted before the >10-colour filter (the benchmark uses set order, which varies "
  "with PYTHONHASHSEED); colour similarity uses skimage's CIEDE2000 on Lab computed with "
  "colormath's constants (|ΔE| differences < 2e-4 on tested pairs).",
  "A colour the tracer cannot record is skipped (the benchmark's tracer would crash and score the "
  "whole side 0); the hooks survive exceptions inside plotting calls.",
  "One sandboxed run per program collects all four traces (the benchmark runs 4 scripts + 1 exec).",
  "The judge sees the generated figure drawn at its own size (dpi 100, ≤2048 px), not a 350-dpi "
  "PDF raster.",
)
_SAVEFIG = re.compile(r"plt\.savefig\(.*\n*", re.S)
_SHOW = re.compile(r"plt.show\(.*\n*", re.S)
_PY_BLOCK = re.compile(r"```python(.*?)```", re.DOTALL)
_ESCAPES = {
  r"\\n": "\n",
  r"\\r": "\r",
  r"\\t": "\t",
  r"\\\"": '"',
  r"\\'": "'",
  r"\\\\": "\\",
  r"\\b": "\b",
  r"\\f": "\f",
  r"\\v": "\v",
}
# colormath 3.0.0's sRGB -> XYZ matrix and D65 white point (what the benchmark's Lab uses).
_SRGB_TO_XYZ = np.array(
  [[0.412424, 0.357579, 0.180464], [0.212656, 0.715158, 0.0721856], [0.0193324, 0.119193, 0.950444]]
)
_D65 = np.array([0.95047, 1.00000, 1.08883])
_CIE_E = 216.0 / 24389.0


@dataclasses.dataclass(frozen=True)
class ChartMimicItem:
  """One benchmark item: id, ground-truth program, reference image (what the judge compares
  against; default: the ground truth drawn here) and chart type (default: the id's prefix)."""

  item_id: str
  gt_code: str
  target: np.ndarray | None = None
  chart_type: str | None = None

  @property
  def category(self) -> str:
    """Chart type: `chart_type`, else the id up to its last '_' ('bar_12' -> 'bar')."""
    if self.chart_type:
      return self.chart_type
    return self.item_id.rsplit("_", 1)[0] if "_" in self.item_id else self.item_id


@dataclasses.dataclass(frozen=True)
class ChartMimicConfig:
  """Scoring settings (defaults follow the benchmark)."""

  timeout_s: float = DEFAULT_TIMEOUT_S  # per program, as VLMEvalKit's subprocess timeout
  truncate: bool = True  # cut generated code at its first plt.savefig( / plt.show(
  # networkx layout special case: 'vlmevalkit' (reference side), 'both' (original repo), 'none'.
  graph_layout: str = "vlmevalkit"
  color_filter_above: int = 10  # more unique colours than this are filtered (similarity > 0.7)
  color_filter_similarity: float = 0.7
  dpi: float = 100.0  # the drawn image (judge and report)
  max_side_px: int = 2048

  def __post_init__(self) -> None:
    if self.graph_layout not in ("vlmevalkit", "both", "none"):
      raise ValueError(
        f"graph_layout must be 'vlmevalkit', 'both' or 'none': {self.graph_layout!r}"
      )


# ----------------------------------------------------------------------------- code handling


def extract_python_code(response: str) -> str:
  """VLMEvalKit: the first ```python ...``` block of a response, or '' when there is none."""
  matches = _PY_BLOCK.findall(response)
  return matches[0] if matches else ""


def clean_escape_chars(code: str) -> str:
  """VLMEvalKit's clean_escape_chars: literal backslash escapes ('\\\\n') become characters."""
  for escaped, unescaped in _ESCAPES.items():
    code = code.replace(escaped, unescaped)
  return code


def response_to_code(response: str) -> str:
  """A model response as VLMEvalKit turns it into code ('' means: no code, scored 0)."""
  return clean_escape_chars(extract_python_code(response))


def truncate_for_execution(code: str) -> str:
  """VLMEvalKit: drop everything from the first 'plt.savefig(' and from 'plt.show(' on."""
  code = _SAVEFIG.sub("", code)
  code = _SHOW.sub("", code)
  return code.strip()


# ----------------------------------------------------------------------------- metrics


def text_prf(generated: Sequence[str], reference: Sequence[str]) -> PRF:
  """Multiset exact match of drawn strings (case and whitespace sensitive)."""
  matched = sum((collections.Counter(generated) & collections.Counter(reference)).values())
  return PRF.from_counts(matched, len(generated), len(reference))


def _layout_key(entry: Mapping[str, int]) -> tuple[int, ...]:
  """A hashable form of one layout record."""
  names = ("nrows", "ncols", "row_start", "row_end", "col_start", "col_end")
  return tuple(int(entry[n]) for n in names)


def layout_prf(
  generated: Sequence[Mapping[str, int]], reference: Sequence[Mapping[str, int]]
) -> PRF:
  """Multiset exact match of per-axes grid positions."""
  gen = collections.Counter(_layout_key(e) for e in generated)
  ref = collections.Counter(_layout_key(e) for e in reference)
  return PRF.from_counts(sum((gen & ref).values()), len(generated), len(reference))


def graph_layout(n_axes: int) -> list[dict[str, int]]:
  """ChartMimic's fixed layout for networkx charts: one (1, 1, 0-1, 0-1) record per axes."""
  one = {"nrows": 1, "ncols": 1, "row_start": 0, "row_end": 1, "col_start": 0, "col_end": 1}
  return [dict(one) for _ in range(n_axes)]


def type_prf(generated: Mapping[str, int], reference: Mapping[str, int]) -> PRF:
  """Call-count match: Σ_k min(gen_k, ref_k) over Σ gen (precision) and Σ ref (recall)."""
  matched = sum(min(n, reference.get(k, 0)) for k, n in generated.items())
  return PRF.from_counts(matched, sum(generated.values()), sum(reference.values()))


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """sRGB 0–255 (..., 3) -> CIELAB (D65) with colormath 3.0.0's constants (the benchmarks' Lab)."""
  v = np.asarray(rgb, dtype=np.float64) / 255.0
  linear = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
  t = (linear @ _SRGB_TO_XYZ.T) / _D65
  f = np.where(t > _CIE_E, np.cbrt(t), 7.787 * t + 16.0 / 116.0)
  fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
  return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def hex_to_lab(colors: Sequence[str]) -> np.ndarray:
  """'#RRGGBB[AA]' strings -> CIELAB (see `rgb_to_lab`); shape (K, 3)."""
  rgb = [[int(c.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4)] for c in colors]
  return rgb_to_lab(np.array(rgb, dtype=np.float64).reshape(-1, 3))


def similarity_matrix(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
  """Pairwise colour similarity: hex/hex max(0, 1 − ΔE2000/100), names 1 if equal, mixed 0."""
  out = np.zeros((len(a), len(b)))
  if not len(a) or not len(b):
    return out
  a_hex = np.array([c.startswith("#") for c in a])
  b_hex = np.array([c.startswith("#") for c in b])
  if a_hex.any() and b_hex.any():
    ia, ib = np.flatnonzero(a_hex), np.flatnonzero(b_hex)
    lab_a = hex_to_lab([a[i] for i in ia])
    lab_b = hex_to_lab([b[i] for i in ib])
    de = deltaE_ciede2000(lab_a[:, None, :], lab_b[None, :, :])
    out[np.ix_(ia, ib)] = np.maximum(0.0, 1.0 - de / 100.0)
  for i in np.flatnonzero(~a_hex):
    for j in np.flatnonzero(~b_hex):
      out[i, j] = 1.0 if a[i] == b[j] else 0.0
  return out


def color_similarity(c1: str, c2: str) -> float:
  """Similarity of two colour strings (see `similarity_matrix`)."""
  return float(similarity_matrix([c1], [c2])[0, 0])


def filter_colors(colors: Sequence[str], threshold: float = 0.7) -> list[str]:
  """ChartMimic's filter_color: keep a colour unless it is > threshold similar to a kept one.

  Compares the colour parts only (across functions), in the given order (callers sort first).
  """
  kept: list[str] = []
  parts = [c.split("--", 1)[1] for c in colors]
  kept_parts: list[str] = []
  for color, part in zip(colors, parts):
    if kept and similarity_matrix([part], kept_parts).max() > threshold:
      continue
    kept.append(color)
    kept_parts.append(part)
  return kept


def prepare_colors(
  colors: Sequence[str], config: ChartMimicConfig = ChartMimicConfig()
) -> list[str]:
  """The colour list the benchmark compares: unique, sorted, filtered when more than 10."""
  unique = sorted(set(colors))
  if len(unique) > config.color_filter_above:
    unique = filter_colors(unique, config.color_filter_similarity)
  return unique


def color_prf(generated: Sequence[str], reference: Sequence[str]) -> PRF:
  """Best per-function assignment of 'function--colour' strings; P = S/|gen|, R = S/|ref|."""
  if not generated or not reference:
    return PRF()
  groups: dict[str, tuple[list[str], list[str]]] = {}
  for side, colors in ((0, generated), (1, reference)):
    for c in colors:
      fn, color = c.split("--", 1)
      groups.setdefault(fn, ([], []))[side].append(color)
  total = 0.0
  for fn in sorted(groups):
    gen, ref = groups[fn]
    if gen and ref:
      sim = similarity_matrix(gen, ref)
      rows, cols = linear_sum_assignment(sim, maximize=True)
      total += float(sim[rows, cols].sum())
  return PRF.from_pr(total / len(generated), total / len(reference))


def overall_score(
  text: float, layout: float, chart_type: float, color: float, judge_score: float
) -> float:
  """ChartMimic's Overall: (mean of the four low-level scores + judge score) / 2 (all 0–100)."""
  return ((text + layout + chart_type + color) / 4.0 + judge_score) / 2.0


# ----------------------------------------------------------------------------- scoring


def _is_graph(item: ChartMimicItem) -> bool:
  """Whether the item is a networkx chart (VLMEvalKit: its file path contains '/graph')."""
  return item.category == "graph" or item.item_id.startswith("graph")


def low_level_scores(
  gen: CodeTrace, ref: CodeTrace, item: ChartMimicItem, config: ChartMimicConfig
) -> dict[str, PRF]:
  """The four PRFs of a generated trace against the reference trace."""
  gen_layout, ref_layout = gen.layout, ref.layout
  if _is_graph(item) and config.graph_layout != "none":
    ref_layout = graph_layout(ref.n_axes)
    if config.graph_layout == "both":
      gen_layout = graph_layout(gen.n_axes)
  return {
    "text": text_prf(gen.texts, ref.texts),
    "layout": layout_prf(gen_layout, ref_layout),
    "type": type_prf(gen.types, ref.types),
    "color": color_prf(prepare_colors(gen.colors, config), prepare_colors(ref.colors, config)),
  }


def _reference_trace(
  item: ChartMimicItem,
  pool: SandboxPool | None,
  config: ChartMimicConfig,
  cache: TraceCache | None,
) -> CodeTrace:
  """The ground-truth trace of `item` (cached; its image is dropped when it has its own target)."""
  return reference_trace(
    "chartmimic-ref",
    item.gt_code,
    own_target=item.target is not None,
    pool=pool,
    timeout_s=config.timeout_s,
    dpi=config.dpi,
    max_side_px=config.max_side_px,
    cache=cache,
  )


def score_chartmimic_item(
  item: ChartMimicItem,
  code: str | None,
  *,
  pool: SandboxPool | None = None,
  judge: Judge | None = None,
  config: ChartMimicConfig = ChartMimicConfig(),
  cache: TraceCache | None = None,
) -> ItemResult:
  """Scores one generated program (already extracted: see `response_to_code`) against an item.

  `pool` is a tracing pool (`create_trace_pool(config=eval_sandbox_config())`; default: the
  shared one); `judge` an OpenAIJudge or None (judge score skipped); `cache` keeps ground-truth
  traces across calls. Never raises for bad generated code.
  """
  code = code or ""
  run_code = truncate_for_execution(code) if config.truncate else code
  gen_future = None
  if run_code.strip():
    gen_future = submit_trace(
      run_code,
      pool=pool,
      timeout_s=config.timeout_s,
      dpi=config.dpi,
      max_side_px=config.max_side_px,
    )
  ref = _reference_trace(item, pool, config, cache)
  gen = gen_future.result() if gen_future is not None else None
  target = item.target if item.target is not None else ref.image
  details: dict[str, Any] = {"reference": ref.summary()}
  if gen is None:
    status, message = "no_code", "No code to run (empty, or no ```python block)."
  else:
    status, message = str(gen.status), gen.message
    details["generated"] = gen.summary()
    if gen.ok and gen.pdf_error:
      status, message = str(Status.RUNTIME_ERROR), gen.pdf_error
  exec_ok = status == Status.OK
  if exec_ok:
    prfs = low_level_scores(gen, ref, item, config)
  else:
    prfs = {m: PRF() for m in METRICS}
  details["prf"] = {m: p.to_json() for m, p in prfs.items()}
  if not ref.ok:
    details["reference_error"] = f"{ref.status}: {ref.message}"
  if target is None:
    outcome = judging.JudgeOutcome(None, note="no reference image to judge against")
  elif judge is None:
    outcome = judging.judge_chartmimic(None, target, None)
  else:
    outcome = judging.judge_chartmimic(judge, target, gen.image if exec_ok else None)
  metrics: dict[str, float | None] = {m: prfs[m].f1 for m in METRICS}
  low = sum(prfs[m].f1 for m in METRICS) / len(METRICS)
  metrics["low_level"] = low
  metrics["judge"] = outcome.score
  metrics["overall"] = None if outcome.score is None else (100.0 * low + outcome.score) / 2.0
  primary = metrics["overall"] if metrics["overall"] is not None else 100.0 * low
  return ItemResult(
    benchmark=BENCHMARK,
    item_id=item.item_id,
    category=item.category,
    exec_ok=exec_ok,
    status=status,
    message=message,
    metrics=metrics,
    judge=outcome,
    primary=primary,
    code=code,
    details=details,
    target=target,
    render=gen.image if gen is not None else None,
  )


def score_chartmimic(
  items: Sequence[ChartMimicItem],
  codes: Sequence[str | None],
  *,
  pool: SandboxPool | None = None,
  judge: Judge | None = None,
  config: ChartMimicConfig = ChartMimicConfig(),
  cache: TraceCache | None = None,
  max_workers: int = 8,
) -> list[ItemResult]:
  """Scores many items concurrently (sandbox jobs and judge calls overlap); results in order."""
  if len(items) != len(codes):
    raise ValueError(f"got {len(items)} ChartMimic items but {len(codes)} generated programs")
  judging.require_openai_judge(judge, "ChartMimic")
  kwargs = {"pool": pool, "judge": judge, "config": config, "cache": cache}
  return score_all(
    score_chartmimic_item, items, codes, kwargs, max_workers=max_workers, name="chartmimic"
  )


def aggregate_chartmimic(
  results: Sequence[ItemResult], *, breakdown: bool = True
) -> dict[str, Any]:
  """VLMEvalKit's compute_metrics: means × 100 over all items (failures 0), Overall, per type.

  judge_score is the mean over the items that have a judge score (`judge_items` of them); Overall
  is given only when every item has one (else None, with `judge_missing` > 0).
  """
  check_benchmark(results, BENCHMARK)
  n = len(results)
  out: dict[str, Any] = {"benchmark": BENCHMARK, "n_items": n}
  out["exec_rate"] = scale(mean([float(r.exec_ok) for r in results]), 100.0)
  for m in METRICS:
    out[m] = scale(mean([r.metrics[m] for r in results], n=n), 100.0)
  out["low_level_average"] = None if n == 0 else sum(out[m] for m in METRICS) / len(METRICS)
  counts = judge_counts(results)
  out.update(counts)
  judged = [r.judge.score for r in results if r.judge is not None and r.judge.score is not None]
  out["judge_score"] = mean(judged)
  complete = n > 0 and counts["judge_missing"] == 0
  out["overall"] = (
    overall_score(*(out[m] for m in METRICS), out["judge_score"]) if complete else None
  )
  if not complete:
    out["overall_note"] = (
      f"Overall needs a judge score for every item; {counts['judge_missing']} of {n} have none."
    )
  models = sorted({r.judge.model for r in results if r.judge is not None and r.judge.model})
  out["judge_models"] = models
  out["reference_failures"] = sum(1 for r in results if "reference_error" in r.details)
  if breakdown:
    out["by_category"] = by_category(results, aggregate_chartmimic)
    out["deviations"] = list(DEVIATIONS)
  return out
