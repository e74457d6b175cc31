"""A model-free judge: structure, colour, edge, layout and text-region similarity of two images.

Every aspect is a similarity in [0, 1] computed at a small working resolution (both images resized
to the target's proportions, longest side `work_size`; text at `text_size`):

- structure: SSIM of the grayscale images at three scales (1, 1/2, 1/4), averaged over the pixels
  where either image has content (a white chart background would otherwise make any render look
  similar); the coarse scales let it fall gradually as elements move;
- colour: dominant colours (3-bit histogram quantisation of the non-background pixels) matched both
  ways by CIEDE2000, similarity max(0, 1 - ΔE / delta_e_scale), weighted by pixel share; plus the
  background colour;
- edges: soft F1 of Canny edge maps, each edge pixel counting 1 - d / edge_reach where d is its
  distance to the other image's nearest edge;
- layout: weighted Jaccard (Σmin / Σmax) of content-density grids at 4x4, 8x8 and 16x16, times the
  ratio of the two images' width/height proportions;
- text: a crude text-likelihood map — small high-contrast connected components merged horizontally
  into lines — compared by text-density Jaccard and line count. A heuristic, not OCR: digits that
  touch a tick mark, large headings and dense scatter markers fool it.

Each aspect is then rescaled as a skill score against a blank canvas of the target's background
colour, (s - s_blank) / (1 - s_blank), so an empty render scores 0 on every aspect and an identical
one 1. The overall score is a weighted mean of the aspects. Feedback text is written from the
weakest aspects.

Deterministic (no randomness; stable sorts) and host-only (NumPy, SciPy, scikit-image, Pillow).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from collections.abc import Mapping

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import color as skcolor
from skimage import feature

from rrvf_jax.env.judges.base import Judge, JudgeResult, Kind, Mode, check_image, register_judge

ASPECTS = ("structure", "color", "edges", "layout", "text")
_TEXT_GRID = 12
_ASPECT_TITLES = {
  "structure": "Shapes",
  "color": "Colour",
  "edges": "Lines and details",
  "layout": "Layout",
  "text": "Text",
}
_REGIONS = (
  ("top-left", "top", "top-right"),
  ("left", "centre", "right"),
  ("bottom-left", "bottom", "bottom-right"),
)


@dataclasses.dataclass(frozen=True)
class LocalJudgeConfig:
  """Settings of the local judge; the defaults are tuned for 300–1000 px chart and web images."""

  work_size: int = 256
  # Text is searched at a higher resolution: glyphs blur into blobs at `work_size`.
  text_size: int = 384
  # Aspect weights (normalised to sum to 1).
  weights: tuple[tuple[str, float], ...] = (
    ("structure", 0.3),
    ("color", 0.2),
    ("edges", 0.2),
    ("layout", 0.2),
    ("text", 0.1),
  )
  # ΔE at which two colours count as entirely different (ChartMimic uses 100; 50 is stricter).
  delta_e_scale: float = 50.0
  max_colors: int = 8
  min_color_share: float = 0.01
  # Max per-channel difference (0–255) for a pixel to count as background.
  bg_tolerance: int = 24
  edge_sigma: float = 1.0
  # Distance (working-resolution pixels) at which an edge pixel stops counting as matched.
  edge_reach: float = 6.0
  grid_sizes: tuple[int, ...] = (4, 8, 16)
  # Aspects below this similarity get a feedback comment (weakest first).
  feedback_threshold: float = 0.85
  max_feedback_items: int = 3
  # Target features are cached by image hash: a target is judged against many renders.
  cache_size: int = 64


@dataclasses.dataclass(frozen=True)
class _Features:
  """What the judge extracts from one image at working resolution."""

  shape: tuple[int, int]  # original (H, W)
  gray: np.ndarray  # float64 (h, w) in [0, 1]
  bg: np.ndarray  # float64 (3,) RGB 0–255
  content: np.ndarray  # bool (h, w): differs from the background
  colors: np.ndarray  # float64 (K, 3) RGB 0–255, most frequent first
  lab: np.ndarray  # float64 (K, 3)
  shares: np.ndarray  # float64 (K,), sums to 1 when K > 0
  edges: np.ndarray  # bool (h, w)
  edge_dist: np.ndarray  # float64 (h, w): distance to the nearest edge pixel (inf when none)
  grids: tuple[np.ndarray, ...]  # content density per grid size
  text: np.ndarray  # bool (h, w): text-likelihood mask
  text_grid: np.ndarray  # text density on a _TEXT_GRID x _TEXT_GRID grid
  text_lines: int


def _work_dims(shape: tuple[int, int], work_size: int) -> tuple[int, int]:
  """Return (h, w) with the aspect ratio of `shape` and longest side `work_size`."""
  h, w = shape
  scale = work_size / max(h, w)
  return max(8, round(h * scale)), max(8, round(w * scale))


def _resize(image: np.ndarray, dims: tuple[int, int]) -> np.ndarray:
  """Resize an RGB uint8 image to (h, w) with Pillow's antialiased bilinear filter."""
  if image.shape[:2] == dims:
    return image
  pil = Image.fromarray(image).resize((dims[1], dims[0]), Image.Resampling.BILINEAR)
  return np.asarray(pil)


