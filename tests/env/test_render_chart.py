"""Chart renderer: sandboxed renders equal plain in-process matplotlib pixel for pixel, are
deterministic, honour the canvas, and treat savefig/show/backends as documented."""

from __future__ import annotations

import io
import random

import matplotlib
import numpy as np
import pytest
from PIL import Image

matplotlib.use("Agg")  # before pyplot is imported: the reference renders headless, like the sandbox
import matplotlib.pyplot as plt

from rrvf_jax.env import (
  CHART_RC_PARAMS,
  ChartCanvas,
  Status,
  create_chart_pool,
  default_chart_pool,
  render_chart,
  render_charts,
)

PROGRAMS = {
  "lines": """
import numpy as np
import matplotlib.pyplot as plt
x = np.linspace(0, 4 * np.pi, 200)
plt.plot(x, np.sin(x), label="sin", linewidth=2)
plt.plot(x, np.cos(x), "--", label="cos")
plt.title("Trig functions"); plt.xlabel("x (rad)"); plt.ylabel("value")
plt.legend(); plt.grid(alpha=0.3)
""",
  "random_scatter": """
import numpy as np
import matplotlib.pyplot as plt
x, y = np.random.randn(2, 300)
plt.scatter(x, y, c=np.hypot(x, y), cmap="plasma", s=15, alpha=0.8)
plt.colorbar(label="radius"); plt.title("Scatter (unseeded RNG)")
""",
  "grouped_bars": """
import numpy as np
import matplotlib.pyplot as plt
labels = ["North", "South", "East", "West"]
a, b = [23, 17, 35, 29], [25, 32, 30, 20]
x = np.arange(len(labels))
fig, ax = plt.subplots(figsize=(10, 4))
r1 = ax.bar(x - 0.2, a, 0.4, label="2023"); r2 = ax.bar(x + 0.2, b, 0.4, label="2024")
ax.bar_label(r1); ax.bar_label(r2); ax.set_xticks(x, labels); ax.legend()
ax.set_title("Sales by region")
""",
  "pie_and_hist": """
import numpy as np
import matplotlib.pyplot as plt
fig, (a1, a2) = plt.subplots(1, 2)
a1.pie([30, 20, 50], labels=["A", "B", "C"], autopct="%1.0f%%", explode=[0, 0.1, 0])
a2.hist(np.random.normal(size=500), bins=20, color="teal", edgecolor="k")
fig.suptitle("Two panels $\\\\alpha^2$"); fig.tight_layout()
""",
  "heatmap_annotated": """
import numpy as np
import matplotlib.pyplot as plt
z = np.random.rand(6, 6)
fig, ax = plt.subplots()
im = ax.imshow(z, cmap="YlGnBu")
for i in range(6):
  for j in range(6):
    ax.text(j, i, f"{z[i, j]:.2f}", ha="center", va="center", fontsize=8)
fig.colorbar(im); ax.set_title("Heatmap")
""",
  "surface_3d": """
import numpy as np
import matplotlib.pyplot as plt
fig = plt.figure()
ax = fig.add_subplot(projection="3d")
X, Y = np.meshgrid(np.linspace(-2, 2, 30), np.linspace(-2, 2, 30))
ax.plot_surface(X, Y, np.exp(-X**2 - Y**2), cmap="viridis")
ax.set_title("Gaussian")
""",
  "unicode_text": """
import matplotlib.pyplot as plt
plt.bar(["café", "naïve", "Ω-band", "Zürich"], [3, 1, 4, 1])
plt.title("Ünïcödé labels — ±5 %")
""",
}


@pytest.fixture(scope="module")
def pool():
  """A two-worker chart pool shared by the tests of this module."""
  with create_chart_pool(2) as pool:
    assert pool.wait_ready(60)
    yield pool


