"""Procedural chart programs: a seeded random spec written out as short matplotlib code.

Pure Python (no matplotlib import): the code is rendered later by the sandboxed chart renderer,
so dataset targets are drawn exactly like policy renders. Two complexities:
  simple  one plot, 3-5 data points, literal data, a title: ~100-250 characters of code, short
          enough for a tiny model to learn to write in minutes on a CPU.
  full    1-4 subplots of bar, grouped bar, line, scatter, pie, histogram and area charts, with
          titles, axis labels, legends, colours, grids, annotations and seeded numpy data.
Every program imports what it uses and runs on its own (tests render samples of every type).
"""

from __future__ import annotations

import dataclasses
import random

CHART_TYPES = ("bar", "grouped_bar", "line", "scatter", "pie", "histogram", "area")
COMPLEXITIES = ("simple", "full")

TITLES = (
  "Sales", "Revenue", "Growth", "Visitors", "Budget", "Rainfall", "Scores", "Costs", "Profit",
  "Downloads", "Users", "Energy", "Traffic", "Output", "Demand", "Orders", "Votes", "Prices",
  "Population", "Yield", "Exports", "Signups", "Clicks", "Errors", "Latency", "Storage",
)  # fmt: skip
AXIS_LABELS = (
  "Month", "Year", "Region", "Product", "Team", "Week", "Day", "Count", "Value", "Amount",
  "Share", "Rate", "Hours", "Units", "Score", "Size", "Price", "Time", "Speed", "Level",
)  # fmt: skip
CATEGORY_SETS = (
  ("A", "B", "C", "D", "E", "F"),
  ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat"),
  ("Q1", "Q2", "Q3", "Q4"),
  ("North", "South", "East", "West"),
  ("Jan", "Feb", "Mar", "Apr", "May", "Jun"),
  ("2019", "2020", "2021", "2022", "2023", "2024"),
  ("Alpha", "Beta", "Gamma", "Delta", "Omega"),
  ("Cats", "Dogs", "Birds", "Fish", "Mice"),
  ("Red", "Blue", "Green", "Gold", "Gray"),
  ("Tea", "Coffee", "Juice", "Water", "Milk"),
)
SERIES_NAMES = (
  "2022", "2023", "2024", "Plan", "Actual", "Men", "Women", "Online", "Store", "Team A",
  "Team B", "Model X", "Model Y", "Base", "New",
)  # fmt: skip
SIMPLE_COLORS = (
  "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
  "tab:gray", "tab:olive", "tab:cyan",
)  # fmt: skip
FULL_COLORS = (
  *SIMPLE_COLORS, "steelblue", "coral", "seagreen", "orchid", "goldenrod", "slategray",
  "crimson", "teal", "navy", "olive", "salmon", "darkorange", "#4c72b0", "#dd8452", "#55a868",
  "#c44e52", "#8172b3", "#937860",
)  # fmt: skip
MARKERS = ("o", "s", "^", "D", "v", "*", "x", "+")
LINESTYLES = ("-", "--", "-.", ":")
LEGEND_LOCS = ("best", "upper left", "upper right", "lower left", "lower right", "upper center")
HATCHES = ("/", "\\\\", "x", ".", "o", "-")
CMAPS = ("viridis", "plasma", "coolwarm", "magma", "cividis", "Blues", "Greens")
# (rows, cols) of the subplot grid per number of subplots.
GRIDS = {1: ((1, 1),), 2: ((1, 2), (2, 1)), 3: ((1, 3), (3, 1)), 4: ((2, 2),)}


@dataclasses.dataclass(frozen=True)
class SyntheticChart:
  """One generated chart program: the code and what it draws."""

  code: str
  chart_type: str  # the subplots' types joined with "+" in subplot order, e.g. "bar+pie"
  num_subplots: int


def generate_chart(
  rng: random.Random, complexity: str, chart_type: str | None = None
) -> SyntheticChart:
  """Draws one chart program; `chart_type` forces the type (of every subplot, for `full`)."""
  if complexity not in COMPLEXITIES:
    raise ValueError(f"unknown chart complexity {complexity!r}; known: {', '.join(COMPLEXITIES)}")
  if chart_type is not None and chart_type not in CHART_TYPES:
    raise ValueError(f"unknown chart type {chart_type!r}; known: {', '.join(CHART_TYPES)}")
  if complexity == "simple":
    return _simple_chart(rng, chart_type or rng.choice(CHART_TYPES))
  return _full_chart(rng, chart_type)