def _background(rgb: np.ndarray) -> np.ndarray:
  """Return the most frequent colour (4-bit quantised bins, then the mean of the winning bin)."""
  rgb = rgb[::2, ::2]  # a quarter of the pixels is plenty to find the dominant colour
  q = rgb >> 4
  codes = (q[..., 0].astype(np.int32) << 8) | (q[..., 1].astype(np.int32) << 4) | q[..., 2]
  best = np.argmax(np.bincount(codes.ravel(), minlength=4096))
  return rgb[codes == best].mean(axis=0)


def _differs(rgb: np.ndarray, color: np.ndarray, tolerance: int) -> np.ndarray:
  """Mask of pixels whose largest channel difference from `color` exceeds `tolerance`."""
  out = np.zeros(rgb.shape[:2], dtype=bool)
  for c in range(3):
    out |= np.abs(rgb[:, :, c].astype(np.int16) - round(float(color[c]))) > tolerance
  return out


def _palette(
  rgb: np.ndarray, content: np.ndarray, max_colors: int, min_share: float
) -> tuple[np.ndarray, np.ndarray]:
  """Return dominant foreground colours (K, 3) and their shares, by 3-bit histogram quantisation."""
  pixels = rgb[content].astype(np.int32)
  if len(pixels) == 0:
    return np.zeros((0, 3)), np.zeros((0,))
  q = pixels >> 5
  codes = (q[:, 0] << 6) | (q[:, 1] << 3) | q[:, 2]
  counts = np.bincount(codes, minlength=512).astype(np.float64)
  sums = np.stack([np.bincount(codes, weights=pixels[:, c], minlength=512) for c in range(3)], 1)
  # Stable sort: equal counts keep bin order, so the palette is deterministic.
  order = np.argsort(-counts, kind="stable")[:max_colors]
  order = order[counts[order] >= min_share * len(pixels)]
  if len(order) == 0:
    order = np.argsort(-counts, kind="stable")[:1]
  colors = sums[order] / counts[order, None]
  shares = counts[order] / counts[order].sum()
  return colors, shares


def _to_lab(colors: np.ndarray) -> np.ndarray:
  """Convert (K, 3) RGB 0–255 colours to CIELAB."""
  if len(colors) == 0:
    return np.zeros((0, 3))
  return skcolor.rgb2lab(colors[None, :, :] / 255.0)[0]


def _grid(mask: np.ndarray, n: int) -> np.ndarray:
  """Mean of `mask` over an n x n grid of cells."""
  h, w = mask.shape
  rows = np.linspace(0, h, n + 1).astype(int)
  cols = np.linspace(0, w, n + 1).astype(int)
  sums = np.add.reduceat(np.add.reduceat(mask.astype(np.float64), rows[:-1], 0), cols[:-1], 1)
  areas = np.outer(np.diff(rows), np.diff(cols))
  return sums / np.maximum(areas, 1)


