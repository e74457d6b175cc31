"""Sandbox driver for benchmark scoring: runs matplotlib code with tracing hooks, reports a trace.

Runs inside the sandbox zygote (loaded by path, so it is self-contained: stdlib, NumPy, matplotlib;
networkx/squarify/matplotlib_venn hooks only when those import). One job yields everything the
ChartMimic and Plot2Code metrics need, in the same interpreter for ground truth and generation:

- types: call counts of plotting functions, outermost call only (ChartMimic's chart-type tracer);
- colours: per plotting function, the colours of the artists it made, re-read after the code ran
  (ChartMimic's colour tracer, including its one-object-per-(function, colour) bookkeeping);
- layout: the GridSpec geometry of every axes with a subplotspec (ChartMimic's layout tracer);
- labels: every visible non-empty Text with its position, after a draw (Plot2Code's text match);
- texts: every string drawn by the PDF backend after all x/y ticks are removed (ChartMimic's text
  tracer, which hooks `RendererPdf.draw_text`);
- image: the figure drawn at its own size (Plot2Code's savefig), composited over white.

Hooks are keyed by the function they wrap, with no private-method name baked in: matplotlib 3.10
renamed `_process_plot_var_args._makeline` to `_make_line`; whichever exists is hooked. The
figure scored is the one the code left open, else the last one it saved or showed; if there is
none, an empty figure (what the benchmark's appended `plt.savefig` would save).

Payload: 4-byte big-endian length, the JSON trace, then the raw RGB bytes of the image.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import math
import struct

RC_PARAMS = {"svg.hashsalt": "rrvf-jax", "figure.max_open_warning": 0}
DEFAULT_OPTIONS = {"dpi": 100.0, "max_side_px": 2048}
OPTIONAL_PRELOAD = (
  "numpy.random", "numpy.linalg", "numpy.fft", "numpy.ma", "matplotlib.patches",
  "matplotlib.colors", "matplotlib.ticker", "matplotlib.gridspec", "matplotlib.dates",
  "matplotlib.cm", "matplotlib.lines", "matplotlib.path", "matplotlib.image",
  "matplotlib.backends.backend_pdf", "matplotlib.projections.polar", "mpl_toolkits.mplot3d",
  "mpl_toolkits.axes_grid1", "matplotlib.sankey", "matplotlib.table", "math", "random",
  "datetime", "collections", "itertools", "functools", "json", "csv", "re", "string",
  "textwrap", "statistics", "pandas", "seaborn", "squarify", "matplotlib_venn", "networkx",
)  # fmt: skip
_APPEARANCE_KWARGS = ("facecolor", "edgecolor", "transparent")
_HEADER = struct.Struct("!I")


class _State:
  """Everything the hooks record during one job (the job is a fresh fork: no reset needed)."""

  def __init__(self) -> None:
    self.type_busy = False  # inside a type-counted call: nested counted calls are not counted
    self.color_busy = False  # the same for colour-logged calls (ChartMimic's `in_decorator`)
    self.frozen = False  # set at collect: drawing must not add calls
    self.types: dict[str, int] = {}
    # "kind--COLOR" -> (kind, artist, colour at call time): the last artist per key, as the
    # benchmark's `drawed_objects` dict keeps it.
    self.colors: dict[str, tuple[str, object, str]] = {}
    self.collect_texts = False
    self.texts: list[str] = []
    self.saved: list[tuple[object, dict]] = []
    self.original_savefig = None
    self.original_switch_backend = None
    self.errors: list[str] = []


_state = _State()
_installed = False


# ----------------------------------------------------------------------------- zygote set-up


def apply_rc_params() -> None:
  """Resets matplotlib to its default style plus RC_PARAMS."""
  import matplotlib

  matplotlib.rcdefaults()
  matplotlib.rcParams.update(RC_PARAMS)


def warmup() -> None:
  """Imports matplotlib and the optional packages once, and draws once to PNG and PDF."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  for name in OPTIONAL_PRELOAD:
    # An optional package that is absent or broken is simply not preloaded.
    with contextlib.suppress(Exception):
      importlib.import_module(name)
  apply_rc_params()
  fig, ax = plt.subplots()
  ax.plot([0, 1], [0, 1], label="warm-up")
  ax.bar([0.5], [0.5])
  ax.set_title(r"warm-up $\alpha^2$")
  ax.legend()
  fig.savefig(io.BytesIO(), format="rgba", dpi=50)
  fig.savefig(io.BytesIO(), format="pdf")
  plt.close("all")


