"""Builders for public datasets prepared from files the user downloaded into `manual_dir`.

Nothing is fetched: download the files (see each builder's LAYOUT) and pass their directory as
`manual_dir`. Images are stored as PNG bytes (PNG inputs kept bit for bit, other formats
re-encoded as RGB PNG); every image is decoded once at build time, so a corrupt file fails the
build with its path instead of failing a training step later. A missing or empty manual_dir, or one
without the expected files, raises `ManualDataError` naming the directory and the layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from rrvf_jax.data import base
from rrvf_jax.data.images import to_png

_LOG_EVERY = 500  # examples between progress log lines
_SPLIT_NAME = re.compile(r"^[\w-]+$")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, object) for each non-blank line; ValueError naming file:line if malformed."""
  with path.open(encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not valid JSON ({e})") from e
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
      yield number, row


def _read_image(path: Path, where: str) -> bytes:
  """An image file as PNG bytes; ValueError naming `where` if it is missing or corrupt."""
  if not path.is_file():
    raise ValueError(f"{where}: image file {path} not found")
  return to_png(path.read_bytes(), f"{where} ({path})")


def _log_progress(name: str, split: str, done: int, total: int) -> None:
  """Logs every _LOG_EVERY examples and at the end."""
  if done % _LOG_EVERY == 0 or done == total:
    logging.info("%s/%s: prepared %d/%d examples", name, split, done, total)


# ---------------------------------------------------------------------------------- ChartMimic


class Chartmimic(base.ManualBuilder):
  """ChartMimic (Direct Mimic): ground-truth matplotlib scripts and their reference images.

  Layout of manual_dir (the extracted `dataset-iclr.tar.gz` of the HF dataset
  `ChartMimic/ChartMimic`, or any part of it):

      manual_dir/
        direct_600/            each directory holding <id>.py + <id>.png pairs becomes a split
          bar_43.py            named after it (direct_600, direct_1800, customized_600, ...),
          bar_43.png           at any depth below manual_dir
          ...

  A .py without a .png of the same stem (e.g. only a .pdf) is skipped with a warning.
  Features: id (str, the file stem, e.g. 'bar_43'), image (PNG bytes, the reference figure at
  its original size), code (str, the ground-truth script, unchanged: it may call plt.savefig,
  which the project's renderer ignores), chart_type (str, the id's prefix: 'bar', 'HR', ...).
  """

  name = "chartmimic"
  MANUAL_DOWNLOAD_INSTRUCTIONS = "See the builder docstring (rrvf_jax.data.manual.Chartmimic)."
  LAYOUT = """
manual_dir/
  direct_600/          one split per directory holding <id>.py + <id>.png pairs (any depth)
    bar_43.py          the ground-truth matplotlib script
    bar_43.png         its reference image
"""

  def _features(self) -> Mapping[str, tfds.features.FeatureConnector]:
    """id, image, code, chart_type."""
    return {
      "id": base.text("ChartMimic example id (the file stem, e.g. 'bar_43')."),
      "image": base.png_bytes("The reference chart image, PNG."),
      "code": base.text("The ground-truth matplotlib script."),
      "chart_type": base.text("Chart category: the id's prefix (e.g. 'bar', 'HR', '3d')."),
    }

  def _info(self) -> tfds.core.DatasetInfo:
    """Dataset metadata."""
    return self._make_info(
      "ChartMimic chart-to-code benchmark: reference chart images with ground-truth matplotlib "
      "code, one split per task directory.",
      homepage="https://github.com/ChartMimic/ChartMimic",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    """One split per directory holding .py/.png pairs."""
    root = self.manual_root(dl_manager)
    splits: dict[str, list[tuple[Path, Path]]] = {}
    for directory in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
      pairs, missing = [], []
      for script in sorted(directory.glob("*.py")):
        image = script.with_suffix(".png")
        (pairs if image.is_file() else missing).append((script, image))
      if missing:
        logging.warning(
          "chartmimic: %d script(s) in %s have no .png and are skipped (e.g. %s)",
          len(missing),
          directory,
          missing[0][0].name,
        )
      if not pairs:
        continue
      split = directory.name if directory != root else "test"
      if not _SPLIT_NAME.match(split) or split in splits:
        raise self.layout_error(root, f"has a duplicate or unusable split directory {directory}")
      splits[split] = pairs
    if not splits:
      raise self.layout_error(root, "holds no <id>.py + <id>.png pairs")
    return {split: self._generate_examples(split, pairs) for split, pairs in splits.items()}

  def _generate_examples(
    self, split: str, pairs: list[tuple[Path, Path]]
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Reads each script and its image."""
    for done, (script, image) in enumerate(pairs, start=1):
      example_id = script.stem
      yield (
        example_id,
        {
          "id": example_id,
          "image": _read_image(image, f"chartmimic {example_id}"),
          "code": script.read_text(encoding="utf-8"),
          "chart_type": example_id.rsplit("_", 1)[0] if "_" in example_id else example_id,
        },
      )
      _log_progress(self.name, split, done, len(pairs))


# ----------------------------------------------------------------------------------- Plot2Code


class Plot2code(base.ManualBuilder):
  """Plot2Code (matplotlib test set): reference plots, their code and a description.

  Layout of manual_dir (the HF dataset `TencentARC/Plot2Code`, config `python_matplotlib`,
  split `test`, an imagefolder):

      manual_dir/
        metadata.jsonl                 one JSON object per line (found at any depth; exactly one)
        ground_truth_image_0.png       ...

  Each line has "code" (the ground-truth matplotlib program; "ground_truth_code" is accepted
  too), optionally "file_name" (the image path relative to the JSONL; default
  ground_truth_image_<line index>.png) and optionally "instruction" (a text description).
  Split: test. Features: id (str, the image's stem), image (PNG bytes), code (str),
  instruction (str, '' if absent).
  """

  name = "plot2code"
  MANUAL_DOWNLOAD_INSTRUCTIONS = "See the builder docstring (rrvf_jax.data.manual.Plot2code)."
  LAYOUT = """
manual_dir/
  metadata.jsonl             one JSON object per line: {"file_name": "ground_truth_image_0.png",
                             "code": "<matplotlib code>", "instruction": "<optional text>"}
  ground_truth_image_0.png   the images the lines name (default ground_truth_image_<line index>.png)
"""

  def _features(self) -> Mapping[str, tfds.features.FeatureConnector]:
    """id, image, code, instruction."""
    return {
      "id": base.text("Plot2Code example id (the image file's stem)."),
      "image": base.png_bytes("The reference plot, PNG."),
      "code": base.text("The ground-truth matplotlib program."),
      "instruction": base.text("Description of the plot ('' if the metadata has none)."),
    }

  def _info(self) -> tfds.core.DatasetInfo:
    """Dataset metadata."""
    return self._make_info(
      "Plot2Code matplotlib test set: reference plots with ground-truth code and instructions.",
      homepage="https://github.com/TencentARC/Plot2Code",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    """The single test split, from the one metadata.jsonl."""
    root = self.manual_root(dl_manager)
    found = sorted(root.rglob("metadata.jsonl"))
    if len(found) != 1:
      problem = "holds no metadata.jsonl" if not found else f"holds {len(found)} metadata.jsonl"
      raise self.layout_error(root, problem)
    return {"test": self._generate_examples(found[0])}

  def _generate_examples(self, metadata: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Reads the metadata lines and the images they name."""
    rows = list(_read_jsonl(metadata))
    if not rows:
      raise self.layout_error(metadata.parent, f"has an empty {metadata.name}")
    for index, (number, row) in enumerate(rows):
      where = f"{metadata}:{number}"
      code = row.get("code", row.get("ground_truth_code"))
      if not isinstance(code, str):
        raise ValueError(f"{where}: no 'code' string in {sorted(row)}")
      image = metadata.parent / str(row.get("file_name", f"ground_truth_image_{index}.png"))
      example_id = image.stem
      yield (
        example_id,
        {
          "id": example_id,
          "image": _read_image(image, where),
          "code": code,
          "instruction": str(row.get("instruction") or ""),
        },
      )
      _log_progress(self.name, "test", index + 1, len(rows))


# ------------------------------------------------------------------------------------ WebSight


@dataclasses.dataclass(eq=False)
class WebsightConfig(base.ParamConfig):
  """How many examples to hold out for test (chosen by hashing ids with the seed), and a cap."""

  NAME_FORMAT: ClassVar[str] = "test{num_test}-max{max_examples}-seed{seed}"

  num_test: int = 500
  max_examples: int = 0  # 0: every example found; else the first max_examples in file order
  seed: int = 0

  def validate(self) -> None:
    """Checks the parameters (ValueError naming the first bad one)."""
    for name in ("num_test", "max_examples", "seed"):
      if getattr(self, name) < 0:
        raise ValueError(f"WebsightConfig.{name} must be >= 0, got {getattr(self, name)}")


class Websight(base.ManualBuilder):
  """WebSight: HTML pages and their screenshots.

  Layout of manual_dir, either or both of:

      manual_dir/
        *.parquet        shards of the HF dataset `HuggingFaceM4/WebSight` (columns `image`,
                         a struct with `bytes`, and `text`, the HTML); needs pyarrow
        <name>.html      HTML + screenshot pairs (any depth), e.g. exported pages
        <name>.png

  WebSight has only a train split: this builder holds out `num_test` examples (the ids with the
  smallest sha256(seed:id)) as test (no test split if num_test=0), the rest is train.
  Ids: "<parquet stem>-<row>" or the pair's path relative to manual_dir without suffix.
  The stored screenshot is the dataset's own (v0.2 HTML loads Tailwind from a CDN, so an
  offline re-render would not match it).
  Features: id (str), image (PNG bytes), code (str, the HTML).
  """

  name = "websight"
  CONFIG_CLASS = WebsightConfig
  BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [WebsightConfig.create()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "See the builder docstring (rrvf_jax.data.manual.Websight)."
  LAYOUT = """
manual_dir/
  *.parquet        HF HuggingFaceM4/WebSight shards (columns: image {bytes}, text = HTML), and/or
  page_1.html      HTML + screenshot pairs with the same stem (any depth)
  page_1.png
"""

  def _features(self) -> Mapping[str, tfds.features.FeatureConnector]:
    """id, image, code."""
    return {
      "id": base.text("Example id: '<parquet stem>-<row>' or the pair's relative path."),
      "image": base.png_bytes("The page screenshot, PNG."),
      "code": base.text("The page's HTML."),
    }

  def _info(self) -> tfds.core.DatasetInfo:
    """Dataset metadata."""
    return self._make_info(
      "WebSight: synthetic web pages (HTML) with screenshots; test held out by id hash.",
      homepage="https://huggingface.co/datasets/HuggingFaceM4/WebSight",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    """Lists every example, caps, and splits them by id hash."""
    root = self.manual_root(dl_manager)
    config = self.builder_config
    refs = self._list_examples(root)
    if not refs:
      raise self.layout_error(root, "holds no *.parquet files and no .html + .png pairs")
    if config.max_examples:
      refs = refs[: config.max_examples]
    if len(refs) <= config.num_test:
      raise ValueError(
        f"websight: {len(refs)} examples found in {root}, not more than num_test="
        f"{config.num_test}; lower num_test or add data"
      )
    ranked = sorted(refs, key=lambda r: hashlib.sha256(f"{config.seed}:{r[0]}".encode()).digest())
    test_ids = {r[0] for r in ranked[: config.num_test]}
    splits = {
      "train": [r for r in refs if r[0] not in test_ids],
      "test": [r for r in refs if r[0] in test_ids],
    }
    # TFDS cannot write an empty split: with num_test=0 there is no test split at all.
    return {split: self._generate_examples(split, refs) for split, refs in splits.items() if refs}

  def _list_examples(self, root: Path) -> list[tuple[str, Path, int | None]]:
    """(id, file, parquet row or None) of every example, in file order."""
    refs: list[tuple[str, Path, int | None]] = []
    parquets = sorted(root.rglob("*.parquet"))
    if parquets:
      pq = _pyarrow_parquet()
      for path in parquets:
        rows = pq.ParquetFile(path).metadata.num_rows
        refs += [(f"{path.stem}-{row:07d}", path, row) for row in range(rows)]
    for html in sorted(root.rglob("*.html")):
      if html.with_suffix(".png").is_file():
        refs.append((html.relative_to(root).with_suffix("").as_posix(), html, None))
    return refs

  def _generate_examples(
    self, split: str, refs: list[tuple[str, Path, int | None]]
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Reads pairs from files and rows from parquet shards (batch by batch)."""
    wanted: dict[Path, dict[int, str]] = {}
    for example_id, path, row in refs:
      if row is not None:
        wanted.setdefault(path, {})[row] = example_id
    done = 0
    for path, rows in wanted.items():
      for example_id, image, html in _parquet_rows(path, rows):
        done += 1
        yield example_id, _web_example(example_id, to_png(image, f"{path} {example_id}"), html)
        _log_progress(self.name, split, done, len(refs))
    for example_id, path, row in refs:
      if row is None:
        done += 1
        image = _read_image(path.with_suffix(".png"), f"websight {example_id}")
        yield example_id, _web_example(example_id, image, path.read_text(encoding="utf-8"))
        _log_progress(self.name, split, done, len(refs))


def _web_example(example_id: str, png: bytes, html: str) -> dict[str, Any]:
  """One WebSight record."""
  return {"id": example_id, "image": png, "code": html}


def _pyarrow_parquet() -> Any:
  """pyarrow.parquet, or one clear error saying it is needed for WebSight's parquet shards."""
  try:
    import pyarrow.parquet as pq  # optional: only the parquet layout needs it
  except ImportError as e:
    raise ImportError("websight: reading *.parquet shards needs pyarrow (pip install it)") from e
  return pq


def _parquet_rows(path: Path, rows: dict[int, str]) -> Iterator[tuple[str, bytes, str]]:
  """(id, image bytes, html) of the wanted rows of one WebSight shard, read batch by batch."""
  pq = _pyarrow_parquet()
  shard = pq.ParquetFile(path)
  missing = {"image", "text"} - set(shard.schema_arrow.names)
  if missing:
    raise ValueError(f"websight: {path} lacks column(s) {', '.join(sorted(missing))}")
  offset = 0
  for batch in shard.iter_batches(batch_size=256, columns=["image", "text"]):
    images, texts = batch.column("image").to_pylist(), batch.column("text").to_pylist()
    for i, (image, html) in enumerate(zip(images, texts, strict=True)):
      example_id = rows.get(offset + i)
      if example_id is None:
        continue
      data = image.get("bytes") if isinstance(image, dict) else image
      if not isinstance(data, bytes) or not isinstance(html, str):
        raise ValueError(f"websight: {path} row {offset + i} has no image bytes or no HTML text")
      yield example_id, data, html
    offset += len(texts)


# -------------------------------------------------------------------------------- cold start


def _conversation_images(
  messages: Any, root: Path, where: str
) -> tuple[list[dict[str, Any]] | None, np.ndarray]:
  """The messages with later image items reduced to {"type": "image"}, and those images' PNGs.

  Images of the first user turn (the target, stored as `image`) are left as they are.
  """
  pngs: list[bytes] = []
  if messages is None:
    return None, np.zeros((0,), object)
  if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
    raise ValueError(f"{where}: 'messages' must be a list of message objects")
  first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), -1)
  out = []
  for i, message in enumerate(messages):
    content = message.get("content")
    if i <= first_user or not isinstance(content, list):
      out.append(message)
      continue
    items = []
    for item in content:
      if isinstance(item, dict) and item.get("type") == "image":
        if not isinstance(item.get("image"), str):
          raise ValueError(f"{where}: message {i} has an image item without an 'image' file path")
        pngs.append(_read_image(root / item["image"], f"{where} (message {i})"))
        item = {"type": "image"}
      items.append(item)
    out.append({**message, "content": items})
  array = np.empty((len(pngs),), object)
  array[:] = pngs
  return out, array


class RrvfColdstart(base.ManualBuilder):
  """Cold-start SFT data for chart-to-code: images with the code (and optional conversation).

  Layout of manual_dir (convert `syficy/rrvf_coldstart_chartqa` or your own data to it):

      manual_dir/
        train.jsonl          one split per *.jsonl file, named after it (train, test, ...)
        images/0001.png      the images the lines name

  Each line: {"image": "images/0001.png" (path relative to the JSONL's directory),
  "code": "<the target program>", "id": "<optional; default '<split>-<line>'>",
  "messages": <optional: the chat turns as a JSON list, e.g. [{"role": "user", ...}, ...]>}.
  Images shown after the first user turn (renders in tool responses) are content items
  {"type": "image", "image": "images/0001_r1.png"} naming their files the same way.
  Features: id (str), image (PNG bytes), code (str), conversation (str: the "messages" as JSON
  text, '' if absent; later image items reduced to {"type": "image"}), turn_images (the PNG of
  each of those later images, in order). SFT replaces the first user turn by the run's prompt.
  """

  name = "rrvf_coldstart"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "First version.",
    "1.1.0": "Images after the first user turn stored as turn_images.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = "See the builder docstring (rrvf_jax.data.manual.RrvfColdstart)."
  LAYOUT = """
manual_dir/
  train.jsonl       one split per *.jsonl (train, test, ...); each line a JSON object:
                    {"image": "images/0001.png", "code": "<program>", "id": "<optional>",
                     "messages": [<optional chat turns; later images as
                                  {"type": "image", "image": "images/0001_r1.png"}>]}
  images/0001.png   image paths are relative to the JSONL's directory
"""

  def _features(self) -> Mapping[str, tfds.features.FeatureConnector]:
    """id, image, code, conversation."""
    return {
      "id": base.text("Example id (from the line, or '<split>-<line number>')."),
      "image": base.png_bytes("The chart image, PNG."),
      "code": base.text("The target program for the image."),
      "conversation": base.text("The example's chat turns as JSON text ('' if none)."),
      "turn_images": tfds.features.Tensor(
        shape=(None,), dtype=np.object_, doc="PNG of each image after the first user turn."
      ),
    }

  def _info(self) -> tfds.core.DatasetInfo:
    """Dataset metadata."""
    return self._make_info(
      "RRVF cold-start SFT data: chart images with target code and optional conversations.",
      homepage="https://huggingface.co/datasets/syficy/rrvf_coldstart_chartqa",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    """One split per top-level *.jsonl file."""
    root = self.manual_root(dl_manager)
    files = sorted(root.glob("*.jsonl"))
    if not files:
      raise self.layout_error(root, "holds no *.jsonl files")
    for f in files:
      if not _SPLIT_NAME.match(f.stem):
        raise self.layout_error(root, f"has {f.name}, whose name is not a usable split name")
    return {f.stem: self._generate_examples(f) for f in files}

  def _generate_examples(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Reads the lines and the images they name."""
    rows = list(_read_jsonl(path))
    if not rows:
      raise self.layout_error(path.parent, f"has an empty {path.name}")
    seen: set[str] = set()
    for done, (number, row) in enumerate(rows, start=1):
      where = f"{path}:{number}"
      if not isinstance(row.get("code"), str) or not isinstance(row.get("image"), str):
        raise ValueError(f"{where}: each line needs 'image' and 'code' strings, got {sorted(row)}")
      example_id = str(row.get("id") or f"{path.stem}-{number:06d}")
      if example_id in seen:
        raise ValueError(f"{where}: duplicate id {example_id!r}")
      seen.add(example_id)
      messages, turn_images = _conversation_images(row.get("messages"), path.parent, where)
      yield (
        example_id,
        {
          "id": example_id,
          "image": _read_image(path.parent / row["image"], where),
          "code": row["code"],
          "conversation": "" if messages is None else json.dumps(messages, ensure_ascii=False),
          "turn_images": turn_images,
        },
      )
      _log_progress(self.name, path.stem, done, len(rows))