def _text_map(gray: np.ndarray) -> tuple[np.ndarray, int]:
  """Heuristic text-likelihood mask: small high-contrast blobs merged into horizontal lines.

  Ink is any pixel much darker (or lighter) than its brightest (darkest) 3x3 neighbour, so text on
  a coloured header counts too. Glyph-sized components are kept (short, not hairlines, not solid
  blocks), joined horizontally, and a joined blob wider than tall counts as one text line. Digits
  that touch a tick mark, large headings and dense markers fool it: it is a heuristic, not OCR.
  """
  max_h = max(3, round(0.05 * max(gray.shape)))
  g = np.round(gray * 255).astype(np.int16)  # integer filters are several times faster
  ink = (ndimage.maximum_filter(g, 3) - g > 64) | (g - ndimage.minimum_filter(g, 3) > 64)
  labels, n = ndimage.label(ink, structure=np.ones((3, 3)))
  if n == 0:
    return np.zeros_like(ink), 0
  areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  keep = np.zeros(n + 1, dtype=bool)
  for i, sl in enumerate(ndimage.find_objects(labels)):
    h = sl[0].stop - sl[0].start
    w = sl[1].stop - sl[1].start
    if 3 <= h <= max_h and w <= 10 * max_h and 4 <= areas[i] < 0.85 * h * w:
      keep[i + 1] = True
  glyphs = keep[labels]
  if not glyphs.any():
    return glyphs, 0
  merged = ndimage.maximum_filter1d(glyphs.view(np.uint8), max(3, max_h // 3), axis=1) > 0
  line_labels, _ = ndimage.label(merged)
  lines = 0
  mask = np.zeros_like(ink)
  for sl in ndimage.find_objects(line_labels):
    h = sl[0].stop - sl[0].start
    w = sl[1].stop - sl[1].start
    if w >= 1.2 * h:
      lines += 1
      mask[sl] = True
  return mask, lines


def _gray(rgb: np.ndarray) -> np.ndarray:
  """Luma in [0, 1]."""
  return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0


def _features(
  image: np.ndarray, dims: tuple[int, int], text_dims: tuple[int, int], cfg: LocalJudgeConfig
) -> _Features:
  """Extract all features of one image at working resolution `dims` (text at `text_dims`)."""
  # Resize once to the larger text resolution, then down from there (cheaper than twice from full).
  text_rgb = _resize(image, text_dims)
  rgb = _resize(text_rgb, dims)
  gray = _gray(rgb)
  bg = _background(rgb)
  content = _differs(rgb, bg, cfg.bg_tolerance)
  colors, shares = _palette(rgb, content, cfg.max_colors, cfg.min_color_share)
  edges = feature.canny(gray, sigma=cfg.edge_sigma, low_threshold=0.05, high_threshold=0.15)
  text, lines = _text_map(_gray(text_rgb))
  return _Features(
    shape=(image.shape[0], image.shape[1]),
    gray=gray,
    bg=bg,
    content=content,
    colors=colors,
    lab=_to_lab(colors),
    shares=shares,
    edges=edges,
    edge_dist=_distance_to(edges),
    grids=tuple(_grid(content, n) for n in cfg.grid_sizes),
    text=text,
    text_grid=_grid(text, _TEXT_GRID),
    text_lines=lines,
  )


def _distance_to(mask: np.ndarray) -> np.ndarray:
  """Euclidean distance from every pixel to the nearest True pixel of `mask` (inf when none)."""
  if not mask.any():
    return np.full(mask.shape, np.inf)
  return ndimage.distance_transform_edt(~mask)


def _blank_features(t: _Features) -> _Features:
  """Features of a uniform canvas in `t`'s background colour (what `_features` would compute)."""
  bg_rgb = np.round(t.bg)
  gray = np.full(t.gray.shape, float(bg_rgb @ np.array([0.299, 0.587, 0.114]) / 255.0))
  empty = np.zeros(t.gray.shape, dtype=bool)
  return _Features(
    shape=t.shape,
    gray=gray,
    bg=bg_rgb,
    content=empty,
    colors=np.zeros((0, 3)),
    lab=np.zeros((0, 3)),
    shares=np.zeros((0,)),
    edges=empty,
    edge_dist=np.full(empty.shape, np.inf),
    grids=tuple(np.zeros_like(g) for g in t.grids),
    text=empty,
    text_grid=np.zeros_like(t.text_grid),
    text_lines=0,
  )


# --------------------------------------------------------------------------------------------------
# Aspect similarities (raw, before the blank-canvas rescaling).


def _f1(precision: float, recall: float) -> float:
  """Harmonic mean, 0 when both are 0."""
  return 0.0 if precision + recall <= 0 else 2 * precision * recall / (precision + recall)


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
  """Block-mean downsampling by an integer factor (edges cropped to a multiple of it)."""
  if factor == 1:
    return image.astype(np.float64)
  h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
  blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor)
  return blocks.mean(axis=(1, 3))


def _ssim_map(x: np.ndarray, y: np.ndarray, win: int = 7) -> np.ndarray:
  """Per-pixel SSIM (Wang et al. 2004) with a uniform win x win window, data range 1."""
  c1, c2 = 0.01**2, 0.03**2
  mean = lambda a: ndimage.uniform_filter(a, size=win, mode="reflect")
  mx, my = mean(x), mean(y)
  vx = mean(x * x) - mx * mx
  vy = mean(y * y) - my * my
  cxy = mean(x * y) - mx * my
  return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def _structure(t: _Features, r: _Features) -> float:
  """Multi-scale SSIM of the grayscale images over the pixels where either image has content.

  Coarser scales tolerate small shifts, so the similarity falls gradually as elements move.
  """
  region = t.content | r.content
  scores = []
  for factor in (1, 2, 4):
    ssim_map = _ssim_map(_downsample(t.gray, factor), _downsample(r.gray, factor))
    mask = _downsample(region, factor) > 0
    scores.append(ssim_map[mask].mean() if mask.any() else ssim_map.mean())
  return float(np.clip(np.mean(scores), 0.0, 1.0))


def _color_matrix(t: _Features, r: _Features, scale: float) -> np.ndarray:
  """Pairwise colour similarity max(0, 1 - ΔE2000 / scale), shape (K_t, K_r)."""
  de = skcolor.deltaE_ciede2000(t.lab[:, None, :], r.lab[None, :, :])
  return np.clip(1.0 - de / scale, 0.0, 1.0)


def _color(t: _Features, r: _Features, scale: float) -> float:
  """Palette similarity: foreground colours matched both ways (share-weighted) plus background."""
  bg_sim = float(_color_matrix_bg(t, r, scale))
  if len(t.colors) == 0 and len(r.colors) == 0:
    fg = 1.0
  elif len(t.colors) == 0 or len(r.colors) == 0:
    fg = 0.0
  else:
    sim = _color_matrix(t, r, scale)
    recall = float((sim.max(axis=1) * t.shares).sum())
    precision = float((sim.max(axis=0) * r.shares).sum())
    fg = _f1(precision, recall)
  return 0.8 * fg + 0.2 * bg_sim


def _color_matrix_bg(t: _Features, r: _Features, scale: float) -> float:
  """Similarity of the two background colours."""
  lab = _to_lab(np.stack([t.bg, r.bg]))
  return float(np.clip(1.0 - skcolor.deltaE_ciede2000(lab[0], lab[1]) / scale, 0.0, 1.0))


def _edges(t: _Features, r: _Features, reach: float) -> float:
  """Soft F1 of Canny edge maps: an edge pixel counts 1 - d / reach, d its distance to the other.

  A linear fall-off (rather than a fixed tolerance) makes the similarity fall gradually with shifts.
  """
  nt, nr = bool(t.edges.any()), bool(r.edges.any())
  if not nt and not nr:
    return 1.0
  if not nt or not nr:
    return 0.0
  precision = float(np.clip(1.0 - t.edge_dist[r.edges] / reach, 0.0, 1.0).mean())
  recall = float(np.clip(1.0 - r.edge_dist[t.edges] / reach, 0.0, 1.0).mean())
  return _f1(precision, recall)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
  """Weighted Jaccard Σmin / Σmax of two non-negative arrays (1 when both are all zero)."""
  top = float(np.maximum(a, b).sum())
  return 1.0 if top <= 0 else float(np.minimum(a, b).sum()) / top


def _aspect_ratio_similarity(t: _Features, r: _Features) -> float:
  """min/max of the two images' width/height ratios (1 when the proportions agree)."""
  at, ar = t.shape[1] / t.shape[0], r.shape[1] / r.shape[0]
  return min(at, ar) / max(at, ar)


def _layout(t: _Features, r: _Features) -> float:
  """Weighted Jaccard of content-density grids (averaged over grid sizes) x proportion similarity.

  Both images are compared at the target's proportions, so a render with the wrong figure size
  would otherwise look right once stretched back.
  """
  grids = float(np.mean([_jaccard(a, b) for a, b in zip(t.grids, r.grids, strict=True)]))
  return grids * _aspect_ratio_similarity(t, r)


def _text(t: _Features, r: _Features) -> float:
  """Text-region similarity: mean of the text-density Jaccard and the text-line count ratio."""
  if t.text_lines == 0 and r.text_lines == 0:
    return 1.0
  count = min(t.text_lines, r.text_lines) / max(t.text_lines, r.text_lines)
  return 0.5 * _jaccard(t.text_grid, r.text_grid) + 0.5 * count


def _raw_aspects(t: _Features, r: _Features, cfg: LocalJudgeConfig) -> dict[str, float]:
  """All raw aspect similarities of a render against a target."""
  return {
    "structure": _structure(t, r),
    "color": _color(t, r, cfg.delta_e_scale),
    "edges": _edges(t, r, cfg.edge_reach),
    "layout": _layout(t, r),
    "text": _text(t, r),
  }


def _rescale(raw: Mapping[str, float], blank: Mapping[str, float]) -> dict[str, float]:
  """Skill score against the blank canvas: (s - s_blank) / (1 - s_blank), clipped to [0, 1]."""
  out = {}
  for k, s in raw.items():
    b = blank[k]
    out[k] = float(np.clip(s if b >= 1.0 - 1e-6 else (s - b) / (1.0 - b), 0.0, 1.0))
  return out


# --------------------------------------------------------------------------------------------------
# Feedback text.


def _hex(rgb: np.ndarray) -> str:
  """Format an RGB colour (0–255 floats) as #rrggbb."""
  r, g, b = (round(float(c)) for c in np.clip(rgb, 0, 255))
  return f"#{r:02x}{g:02x}{b:02x}"


def _region_names(grid3: np.ndarray, mask: np.ndarray) -> list[str]:
  """Names of the 3x3 regions selected by `mask` (row-major order)."""
  return [_REGIONS[i][j] for i, j in zip(*np.nonzero(mask), strict=True)]


def _color_feedback(t: _Features, r: _Features, cfg: LocalJudgeConfig) -> str:
  """Describe missing, wrong and extra colours, and a different background."""
  parts = []
  if float(_color_matrix_bg(t, r, cfg.delta_e_scale)) < 0.9:
    parts.append(f"the background is {_hex(t.bg)} in the reference but {_hex(r.bg)} in yours")
  tgt = ", ".join(f"{_hex(c)} ({s:.0%})" for c, s in zip(t.colors[:5], t.shares[:5], strict=True))
  if len(r.colors) == 0:
    parts.append(f"the reference uses {tgt}, but your image has almost no coloured content")
  elif len(t.colors):
    sim = _color_matrix(t, r, cfg.delta_e_scale)
    de = skcolor.deltaE_ciede2000(t.lab[:, None, :], r.lab[None, :, :])
    mine = ", ".join(_hex(c) for c in r.colors[:5])
    parts.append(f"the reference's main colours are {tgt}; yours are {mine}")
    for i in np.argsort(sim.max(axis=1), kind="stable")[:2]:
      j = int(np.argmax(sim[i]))
      if de[i, j] > 10:
        closest = f"closest in yours: {_hex(r.colors[j])}, ΔE {de[i, j]:.0f}"
        parts.append(f"{_hex(t.colors[i])} is missing ({closest})")
    extra = [j for j in range(len(r.colors)) if de[:, j].min() > 15 and r.shares[j] >= 0.05]
    if extra:
      parts.append(
        "yours has colours not in the reference: " + ", ".join(_hex(r.colors[j]) for j in extra)
      )
  return "The colours differ: " + "; ".join(parts) + "."


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float] | None:
  """Normalised (x0, x1, y0, y1) extent of a mask, or None when empty."""
  ys, xs = np.nonzero(mask)
  if len(ys) == 0:
    return None
  h, w = mask.shape
  return xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h