def prepare(options: dict) -> None:
  """Seeds the RNGs, makes show/savefig harmless and installs the tracing hooks (in the job)."""
  global _installed
  import matplotlib
  import matplotlib.pyplot as plt
  import numpy as np

  del options
  np.random.seed(0)
  if _installed:
    return
  _installed = True
  _state.original_savefig = matplotlib.figure.Figure.savefig
  _state.original_switch_backend = plt.switch_backend
  matplotlib.figure.Figure.savefig = _record_savefig
  plt.show = _record_show
  plt.pause = _ignore
  plt.switch_backend = _switch_to_agg
  matplotlib.use = _ignore
  _install_type_and_color_hooks()
  _install_text_hook()


def collect(options: dict) -> tuple[str, str, dict, bytes]:
  """Draws the figure, gathers the trace; returns (status, message, meta, payload)."""
  import matplotlib.pyplot as plt

  opts = {**DEFAULT_OPTIONS, **options}
  _state.frozen = True
  picked = _pick_figure()
  no_figure = picked is None
  fig, kwargs = (plt.figure(), {}) if picked is None else picked
  trace: dict = {"no_figure": no_figure, "types": dict(sorted(_state.types.items()))}
  trace["colors"] = _final_colors()
  trace["layout"], trace["n_axes"] = _layout(fig)
  width_in, height_in = (float(v) for v in fig.get_size_inches())
  trace["figsize"] = [_finite(width_in), _finite(height_in)]
  try:
    rgb = _render_native(fig, opts, kwargs)
  except MemoryError:
    raise
  except Exception as e:  # drawing failed: the benchmarks' savefig would have failed too
    return "runtime_error", f"Error while drawing the figure: {_describe(e)}", {}, b""
  trace["labels"] = _plot2code_labels(fig)
  trace["texts"], trace["pdf_error"] = _pdf_texts(fig)
  trace["image_shape"] = list(rgb.shape)
  trace["errors"] = _state.errors[:20]
  body = json.dumps(trace, allow_nan=False).encode()
  return "ok", "", {"trace_bytes": len(body)}, _HEADER.pack(len(body)) + body + rgb.tobytes()


# ----------------------------------------------------------------------------- figures


def _record_savefig(fig, *args, **kwargs) -> None:
  """Stands in for Figure.savefig: remembers the figure and its appearance options."""
  _state.saved.append((fig, {k: kwargs[k] for k in _APPEARANCE_KWARGS if k in kwargs}))


def _record_show(*args, **kwargs) -> None:
  """Stands in for pyplot.show: remembers the current figure (the code may close it next)."""
  import matplotlib.pyplot as plt

  if plt.get_fignums():
    _state.saved.append((plt.gcf(), {}))


def _switch_to_agg(*args, **kwargs) -> None:
  """Stands in for pyplot.switch_backend: whatever is asked for, the backend stays Agg."""
  _state.original_switch_backend("agg")


def _ignore(*args, **kwargs) -> None:
  """Stands in for calls that make no sense in a headless, fixed-backend sandbox."""


def _pick_figure() -> tuple[object, dict] | None:
  """The current pyplot figure if one is open, else the last figure saved or shown."""
  import matplotlib.pyplot as plt

  kwargs = _state.saved[-1][1] if _state.saved else {}
  if plt.get_fignums():
    fig = plt.gcf()
    return fig, (kwargs if _state.saved and _state.saved[-1][0] is fig else {})
  return _state.saved[-1] if _state.saved else None