# ----------------------------------------------------------------------------------- simple


def _literal(values: list, sep: str = ",") -> str:
  """A Python list literal; compact by default ([3,1,2]: fewer tokens for the simple charts)."""
  return "[" + sep.join(repr(v) for v in values) + "]"


def _list(values: list) -> str:
  """A list literal in the spaced style of the full programs: [3, 1, 2]."""
  return _literal(values, ", ")


def _simple_chart(rng: random.Random, chart_type: str) -> SyntheticChart:
  """A single plot with 3-5 literal data points and a title."""
  n = rng.randint(3, 5)
  cats = list(rng.choice([s for s in CATEGORY_SETS if len(s) >= n])[:n])
  vals = [rng.randint(1, 9) for _ in range(n)]
  color = rng.choice(SIMPLE_COLORS)
  if chart_type == "bar":
    fn = rng.choice(("bar", "barh"))
    body = f"plt.{fn}({_literal(cats)},{_literal(vals)},color={color!r})"
  elif chart_type == "grouped_bar":
    n = min(n, 4)
    a, b = vals[:n], [rng.randint(1, 9) for _ in range(n)]
    x1 = list(range(n))
    x2 = [x + 0.4 for x in x1]
    s1, s2 = rng.sample(SERIES_NAMES, 2)
    body = (
      f"plt.bar({_literal(x1)},{_literal(a)},0.4,label={s1!r})\n"
      f"plt.bar({_literal(x2)},{_literal(b)},0.4,label={s2!r})\n"
      "plt.legend()"
    )
  elif chart_type == "line":
    marker = rng.choice(("", ",marker='o'", ",marker='s'"))
    body = f"plt.plot({_literal(cats)},{_literal(vals)},color={color!r}{marker})"
  elif chart_type == "scatter":
    xs = sorted(rng.sample(range(1, 10), n))
    body = f"plt.scatter({_literal(xs)},{_literal(vals)},color={color!r})"
  elif chart_type == "pie":
    body = f"plt.pie({_literal(vals)},labels={_literal(cats)})"
  elif chart_type == "histogram":
    data = sorted(rng.randint(1, 6) for _ in range(rng.randint(6, 9)))
    body = f"plt.hist({_literal(data)},bins={rng.randint(3, 5)},color={color!r})"
  elif chart_type == "area":
    xs = list(range(n))
    body = f"plt.fill_between({_literal(xs)},{_literal(vals)},color={color!r},alpha=0.5)"
  else:  # generate_chart validated the name
    raise AssertionError(chart_type)
  code = f"import matplotlib.pyplot as plt\n{body}\nplt.title({rng.choice(TITLES)!r})\n"
  return SyntheticChart(code=code, chart_type=chart_type, num_subplots=1)


# ------------------------------------------------------------------------------------- full


def _full_chart(rng: random.Random, forced_type: str | None) -> SyntheticChart:
  """A figure of 1-4 subplots, each a random (or the forced) chart type."""
  num = rng.choice((1, 1, 1, 2, 2, 3, 4))
  rows, cols = rng.choice(GRIDS[num])
  seed = rng.randint(0, 9999)
  lines = ["import matplotlib.pyplot as plt", "import numpy as np", ""]
  lines.append(f"rng = np.random.default_rng({seed})")
  if num == 1:
    lines.append("fig, ax = plt.subplots(layout='constrained')")
  else:
    lines.append(f"fig, axes = plt.subplots({rows}, {cols}, layout='constrained')")
  types = []
  for i in range(num):
    chart_type = forced_type or rng.choice(CHART_TYPES)
    types.append(chart_type)
    if num > 1:
      index = f"{i // cols}, {i % cols}" if rows > 1 and cols > 1 else str(i)
      lines += ["", f"ax = axes[{index}]"]
    else:
      lines.append("")
    lines += _FULL_BLOCKS[chart_type](rng)
    lines += _decorate(rng, chart_type)
  if num > 1 and rng.random() < 0.6:
    lines += ["", f"fig.suptitle({rng.choice(TITLES) + ' overview'!r})"]
  code = "\n".join(lines) + "\n"
  return SyntheticChart(code=code, chart_type="+".join(types), num_subplots=num)


def _values(rng: random.Random, n: int, scale: int | None = None) -> list:
  """n data values: small integers or one-decimal floats, at the given (or a random) scale."""
  scale = scale or rng.choice((1, 10, 100))
  if rng.random() < 0.5:
    return [rng.randint(1, 10) * scale for _ in range(n)]
  return [round(rng.uniform(0.5, 10.0) * scale, 1) for _ in range(n)]


