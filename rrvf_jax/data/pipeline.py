"""Host-side input pipeline: shuffled, per-host-sharded batches of examples with resumable state.

A global batch is `global_batch_size` consecutive indices of the epoch's order (a permutation
of the dataset seeded by (seed, epoch), or the identity without shuffling); host `process_index`
of `process_count` takes the `process_index`-th contiguous slice of it, so hosts see disjoint
examples and together the whole global batch. The state is two integers (epoch, batch within
the epoch) plus the settings they depend on; it is the same on every host, so any host's
checkpoint resumes every host, even with a different process count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

STATE_VERSION = 1
# Settings a saved state only makes sense with: resuming under different ones is an error.
_PINNED = ("seed", "shuffle", "num_records", "global_batch_size", "drop_remainder")


class BatchIterator(Iterator[list[dict[str, Any]]]):
  """Yields this host's share of each global batch (a list of example dicts, in order).

  Args:
    source: random-access examples (`len` and `[i]`; `__getitems__` is used when present).
    global_batch_size: examples per step across all hosts (a multiple of `process_count`).
    seed: shuffling seed; epoch e uses the permutation drawn from (seed, e).
    shuffle: whether to shuffle each epoch (else dataset order).
    num_epochs: epochs to run; None repeats forever.
    drop_remainder: drop the last, partial global batch of each epoch (static shapes). If False
      the partial batch is split as evenly as possible across hosts (some may get fewer examples,
      or none).
    process_index, process_count: this host and the number of hosts (jax.process_index() /
      jax.process_count() in a multi-host run).
  """

  def __init__(
    self,
    source: Sequence[dict[str, Any]],
    global_batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    process_index: int = 0,
    process_count: int = 1,
  ) -> None:
    num_records = len(source)
    name = getattr(source, "name", type(source).__name__)
    if num_records == 0:
      raise ValueError(f"the dataset {name} is empty: there is nothing to iterate over")
    if global_batch_size < 1:
      raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(
        f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
      )
    if global_batch_size % process_count:
      raise ValueError(
        f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}"
      )
    if drop_remainder and num_records < global_batch_size:
      raise ValueError(
        f"the dataset {name} has {num_records} examples, fewer than one global batch of "
        f"{global_batch_size} (drop_remainder=True would yield nothing)"
      )
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    self._source = source
    self.global_batch_size = global_batch_size
    self.seed = int(seed)
    self.shuffle = shuffle
    self.num_epochs = num_epochs
    self.drop_remainder = drop_remainder
    self.process_index = process_index
    self.process_count = process_count
    self.num_records = num_records
    rounding = math.floor if drop_remainder else math.ceil
    self.batches_per_epoch = int(rounding(num_records / global_batch_size))
    self._epoch = 0
    self._batch = 0
    self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

  @property
  def local_batch_size(self) -> int:
    """Examples per host in a full global batch."""
    return self.global_batch_size // self.process_count

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The dataset indices of `epoch` in iteration order (the same on every host)."""
    if self._order is None or self._order[0] != epoch:
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
      else:
        order = np.arange(self.num_records)
      self._order = (epoch, order)
    return self._order[1]

  def global_batch_indices(self, epoch: int, batch: int) -> np.ndarray:
    """Dataset indices of global batch `batch` of `epoch` (all hosts together)."""
    start = batch * self.global_batch_size
    return self.epoch_order(epoch)[start : start + self.global_batch_size]

  def local_indices(self, epoch: int, batch: int) -> np.ndarray:
    """This host's slice of a global batch."""
    indices = self.global_batch_indices(epoch, batch)
    if len(indices) == self.global_batch_size:
      size = self.local_batch_size
      return indices[self.process_index * size : (self.process_index + 1) * size]
    return np.array_split(indices, self.process_count)[self.process_index]  # a partial batch

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> list[dict[str, Any]]:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    indices = [int(i) for i in self.local_indices(self._epoch, self._batch)]
    getitems = getattr(self._source, "__getitems__", None)
    if getitems is not None:
      batch = list(getitems(indices))
    else:
      batch = [self._source[i] for i in indices]
    # Advance only after the read succeeded: a failed read leaves the position unchanged.
    self._batch += 1
    if self._batch == self.batches_per_epoch:
      self._epoch, self._batch = self._epoch + 1, 0
    return batch

  def get_state(self) -> dict[str, Any]:
    """The position (JSON-serialisable); `set_state` of it resumes with the same next batch."""
    return {
      "version": STATE_VERSION,
      "epoch": self._epoch,
      "batch_in_epoch": self._batch,
      "seed": self.seed,
      "shuffle": self.shuffle,
      "num_records": self.num_records,
      "global_batch_size": self.global_batch_size,
      "drop_remainder": self.drop_remainder,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes from a `get_state()` dict; ValueError naming the key if it does not fit."""
    missing = [k for k in ("version", "epoch", "batch_in_epoch", *_PINNED) if k not in state]
    if missing:
      raise ValueError(f"input pipeline state lacks key(s) {', '.join(missing)}: {state}")
    if state["version"] != STATE_VERSION:
      raise ValueError(f"input pipeline state version {state['version']} != {STATE_VERSION}")
    for key in _PINNED:
      if state[key] != getattr(self, key):
        raise ValueError(
          f"input pipeline state has {key}={state[key]!r} but this iterator has "
          f"{key}={getattr(self, key)!r}; resuming would not continue the same stream"
        )
    epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
    if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
      raise ValueError(
        f"input pipeline state position epoch={epoch}, batch_in_epoch={batch} is out of range "
        f"({self.batches_per_epoch} batches per epoch)"
      )
    self._epoch, self._batch = epoch, batch
