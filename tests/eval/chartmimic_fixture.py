"""A tiny ChartMimic-format benchmark: `<id>.py` + `<id>.png` pairs in `manual_dir/<split>/`."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Small programs in ChartMimic's style (they end by saving a PDF, as the benchmark's scripts do).
PROGRAMS = {
  "bar_1": """
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(3, 2))
ax.bar(["a", "b", "c"], [3, 1, 2], color="#1F77B4", label="sales")
ax.set_title("Sales by Region")
ax.set_xlabel("Region")
ax.legend()
plt.tight_layout()
plt.savefig("bar_1.pdf")
""",
  "line_1": """
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(3, 2))
ax.plot([0, 1, 2, 3], [1, 3, 2, 4], color="#D62728", marker="o")
ax.set_title("Trend")
plt.savefig("line_1.pdf")
""",
  "pie_1": """
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(2.5, 2.5))
ax.pie([40, 35, 25], labels=["x", "y", "z"], colors=["#2CA02C", "#FF7F0E", "#9467BD"])
ax.set_title("Share")
plt.savefig("pie_1.pdf")
""",
  "scatter_1": """
import matplotlib.pyplot as plt
fig, axes = plt.subplots(1, 2, figsize=(4, 2))
axes[0].scatter([1, 2, 3], [3, 1, 2], color="#8C564B")
axes[1].barh(["p", "q"], [2, 5], color="#17BECF")
axes[0].set_title("Left")
axes[1].set_title("Right")
plt.savefig("scatter_1.pdf")
""",
}


def draw_png(code: str, dpi: int = 50) -> bytes:
  """Runs a program here (up to its savefig) and returns its figure as PNG bytes."""
  plt.close("all")
  exec(code.split("plt.savefig(")[0], {"__name__": "__fixture__"})  # our own trusted programs
  buf = io.BytesIO()
  plt.gcf().savefig(buf, format="png", dpi=dpi)
  plt.close("all")
  return buf.getvalue()


def write_chartmimic_fixture(manual_dir: Path, split: str = "direct_600") -> dict[str, str]:
  """Writes the programs and their reference PNGs in the builder's layout; returns id -> code."""
  directory = Path(manual_dir) / split
  directory.mkdir(parents=True, exist_ok=True)
  for item_id, code in PROGRAMS.items():
    (directory / f"{item_id}.py").write_text(code)
    (directory / f"{item_id}.png").write_bytes(draw_png(code))
  return dict(PROGRAMS)
