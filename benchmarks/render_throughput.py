"""Render throughput: sandboxed chart pool vs plain in-process matplotlib; HTML pages per second.

Both chart paths do the same work on the same 40 programs: run the code, draw the figure it
leaves at the fixed canvas (672x672 px, 96 dpi) into an RGB array. The in-process peer is one
thread of plain matplotlib (what a trainer would do with no sandbox at all); the sandbox runs the
programs across a pool of warm, isolated workers. For HTML, the warm renderer (one browser,
a fresh context per page) is compared with launching a browser per page.

Usage: python benchmarks/render_throughput.py [--workers 2] [--repeats 3] [--pages 20]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np

from rrvf_jax.env import (
  CHART_RC_PARAMS,
  ChartCanvas,
  HtmlRenderer,
  create_chart_pool,
  isolation_level,
  render_charts,
)
from rrvf_jax.env.web import find_chromium

_HEADER = "import numpy as np\nimport matplotlib.pyplot as plt\n"
_TEMPLATES = [
  "x = np.linspace(0, 10, {n})\nfor k in range(3):\n  plt.plot(x, np.sin(x + k), label=f's{{k}}')\n"
  "plt.legend(); plt.title('Lines {n}'); plt.xlabel('x'); plt.ylabel('y'); plt.grid(True)\n",
  "labels = ['A', 'B', 'C', 'D', 'E']\nvals = np.random.rand(5) * {n}\n"
  "bars = plt.bar(labels, vals, color='tab:blue')\nplt.bar_label(bars, fmt='%.1f')\n"
  "plt.title('Bars')\n",
  "x = np.random.randn({n}); y = x * 0.5 + np.random.randn({n}) * 0.3\n"
  "plt.scatter(x, y, c=y, cmap='viridis', s=12); plt.colorbar(); plt.title('Scatter')\n",
  "sizes = [15, 30, 45, 10]\nplt.pie(sizes, labels=['a', 'b', 'c', 'd'], autopct='%1.1f%%',"
  " startangle=90)\nplt.axis('equal'); plt.title('Pie {n}')\n",
  "data = np.random.randn({n} * 10)\nplt.hist(data, bins=30, alpha=0.7, edgecolor='black')\n"
  "plt.title('Histogram')\n",
  "fig, axs = plt.subplots(2, 2, figsize=(8, 6))\nx = np.linspace(0, 5, {n})\n"
  "axs[0, 0].plot(x, x ** 2); axs[0, 1].bar(range(5), range(5))\n"
  "axs[1, 0].scatter(x, np.cos(x)); axs[1, 1].fill_between(x, np.sin(x), alpha=0.4)\n"
  "fig.suptitle('Subplots'); fig.tight_layout()\n",
  "x = np.arange(8); y = np.random.rand(8) * {n}; e = np.random.rand(8)\n"
  "plt.errorbar(x, y, yerr=e, fmt='o-', capsize=4); plt.title('Errorbars')\n",
  "z = np.random.rand(12, 12)\nplt.imshow(z, cmap='hot'); plt.colorbar()\n"
  "plt.title('Heatmap {n}'); plt.xticks(range(12)); plt.yticks(range(12))\n",
  "data = [np.random.randn({n}) * s for s in (1, 2, 3)]\nplt.boxplot(data)\nplt.title('Boxplot')\n",
  "data = [np.random.randn({n}) * s for s in (1, 2, 3)]\nplt.violinplot(data)\n"
  "plt.title('Violin')\n",
  "ax = plt.subplot(projection='polar')\nt = np.linspace(0, 2 * np.pi, {n})\n"
  "ax.plot(t, 1 + np.sin(3 * t)); ax.set_title('Polar')\n",
  "from mpl_toolkits.mplot3d import Axes3D\n"
  "fig = plt.figure(); ax = fig.add_subplot(projection='3d')\n"
  "X, Y = np.meshgrid(np.linspace(-3, 3, {n} // 4), np.linspace(-3, 3, {n} // 4))\n"
  "ax.plot_surface(X, Y, np.sin(np.hypot(X, Y)), cmap='coolwarm'); ax.set_title('Surface')\n",
  "x = np.arange(5); a = np.random.rand(5); b = np.random.rand(5)\n"
  "plt.bar(x, a, label='a'); plt.bar(x, b, bottom=a, label='b')\n"
  "plt.legend(); plt.title('Stacked')\n",
  "x = np.linspace(0, 10, {n}); fig, ax1 = plt.subplots(); ax2 = ax1.twinx()\n"
  "ax1.plot(x, np.exp(x / 5), 'g-'); ax2.plot(x, np.log1p(x), 'b--')\n"
  "ax1.set_ylabel('exp'); ax2.set_ylabel('log'); plt.title('Twin axes')\n",
  "x = np.linspace(-3, 3, {n}); X, Y = np.meshgrid(x, x)\n"
  "cs = plt.contourf(X, Y, np.exp(-X ** 2 - Y ** 2), levels=12); plt.colorbar(cs)\n"
  "plt.title('Contour')\n",
  "y = np.random.rand(4, 10).cumsum(axis=1)\nplt.stackplot(range(10), y, labels=list('abcd'))\n"
  "plt.legend(loc='upper left'); plt.title('Stackplot {n}')\n",
  "x = np.linspace(0.1, 10, {n}); plt.semilogy(x, np.exp(x)); plt.grid(True, which='both')\n"
  "plt.title('Log scale')\n",
  "cats = ['Q1', 'Q2', 'Q3', 'Q4']; w = 0.25; x = np.arange(4)\n"
  "for i in range(3):\n  plt.bar(x + i * w, np.random.rand(4) * {n}, w, label=f'y{{i}}')\n"
  "plt.xticks(x + w, cats); plt.legend(); plt.title('Grouped bars')\n",
  "x = np.linspace(0, 10, {n}); plt.plot(x, np.sin(x))\n"
  "plt.annotate('peak', xy=(np.pi / 2, 1), xytext=(3, 1.3), arrowprops=dict(arrowstyle='->'))\n"
  "plt.ylim(-1.5, 1.6); plt.title('Annotated')\n",
  "vals = np.random.rand(6) * {n}; labels = [f'item {{i}}' for i in range(6)]\n"
  "plt.barh(labels, vals, color=plt.cm.Set2(np.arange(6))); plt.title('Horizontal bars')\n",
]


def chart_programs() -> list[str]:
  """The 40 benchmark programs: 20 chart kinds, two sizes each."""
  return [_HEADER + t.format(n=n) for n in (60, 120) for t in _TEMPLATES]


def render_in_process(code: str, canvas: ChartCanvas) -> np.ndarray:
  """The peer: plain matplotlib in this process, same canvas, into an RGB array."""
  matplotlib.rcdefaults()
  matplotlib.rcParams.update(CHART_RC_PARAMS)
  np.random.seed(0)
  random.seed(0)
  exec(compile(code, "<code>", "exec"), {"__name__": "__main__"})
  fig = plt.gcf()
  fig.set_size_inches(canvas.width / canvas.dpi, canvas.height / canvas.dpi)
  buf = io.BytesIO()
  fig.savefig(buf, format="rgba", dpi=canvas.dpi)
  plt.close("all")
  rgba = np.frombuffer(buf.getvalue(), np.uint8).reshape(canvas.height, canvas.width, 4)
  return rgba[..., :3].copy()


def timed(fn, repeats: int) -> float:
  """Median wall time of fn() over repeats (after one warm-up call)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def html_pages(n: int) -> list[str]:
  """Small but realistic pages: a header, a grid of cards, a table, inline CSS."""
  pages = []
  for i in range(n):
    cards = "".join(
      f"<div class=card><h3>Card {j}</h3><p>Lorem ipsum dolor sit amet {i * j}.</p></div>"
      for j in range(6)
    )
    rows = "".join(f"<tr><td>{r}</td><td>{r * i}</td><td>{r * r}</td></tr>" for r in range(8))
    pages.append(
      "<html><head><style>body{font-family:sans-serif;margin:0}header{background:#246;color:#fff;"
      "padding:24px}.grid{display:grid;grid-template-columns:repeat(3,1fr);gap:16px;padding:24px}"
      ".card{border:1px solid #ccc;border-radius:8px;padding:12px}table{margin:24px}"
      f"td{{padding:4px 12px}}</style></head><body><header><h1>Page {i}</h1></header>"
      f"<div class=grid>{cards}</div><table>{rows}</table></body></html>"
    )
  return pages


