"""Shared pieces of the TFDS builders: base class, parameterised configs, manual-dir checks.

Every builder writes `array_record` files with features that need no TensorFlow: strings as
`tfds.features.Text`, images as PNG bytes in a scalar object `tfds.features.Tensor`
(`tfds.features.Image` needs TensorFlow), numbers as `tfds.features.Scalar`. Verified here with
tensorflow-datasets 4.9.10 and no TensorFlow installed: `download_and_prepare`, `as_data_source`,
`tfds.data_source` and `tfds.builder_from_directory(...).as_data_source()` all work. The one part of
TFDS avoided is `dataset_info_from_configs` (it reads metadata files next to the builder module).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import inspect
import re
import string
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

# Splits are stored in generation order (no TFDS key hashing): record i is example i. The input
# pipeline shuffles.
FILE_FORMAT = "array_record"


class ManualDataError(ValueError):
  """The files a builder reads from `manual_dir` are missing, empty or not laid out as expected."""


def text(doc: str) -> tfds.features.Text:
  """A UTF-8 string feature (read back as bytes by TFDS; `ExampleSource` decodes it to str)."""
  return tfds.features.Text(doc=doc)


def png_bytes(doc: str = "The image, PNG-encoded.") -> tfds.features.Tensor:
  """An encoded image stored as raw bytes (no TensorFlow needed to write or read it)."""
  return tfds.features.Tensor(shape=(), dtype=np.object_, doc=doc)


def integer(doc: str) -> tfds.features.Scalar:
  """An int64 scalar feature."""
  return tfds.features.Scalar(dtype=np.int64, doc=doc)


@dataclasses.dataclass(eq=False)
class ParamConfig(tfds.core.BuilderConfig):
  """A builder config whose name spells out all its parameters (so it can be rebuilt from it).

  Subclasses add fields (int or lowercase str) and set `NAME_FORMAT`, e.g.
  "{complexity}-{width}x{height}": `create(**params)` fills the name in, `from_name(name)`
  parses it back, so `tfds.data_source("synthetic_charts/simple-224x224-...")` works too.
  """

  NAME_FORMAT: ClassVar[str] = ""

  @classmethod
  def param_fields(cls) -> dict[str, dataclasses.Field]:
    """The config's own parameters (the fields named in NAME_FORMAT)."""
    names = re.findall(r"{(\w+)}", cls.NAME_FORMAT)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return {n: fields[n] for n in names}

  @classmethod
  def create(cls, **params: Any) -> ParamConfig:
    """The config with `params` (others at their defaults); ValueError on unknown or bad ones."""
    fields = cls.param_fields()
    unknown = sorted(set(params) - set(fields))
    if unknown:
      raise ValueError(
        f"unknown {cls.__name__} parameter(s) {', '.join(unknown)}; known: {', '.join(fields)}"
      )
    values = {n: params.get(n, f.default) for n, f in fields.items()}
    for n, v in values.items():
      if _is_int(fields[n]) and (isinstance(v, bool) or not isinstance(v, int | np.integer)):
        raise ValueError(f"{cls.__name__}.{n} must be an int, got {v!r}")
      if not _is_int(fields[n]) and not isinstance(v, str):
        raise ValueError(f"{cls.__name__}.{n} must be a str, got {v!r}")
    values = {n: int(v) if isinstance(v, np.integer) else v for n, v in values.items()}
    config = cls(name=cls.NAME_FORMAT.format(**values), **values)
    config.validate()
    return config

  @classmethod
  def from_name(cls, name: str) -> ParamConfig | None:
    """Parses a name made by `create` back into the config (None if it does not match)."""
    fields = cls.param_fields()
    pattern = ""
    for literal, field_name, _, _ in string.Formatter().parse(cls.NAME_FORMAT):
      pattern += re.escape(literal)
      if field_name:
        kind = r"\d+" if _is_int(fields[field_name]) else r"[a-z_]+"
        pattern += f"(?P<{field_name}>{kind})"
    match = re.fullmatch(pattern, name)
    if match is None:
      return None
    values = {n: int(v) if _is_int(fields[n]) else v for n, v in match.groupdict().items()}
    try:
      return cls.create(**values)
    except ValueError:
      return None

  def validate(self) -> None:
    """Raises ValueError naming a parameter whose value is out of range (override)."""

  def params(self) -> dict[str, Any]:
    """The parameters as a dict."""
    return {n: getattr(self, n) for n in self.param_fields()}


