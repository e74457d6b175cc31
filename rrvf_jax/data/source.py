"""Random access to a built split: `len(source)` and `source[i]` -> dict of Python values."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, SupportsIndex

import numpy as np
import tensorflow_datasets as tfds


class ExampleSource(Sequence):
  """Wraps a TFDS array_record data source; records come back as plain Python values.

  Text features come back as `str` (TFDS gives bytes), numeric scalars as `int`/`float`, images
  as the stored PNG `bytes` (decode with `rrvf_jax.data.decode_image`), image lists as lists of
  `bytes`. Indexing is random access
  (no TensorFlow involved); `__getitems__` reads a batch of records in one call.
  """

  def __init__(self, source: Any, *, name: str, split: str) -> None:
    self._source = source
    self.name = name
    self.split = split
    features = source.dataset_info.features
    self.feature_names: tuple[str, ...] = tuple(features.keys())
    self._text = frozenset(k for k, f in features.items() if isinstance(f, tfds.features.Text))

  @property
  def info(self) -> tfds.core.DatasetInfo:
    """The TFDS DatasetInfo of the dataset."""
    return self._source.dataset_info

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: SupportsIndex) -> dict[str, Any]:  # type: ignore[override]
    i = self._check_index(index)
    return self._convert(self._source[i])

  def __getitems__(self, indices: Sequence[SupportsIndex]) -> list[dict[str, Any]]:
    """The records at `indices`, read in one call."""
    checked = [self._check_index(i) for i in indices]
    if not checked:
      return []
    return [self._convert(r) for r in self._source.__getitems__(checked)]

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return f"ExampleSource({self.name}, split={self.split!r}, len={len(self)})"

  def _check_index(self, index: SupportsIndex) -> int:
    """A non-negative in-range int index (negative ones count from the end)."""
    if isinstance(index, slice):
      raise TypeError("ExampleSource does not support slices; use __getitems__(indices)")
    i, n = index.__index__(), len(self)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"{self.name}/{self.split}: index {index} out of range for {n} examples")
    return i

  def _convert(self, record: dict[str, Any]) -> dict[str, Any]:
    """TFDS record -> str / bytes / int / float values."""
    out = {}
    for key, value in record.items():
      if key in self._text:
        value = value.decode("utf-8") if isinstance(value, bytes) else str(value)
      elif isinstance(value, np.generic):
        value = value.item()
      elif isinstance(value, np.ndarray) and value.dtype == object:
        value = [bytes(v) for v in value]  # a list of encoded images (e.g. turn_images)
      out[key] = value
    return out
