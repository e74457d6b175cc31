"""Per-item result records shared by the benchmark scorers, and small aggregation helpers."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rrvf_jax.eval.judging import JudgeOutcome


@dataclasses.dataclass(frozen=True)
class PRF:
  """Precision, recall and F1 of one metric on one item (all in [0, 1])."""

  precision: float = 0.0
  recall: float = 0.0
  f1: float = 0.0

  @classmethod
  def from_counts(cls, matched: float, n_generated: float, n_reference: float) -> PRF:
    """P = matched / generated, R = matched / reference, F1; 0 when either side is empty."""
    if n_generated <= 0 or n_reference <= 0:
      return cls()
    return cls.from_pr(matched / n_generated, matched / n_reference)

  @classmethod
  def from_pr(cls, precision: float, recall: float) -> PRF:
    """The F1 of a precision and a recall (0 when both are 0)."""
    total = precision + recall
    f1 = 0.0 if total == 0 else 2 * precision * recall / total
    return cls(float(precision), float(recall), float(f1))

  def to_json(self) -> dict[str, float]:
    """A JSON-able dict."""
    return dataclasses.asdict(self)


@dataclasses.dataclass(eq=False)
class ItemResult:
  """The score of one benchmark item.

  metrics: the benchmark's per-item numbers (F1s and text scores in [0, 1]; `None` where the
  benchmark leaves the item out, e.g. Plot2Code's text score of a failed item). judge: the judge
  outcome (None when the benchmark has no judge score). primary: the number the report ranks items
  by. details: JSON-able extras (precision/recall, trace digests). target/render: images for the
  report, never written to results.json.
  """

  benchmark: str
  item_id: str
  category: str | None
  exec_ok: bool
  status: str
  message: str
  metrics: dict[str, float | None]
  judge: JudgeOutcome | None
  primary: float | None
  code: str | None
  details: dict[str, Any] = dataclasses.field(default_factory=dict)
  target: np.ndarray | None = dataclasses.field(default=None, repr=False)
  render: np.ndarray | None = dataclasses.field(default=None, repr=False)

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict (no images)."""
    return {
      "benchmark": self.benchmark,
      "id": self.item_id,
      "category": self.category,
      "exec_ok": self.exec_ok,
      "status": self.status,
      "message": self.message,
      "metrics": dict(self.metrics),
      "judge": None if self.judge is None else self.judge.to_json(),
      "primary": self.primary,
      "code": self.code,
      "details": self.details,
    }


def mean(values: Iterable[float | None], *, n: int | None = None) -> float | None:
  """Sum of the non-None values divided by `n` (default: their count); None when nothing counts."""
  vals = [float(v) for v in values if v is not None]
  denominator = len(vals) if n is None else n
  if denominator <= 0:
    return None
  return math.fsum(vals) / denominator


def scale(value: float | None, factor: float) -> float | None:
  """value * factor, None stays None."""
  return None if value is None else value * factor


def by_category(
  results: Sequence[ItemResult], aggregate_fn, *, key: str = "category"
) -> dict[str, dict[str, Any]]:
  """Applies an aggregate function to each category's items (sorted by category name)."""
  groups: dict[str, list[ItemResult]] = {}
  for r in results:
    groups.setdefault(str(getattr(r, key) or "uncategorised"), []).append(r)
  return {name: aggregate_fn(groups[name], breakdown=False) for name in sorted(groups)}


def check_benchmark(results: Sequence[ItemResult], name: str) -> None:
  """Raises ValueError when a result belongs to another benchmark."""
  others = sorted({r.benchmark for r in results if r.benchmark != name})
  if others:
    raise ValueError(f"cannot aggregate {others} results as {name}")


def judge_counts(results: Sequence[ItemResult]) -> Mapping[str, int]:
  """How many items have a judge score, and how many do not."""
  scored = sum(1 for r in results if r.judge is not None and r.judge.score is not None)
  return {"judge_items": scored, "judge_missing": len(results) - scored}


def score_all(
  score_item: Callable[..., ItemResult],
  items: Sequence[Any],
  outputs: Sequence[str | None],
  kwargs: Mapping[str, Any],
  *,
  max_workers: int,
  name: str,
) -> list[ItemResult]:
  """`score_item(item, output, **kwargs)` for every pair, in threads when asked; results in order.

  Sandbox jobs, renders and judge calls of different items overlap in the threads.
  """
  if max_workers <= 1 or len(items) <= 1:
    return [score_item(i, o, **kwargs) for i, o in zip(items, outputs, strict=True)]
  with concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix=name) as ex:
    futures = [ex.submit(score_item, i, o, **kwargs) for i, o in zip(items, outputs, strict=True)]
    return [f.result() for f in futures]