def _render_native(fig, opts: dict, kwargs: dict):
  """Draws the figure at its own size (dpi capped so no side exceeds max_side_px); HxWx3 uint8."""
  import matplotlib
  import numpy as np
  from PIL import Image

  width_in, height_in = (float(v) for v in fig.get_size_inches())
  if not (math.isfinite(width_in) and math.isfinite(height_in)) or min(width_in, height_in) <= 0:
    raise ValueError(f"the figure size {width_in}x{height_in} inches is not drawable")
  dpi = min(float(opts["dpi"]), float(opts["max_side_px"]) / max(width_in, height_in))
  buf = io.BytesIO()
  with matplotlib.rc_context({"savefig.bbox": None}):
    _state.original_savefig(fig, buf, format="png", dpi=dpi, bbox_inches=None, **kwargs)
  buf.seek(0)
  with Image.open(buf) as png:
    rgba = np.asarray(png.convert("RGBA"))
  alpha = rgba[..., 3:4].astype(np.uint16)
  if (alpha == 255).all():
    return np.ascontiguousarray(rgba[..., :3])
  # Transparent figures come out white, as a PNG viewer (and the judge) would show them.
  rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
  return rgb.astype(np.uint8)


def _layout(fig) -> tuple[list[dict], int]:
  """GridSpec geometry per axes (ChartMimic's layout tracer), and the number of axes."""
  out = []
  for ax in fig.axes:
    spec = ax.get_subplotspec()
    if spec is None:
      continue
    nrows, ncols = spec.get_gridspec().get_geometry()
    out.append(
      {
        "nrows": int(nrows),
        "ncols": int(ncols),
        "row_start": int(spec.rowspan.start),
        "row_end": int(spec.rowspan.stop - 1),
        "col_start": int(spec.colspan.start),
        "col_end": int(spec.colspan.stop - 1),
      }
    )
  return out, len(fig.axes)


def _plot2code_labels(fig) -> list[list]:
  """Every visible non-empty Text (lower-cased, stripped) with its position, by a child walk."""
  import matplotlib.text

  out = []
  stack = [fig]
  seen = 0
  while stack and seen < 200_000:  # pre-order walk, as Plot2Code's recursive extract_texts
    artist = stack.pop()
    seen += 1
    if isinstance(artist, matplotlib.text.Text) and artist.get_visible():
      text = str(artist.get_text()).strip().lower()
      if text:
        out.append([text, *_position(artist)])
    try:
      children = list(artist.get_children())
    except Exception:
      children = []
    stack.extend(reversed(children))
  return out


def _position(artist) -> list:
  """The text's (x, y) as floats, or [None, None] when they are not plain finite numbers."""
  try:
    x, y = artist.get_position()
    x, y = float(x), float(y)
  except Exception:
    return [None, None]
  if not (math.isfinite(x) and math.isfinite(y)):
    return [None, None]
  return [x, y]


def _pdf_texts(fig) -> tuple[list[str], str | None]:
  """Strings drawn by the PDF backend after removing all x/y ticks (ChartMimic's text tracer)."""
  for ax in fig.get_axes():
    ax.set_xticks([])
    ax.set_yticks([])
  _state.texts = []
  _state.collect_texts = True
  try:
    _state.original_savefig(fig, io.BytesIO(), format="pdf", bbox_inches=None)
  except MemoryError:
    raise
  except Exception as e:
    return [], f"PDF drawing failed: {_describe(e)}"
  finally:
    _state.collect_texts = False
  return list(_state.texts), None


def _finite(value: float) -> float | None:
  """The value, or None when it is not finite (JSON has no NaN)."""
  return value if math.isfinite(value) else None


def _describe(error: BaseException) -> str:
  """A one-line description of an exception."""
  return f"{type(error).__name__}: {str(error)[:300]}"


# ----------------------------------------------------------------------------- text hook


def _install_text_hook() -> None:
  """Wraps RendererPdf.draw_text to log the string of every call while collecting."""
  from matplotlib.backends.backend_pdf import RendererPdf

  original = RendererPdf.draw_text

  def draw_text(self, gc, x, y, s, *args, **kwargs):
    if _state.collect_texts:
      _state.texts.append(str(s))
    return original(self, gc, x, y, s, *args, **kwargs)

  RendererPdf.draw_text = draw_text


# ----------------------------------------------------------------------------- type/colour hooks


def _type_key(func, polar: bool = False) -> str:
  """Counting key: defining module of the (unwrapped) function, '_polar' tag, '-', its name."""
  target = inspect.unwrap(func)
  module = getattr(target, "__module__", None) or "?"
  return f"{module}{'_polar' if polar else ''}-{func.__name__}"