def _layout_feedback(t: _Features, r: _Features) -> str:
  """Describe where content is missing or extra, how the extents differ, and the proportions."""
  gt3, gr3 = _grid(t.content, 3), _grid(r.content, 3)
  missing = _region_names(gt3, (gt3 > 0.02) & (gr3 < 0.5 * gt3))
  extra = _region_names(gr3, (gr3 > 0.02) & (gt3 < 0.5 * gr3))
  parts = []
  if missing:
    parts.append("the reference has content in the " + ", ".join(missing) + " that yours lacks")
  if extra:
    parts.append("yours has extra content in the " + ", ".join(extra))
  bt, br = _bbox(t.content), _bbox(r.content)
  if bt and br and max(abs(a - b) for a, b in zip(bt, br, strict=True)) > 0.05:
    parts.append(
      "the reference's content spans x {:.0%}–{:.0%}, y {:.0%}–{:.0%} of the image; ".format(*bt)
      + "yours spans x {:.0%}–{:.0%}, y {:.0%}–{:.0%}".format(*br)
    )
  if _aspect_ratio_similarity(t, r) < 0.95:
    (th, tw), (rh, rw) = t.shape, r.shape
    parts.append(
      f"the image proportions differ: the reference is {tw}x{th} px (width/height "
      f"{tw / th:.2f}), yours is {rw}x{rh} px ({rw / rh:.2f}); adjust the figure size"
    )
  if not parts:
    parts.append("elements are placed or sized differently (check subplot arrangement and margins)")
  return "The layout differs: " + "; ".join(parts) + "."


