"""Host side of the tracing driver: run code in the sandbox, get its benchmark trace back.

`trace_code(code, pool=...)` runs a program in a sandbox pool built on `_trace_driver.py` (the
project's sandbox: separate process, rlimits, seccomp, audit hook, bubblewrap namespaces where
available, wall-clock kill) and returns a `CodeTrace`: what ChartMimic's four tracers and
Plot2Code's text extraction would see, plus the drawn image. A program that hangs, crashes or
attacks the sandbox yields a failed trace with the sandbox's status; it never raises.

Ground-truth traces are worth caching across runs of the same evaluation (`TraceCache`): they
depend only on the code and on this interpreter's matplotlib.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import struct
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from rrvf_jax.env.codecheck import CodeLimits
from rrvf_jax.env.sandbox import SandboxConfig, SandboxPool, SandboxResult
from rrvf_jax.env.types import Status
from rrvf_jax.eval import _trace_driver

TRACE_DRIVER = Path(_trace_driver.__file__).resolve()
# The benchmarks' own limits: ChartMimic runs each program for up to 120 s, Plot2Code 30 s.
DEFAULT_TIMEOUT_S = 120.0
_HEADER = struct.Struct("!I")
T = TypeVar("T")


@dataclasses.dataclass(eq=False)
class CodeTrace:
  """What one program drew, as the benchmark tracers see it (empty fields when it failed).

  texts: strings drawn to PDF with ticks removed (ChartMimic Text); layout: one dict per axes with
  a subplotspec (ChartMimic Layout); n_axes: all axes of the figure; types: call counts per
  plotting function (ChartMimic Type); colors: unique 'function--COLOUR' strings (ChartMimic
  Color, before its >10-colour filter); labels: (text, x, y) of every visible Text after a draw,
  x/y None when not numeric (Plot2Code); figsize in inches; image: the figure at its own size.
  """

  status: Status
  message: str = ""
  texts: list[str] = dataclasses.field(default_factory=list)
  layout: list[dict[str, int]] = dataclasses.field(default_factory=list)
  n_axes: int = 0
  types: dict[str, int] = dataclasses.field(default_factory=dict)
  colors: list[str] = dataclasses.field(default_factory=list)
  labels: list[tuple[str, float | None, float | None]] = dataclasses.field(default_factory=list)
  figsize: tuple[float | None, float | None] | None = None
  image: np.ndarray | None = dataclasses.field(default=None, repr=False)
  no_figure: bool = False
  pdf_error: str | None = None
  errors: list[str] = dataclasses.field(default_factory=list)
  timings: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def ok(self) -> bool:
    """Whether the program ran to the end and its figure was drawn."""
    return self.status == Status.OK

  def summary(self) -> dict[str, Any]:
    """A JSON-able digest for per-item results (no image)."""
    return {
      "status": str(self.status),
      "message": self.message,
      "n_texts": len(self.texts),
      "n_axes": self.n_axes,
      "types": dict(self.types),
      "n_colors": len(self.colors),
      "figsize": list(self.figsize) if self.figsize else None,
      "no_figure": self.no_figure,
      "pdf_error": self.pdf_error,
      "tracer_errors": list(self.errors),
    }


def eval_sandbox_config(timeout_s: float = DEFAULT_TIMEOUT_S) -> SandboxConfig:
  """Sandbox limits for benchmark programs: the project's, with room for data-heavy references.

  Ground-truth scripts often hold thousands of numbers; the training-time static limit on numeric
  literals (a guard against pasted raster data) would reject them.
  """
  return SandboxConfig(
    timeout_s=timeout_s, code_limits=CodeLimits(max_code_chars=400_000, max_literal_numbers=200_000)
  )


def create_trace_pool(
  num_workers: int | None = None, config: SandboxConfig | None = None
) -> SandboxPool:
  """A sandbox pool whose jobs return benchmark traces (caller owns it: `close()` or `with`).

  Pass `config=eval_sandbox_config()` for benchmark programs (the default config is the training
  sandbox's, whose static limits reject data-heavy reference scripts).
  """
  return SandboxPool(TRACE_DRIVER, num_workers=num_workers, config=config)


_default_pool: SandboxPool | None = None
_default_lock = threading.Lock()


def default_trace_pool() -> SandboxPool:
  """The shared tracing pool (created on first use, closed at exit)."""
  global _default_pool
  with _default_lock:
    if _default_pool is None or _default_pool._closed:
      _default_pool = create_trace_pool(config=eval_sandbox_config())
    return _default_pool


def submit_trace(
  code: str,
  *,
  pool: SandboxPool | None = None,
  timeout_s: float = DEFAULT_TIMEOUT_S,
  dpi: float = 100.0,
  max_side_px: int = 2048,
) -> concurrent.futures.Future[CodeTrace]:
  """Queues a program; the future resolves to its CodeTrace (never to an exception)."""
  pool = pool or default_trace_pool()
  options = {"dpi": float(dpi), "max_side_px": int(max_side_px)}
  inner = pool.submit(code, timeout_s=timeout_s, options=options)
  outer: concurrent.futures.Future[CodeTrace] = concurrent.futures.Future()
  inner.add_done_callback(lambda f: outer.set_result(parse_trace(f.result())))
  return outer


def trace_code(code: str, **kwargs: Any) -> CodeTrace:
  """Runs a program in the sandbox and returns its trace (see `submit_trace` for arguments)."""
  return submit_trace(code, **kwargs).result()


def parse_trace(result: SandboxResult) -> CodeTrace:
  """Decodes the driver's payload, distrusting every field (the job ran model-written code)."""
  if result.status != Status.OK:
    return CodeTrace(result.status, result.message, timings=dict(result.timings))
  try:
    return _decode(result)
  except Exception as e:  # whatever the job sent: this runs in a pool thread and must not raise
    message = f"The sandbox returned an unreadable trace ({type(e).__name__}: {e})."
    return CodeTrace(Status.RUNTIME_ERROR, message, timings=dict(result.timings))


def _decode(result: SandboxResult) -> CodeTrace:
  """Parses payload = length, JSON trace, raw RGB image."""
  payload = result.payload
  (size,) = _HEADER.unpack_from(payload, 0)
  body = json.loads(payload[_HEADER.size : _HEADER.size + size])
  h, w, c = (int(v) for v in body["image_shape"])
  pixels = payload[_HEADER.size + size :]
  if c != 3 or h < 1 or w < 1 or len(pixels) != h * w * 3:
    raise ValueError(f"image of {len(pixels)} bytes does not match shape {(h, w, c)}")
  image = np.frombuffer(pixels, dtype=np.uint8).reshape(h, w, 3)
  layout = [{str(k): int(v) for k, v in d.items()} for d in body["layout"]]
  labels = [(str(t), _opt_float(x), _opt_float(y)) for t, x, y in body["labels"]]
  figsize = tuple(_opt_float(v) for v in body["figsize"])
  return CodeTrace(
    status=Status.OK,
    texts=[str(t) for t in body["texts"]],
    layout=layout,
    n_axes=int(body["n_axes"]),
    types={str(k): int(v) for k, v in body["types"].items()},
    colors=sorted(str(c) for c in body["colors"]),
    labels=labels,
    figsize=figsize,  # type: ignore[arg-type]
    image=image,
    no_figure=bool(body["no_figure"]),
    pdf_error=None if body["pdf_error"] is None else str(body["pdf_error"]),
    errors=[str(e) for e in body.get("errors", [])],
    timings=dict(result.timings),
  )


def _opt_float(value: Any) -> float | None:
  """A float, or None."""
  return None if value is None else float(value)


class TraceCache:
  """A thread-safe LRU of computed values (ground-truth traces, reference renders) by key.

  Concurrent requests for the same key compute it once; the others wait for that result.
  """

  def __init__(self, max_items: int = 4096) -> None:
    self.max_items = max_items
    self._items: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
    self._pending: dict[Hashable, concurrent.futures.Future] = {}
    self._lock = threading.Lock()
    self.hits = 0
    self.misses = 0

  def get_or_compute(self, key: Hashable, compute: Callable[[], T]) -> T:
    """The cached value for `key`, computing (and storing) it on a miss."""
    with self._lock:
      if key in self._items:
        self._items.move_to_end(key)
        self.hits += 1
        return self._items[key]
      future = self._pending.get(key)
      owner = future is None
      if owner:
        future = concurrent.futures.Future()
        self._pending[key] = future
        self.misses += 1
    if not owner:
      return future.result()
    try:
      value = compute()
    except BaseException as e:
      future.set_exception(e)
      raise
    finally:
      with self._lock:
        self._pending.pop(key, None)
    with self._lock:
      self._items[key] = value
      while len(self._items) > self.max_items:
        self._items.popitem(last=False)
    future.set_result(value)
    return value


def code_key(kind: str, code: str, **settings: Any) -> str:
  """A cache key: sha256 of the kind, the settings and the code."""
  h = hashlib.sha256(kind.encode())
  h.update(json.dumps(settings, sort_keys=True, default=str).encode())
  h.update(code.encode("utf-8", "surrogatepass"))
  return h.hexdigest()


def reference_trace(
  kind: str,
  gt_code: str,
  *,
  own_target: bool,
  pool: SandboxPool | None,
  timeout_s: float,
  dpi: int,
  max_side_px: int,
  cache: TraceCache | None,
) -> CodeTrace:
  """A benchmark item's ground-truth trace (cached under `kind`; no image with `own_target`)."""

  def compute() -> CodeTrace:
    trace = submit_trace(
      gt_code, pool=pool, timeout_s=timeout_s, dpi=dpi, max_side_px=max_side_px
    ).result()
    return dataclasses.replace(trace, image=None) if own_target else trace

  if cache is None:
    return compute()
  key = code_key(kind, gt_code, dpi=dpi, px=max_side_px, timeout=timeout_s, own_target=own_target)
  return cache.get_or_compute(key, compute)