def _hook(owner, name: str, *, count: bool, color) -> None:
  """Replaces owner.name by a wrapper that counts the call and/or logs its colours.

  `color` is None (no colour logging), a kind string, or a function (args) -> kind | None.
  Only the outermost counted (logged) call is counted (logged), as in ChartMimic's tracers.
  """
  func = getattr(owner, name, None)
  if func is None:
    return
  polar_cls = _polar_axes_class()

  def wrapper(*args, **kwargs):
    if _state.frozen:
      return func(*args, **kwargs)
    kind = color(args) if callable(color) else color
    do_count = count and not _state.type_busy
    do_color = kind is not None and not _state.color_busy
    if do_count:
      polar = name == "plot" and bool(args) and isinstance(args[0], polar_cls)
      key = _type_key(func, polar)
      _state.types[key] = _state.types.get(key, 0) + 1
      _state.type_busy = True
    if do_color:
      _state.color_busy = True
    try:
      result = func(*args, **kwargs)
    finally:
      if do_count:
        _state.type_busy = False
      if do_color:
        _state.color_busy = False
    if do_color:
      try:
        _log_colors(kind, args, kwargs, result)
      except Exception as e:  # the benchmark's tracer would crash here; we skip the record
        _state.errors.append(f"colour log of {kind}: {_describe(e)}")
    return result

  wrapper.__name__ = getattr(func, "__name__", name)
  wrapper.__wrapped__ = func
  setattr(owner, name, wrapper)


def _polar_axes_class():
  """matplotlib's PolarAxes class."""
  from matplotlib.projections.polar import PolarAxes

  return PolarAxes


def _install_type_and_color_hooks() -> None:
  """Installs the hooks of ChartMimic's chart-type and colour tracers (one wrapper per function)."""
  from matplotlib.axes import Axes
  from matplotlib.axes._base import _process_plot_var_args
  from matplotlib.image import NonUniformImage
  from matplotlib.patches import Circle, Ellipse

  polar = _polar_axes_class()
  by_axes = lambda polar_kind, plain_kind: (
    lambda args: polar_kind if args and isinstance(args[0], polar) else plain_kind
  )
  # name: (counted by the type tracer, colour kind)
  axes_hooks = {
    "bar": (True, "bar"),
    "barh": (True, None),
    "plot": (True, by_axes("plot_polar", None)),  # colour: PolarAxes.plot only (else the line)
    "axhline": (True, "axhline"),
    "axvline": (True, "axvline"),
    "axvspan": (True, "axvspan"),
    "axhspan": (True, "axhspan"),
    "hlines": (True, "hlines"),
    "vlines": (True, "vlines"),
    "errorbar": (True, None),
    "boxplot": (True, "boxplot"),
    "violinplot": (True, "violinplot"),
    "violin": (True, None),
    "hist": (True, "hist"),
    "fill_between": (True, None),
    "fill_betweenx": (True, None),
    "_fill_between_x_or_y": (False, "fill_between"),
    "scatter": (True, by_axes("scatter_polar", "scatter")),
    "quiver": (True, "quiver"),
    "pie": (True, "pie"),
    "fill": (True, "fill"),
    "imshow": (True, "imshow"),
    "pcolor": (True, "pcolor"),
    "contour": (True, "contour"),
    "contourf": (True, "contourf"),
    "broken_barh": (True, "broken_barh"),
    "tripcolor": (True, "tripcolor"),
  }
  for name, (count, kind) in axes_hooks.items():
    _hook(Axes, name, count=count, color=kind)
  line_maker = "_make_line" if hasattr(_process_plot_var_args, "_make_line") else "_makeline"
  _hook(_process_plot_var_args, line_maker, count=False, color="line")
  _hook(NonUniformImage, "__init__", count=True, color="nonuniformimage")
  _hook(Ellipse, "__init__", count=True, color="ellipse")
  _hook(Circle, "__init__", count=True, color="ellipse")  # the benchmark keys both by patches.py
  with contextlib.suppress(Exception):
    from mpl_toolkits.mplot3d import Axes3D

    for name in ("scatter", "plot", "plot_surface", "bar3d", "bar", "add_collection3d"):
      _hook(Axes3D, name, count=True, color=f"{name}_3d")
  with contextlib.suppress(Exception):
    import squarify

    _hook(squarify, "plot", count=True, color="squarify")
  with contextlib.suppress(Exception):
    from matplotlib_venn._common import VennDiagram

    _hook(VennDiagram, "__init__", count=True, color="venn")
  with contextlib.suppress(Exception):
    import networkx
    import networkx.drawing.nx_pylab as nx_pylab

    for name, kind in (
      ("draw_networkx_nodes", "nx_nodes"),
      ("draw_networkx_edges", "nx_edges"),
      ("draw_networkx_labels", "nx_labels"),
    ):
      _hook(nx_pylab, name, count=True, color=kind)
      setattr(networkx, name, getattr(nx_pylab, name))