def _edges_feedback(t: _Features, r: _Features) -> str:
  """Compare the amount and placement of line detail."""
  nt, nr = int(t.edges.sum()), int(r.edges.sum())
  if nr == 0:
    return "Lines and details differ: your image has almost no lines, markers or borders."
  ratio = nt / max(nr, 1)
  gt3, gr3 = _grid(t.edges, 3), _grid(r.edges, 3)
  where = _region_names(gt3, np.abs(gt3 - gr3) >= np.abs(gt3 - gr3).max() * 0.99)
  loc = f", most of all in the {where[0]}" if where else ""
  if ratio > 1.3:
    return (
      f"Lines and details differ: the reference has about {ratio:.1f}x more lines, markers, grid "
      f"lines or borders than yours{loc}; check that every series, gridline and tick is drawn."
    )
  if ratio < 1 / 1.3:
    return (
      f"Lines and details differ: yours has about {1 / ratio:.1f}x more lines, markers or borders "
      f"than the reference{loc}; remove extra gridlines, markers or series."
    )
  return (
    f"Lines and details differ: lines, markers or borders are in different places{loc}; check data "
    "values, axis limits and line styles."
  )


def _structure_feedback(t: _Features, r: _Features) -> str:
  """Describe a structural mismatch."""
  del t, r  # SSIM says that shapes differ, not which; the other aspects say where and how
  return (
    "Shapes do not line up with the reference: positions and sizes of elements (bars, lines, "
    "boxes) differ; check the data values, axis ranges and element sizes."
  )