def _categories(rng: random.Random, lo: int, hi: int) -> list[str]:
  """lo..hi category labels from one vocabulary."""
  pool = rng.choice([s for s in CATEGORY_SETS if len(s) >= lo])
  return list(pool[: rng.randint(lo, min(hi, len(pool)))])


def _bar(rng: random.Random) -> list[str]:
  """Vertical or horizontal bars, one colour or one per bar, maybe hatched and labelled."""
  cats = _categories(rng, 3, 6)
  vals = _values(rng, len(cats))
  fn = rng.choice(("bar", "bar", "barh"))
  if rng.random() < 0.3:
    color = _list(rng.sample(FULL_COLORS, len(cats)))
  else:
    color = repr(rng.choice(FULL_COLORS))
  extra = ""
  if rng.random() < 0.4:
    extra += f", edgecolor={rng.choice(('black', 'white', 'gray'))!r}"
  if rng.random() < 0.2:
    extra += f", hatch={rng.choice(HATCHES)!r}"
  out = [f"bars = ax.{fn}({_list(cats)}, {_list(vals)}, color={color}{extra})"]
  if rng.random() < 0.35:
    out.append("ax.bar_label(bars)")
  return out


def _grouped_bar(rng: random.Random) -> list[str]:
  """2-4 series of bars side by side with a legend."""
  cats = _categories(rng, 3, 5)
  k = rng.randint(2, 4)
  names = rng.sample(SERIES_NAMES, k)
  colors = rng.sample(FULL_COLORS, k)
  width = round(0.8 / k, 2)
  scale = rng.choice((1, 10, 100))  # one scale for all series, so the groups are comparable
  out = [f"labels = {_list(cats)}", "x = np.arange(len(labels))"]
  for j in range(k):
    offset = round((j - (k - 1) / 2) * width, 3)
    vals = _values(rng, len(cats), scale)
    out.append(
      f"ax.bar(x + {offset}, {_list(vals)}, {width}, label={names[j]!r}, color={colors[j]!r})"
    )
  out.append("ax.set_xticks(x, labels)")
  out.append(f"ax.legend(loc={rng.choice(LEGEND_LOCS)!r})")
  return out


def _line(rng: random.Random) -> list[str]:
  """1-4 lines over shared x values, with markers and line styles."""
  k = rng.randint(1, 4)
  if rng.random() < 0.5:
    n = rng.randint(4, 8)
    start = rng.choice((2010, 2015, 2018, 1))
    out = [f"x = np.arange({start}, {start + n})"]
  else:
    out = [f"x = np.linspace(0, {rng.randint(2, 10)}, {rng.choice((20, 50, 100))})"]
  names = rng.sample(SERIES_NAMES, k)
  for j in range(k):
    style = f"color={rng.choice(FULL_COLORS)!r}, linestyle={rng.choice(LINESTYLES)!r}"
    if rng.random() < 0.5:
      style += f", marker={rng.choice(MARKERS)!r}"
    a, b = round(rng.uniform(0.5, 3.0), 1), round(rng.uniform(-2.0, 2.0), 1)
    y = rng.choice((f"{a} * x + {b}", f"np.sin(x + {b}) * {a}", f"{a} * np.sqrt(x) + {b}"))
    if rng.random() < 0.3:
      y += " + rng.normal(0, 0.2, len(x))"
    out.append(f"ax.plot(x, {y}, {style}, label={names[j]!r})")
  if k > 1 or rng.random() < 0.3:
    out.append(f"ax.legend(loc={rng.choice(LEGEND_LOCS)!r})")
  return out


def _scatter(rng: random.Random) -> list[str]:
  """1-3 point clouds (seeded numpy data), or one coloured by a colormap with a colorbar."""
  if rng.random() < 0.3:
    n = rng.choice((30, 50, 80))
    return [
      f"x, y = rng.normal(0, 1, {n}), rng.normal(0, 1, {n})",
      f"points = ax.scatter(x, y, c=x + y, cmap={rng.choice(CMAPS)!r}, s={rng.choice((15, 30))})",
      "fig.colorbar(points, ax=ax)",
    ]
  k = rng.randint(1, 3)
  names = rng.sample(SERIES_NAMES, k)
  out = []
  for j in range(k):
    n = rng.choice((8, 15, 25, 40))
    mx, my = round(rng.uniform(-3, 3), 1), round(rng.uniform(-3, 3), 1)
    out.append(
      f"ax.scatter(rng.normal({mx}, 1, {n}), rng.normal({my}, 1, {n}), "
      f"color={rng.choice(FULL_COLORS)!r}, marker={rng.choice(MARKERS[:6])!r}, "
      f"alpha={rng.choice((0.6, 0.8, 1.0))}, label={names[j]!r})"
    )
  if k > 1:
    out.append(f"ax.legend(loc={rng.choice(LEGEND_LOCS)!r})")
  return out