def _hex(color) -> str:
  """ChartMimic's convert_color_to_hex: '#RRGGBB' upper-case (9-char hex strings kept as given)."""
  import matplotlib.colors as mcolors
  import numpy as np

  if isinstance(color, str):
    if color.startswith("#") and len(color) in (7, 9):
      return color.upper()
    return mcolors.to_hex(mcolors.to_rgba(color)).upper()
  if isinstance(color, (list, tuple, np.ndarray)) and len(color) in (3, 4):
    return mcolors.to_hex(color).upper()
  raise ValueError(f"unsupported colour {color!r}")


def _cmap_name(kwargs: dict) -> str | None:
  """The colormap name of a `cmap=` keyword argument, if any."""
  cmap = kwargs.get("cmap")
  if cmap is None:
    return None
  return cmap if isinstance(cmap, str) else str(cmap.name)


def _put(kind: str, color: str, obj: object) -> None:
  """Records an artist under (kind, colour); a later artist with the same key replaces it."""
  _state.colors[f"{kind}--{color}"] = (kind, obj, color)


def _put_all(kind: str, colors: list, obj: object) -> None:
  """Records one artist under the last of its colours (the benchmark's bookkeeping)."""
  hexes = [_hex(c) for c in colors]
  if hexes:
    _put(kind, hexes[-1], obj)


def _log_colors(kind: str, args: tuple, kwargs: dict, result) -> None:
  """Records the artists a plotting call made, as ChartMimic's colour tracer does per function."""
  import matplotlib.cbook
  import matplotlib.patches

  if kind == "line":
    _put(kind, _hex(result[1]["color"]), result[0])
  elif kind in ("axhline", "axvline", "plot_polar", "plot_3d"):
    for line in [result] if kind in ("axhline", "axvline") else result:
      _put(kind, _hex(line.get_color()), line)
  elif kind == "fill_between":
    _put(kind, _hex(list(result.get_facecolors()[0])), result)
  elif kind == "bar":
    for patch in result:
      _put(kind, _hex(list(patch._original_facecolor)), patch)
  elif kind in ("scatter", "scatter_polar", "scatter_3d", "plot_surface_3d"):
    cmap = _cmap_name(kwargs)
    if cmap is not None:
      _put(kind, cmap, result)
    elif kind == "scatter_3d":
      _put_all(kind, result.get_facecolors().tolist(), result)
    elif kind == "plot_surface_3d":
      _put(kind, _hex(result.get_facecolors().tolist()[0]), result)
    elif len(result.get_facecolor()) != 0:
      _put(kind, _hex(list(result.get_facecolor()[0])), result)
  elif kind == "pie":
    for wedge in result[0]:
      _put(kind, _hex(wedge.get_facecolor()), wedge)
  elif kind in ("axvspan", "axhspan"):
    _put(kind, _hex(result.get_facecolor()), result)
  elif kind in ("hlines", "vlines"):
    _put_all(kind, [list(c) for c in result.get_edgecolors()], result)
  elif kind == "boxplot":
    for box in result["boxes"]:
      if isinstance(box, matplotlib.patches.PathPatch):
        _put(kind, _hex(list(box.get_facecolor())), box)
  elif kind == "violinplot":
    for body in result["bodies"]:
      _put(kind, _hex(list(body.get_facecolor()[0])), body)
  elif kind == "hist":
    patches = result[2]
    groups = patches if isinstance(patches, matplotlib.cbook.silent_list) else [patches]
    for group in groups:
      for patch in group:
        _put(kind, _hex(list(patch.get_facecolor())), patch)
  elif kind in ("quiver", "broken_barh", "add_collection3d_3d", "nx_nodes"):
    _put_all(kind, result.get_facecolors().tolist(), result)
  elif kind == "squarify":
    for container in result.containers:
      for patch in container:
        _put(kind, _hex(list(patch.get_facecolor())), patch)
  elif kind in ("imshow", "pcolor", "contour", "contourf", "tripcolor"):
    _put(kind, str(result.get_cmap().name), result)
  elif kind == "fill":
    for patch in result:
      _put(kind, _hex(list(patch.get_facecolor())), patch)
  elif kind == "nonuniformimage":
    _put(kind, str(args[0].get_cmap().name), args[0])
  elif kind == "ellipse":
    _put(kind, _hex(args[0].get_facecolor()), args[0])
  elif kind == "venn":
    _put_all(kind, [p.get_facecolor() for p in args[0].patches], args[0])
  elif kind == "bar3d_3d":
    _put(kind, _hex(result.get_facecolors().tolist()[0]), result)
  elif kind == "bar_3d":
    for patch in result:
      _put(kind, _hex(patch.get_facecolor()), patch)
  elif kind == "nx_labels":
    for text in result.values():
      _put(kind, _hex(text.get_color()), text)
  elif kind == "nx_edges":
    if isinstance(result, list):
      _put_all(kind, [arrow.get_facecolor() for arrow in result], result)
    else:
      _put_all(kind, result.get_edgecolors().tolist(), result)


