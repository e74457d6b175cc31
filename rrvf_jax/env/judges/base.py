"""The judge interface: result and request types, a base class, and the `make_judge` registry.

A judge compares a rendered image with the target image and returns a score in [0, 1], per-aspect
scores in [0, 1], and feedback text for the policy. Judges are chosen by name
(`make_judge('local')`, `make_judge('openai', base_url=…, model=…)`) so the run config can swap
them.

Two modes: 'score' is the final visual judge (R_vision); 'feedback' is the per-turn teacher whose
text goes back to the policy. A judge may return `score=None` in feedback mode when it does not
score.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

Kind = Literal["chart", "web"]
Mode = Literal["score", "feedback"]
Source = Literal["local", "openai", "fallback_local"]


@dataclasses.dataclass(frozen=True)
class JudgeResult:
  """One judgement: overall score, per-aspect scores, feedback text, and where it came from."""

  score: float | None
  aspects: Mapping[str, float]
  feedback: str
  raw: str | None
  source: Source
  # False when a model answered but no score could be read from its text.
  parse_ok: bool = True
  # Why the result is degraded (parse failure, fallback reason), for logs.
  error: str | None = None
  cached: bool = False


@dataclasses.dataclass(frozen=True)
class JudgeRequest:
  """One (target, render) pair to judge, for the batched `judge_many`."""

  target: np.ndarray
  render: np.ndarray
  kind: Kind = "chart"
  code: str | None = None
  mode: Mode = "score"


class JudgeUnavailableError(RuntimeError):
  """The judge service could not be reached (or kept failing) and the policy forbids a fallback."""


def check_image(image: np.ndarray, what: str) -> np.ndarray:
  """Validate an image as uint8 HxWx3 (dropping an alpha channel, expanding grayscale)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{what} must be uint8, got {image.dtype}")
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
    raise ValueError(f"{what} must be HxWx3, got shape {image.shape}")
  return np.ascontiguousarray(image[:, :, :3])


class Judge(abc.ABC):
  """Base class: implement `judge`; `judge_many` runs it concurrently in a thread pool."""

  name: str = "judge"
  max_workers: int = 4

  @abc.abstractmethod
  def judge(
    self,
    target: np.ndarray,
    render: np.ndarray,
    *,
    kind: Kind = "chart",
    code: str | None = None,
    mode: Mode = "score",
  ) -> JudgeResult:
    """Compare `render` with `target` and return a JudgeResult."""

  def judge_many(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
    """Judge many pairs concurrently; results come back in request order."""

    def one(r: JudgeRequest) -> JudgeResult:
      return self.judge(r.target, r.render, kind=r.kind, code=r.code, mode=r.mode)

    if len(requests) <= 1 or self.max_workers <= 1:
      return [one(r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(
      max_workers=min(self.max_workers, len(requests)), thread_name_prefix=f"judge-{self.name}"
    ) as pool:
      return list(pool.map(one, requests))

  def metrics(self) -> dict[str, int]:
    """Return counters for logging (requests, cache hits, retries, failures, …)."""
    return {}

  def close(self) -> None:  # noqa: B027  (optional hook, not abstract)
    """Release resources (connections, threads); the default has none."""


_REGISTRY: dict[str, Callable[..., Judge]] = {}


def register_judge(name: str) -> Callable[[Callable[..., Judge]], Callable[..., Judge]]:
  """Class decorator: make a judge constructible by name through `make_judge`."""

  def wrap(factory: Callable[..., Judge]) -> Callable[..., Judge]:
    if name in _REGISTRY:
      raise ValueError(f"judge {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory

  return wrap


def available_judges() -> list[str]:
  """Return the registered judge names."""
  return sorted(_REGISTRY)


def make_judge(name: str, **config: Any) -> Judge:
  """Build a judge by registered name; `config` goes to its constructor."""
  try:
    factory = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown judge {name!r}; available: {available_judges()}") from None
  return factory(**config)
