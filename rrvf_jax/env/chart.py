"""Chart renderer: matplotlib code -> fixed-size RGB image, rendered in the sandbox pool.

`render_chart(code)` needs no set-up: it uses a module-level pool, created on first use. For
explicit control (worker count, limits) build one with `create_chart_pool` and pass `pool=`.
The canvas is fixed (default 672x672 px at 96 dpi; multiples of 28 suit Qwen-VL's patching) and
rendering is deterministic: matplotlib's default style plus `CHART_RC_PARAMS`, Agg, seeded RNGs,
PYTHONHASHSEED=0 and the same fonts (DejaVu/Liberation) in every worker.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rrvf_jax.env import _chart_driver
from rrvf_jax.env.sandbox import SandboxConfig, SandboxPool, SandboxResult
from rrvf_jax.env.types import RenderResult, Status

CHART_DRIVER = Path(_chart_driver.__file__).resolve()
CHART_RC_PARAMS = dict(_chart_driver.RC_PARAMS)


@dataclasses.dataclass(frozen=True)
class ChartCanvas:
  """Size of the rendered chart: width x height pixels at `dpi` (figure inches = pixels / dpi)."""

  width: int = 672
  height: int = 672
  dpi: float = 96.0
  max_figure_px: int = 16384  # a figure the code sizes beyond this (per side) is oversize_output

  def options(self) -> dict[str, float]:
    """The driver options for this canvas."""
    return dataclasses.asdict(self)


_default_pool: SandboxPool | None = None
_default_lock = threading.Lock()


def create_chart_pool(
  num_workers: int | None = None, config: SandboxConfig | None = None
) -> SandboxPool:
  """Creates a sandbox pool that renders charts (caller owns it: `close()` or `with`)."""
  return SandboxPool(CHART_DRIVER, num_workers=num_workers, config=config)


def default_chart_pool() -> SandboxPool:
  """The shared pool behind `render_chart` (created on first use, closed at exit)."""
  global _default_pool
  with _default_lock:
    if _default_pool is None or _default_pool._closed:
      _default_pool = create_chart_pool()
    return _default_pool


def submit_chart(
  code: str,
  *,
  timeout_s: float | None = None,
  canvas: ChartCanvas = ChartCanvas(),
  pool: SandboxPool | None = None,
) -> concurrent.futures.Future[RenderResult]:
  """Queues a chart render; the future resolves to a RenderResult."""
  pool = pool or default_chart_pool()
  inner = pool.submit(code, timeout_s=timeout_s, options=canvas.options())
  outer: concurrent.futures.Future[RenderResult] = concurrent.futures.Future()
  inner.add_done_callback(lambda f: outer.set_result(to_render_result(f.result(), canvas)))
  return outer


def render_chart(
  code: str,
  *,
  timeout_s: float | None = None,
  canvas: ChartCanvas = ChartCanvas(),
  pool: SandboxPool | None = None,
) -> RenderResult:
  """Runs matplotlib code in the sandbox and returns the chart it draws (or why it failed)."""
  return submit_chart(code, timeout_s=timeout_s, canvas=canvas, pool=pool).result()


def render_charts(
  codes: Sequence[str],
  *,
  timeout_s: float | None = None,
  canvas: ChartCanvas = ChartCanvas(),
  pool: SandboxPool | None = None,
) -> list[RenderResult]:
  """Renders many programs in parallel across the pool's workers; results in input order."""
  futures = [submit_chart(c, timeout_s=timeout_s, canvas=canvas, pool=pool) for c in codes]
  return [f.result() for f in futures]


def to_render_result(result: SandboxResult, canvas: ChartCanvas) -> RenderResult:
  """Converts a sandbox result (raw RGB payload) into a RenderResult with an image array."""
  if result.status != Status.OK:
    return RenderResult(result.status, None, result.message, result.timings)
  expected = canvas.height * canvas.width * 3
  if len(result.payload) != expected:
    message = f"The sandbox returned {len(result.payload)} bytes instead of {expected}."
    return RenderResult(Status.RUNTIME_ERROR, None, message, result.timings)
  image = np.frombuffer(result.payload, dtype=np.uint8).reshape(canvas.height, canvas.width, 3)
  return RenderResult(Status.OK, image, "", result.timings)