def _reread(kind: str, obj: object, logged: str) -> list[str]:
  """The artist's colours now (ChartMimic's update_drawed_colors): later set_color calls count."""
  if kind in ("line", "axhline", "axvline", "plot_polar", "plot_3d", "nx_labels"):
    return [_hex(obj.get_color())]
  if kind == "fill_between":
    return [_hex(list(obj.get_facecolors()[0]))]
  if kind == "bar":
    return [_hex(list(obj._original_facecolor))]
  if kind in (
    "scatter",
    "scatter_polar",
    "scatter_3d",
    "plot_surface_3d",
  ) and not logged.startswith("#"):
    return [logged]  # a colormap name
  if kind in ("scatter", "scatter_polar"):
    return [_hex(list(obj.get_facecolor()[0]))] if len(obj.get_facecolor()) != 0 else []
  if kind in ("scatter_3d", "quiver", "broken_barh", "add_collection3d_3d", "nx_nodes"):
    return [_hex(c) for c in obj.get_facecolors().tolist()]
  if kind in ("plot_surface_3d", "bar3d_3d"):
    return [_hex(obj.get_facecolors().tolist()[0])]
  if kind in ("pie", "axvspan", "axhspan", "ellipse", "bar_3d"):
    return [_hex(obj.get_facecolor())]
  if kind in ("hlines", "vlines"):
    return [_hex(list(c)) for c in obj.get_edgecolors()]
  if kind in ("boxplot", "hist", "squarify", "fill"):
    return [_hex(list(obj.get_facecolor()))]
  if kind == "violinplot":
    return [_hex(list(obj.get_facecolor()[0]))]
  if kind in ("imshow", "pcolor", "contour", "contourf", "tripcolor", "nonuniformimage"):
    return [str(obj.get_cmap().name)]
  if kind == "venn":
    return [_hex(p.get_facecolor()) for p in obj.patches]
  if kind == "nx_edges":
    if isinstance(obj, list):
      return [_hex(arrow.get_facecolor()) for arrow in obj]
    return [_hex(c) for c in obj.get_edgecolors().tolist()]
  return []


def _final_colors() -> list[str]:
  """Sorted unique 'kind--COLOUR' strings, re-read from the recorded artists."""
  out = set()
  for kind, obj, logged in _state.colors.values():
    try:
      out.update(f"{kind}--{c}" for c in _reread(kind, obj, logged))
    except Exception as e:
      _state.errors.append(f"colour re-read of {kind}: {_describe(e)}")
  return sorted(out)