def _pie(rng: random.Random) -> list[str]:
  """3-6 labelled wedges, maybe with percentages, an exploded wedge or a donut hole."""
  cats = _categories(rng, 3, 6)
  vals = [rng.randint(5, 40) for _ in cats]
  args = [_list(vals), f"labels={_list(cats)}"]
  if rng.random() < 0.6:
    args.append(f"colors={_list(rng.sample(FULL_COLORS, len(cats)))}")
  if rng.random() < 0.6:
    args.append("autopct='%1.0f%%'")
  if rng.random() < 0.3:
    args.append(f"explode={_list([0.1] + [0] * (len(cats) - 1))}")
  if rng.random() < 0.25:
    args.append("wedgeprops={'width': 0.4}")
  args.append(f"startangle={rng.choice((0, 90, 140))}")
  return [f"ax.pie({', '.join(args)})"]


def _histogram(rng: random.Random) -> list[str]:
  """One or two distributions of seeded numpy samples."""
  k = rng.choice((1, 1, 2))
  out = []
  names = rng.sample(SERIES_NAMES, k)
  for j in range(k):
    mu, sigma = round(rng.uniform(-2, 5), 1), round(rng.uniform(0.5, 2.0), 1)
    size = rng.choice((100, 200, 500))
    extra = f", alpha={0.6 if k > 1 else 1.0}"
    if rng.random() < 0.5:
      extra += f", edgecolor={rng.choice(('black', 'white'))!r}"
    out.append(
      f"ax.hist(rng.normal({mu}, {sigma}, {size}), bins={rng.choice((10, 15, 20, 30))}, "
      f"color={rng.choice(FULL_COLORS)!r}{extra}, label={names[j]!r})"
    )
  if k > 1:
    out.append(f"ax.legend(loc={rng.choice(LEGEND_LOCS)!r})")
  return out


def _area(rng: random.Random) -> list[str]:
  """A stacked area chart of 2-3 series, or one filled curve with its outline."""
  n = rng.randint(5, 8)
  out = [f"x = np.arange({n})"]
  if rng.random() < 0.5:
    k = rng.randint(2, 3)
    names = rng.sample(SERIES_NAMES, k)
    rows = ", ".join(_list([rng.randint(1, 9) for _ in range(n)]) for _ in range(k))
    out.append(
      f"ax.stackplot(x, {rows}, labels={_list(names)}, "
      f"colors={_list(rng.sample(FULL_COLORS, k))}, alpha={rng.choice((0.7, 0.85, 1.0))})"
    )
    out.append(f"ax.legend(loc={rng.choice(LEGEND_LOCS)!r})")
  else:
    color = rng.choice(FULL_COLORS)
    out.append(f"y = {_list([rng.randint(1, 9) for _ in range(n)])}")
    out.append(f"ax.fill_between(x, y, color={color!r}, alpha={rng.choice((0.3, 0.5))})")
    out.append(f"ax.plot(x, y, color={color!r})")
  return out


def _decorate(rng: random.Random, chart_type: str) -> list[str]:
  """Title, axis labels and grid of one subplot (pies get a title only)."""
  out = []
  if rng.random() < 0.85:
    out.append(f"ax.set_title({rng.choice(TITLES)!r})")
  if chart_type != "pie":
    if rng.random() < 0.6:
      x, y = rng.sample(AXIS_LABELS, 2)
      out += [f"ax.set_xlabel({x!r})", f"ax.set_ylabel({y!r})"]
    if rng.random() < 0.35:
      out.append(f"ax.grid(True, linestyle={rng.choice(LINESTYLES)!r}, alpha=0.5)")
  return out


_FULL_BLOCKS = {
  "bar": _bar,
  "grouped_bar": _grouped_bar,
  "line": _line,
  "scatter": _scatter,
  "pie": _pie,
  "histogram": _histogram,
  "area": _area,
}