def _is_int(field: dataclasses.Field) -> bool:
  """Whether a config field holds an int (the others hold lowercase strings)."""
  return field.type in ("int", int)


class RrvfBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the project's builders: array_record files, configs rebuilt from their names."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
  CONFIG_CLASS: ClassVar[type[ParamConfig] | None] = None

  def __init__(self, *, file_format: str | None = None, **kwargs: Any) -> None:
    super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The builder's source file (where TFDS looks for checksums; we download nothing).

    TFDS 4.9.10's own version imports `importlib_resources`, which it only requires on
    Python < 3.9, for builders inside packages; its fallback (this) needs nothing.
    """
    return epath.Path(inspect.getfile(cls))

  @classmethod
  def get_builder_config(cls, name: str, version: Any = None) -> tfds.core.BuilderConfig | None:
    """A predefined config, else one parsed from its parameter-spelling name."""
    config = super().get_builder_config(name, version)
    if config is None and cls.CONFIG_CLASS is not None:
      config = cls.CONFIG_CLASS.from_name(name)
    return config

  @classmethod
  def config_name(cls, **params: Any) -> str | None:
    """The config name for these builder parameters (None for builders without parameters)."""
    if cls.CONFIG_CLASS is None:
      if params:
        raise ValueError(f"{cls.name} takes no parameters, got {', '.join(sorted(params))}")
      return None
    return cls.CONFIG_CLASS.create(**params).name

  @abc.abstractmethod
  def _features(self) -> Mapping[str, tfds.features.FeatureConnector]:
    """The example's features."""

  def _make_info(self, description: str, **kwargs: Any) -> tfds.core.DatasetInfo:
    """DatasetInfo with this builder's features, records kept in generation order."""
    return tfds.core.DatasetInfo(
      builder=self,
      description=description,
      features=tfds.features.FeaturesDict(dict(self._features())),
      disable_shuffling=True,
      **kwargs,
    )


class ManualBuilder(RrvfBuilder, skip_registration=True):
  """A builder that reads files the user downloaded into `manual_dir` (see `LAYOUT`)."""

  LAYOUT: ClassVar[str] = ""

  def manual_root(self, dl_manager: tfds.download.DownloadManager) -> Path:
    """The manual directory; ManualDataError naming it and the layout if missing or empty."""
    try:
      return Path(dl_manager.manual_dir)
    except AssertionError:  # TFDS's way of saying "missing or empty"
      where = getattr(dl_manager, "_manual_dir", None)  # only to name it in the message
      raise self.layout_error(where, "does not exist or is empty") from None

  def layout_error(self, where: object, problem: str) -> ManualDataError:
    """The error for a manual directory that does not hold the expected files."""
    return ManualDataError(
      f"{self.name}: manual_dir {where} {problem}. Expected layout:\n{self.LAYOUT.strip()}"
    )


def check_manual_dir(name: str, manual_dir: Path, layout: str) -> None:
  """Raises ManualDataError if `manual_dir` is missing or empty (before TFDS is involved)."""
  problem = None
  if not manual_dir.is_dir():
    problem = "does not exist"
  elif not any(manual_dir.iterdir()):
    problem = "is empty"
  if problem:
    raise ManualDataError(f"{name}: manual_dir {manual_dir} {problem}. Expected layout:\n{layout}")


@contextlib.contextmanager
def quiet_tfds_progress() -> Iterator[None]:
  """Turns TFDS's tqdm bars off while building (we log progress with absl) and back after."""
  from tensorflow_datasets.core.utils import tqdm_utils

  previous = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(previous)
