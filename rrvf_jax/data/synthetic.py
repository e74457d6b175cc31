"""Synthetic datasets: procedural chart programs and web pages, rendered by the project's renderers.

Targets are drawn by the same sandboxed matplotlib renderer (`rrvf_jax.env.chart`) and the same
headless Chromium (`rrvf_jax.env.web`) that render the policy's code, at the configured canvas, so
a perfect program reproduces its target pixel for pixel. Everything is deterministic given the
config: example i of a split comes from its own seeded RNG; programs that repeat an earlier one
(likelier among the short 'simple' ones) are skipped, so the test split shares no program with
the train split.

Train examples also carry a self-correction trajectory for the cold start (`data.revisions`): a
`conversation` (the turns after the prompt, as JSON) whose drafts were rendered by the same
renderer and judged by the local judge, and `turn_images`, the PNG of each render it shows.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from rrvf_jax.data import base, chart_gen, images, revisions, web_gen
from rrvf_jax.env.chart import ChartCanvas, create_chart_pool, render_charts
from rrvf_jax.env.judges.local import LocalJudge
from rrvf_jax.env.types import RenderResult, Status
from rrvf_jax.env.web import HtmlRenderer, WebCanvas

SPLITS = ("train", "test")
_CHUNK = 64  # examples rendered between progress log lines
_RETRY_TIMEOUT_S = 60.0  # a render that timed out (a loaded machine) is retried once with this


@dataclasses.dataclass(eq=False)
class SyntheticConfig(base.ParamConfig):
  """Canvas, split sizes, seed and complexity ('simple' or 'full') of a synthetic dataset."""

  NAME_FORMAT: ClassVar[str] = (
    "{complexity}-{width}x{height}-train{num_train}-test{num_test}-seed{seed}"
  )
  COMPLEXITIES: ClassVar[tuple[str, ...]] = ("simple", "full")

  complexity: str = "full"
  width: int = 672
  height: int = 672
  num_train: int = 1000
  num_test: int = 100
  seed: int = 0

  def validate(self) -> None:
    """Checks the parameters (ValueError naming the first bad one)."""
    cls = type(self).__name__
    if self.complexity not in self.COMPLEXITIES:
      raise ValueError(
        f"{cls}.complexity must be one of {', '.join(self.COMPLEXITIES)}, got {self.complexity!r}"
      )
    for name in ("width", "height"):
      if not 16 <= getattr(self, name) <= 8192:
        raise ValueError(f"{cls}.{name} must be in [16, 8192] pixels, got {getattr(self, name)}")
    for name in ("num_train", "num_test"):
      if getattr(self, name) < 1:
        raise ValueError(f"{cls}.{name} must be at least 1, got {getattr(self, name)}")
    if self.seed < 0:
      raise ValueError(f"{cls}.seed must be >= 0, got {self.seed}")

  def split_sizes(self) -> dict[str, int]:
    """Examples per split."""
    return {"train": self.num_train, "test": self.num_test}


@dataclasses.dataclass(eq=False)
class SyntheticChartsConfig(SyntheticConfig):
  """SyntheticConfig plus the chart renderer's dpi (figure inches = pixels / dpi)."""

  NAME_FORMAT: ClassVar[str] = (
    "{complexity}-{width}x{height}-dpi{dpi}-train{num_train}-test{num_test}-seed{seed}"
  )

  dpi: int = int(ChartCanvas().dpi)

  def validate(self) -> None:
    """Checks the parameters (ValueError naming the first bad one)."""
    super().validate()
    if not 10 <= self.dpi <= 1000:
      raise ValueError(f"{type(self).__name__}.dpi must be in [10, 1000], got {self.dpi}")


def distinct_programs(
  make: Callable[[random.Random], Any], prefix: str, sizes: Mapping[str, int]
) -> dict[str, list[tuple[str, Any]]]:
  """Per split, (id, item) pairs from `make(rng)` with one seeded RNG per draw, no repeated code.

  `prefix` (name, complexity, seed) keys the RNGs, so the programs depend only on it and on
  the split sizes; an item repeating an earlier one's `.code` is skipped (and the next drawn).
  """
  seen: set[str] = set()
  out = {}
  for split, size in sizes.items():
    items, draw = [], 0
    while len(items) < size:
      if draw > 50 * size + 1000:
        raise RuntimeError(f"{prefix}: could not draw {size} distinct {split} programs")
      item = make(random.Random(f"{prefix}:{split}:{draw}"))
      draw += 1
      if item.code in seen:
        continue
      seen.add(item.code)
      items.append((f"{split}-{len(items):06d}", item))
    out[split] = items
  return out