def bench_html(n_pages: int, repeats: int) -> list[tuple[str, int, float]]:
  """Rows for the HTML table: warm renderer, and one browser launch per page (the peer)."""
  if find_chromium() is None:
    return []
  from playwright.sync_api import sync_playwright

  pages = html_pages(n_pages)
  with HtmlRenderer() as renderer:
    warm = timed(lambda: [renderer.render(p) for p in pages], repeats)
  cold_pages = pages[: max(2, n_pages // 4)]

  def launch_per_page() -> None:
    """The peer: a fresh browser for every page, as some RL codebases do."""
    with sync_playwright() as pw:
      for html in cold_pages:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=["--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.set_content(html)
        page.screenshot(full_page=True)
        browser.close()

  cold = timed(launch_per_page, 1)
  return [
    (f"HtmlRenderer (warm browser, isolation={renderer.isolation})", len(pages), warm),
    ("Playwright, new browser per page (peer, no isolation)", len(cold_pages), cold),
  ]


def main() -> None:
  """Runs the benchmark and prints the tables."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--pages", type=int, default=20)
  args = parser.parse_args()
  canvas = ChartCanvas()
  programs = chart_programs()
  base = timed(lambda: [render_in_process(c, canvas) for c in programs], args.repeats)
  rows = [("in-process matplotlib, 1 thread (peer, no isolation)", base)]
  for workers in sorted({1, args.workers}):
    with create_chart_pool(workers) as pool:
      pool.wait_ready()
      results = render_charts(programs, pool=pool)
      bad = [r.status for r in results if not r.ok]
      assert not bad, f"benchmark programs failed in the sandbox: {bad}"
      t = timed(lambda pool=pool: render_charts(programs, pool=pool), args.repeats)
      rows.append((f"sandbox pool, {workers} worker(s), isolation={pool.isolation}", t))
  print(f"\nCharts: {len(programs)} programs, canvas {canvas.width}x{canvas.height}")
  print(f"{'setup':<62} {'s':>7} {'charts/s':>9} {'vs peer':>8}")
  for name, t in rows:
    print(f"{name:<62} {t:7.3f} {len(programs) / t:9.1f} {base / t:7.2f}x")
  html_rows = bench_html(args.pages, args.repeats)
  if html_rows:
    print("\nHTML pages (viewport 1280x720, full page up to 2560 px)")
    print(f"{'setup':<62} {'pages':>7} {'pages/s':>9} {'vs peer':>8}")
    peer = html_rows[-1][1] / html_rows[-1][2]
    for name, n, t in html_rows:
      print(f"{name:<62} {n:7d} {n / t:9.2f} {n / t / peer:7.2f}x")
  print(f"\nisolation_level() = {isolation_level()}")


if __name__ == "__main__":
  main()
