"""Datasets (TFDS builders writing array_record, no TensorFlow) and the host input pipeline.

Front door: `load(name, split, data_dir=...)` builds the dataset if it is missing and returns an
`ExampleSource` (`len`, `[i]` -> dict of str / bytes / int). Datasets:
  synthetic_charts  procedural matplotlib charts (id, image, code, chart_type, num_subplots)
  synthetic_web     procedural HTML pages (id, image, code, page_type, num_sections)
  chartmimic        ChartMimic scripts + reference images (id, image, code, chart_type)
  plot2code         Plot2Code test set (id, image, code, instruction)
  websight          WebSight HTML + screenshots (id, image, code)
  rrvf_coldstart    cold-start SFT data (id, image, code, conversation)
(the last four are built from files the user downloaded into `manual_dir`).
Every example has `id` (str), `image` (PNG bytes: `decode_image`) and `code` (str: the program or
HTML that draws the image). `BatchIterator` batches, shards and shuffles a source resumably.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from rrvf_jax.data.base import (
  ManualBuilder,
  ManualDataError,
  RrvfBuilder,
  check_manual_dir,
  quiet_tfds_progress,
)
from rrvf_jax.data.images import decode_image, to_png
from rrvf_jax.data.manual import Chartmimic, Plot2code, RrvfColdstart, Websight, WebsightConfig
from rrvf_jax.data.pipeline import BatchIterator
from rrvf_jax.data.source import ExampleSource
from rrvf_jax.data.synthetic import (
  SyntheticCharts,
  SyntheticChartsConfig,
  SyntheticConfig,
  SyntheticWeb,
)

BUILDERS: dict[str, type[RrvfBuilder]] = {
  b.name: b for b in (SyntheticCharts, SyntheticWeb, Chartmimic, Plot2code, Websight, RrvfColdstart)
}

__all__ = [
  "BUILDERS",
  "BatchIterator",
  "Chartmimic",
  "ExampleSource",
  "ManualDataError",
  "Plot2code",
  "RrvfColdstart",
  "SyntheticCharts",
  "SyntheticChartsConfig",
  "SyntheticConfig",
  "SyntheticWeb",
  "Websight",
  "WebsightConfig",
  "decode_image",
  "get_builder",
  "is_built",
  "load",
  "prepare",
  "to_png",
]


def get_builder(name: str, *, data_dir: str | os.PathLike, **builder_kwargs: Any) -> RrvfBuilder:
  """The TFDS builder of dataset `name` with config parameters `builder_kwargs` (nothing built)."""
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(BUILDERS)}")
  cls = BUILDERS[name]
  return cls(data_dir=os.fspath(data_dir), config=cls.config_name(**builder_kwargs))


def is_built(builder: RrvfBuilder) -> bool:
  """Whether the builder's files are complete (TFDS's `is_prepared` logs a warning when not)."""
  path = Path(builder.data_dir)
  return (path / "dataset_info.json").is_file() and (path / "features.json").is_file()


def prepare(builder: RrvfBuilder, manual_dir: str | os.PathLike | None = None) -> None:
  """Builds the dataset's array_record files unless already there (progress via absl logging)."""
  if is_built(builder):
    return
  if isinstance(builder, ManualBuilder):
    # TFDS's default manual_dir; checked here so that the error names it and the layout.
    manual_dir = Path(manual_dir or Path(builder.data_dir_root) / "downloads" / "manual")
    check_manual_dir(builder.name, manual_dir, type(builder).LAYOUT.strip())
  logging.info("Building %s into %s", builder.info.full_name, builder.data_dir)
  config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
  with quiet_tfds_progress():
    builder.download_and_prepare(download_config=config)
  sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
  logging.info("Built %s: %s", builder.info.full_name, sizes)


def load(
  name: str,
  split: str,
  *,
  data_dir: str | os.PathLike,
  manual_dir: str | os.PathLike | None = None,
  build: bool = True,
  **builder_kwargs: Any,
) -> ExampleSource:
  """Returns split `split` of dataset `name` under `data_dir`, building it first if missing.

  `builder_kwargs` are the dataset's config parameters (e.g. for synthetic_charts: complexity,
  width, height, dpi, num_train, num_test, seed); the config name spells them out, so each
  parameter set is built once, in its own directory. `manual_dir` holds downloaded files for
  chartmimic/plot2code/websight/rrvf_coldstart. With `build=False` a missing dataset is an error
  (e.g. on hosts other than the one that builds it). In multi-host runs build once, then load.
  """
  builder = get_builder(name, data_dir=data_dir, **builder_kwargs)
  if not is_built(builder):
    if not build:
      raise FileNotFoundError(f"{name}: not built at {builder.data_dir} (and build=False)")
    prepare(builder, manual_dir)
  splits = builder.info.splits
  if split not in splits:
    raise ValueError(f"{name}: no split {split!r}; available: {', '.join(sorted(splits))}")
  return ExampleSource(builder.as_data_source(split=split), name=name, split=split)
