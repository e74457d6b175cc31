"""Chart driver for the sandbox: matplotlib set-up before model code, fixed-canvas render after.

Runs inside the sandbox zygote (loaded by path); the host imports it only for `RC_PARAMS` and
`render_figure`, so that reference renders use exactly the same canvas settings. Rendering rules:
Agg backend; matplotlib's default style plus `RC_PARAMS`; the figure the code leaves open (else the
last one passed to `savefig`/`show`) is drawn at `width`x`height` pixels and `dpi`, whatever figsize
the code asked for; `savefig` writes nothing (we render ourselves) but its facecolor/edgecolor/
transparent arguments are honoured; `show`, `pause`, `use` and `switch_backend` do nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math

RC_PARAMS = {"svg.hashsalt": "rrvf-jax", "figure.max_open_warning": 0}
DEFAULT_OPTIONS = {"width": 672, "height": 672, "dpi": 96, "max_figure_px": 16384}
# Imported once in the zygote so that jobs using them start instantly; missing ones are skipped.
OPTIONAL_PRELOAD = (
  "numpy.random", "numpy.linalg", "numpy.fft", "numpy.polynomial", "numpy.ma",
  "matplotlib.patches", "matplotlib.colors", "matplotlib.ticker", "matplotlib.gridspec",
  "matplotlib.dates", "matplotlib.cm", "matplotlib.lines", "matplotlib.path", "matplotlib.image",
  "mpl_toolkits.mplot3d", "mpl_toolkits.axes_grid1", "matplotlib.sankey", "matplotlib.table",
  "math", "random", "datetime", "collections", "itertools", "functools", "json", "csv", "re",
  "string", "textwrap", "statistics", "decimal", "fractions", "io", "calendar",
  "pandas", "seaborn", "squarify", "matplotlib_venn", "networkx",
)  # fmt: skip
_APPEARANCE_KWARGS = ("facecolor", "edgecolor", "transparent")

_saved: list[tuple[object, dict]] = []  # (figure, appearance kwargs) from savefig/show calls
_original_savefig = None
_original_switch_backend = None


def apply_rc_params() -> None:
  """Resets matplotlib to its default style plus RC_PARAMS (host and sandbox alike)."""
  import matplotlib  # imported here: host imports of this module must stay light

  matplotlib.rcdefaults()
  matplotlib.rcParams.update(RC_PARAMS)


def warmup() -> None:
  """Imports and exercises matplotlib once, in the zygote, so forked jobs start warm."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  for name in OPTIONAL_PRELOAD:
    # An optional package that is absent or broken is simply not preloaded.
    with contextlib.suppress(Exception):
      importlib.import_module(name)
  apply_rc_params()
  prepare({})  # seeds numpy.random too, whose first use costs ~7 ms: pay it once, here
  fig, ax = plt.subplots()
  ax.plot([0, 1], [0, 1], label="warm-up")
  ax.bar([0.5], [0.5])
  ax.set_title(r"warm-up $\alpha^2$")
  ax.legend()
  render_figure(fig, **_canvas(DEFAULT_OPTIONS))
  plt.close("all")


def prepare(options: dict) -> None:
  """Seeds the RNGs and makes show/savefig/backend switches harmless (in the forked job)."""
  import matplotlib
  import matplotlib.pyplot as plt
  import numpy as np

  global _original_savefig, _original_switch_backend
  np.random.seed(0)
  if _original_savefig is None:
    _original_savefig = matplotlib.figure.Figure.savefig
    _original_switch_backend = plt.switch_backend
  matplotlib.figure.Figure.savefig = _record_savefig
  plt.show = _record_show
  plt.pause = _ignore
  plt.switch_backend = _switch_to_agg  # pyplot calls it internally too: it must keep working
  matplotlib.use = _ignore