def _check_rendered(name: str, example_id: str, code: str, result: RenderResult) -> bytes:
  """The PNG of a successful render; RuntimeError naming the example and its code otherwise."""
  if not result.ok or result.png is None:
    raise RuntimeError(
      f"{name}: example {example_id} did not render ({result.status}: {result.message})\n{code}"
    )
  return result.png


def _render_retrying(
  render: Callable[[list[str], float | None], list[RenderResult]], codes: list[str]
) -> list[RenderResult]:
  """Renders codes; a render that timed out (a busy machine, not bad code) gets one slower try."""
  results = render(codes, None)
  return [
    render([code], _RETRY_TIMEOUT_S)[0] if r.status == Status.TIMEOUT else r
    for code, r in zip(codes, results, strict=True)
  ]


def _rendered_chunks(
  name: str,
  split: str,
  items: Sequence[tuple[str, Any]],
  render: Callable[[list[str], float | None], list[RenderResult]],
  describe: Callable[[Any], str] | None = None,
  seed: str = "",
) -> Iterator[tuple[str, Any, bytes, revisions.Written | None]]:
  """Renders items chunk by chunk (progress logged): (id, item, png, trajectory or None).

  With `describe` (item -> words for it) each example also gets a self-correction trajectory.
  """
  task = "chart" if "chart" in name else "web"
  judge = LocalJudge() if describe is not None else None
  for start in range(0, len(items), _CHUNK):
    chunk = items[start : start + _CHUNK]
    results = _render_retrying(render, [item.code for _, item in chunk])
    pngs = [
      _check_rendered(name, example_id, item.code, result)
      for (example_id, item), result in zip(chunk, results, strict=True)
    ]
    written: list[revisions.Written | None] = [None] * len(chunk)
    if describe is not None:
      targets = [
        revisions.Example(i, item.code, describe(item), images.decode_image(png, i))
        for (i, item), png in zip(chunk, pngs, strict=True)
      ]
      written = list(
        revisions.write_trajectories(
          targets,
          task=task,
          render=lambda codes: _render_retrying(render, codes),
          judge=judge,
          seed=seed,
        )
      )
    for (example_id, item), png, w in zip(chunk, pngs, written, strict=True):
      yield example_id, item, png, w
    logging.info("%s/%s: rendered %d/%d examples", name, split, start + len(chunk), len(items))


def _trajectory_features(written: revisions.Written | None) -> dict[str, Any]:
  """The `conversation` (JSON, '' for none) and `turn_images` features of an example."""
  pngs = [] if written is None else written.images
  turn_images = np.empty((len(pngs),), object)
  turn_images[:] = pngs
  conversation = "" if written is None else json.dumps(written.conversation, ensure_ascii=False)
  return {"conversation": conversation, "turn_images": turn_images}


def _trajectory_feature_specs() -> dict[str, tfds.features.FeatureConnector]:
  """Feature specs of `_trajectory_features`."""
  return {
    "conversation": base.text(
      "Self-correction trajectory (train split): the turns after the prompt as JSON ('' if none)."
    ),
    "turn_images": tfds.features.Tensor(
      shape=(None,), dtype=np.object_, doc="PNG of each render the conversation shows, in order."
    ),
  }


def _seed(builder: base.RrvfBuilder, config: SyntheticConfig) -> str:
  """The key of an example's trajectory RNG: the dataset, its complexity and seed."""
  return f"{builder.name}:{config.complexity}:{config.seed}"