def _text_feedback(t: _Features, r: _Features) -> str:
  """Compare the amount and placement of text-like regions."""
  gt3, gr3 = _grid(t.text, 3), _grid(r.text, 3)
  missing = _region_names(gt3, (gt3 > 0.01) & (gr3 < 0.5 * gt3))
  extra = _region_names(gr3, (gr3 > 0.01) & (gt3 < 0.5 * gr3))
  parts = [f"the reference has about {t.text_lines} lines of text, yours about {r.text_lines}"]
  if missing:
    parts.append("text is missing in the " + ", ".join(missing))
  if extra:
    parts.append("yours has extra text in the " + ", ".join(extra))
  return "Text differs: " + "; ".join(parts) + " (titles, labels, legends, annotations)."


_FEEDBACK = {
  "structure": lambda t, r, cfg: _structure_feedback(t, r),
  "color": _color_feedback,
  "edges": lambda t, r, cfg: _edges_feedback(t, r),
  "layout": lambda t, r, cfg: _layout_feedback(t, r),
  "text": lambda t, r, cfg: _text_feedback(t, r),
}


def _feedback(
  aspects: Mapping[str, float], t: _Features, r: _Features, cfg: LocalJudgeConfig
) -> str:
  """Write comments for the weakest aspects, in the paper's '---Comments:' style."""
  weak = sorted((v, k) for k, v in aspects.items() if v < cfg.feedback_threshold)
  lines = ["---Comments:"]
  for _, k in weak[: cfg.max_feedback_items]:
    lines.append(f"-**{_ASPECT_TITLES[k]}**- {_FEEDBACK[k](t, r, cfg)}")
  if len(lines) == 1:
    lines.append(
      "-**Overall**- The render closely matches the reference; only small details differ."
    )
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The judge.


