"""WebSight / Design2Code-style scoring of generated HTML against a reference page, offline.

Both pages are rendered by the project's sandboxed Chromium (`rrvf_jax.env.web.HtmlRenderer`,
no network: remote CSS such as WebSight v0.2's Tailwind CDN and remote images load on neither
side). Per item:

- render ok (exec rate): the generated page renders and is not blank;
- visual: the local judge's score and its five components (structure, colour, edges, layout,
  text) of the generated screenshot against the reference screenshot (0–100). The reference is
  the reference HTML re-rendered here (same browser, same offline rules: stabler than the
  dataset's screenshot, made elsewhere); only without reference HTML is `WebItem.target` used;
- Design2Code block metrics (when the reference HTML is given): text blocks found without OCR —
  each text-bearing element gets a unique colour, the page is rendered twice with all those
  colours shifted by 50, and pixels that changed by exactly that are text; a block is an element's
  text, its pixel bounding box and its mean colour on the real screenshot. Blocks with the same
  box are merged, matched by Hungarian assignment on SequenceMatcher text similarity (with
  Design2Code's context bonus 0.1, window 1), pairs below 0.5 dropped. block = matched area share,
  text = mean similarity, position = mean 1 − max(|Δcx|, |Δcy|), color = mean 1 − ΔE2000/100;
- clip (only with a user-supplied `embed` callable, e.g. a locally loaded CLIP image encoder):
  cosine of the embeddings of both screenshots after masking text boxes and squaring (0–100), and
  then design2code = 20 × (block + text + position + color + clip/100), as in Design2Code;
- judge: the judge's 0–100 score with the project's web rubric (RRVF's "GPT Score" prompt is
  unpublished).

Not computed (documented gaps): Design2Code's iterative merging of adjacent blocks before matching
(`find_possible_merge`), its predicted-HTML clean-up (repetition truncation, element dedup), and
Telea inpainting (text boxes are filled with their border's median colour instead). No CLIP weights
ship with the project; without `embed`, clip and design2code are None.
"""

from __future__ import annotations

import dataclasses
import difflib
import html
import html.parser
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.color import deltaE_ciede2000

from rrvf_jax.env.judges.base import Judge
from rrvf_jax.env.judges.local import LocalJudge
from rrvf_jax.env.types import RenderResult, Status
from rrvf_jax.eval import judging
from rrvf_jax.eval.chartmimic import rgb_to_lab
from rrvf_jax.eval.results import (
  ItemResult,
  by_category,
  check_benchmark,
  judge_counts,
  mean,
  scale,
  score_all,
)
from rrvf_jax.eval.trace import TraceCache, code_key

BENCHMARK = "websight"
BLOCK_METRICS = ("block", "text", "position", "color")
VISUAL_ASPECTS = ("structure", "color", "edges", "layout", "text")
# Design2Code's text-bearing tags: each gets its own colour in the block-finding renders.
TEXT_TAGS = frozenset({
  "p", "h1", "h2", "h3", "h4", "h5", "h6", "div", "span", "a", "b", "li", "table", "td", "th",
  "button", "footer", "header", "figcaption",
})  # fmt: skip
_VOID = frozenset({
  "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
  "wbr",
})  # fmt: skip
_RAW = frozenset({"script", "style", "title", "textarea", "noscript", "template"})
_LEVELS = tuple(range(10, 200, 16))  # colour pool per channel; +50 stays below 255
_SHIFT = 50
_SHIFT_TOLERANCE = 8
_COLOR_TOLERANCE = 4
Embed = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class WebItem:
  """One item: id, reference HTML (None: compare with `target` only), reference screenshot."""

  item_id: str
  gt_html: str | None
  target: np.ndarray | None = None
  category: str | None = None


@dataclasses.dataclass(frozen=True)
class WebSightConfig:
  """Scoring settings."""

  timeout_s: float = 20.0  # per page render
  context_bonus: float = 0.1  # Design2Code's consecutive_bonus
  context_window: int = 1
  min_text_similarity: float = 0.5
  clip_mask_text: bool = True  # mask text boxes before embedding (Design2Code's CLIP variant)