def reference_render(code: str, canvas: ChartCanvas) -> np.ndarray:
  """Plain matplotlib in this process with the same canvas settings, saved as PNG."""
  matplotlib.rcdefaults()
  matplotlib.rcParams.update(CHART_RC_PARAMS)
  np.random.seed(0)
  random.seed(0)
  plt.close("all")
  try:
    exec(compile(code, "<code>", "exec"), {"__name__": "__main__"})
    fig = plt.gcf()
    fig.set_size_inches(canvas.width / canvas.dpi, canvas.height / canvas.dpi)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=canvas.dpi)
  finally:
    plt.close("all")
    matplotlib.rcdefaults()
  return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_sandbox_matches_in_process_matplotlib(pool, name):
  canvas = ChartCanvas()
  result = render_chart(PROGRAMS[name], pool=pool, canvas=canvas)
  assert result.ok, result.message
  expected = reference_render(PROGRAMS[name], canvas)
  assert result.image.shape == expected.shape == (672, 672, 3)
  np.testing.assert_array_equal(result.image, expected)


def test_renders_are_deterministic_across_runs_and_workers(pool):
  code = PROGRAMS["random_scatter"]
  results = render_charts([code] * 6, pool=pool)  # spread over both workers
  pngs = {r.png for r in results}
  assert len(pngs) == 1
  assert all(np.array_equal(r.image, results[0].image) for r in results)
  # The PNG holds exactly the image, with no metadata that could vary.
  decoded = np.asarray(Image.open(io.BytesIO(results[0].png)))
  np.testing.assert_array_equal(decoded, results[0].image)
  assert b"tEXt" not in results[0].png and b"tIME" not in results[0].png


def test_canvas_is_configurable(pool):
  canvas = ChartCanvas(width=448, height=336, dpi=112)
  result = render_chart(PROGRAMS["lines"], pool=pool, canvas=canvas)
  assert result.ok and result.image.shape == (336, 448, 3)
  np.testing.assert_array_equal(result.image, reference_render(PROGRAMS["lines"], canvas))


def test_figsize_does_not_change_the_canvas(pool):
  small = "import matplotlib.pyplot as plt\nplt.figure(figsize=(2, 1), dpi=50)\nplt.plot([1, 2])\n"
  assert render_chart(small, pool=pool).image.shape == (672, 672, 3)


def test_savefig_then_close_still_renders_the_saved_figure(pool):
  base = "import matplotlib.pyplot as plt\nplt.plot([0, 1], [0, 1])\n"
  shown = render_chart(base, pool=pool)
  saved = render_chart(base + "plt.savefig('out.png', dpi=300)\nplt.close()\n", pool=pool)
  assert saved.ok, saved.message
  np.testing.assert_array_equal(saved.image, shown.image)
  after_show = render_chart(base + "plt.show()\nplt.close('all')\n", pool=pool)
  np.testing.assert_array_equal(after_show.image, shown.image)


def test_savefig_appearance_options_are_honoured(pool):
  code = (
    "import matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.savefig('x.png', facecolor='black')\n"
  )
  result = render_chart(code, pool=pool)
  assert result.ok
  assert tuple(result.image[2, 2]) == (0, 0, 0)  # the figure background


def test_backend_switches_and_pause_are_harmless(pool):
  code = (
    "import matplotlib\nmatplotlib.use('TkAgg')\nimport matplotlib.pyplot as plt\n"
    "plt.switch_backend('Qt5Agg')\nplt.plot([1, 2])\nplt.pause(30)\nplt.show(block=True)\n"
  )
  result = render_chart(code, pool=pool, timeout_s=5)
  assert result.ok, result.message


def test_batch_results_keep_input_order(pool):
  codes = [PROGRAMS["lines"], "raise KeyError('nope')", "x = 1", PROGRAMS["unicode_text"]]
  statuses = [r.status for r in render_charts(codes, pool=pool)]
  assert statuses == [Status.OK, Status.RUNTIME_ERROR, Status.NO_FIGURE, Status.OK]


def test_render_chart_works_without_setup():
  try:
    result = render_chart("import matplotlib.pyplot as plt\nplt.plot([3, 1, 2])\n")
    assert result.ok, result.message
  finally:
    default_chart_pool().close()