@register_judge("local")
class LocalJudge(Judge):
  """Model-free judge (see the module docstring); the default for tests and the demo."""

  name = "local"

  def __init__(self, config: LocalJudgeConfig | None = None, **overrides: object) -> None:
    cfg = config or LocalJudgeConfig()
    if overrides:
      cfg = dataclasses.replace(cfg, **overrides)
    weights = dict(cfg.weights)
    if set(weights) != set(ASPECTS) or min(weights.values()) < 0 or sum(weights.values()) <= 0:
      raise ValueError(f"weights must give a non-negative weight to each of {ASPECTS}")
    self.config = cfg
    total = sum(weights.values())
    self._weights = {k: v / total for k, v in weights.items()}
    self._cache: collections.OrderedDict[bytes, tuple[_Features, dict[str, float]]] = (
      collections.OrderedDict()
    )
    self._lock = threading.Lock()
    self._counts = collections.Counter()

  def _target(self, target: np.ndarray) -> tuple[_Features, dict[str, float]]:
    """Features of the target and its blank-canvas baseline, cached by image hash."""
    key = hashlib.sha256(repr(target.shape).encode() + target.tobytes()).digest()
    with self._lock:
      hit = self._cache.get(key)
      if hit is not None:
        self._cache.move_to_end(key)
        self._counts["target_cache_hits"] += 1
        return hit
    dims = _work_dims(target.shape[:2], self.config.work_size)
    text_dims = _work_dims(target.shape[:2], self.config.text_size)
    t = _features(target, dims, text_dims, self.config)
    value = (t, _raw_aspects(t, _blank_features(t), self.config))
    with self._lock:
      self._cache[key] = value
      while len(self._cache) > self.config.cache_size:
        self._cache.popitem(last=False)
    return value

  def judge(
    self,
    target: np.ndarray,
    render: np.ndarray,
    *,
    kind: Kind = "chart",
    code: str | None = None,
    mode: Mode = "score",
  ) -> JudgeResult:
    """Score `render` against `target`; `kind`, `code` and `mode` do not change the computation."""
    del (
      kind,
      code,
      mode,
    )  # the same image statistics serve both charts and pages, score and feedback
    target = check_image(target, "target")
    render = check_image(render, "render")
    t, blank = self._target(target)
    r = _features(render, t.gray.shape, t.text.shape, self.config)
    aspects = _rescale(_raw_aspects(t, r, self.config), blank)
    # Clamped: the weighted sum of aspects in [0, 1] can round to just above 1 (1.0000000000000002
    # for a perfect render), which the reward rejects.
    score = min(1.0, max(0.0, float(sum(self._weights[k] * aspects[k] for k in ASPECTS))))
    with self._lock:
      self._counts["requests"] += 1
    return JudgeResult(
      score=score,
      aspects=aspects,
      feedback=_feedback(aspects, t, r, self.config),
      raw=None,
      source="local",
    )

  def metrics(self) -> dict[str, int]:
    """Counters: requests and target-feature cache hits."""
    with self._lock:
      return {"requests": self._counts["requests"], "cache_hits": self._counts["target_cache_hits"]}