class SyntheticCharts(base.RrvfBuilder):
  """Procedural matplotlib charts rendered by the sandboxed chart renderer.

  Features: id (str, "train-000012"), image (PNG bytes, height x width RGB), code (str, the
  matplotlib program that draws the image), chart_type (str: one of
  bar/grouped_bar/line/scatter/pie/histogram/area, subplot types joined by "+"),
  num_subplots (int, 1-4; always 1 for 'simple'), conversation and turn_images (a
  self-correction trajectory on the train split; see the module docstring).
  """

  name = "synthetic_charts"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "First version.",
    "1.1.0": "Train examples carry self-correction trajectories (conversation, turn_images).",
  }
  CONFIG_CLASS = SyntheticChartsConfig
  BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
    SyntheticChartsConfig.create(complexity="full"),
    SyntheticChartsConfig.create(
      complexity="simple", width=224, height=224, num_train=128, num_test=16
    ),
  ]

  def _features(self) -> Mapping[str, tfds.features.FeatureConnector]:
    """id, image, code, chart_type, num_subplots."""
    return {
      "id": base.text("Example id, unique within the dataset (e.g. 'train-000012')."),
      "image": base.png_bytes("The rendered chart, PNG (RGB, canvas height x width)."),
      "code": base.text("The matplotlib program that renders the image."),
      "chart_type": base.text("Chart type of each subplot, joined with '+'."),
      "num_subplots": base.integer("Number of subplots (1-4)."),
      **_trajectory_feature_specs(),
    }

  def _info(self) -> tfds.core.DatasetInfo:
    """Dataset metadata."""
    return self._make_info(
      "Procedurally generated matplotlib charts (code + rendered image), rendered by the "
      "rrvf_jax sandboxed chart renderer."
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    """Draws the programs of both splits (so test can avoid train's), then renders per split."""
    config = self.builder_config
    programs = distinct_programs(
      lambda rng: chart_gen.generate_chart(rng, config.complexity),
      f"{self.name}:{config.complexity}:{config.seed}",
      config.split_sizes(),
    )
    return {split: self._generate_examples(split, items) for split, items in programs.items()}

  def _generate_examples(
    self, split: str, items: list[tuple[str, chart_gen.SyntheticChart]]
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Renders the split's programs in the sandbox pool."""
    config = self.builder_config
    canvas = ChartCanvas(config.width, config.height, dpi=float(config.dpi))
    with create_chart_pool() as pool:

      def render(codes: list[str], timeout_s: float | None) -> list[RenderResult]:
        return render_charts(codes, canvas=canvas, pool=pool, timeout_s=timeout_s)

      describe = None
      if split == "train":
        describe = lambda c: revisions.describe_chart(c.chart_type, c.num_subplots)
      chunks = _rendered_chunks(self.name, split, items, render, describe, _seed(self, config))
      for example_id, chart, png, written in chunks:
        yield (
          example_id,
          {
            "id": example_id,
            "image": png,
            "code": chart.code,
            "chart_type": chart.chart_type,
            "num_subplots": chart.num_subplots,
            **_trajectory_features(written),
          },
        )


class SyntheticWeb(base.RrvfBuilder):
  """Procedural HTML pages screenshot by the project's headless-Chromium renderer.

  Features: id (str), image (PNG bytes, height x width RGB: the viewport, pages cropped to it),
  code (str, the HTML), page_type (str: heading/button/list/box for 'simple',
  landing/blog/product/contact/dashboard for 'full'), num_sections (int, top-level blocks),
  conversation and turn_images (a self-correction trajectory on the train split).
  """

  name = "synthetic_web"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "First version.",
    "1.1.0": "Train examples carry self-correction trajectories (conversation, turn_images).",
  }
  CONFIG_CLASS = SyntheticConfig
  BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
    SyntheticConfig.create(complexity="full", width=1280, height=720),
    SyntheticConfig.create(complexity="simple", width=448, height=336, num_train=128, num_test=16),
  ]

  def _features(self) -> Mapping[str, tfds.features.FeatureConnector]:
    """id, image, code, page_type, num_sections."""
    return {
      "id": base.text("Example id, unique within the dataset (e.g. 'train-000012')."),
      "image": base.png_bytes("The page screenshot, PNG (RGB, viewport height x width)."),
      "code": base.text("The HTML of the page."),
      "page_type": base.text("Kind of page or block."),
      "num_sections": base.integer("Top-level blocks in the page body."),
      **_trajectory_feature_specs(),
    }

  def _info(self) -> tfds.core.DatasetInfo:
    """Dataset metadata."""
    return self._make_info(
      "Procedurally generated HTML pages (code + screenshot), rendered by the rrvf_jax "
      "headless-Chromium renderer with no network."
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    """Draws the pages of both splits (so test can avoid train's), then renders per split."""
    config = self.builder_config
    pages = distinct_programs(
      lambda rng: web_gen.generate_page(rng, config.complexity),
      f"{self.name}:{config.complexity}:{config.seed}",
      config.split_sizes(),
    )
    return {split: self._generate_examples(split, items) for split, items in pages.items()}

  def _generate_examples(
    self, split: str, items: list[tuple[str, web_gen.SyntheticPage]]
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Screenshots the split's pages with one browser."""
    config = self.builder_config
    canvas = WebCanvas(width=config.width, height=config.height, max_height=config.height)
    with HtmlRenderer(canvas) as renderer:

      def render(pages: list[str], timeout_s: float | None) -> list[RenderResult]:
        futures = [renderer.submit(p, timeout_s=timeout_s) for p in pages]
        return [f.result() for f in futures]

      describe = (lambda p: revisions.describe_page(p.page_type)) if split == "train" else None
      chunks = _rendered_chunks(self.name, split, items, render, describe, _seed(self, config))
      for example_id, page, png, written in chunks:
        yield (
          example_id,
          {
            "id": example_id,
            "image": png,
            "code": page.code,
            "page_type": page.page_type,
            "num_sections": page.num_sections,
            **_trajectory_features(written),
          },
        )