def collect(options: dict) -> tuple[str, str, dict, bytes]:
  """Renders the figure the code left; returns (status, message, meta, RGB bytes)."""
  import matplotlib

  opts = {**DEFAULT_OPTIONS, **options}
  picked = _pick_figure()
  if picked is None:
    return "no_figure", "The code did not produce a matplotlib figure.", {}, b""
  fig, kwargs = picked
  w_px, h_px = (float(v) * float(fig.dpi) for v in fig.get_size_inches())
  if not (math.isfinite(w_px) and math.isfinite(h_px)) or max(w_px, h_px) > opts["max_figure_px"]:
    size = f"{w_px:.0f}x{h_px:.0f}"
    message = f"The figure is {size} pixels (limit {opts['max_figure_px']} per side)."
    return "oversize_output", message, {}, b""
  with matplotlib.rc_context({"savefig.bbox": None}):
    rgb = render_figure(fig, **_canvas(opts), **kwargs)
  meta = {"shape": list(rgb.shape)}
  if (rgb == rgb[0, 0]).all():
    return "blank_image", "The figure is blank (a single uniform colour).", meta, b""
  return "ok", "", meta, rgb.tobytes()


def render_figure(fig, width: int, height: int, dpi: float, **kwargs):
  """Draws a figure at exactly width x height pixels; returns an HxWx3 uint8 array."""
  import numpy as np

  savefig = _original_savefig or type(fig).savefig
  fig.set_size_inches(width / dpi, height / dpi)
  buf = io.BytesIO()
  savefig(fig, buf, format="rgba", dpi=dpi, bbox_inches=None, **kwargs)
  w, h = int(fig.get_figwidth() * dpi), int(fig.get_figheight() * dpi)
  rgba = np.frombuffer(buf.getvalue(), dtype=np.uint8).reshape(h, w, 4)
  return _fit(_over_white(rgba), width, height)


def _over_white(rgba):
  """Composites RGBA over white (transparent figures come out white, not black)."""
  import numpy as np

  alpha = rgba[..., 3:4].astype(np.uint16)
  if (alpha == 255).all():
    return np.ascontiguousarray(rgba[..., :3])
  rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
  return rgb.astype(np.uint8)


def _fit(rgb, width: int, height: int):
  """Pads (white) or crops to the exact canvas, absorbing float rounding of the figure size."""
  import numpy as np

  if rgb.shape[:2] == (height, width):
    return rgb
  out = np.full((height, width, 3), 255, dtype=np.uint8)
  h, w = min(height, rgb.shape[0]), min(width, rgb.shape[1])
  out[:h, :w] = rgb[:h, :w]
  return out


def _canvas(opts: dict) -> dict:
  """The canvas arguments of render_figure, from job options."""
  return {"width": int(opts["width"]), "height": int(opts["height"]), "dpi": float(opts["dpi"])}


def _pick_figure() -> tuple[object, dict] | None:
  """The current pyplot figure if one is open, else the last figure saved or shown."""
  import matplotlib.pyplot as plt

  kwargs = _saved[-1][1] if _saved else {}
  if plt.get_fignums():
    fig = plt.gcf()
    return fig, (kwargs if _saved and _saved[-1][0] is fig else {})
  return _saved[-1] if _saved else None


def _record_savefig(fig, *args, **kwargs) -> None:
  """Stands in for Figure.savefig: remembers the figure and its appearance options."""
  _saved.append((fig, {k: kwargs[k] for k in _APPEARANCE_KWARGS if k in kwargs}))


def _record_show(*args, **kwargs) -> None:
  """Stands in for pyplot.show: remembers the current figure (the code may close it next)."""
  import matplotlib.pyplot as plt

  if plt.get_fignums():
    _saved.append((plt.gcf(), {}))


def _switch_to_agg(*args, **kwargs) -> None:
  """Stands in for pyplot.switch_backend: whatever is asked for, the backend stays Agg."""
  _original_switch_backend("agg")


def _ignore(*args, **kwargs) -> None:
  """Stands in for calls that make no sense in a headless, fixed-backend sandbox."""