@dataclasses.dataclass(frozen=True)
class TextBlock:
  """A text block: lower-cased text, (x, y, w, h) normalised by the page size, mean RGB colour."""

  text: str
  bbox: tuple[float, float, float, float]
  color: tuple[float, float, float]


# ----------------------------------------------------------------------------- block finding


def _pool_color(index: int) -> tuple[int, int, int]:
  """The index-th colour of the pool (12 levels per channel)."""
  n = len(_LEVELS)
  return _LEVELS[index // (n * n) % n], _LEVELS[index // n % n], _LEVELS[index % n]


class _Recolor(html.parser.HTMLParser):
  """Rewrites HTML: transparent backgrounds everywhere, a unique text colour per text-bearing tag;
  collects each such element's own text (text whose nearest coloured ancestor it is)."""

  def __init__(self, shift: int) -> None:
    super().__init__(convert_charrefs=False)
    self.shift = shift
    self.out: list[str] = []
    self.stack: list[tuple[str, int | None]] = []
    self.texts: list[list[str]] = []

  def _owner(self) -> int | None:
    """The block index of the nearest coloured open element (None inside raw-text elements)."""
    for tag, idx in reversed(self.stack):
      if tag in _RAW:
        return None
      if idx is not None:
        return idx
    return None

  def _start(self, tag: str, attrs: list[tuple[str, str | None]], closed: bool) -> None:
    idx = None
    style = "background-color: transparent !important; text-shadow: none !important;"
    if tag in TEXT_TAGS and len(self.texts) < len(_LEVELS) ** 3:
      idx = len(self.texts)
      self.texts.append([])
      r, g, b = (c + self.shift for c in _pool_color(idx))
      style += f" color: rgb({r}, {g}, {b}) !important;"
    parts = [f"<{tag}"]
    for name, value in attrs:
      if name == "style" and value:
        style = value.rstrip().rstrip(";") + "; " + style
        continue
      parts.append(f" {name}" if value is None else f' {name}="{html.escape(value, quote=True)}"')
    parts.append(f' style="{html.escape(style, quote=True)}"')
    parts.append(" />" if closed else ">")
    self.out.append("".join(parts))
    if not closed and tag not in _VOID:
      self.stack.append((tag, idx))

  def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
    self._start(tag, attrs, closed=False)

  def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
    self._start(tag, attrs, closed=True)

  def handle_endtag(self, tag: str) -> None:
    for k in range(len(self.stack) - 1, -1, -1):
      if self.stack[k][0] == tag:
        del self.stack[k:]
        break
    self.out.append(f"</{tag}>")

  def _text(self, raw: str, text: str) -> None:
    self.out.append(raw)
    owner = self._owner()
    if owner is not None:
      self.texts[owner].append(text)

  def handle_data(self, data: str) -> None:
    self._text(data, data)

  def handle_entityref(self, name: str) -> None:
    self._text(f"&{name};", html.unescape(f"&{name};"))

  def handle_charref(self, name: str) -> None:
    self._text(f"&#{name};", html.unescape(f"&#{name};"))

  def handle_comment(self, data: str) -> None:
    self.out.append(f"<!--{data}-->")

  def handle_decl(self, decl: str) -> None:
    self.out.append(f"<!{decl}>")

  def handle_pi(self, data: str) -> None:
    self.out.append(f"<?{data}>")

  def unknown_decl(self, data: str) -> None:
    self.out.append(f"<![{data}]>")


def recolor_html(source: str, shift: int = 0) -> tuple[str, list[str]]:
  """The HTML with pool colours (+shift) on text-bearing tags, and each tag's own text."""
  parser = _Recolor(shift)
  parser.feed(source)
  parser.close()
  texts = [re.sub(r"\s+", " ", "".join(t)).strip().lower() for t in parser.texts]
  return "".join(parser.out), texts


def blocks_from_renders(
  original: np.ndarray, base: np.ndarray, shifted: np.ndarray, texts: Sequence[str]
) -> list[TextBlock]:
  """Text blocks from the real screenshot and the two recoloured ones (same size required)."""
  if not (original.shape == base.shape == shifted.shape):
    return []
  base16 = base.astype(np.int16)
  diff = shifted.astype(np.int16) - base16
  text_px = (np.abs(diff - _SHIFT) <= _SHIFT_TOLERANCE).all(axis=-1)
  # Pool index of each pixel's colour (per channel: nearest level within the tolerance).
  level = np.rint((base16 - _LEVELS[0]) / 16.0).astype(np.int32)
  on_grid = (np.abs(base16 - (_LEVELS[0] + 16 * level)) <= _COLOR_TOLERANCE) & (level >= 0)
  on_grid &= level < len(_LEVELS)
  n = len(_LEVELS)
  index = level[..., 0] * n * n + level[..., 1] * n + level[..., 2]
  ids = np.where(text_px & on_grid.all(axis=-1) & (index < len(texts)), index + 1, 0)
  h, w = ids.shape
  blocks = []
  for k, box in enumerate(ndimage.find_objects(ids, max_label=len(texts))):
    if box is None or not texts[k]:
      continue
    mask = ids[box] == k + 1
    color = original[box][mask].mean(axis=0)
    y0, y1, x0, x1 = box[0].start, box[0].stop, box[1].start, box[1].stop
    bbox = (x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h)
    blocks.append(TextBlock(texts[k], bbox, tuple(float(c) for c in color)))
  return merge_same_bbox(blocks)


def merge_same_bbox(blocks: Sequence[TextBlock]) -> list[TextBlock]:
  """Design2Code's merge_blocks_by_bbox: blocks with one box become one (texts joined, colours
  averaged pairwise in order)."""
  merged: dict[tuple[float, ...], TextBlock] = {}
  for b in blocks:
    if b.bbox in merged:
      old = merged[b.bbox]
      color = tuple((x + y) / 2 for x, y in zip(old.color, b.color))
      merged[b.bbox] = TextBlock(old.text + " " + b.text, b.bbox, color)  # type: ignore[arg-type]
    else:
      merged[b.bbox] = b
  return list(merged.values())


def find_text_blocks(
  renderer: Any, source: str, original: np.ndarray, *, timeout_s: float = 20.0
) -> list[TextBlock] | None:
  """Renders the two recoloured versions of a page; None when either render fails."""
  base_html, texts = recolor_html(source, 0)
  shifted_html, _ = recolor_html(source, _SHIFT)
  renders = [renderer.submit(h, timeout_s=timeout_s) for h in (base_html, shifted_html)]
  base, shifted = (f.result() for f in renders)
  if base.image is None or shifted.image is None:
    return None
  return blocks_from_renders(original, base.image, shifted.image, texts)


# ----------------------------------------------------------------------------- block matching


def _text_similarity(a: str, b: str) -> float:
  """difflib's SequenceMatcher ratio (2·matches / total length)."""
  return difflib.SequenceMatcher(None, a, b).ratio()


def adjust_cost_for_context(cost: np.ndarray, bonus: float, window: int) -> np.ndarray:
  """Design2Code's adjust_cost_for_context: good pairs get a bonus from good pairs around them."""
  if window <= 0:
    return cost
  n, m = cost.shape
  out = cost.copy()
  for i in range(n):
    for j in range(m):
      if out[i, j] >= -0.5:
        continue
      near = cost[
        max(0, i - window) : min(n, i + window + 1), max(0, j - window) : min(m, j + window + 1)
      ]
      values = np.sort(near.ravel())[::-1]
      values = np.delete(values, np.where(values == cost[i, j])[0][0])
      out[i, j] += bonus * values[-window * 2 :].sum()
  return out


def match_blocks(
  generated: Sequence[TextBlock],
  reference: Sequence[TextBlock],
  config: WebSightConfig = WebSightConfig(),
) -> list[tuple[int, int, float]]:
  """Matched (generated index, reference index, text similarity) pairs."""
  if not generated or not reference:
    return []
  sim = np.array([[_text_similarity(g.text, r.text) for r in reference] for g in generated])
  cost = adjust_cost_for_context(-sim, config.context_bonus, config.context_window)
  rows, cols = linear_sum_assignment(cost)
  pairs = [(int(i), int(j), float(sim[i, j])) for i, j in zip(rows, cols)]
  return [p for p in pairs if p[2] >= config.min_text_similarity]


def _color_sim(a: Sequence[float], b: Sequence[float]) -> float:
  """max(0, 1 − ΔE2000/100) of two RGB colours."""
  lab = rgb_to_lab(np.array([a, b], dtype=np.float64))
  return float(max(0.0, 1.0 - deltaE_ciede2000(lab[0], lab[1]) / 100.0))


def block_scores(
  generated: Sequence[TextBlock],
  reference: Sequence[TextBlock],
  config: WebSightConfig = WebSightConfig(),
) -> dict[str, float]:
  """Design2Code's block, text, position and color scores in [0, 1] (0 when nothing matches)."""
  pairs = match_blocks(generated, reference, config)
  if not pairs:
    return dict.fromkeys(BLOCK_METRICS, 0.0)
  area = lambda b: b.bbox[2] * b.bbox[3]
  matched_g = {i for i, _, _ in pairs}
  matched_r = {j for _, j, _ in pairs}
  unmatched = sum(area(b) for i, b in enumerate(generated) if i not in matched_g)
  unmatched += sum(area(b) for j, b in enumerate(reference) if j not in matched_r)
  matched_areas, texts, positions, colors = [], [], [], []
  for i, j, s in pairs:
    g, r = generated[i], reference[j]
    matched_areas.append(area(g) + area(r))
    texts.append(s)
    gx, gy = g.bbox[0] + g.bbox[2] / 2, g.bbox[1] + g.bbox[3] / 2
    rx, ry = r.bbox[0] + r.bbox[2] / 2, r.bbox[1] + r.bbox[3] / 2
    positions.append(1.0 - max(abs(gx - rx), abs(gy - ry)))
    colors.append(_color_sim(g.color, r.color))
  total = sum(matched_areas) + unmatched
  return {
    "block": float(sum(matched_areas) / total) if total > 0 else 0.0,
    "text": float(np.mean(texts)),
    "position": float(np.mean(positions)),
    "color": float(np.mean(colors)),
  }


# ----------------------------------------------------------------------------- embeddings


def mask_and_square(image: np.ndarray, blocks: Sequence[TextBlock]) -> np.ndarray:
  """Fills text boxes with their border's median colour, then resizes to a min-side square."""
  out = np.array(image, copy=True)
  h, w = out.shape[:2]
  for b in blocks:
    x0, y0 = int(b.bbox[0] * w), int(b.bbox[1] * h)
    x1, y1 = x0 + int(b.bbox[2] * w), y0 + int(b.bbox[3] * h)
    if x1 <= x0 or y1 <= y0:
      continue
    ring = np.concatenate(
      [
        out[max(y0 - 1, 0), x0:x1],
        out[min(y1, h - 1), x0:x1],
        out[y0:y1, max(x0 - 1, 0)],
        out[y0:y1, min(x1, w - 1)],
      ]
    )
    out[y0:y1, x0:x1] = np.median(ring, axis=0).astype(np.uint8)
  side = min(h, w)
  square = Image.fromarray(out).resize((side, side), Image.Resampling.LANCZOS)
  return np.asarray(square)


def embedding_score(
  embed: Embed,
  generated: np.ndarray,
  reference: np.ndarray,
  gen_blocks: Sequence[TextBlock] = (),
  ref_blocks: Sequence[TextBlock] = (),
  mask_text: bool = True,
) -> float:
  """100 × cosine similarity of the two screenshots' embeddings (Design2Code's CLIP score)."""
  a = mask_and_square(generated, gen_blocks if mask_text else ())
  b = mask_and_square(reference, ref_blocks if mask_text else ())
  va = np.asarray(embed(a), dtype=np.float64).ravel()
  vb = np.asarray(embed(b), dtype=np.float64).ravel()
  denominator = float(np.linalg.norm(va) * np.linalg.norm(vb))
  if va.shape != vb.shape or denominator == 0:
    raise ValueError(f"embed returned unusable vectors of shapes {va.shape} and {vb.shape}")
  return 100.0 * float(va @ vb) / denominator


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class _Reference:
  """The reference page as rendered here, and its blocks (None when not computable)."""

  render: RenderResult | None
  image: np.ndarray | None
  blocks: list[TextBlock] | None


def _reference(
  item: WebItem, renderer: Any, config: WebSightConfig, cache: TraceCache | None
) -> _Reference:
  """Renders the reference HTML and finds its blocks (cached by HTML)."""

  def compute() -> _Reference:
    if item.gt_html is None:
      return _Reference(None, item.target, None)
    render = renderer.submit(item.gt_html, timeout_s=config.timeout_s).result()
    if render.image is None:
      return _Reference(render, None, None)
    blocks = find_text_blocks(renderer, item.gt_html, render.image, timeout_s=config.timeout_s)
    return _Reference(render, render.image, blocks)

  if cache is None or item.gt_html is None:
    return compute()
  return cache.get_or_compute(code_key("web-ref", item.gt_html, t=config.timeout_s), compute)


def score_websight_item(
  item: WebItem,
  generated_html: str | None,
  *,
  renderer: Any = None,
  judge: Judge | None = None,
  embed: Embed | None = None,
  local_judge: LocalJudge | None = None,
  config: WebSightConfig = WebSightConfig(),
  cache: TraceCache | None = None,
) -> ItemResult:
  """Scores one generated page; `renderer` an HtmlRenderer (default: the shared one)."""
  if renderer is None:
    from rrvf_jax.env.web import default_html_renderer

    renderer = default_html_renderer()
  local_judge = local_judge or LocalJudge()
  source = generated_html or ""
  gen_future = renderer.submit(source, timeout_s=config.timeout_s) if source.strip() else None
  ref = _reference(item, renderer, config, cache)
  gen = gen_future.result() if gen_future is not None else None
  details: dict[str, Any] = {}
  if gen is None:
    status, message = "no_code", "No HTML to render."
  else:
    status, message = str(gen.status), gen.message
  exec_ok = status == Status.OK
  metrics: dict[str, float | None] = {}
  reference_image = ref.image
  if reference_image is None:
    details["reference_error"] = (
      "no reference HTML or image"
      if ref.render is None
      else f"{ref.render.status}: {ref.render.message}"
    )
  can_compare = exec_ok and reference_image is not None
  # Visual similarity from the local judge's components (0–100).
  if can_compare:
    local = local_judge.judge(reference_image, gen.image, kind="web")
    metrics["visual"] = 100.0 * float(local.score)
    for a in VISUAL_ASPECTS:
      metrics[f"visual_{a}"] = 100.0 * float(local.aspects[a])
  else:
    metrics["visual"] = 0.0
    for a in VISUAL_ASPECTS:
      metrics[f"visual_{a}"] = 0.0
  # Design2Code block metrics (need the reference HTML and both block sets).
  gen_blocks: list[TextBlock] | None = None
  if ref.blocks is None:
    for m in BLOCK_METRICS:
      metrics[m] = None
    why = "no reference HTML" if item.gt_html is None else "the reference page did not render"
    details["blocks_note"] = f"{why}: block metrics not computable"
  elif not can_compare:
    metrics.update(dict.fromkeys(BLOCK_METRICS, 0.0))
  else:
    gen_blocks = find_text_blocks(renderer, source, gen.image, timeout_s=config.timeout_s)
    if gen_blocks is None:
      metrics.update(dict.fromkeys(BLOCK_METRICS, 0.0))
      details["blocks_note"] = "the recoloured generated page did not render"
    else:
      metrics.update(block_scores(gen_blocks, ref.blocks, config))
      details["n_blocks"] = {"generated": len(gen_blocks), "reference": len(ref.blocks)}
  # Embedding score, only with a user-supplied encoder.
  metrics["clip"] = None
  metrics["design2code"] = None
  if embed is not None:
    if can_compare:
      metrics["clip"] = embedding_score(
        embed, gen.image, reference_image, gen_blocks or (), ref.blocks or (), config.clip_mask_text
      )
    else:
      metrics["clip"] = 0.0
    if metrics["block"] is not None:
      parts = [metrics[m] for m in BLOCK_METRICS]
      metrics["design2code"] = 20.0 * (sum(parts) + metrics["clip"] / 100.0)
  else:
    details["clip_note"] = "no embedding function given: clip score skipped"
  if reference_image is None:
    outcome = judging.JudgeOutcome(None, note="no reference image to judge against")
  else:
    outcome = judging.judge_web(judge, reference_image, gen.image if exec_ok else None)
  metrics["judge"] = outcome.score
  return ItemResult(
    benchmark=BENCHMARK,
    item_id=item.item_id,
    category=item.category,
    exec_ok=exec_ok,
    status=status,
    message=message,
    metrics=metrics,
    judge=outcome,
    primary=metrics["visual"],
    code=source,
    details=details,
    # What the scores compared against: the re-rendered reference when its HTML is given.
    target=reference_image if reference_image is not None else item.target,
    render=gen.image if gen is not None else None,
  )


def score_websight(
  items: Sequence[WebItem],
  htmls: Sequence[str | None],
  *,
  renderer: Any = None,
  judge: Judge | None = None,
  embed: Embed | None = None,
  config: WebSightConfig = WebSightConfig(),
  cache: TraceCache | None = None,
  max_workers: int = 4,
) -> list[ItemResult]:
  """Scores many pages (the renderer serialises page loads; judging overlaps); results in order."""
  if len(items) != len(htmls):
    raise ValueError(f"got {len(items)} WebSight items but {len(htmls)} generated pages")
  local = LocalJudge()
  kwargs = {
    "renderer": renderer,
    "judge": judge,
    "embed": embed,
    "local_judge": local,
    "config": config,
    "cache": cache,
  }
  return score_all(
    score_websight_item, items, htmls, kwargs, max_workers=max_workers, name="websight"
  )


def aggregate_websight(results: Sequence[ItemResult], *, breakdown: bool = True) -> dict[str, Any]:
  """Means over all items (failed renders count 0); optional metrics over the items having them."""
  check_benchmark(results, BENCHMARK)
  n = len(results)
  out: dict[str, Any] = {"benchmark": BENCHMARK, "n_items": n}
  out["exec_rate"] = scale(mean([float(r.exec_ok) for r in results]), 100.0)
  for m in ("visual", *(f"visual_{a}" for a in VISUAL_ASPECTS)):
    out[m] = mean([r.metrics[m] for r in results], n=n)
  for m in BLOCK_METRICS:
    vals = [r.metrics[m] for r in results]
    out[m] = scale(mean(vals), 100.0)
    out[f"{m}_items"] = sum(v is not None for v in vals)
  for m in ("clip", "design2code"):
    vals = [r.metrics[m] for r in results]
    out[m] = mean(vals)
    out[f"{m}_items"] = sum(v is not None for v in vals)
  out.update(judge_counts(results))
  out["judge_score"] = mean([r.metrics["judge"] for r in results])
  out["judge_models"] = sorted(
    {r.judge.model for r in results if r.judge is not None and r.judge.model}
  )
  out["reference_failures"] = sum(1 for r in results if "reference_error" in r.details)
  if breakdown:
    out["by_category"] = by_category(results, aggregate_websight)
  return out
