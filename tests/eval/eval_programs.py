"""Programs and pages with known scores, shared by the evaluation tests."""

from __future__ import annotations

# A bar chart with four drawn texts (title, x label, y label, legend entry) in one bar colour.
BAR_GT = """
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(6, 4))
ax.bar(["a", "b", "c"], [3, 1, 2], color="#1F77B4", label="sales")
ax.set_title("Sales by Region")
ax.set_xlabel("Region")
ax.set_ylabel("Units")
ax.legend()
plt.tight_layout()
plt.savefig("bar_1.pdf")
"""
BAR_CALL = 'ax.bar(["a", "b", "c"], [3, 1, 2], color="#1F77B4", label="sales")'
HIST_CALL = 'ax.hist([1, 2, 2, 3, 3, 3], color="#1F77B4", label="sales")'
WRONG_TITLE = BAR_GT.replace("Sales by Region", "Sales per Region")
# CIEDE2000 between #1F77B4 and #1F77C8 is 3.164317313177 (colormath 3.0.0, as the benchmark).
OFF_COLOUR = BAR_GT.replace('color="#1F77B4"', 'color="#1F77C8"')
OFF_COLOUR_SIMILARITY = 1 - 3.164317313177 / 100
HIST_INSTEAD = BAR_GT.replace(BAR_CALL, HIST_CALL)
FAILS = BAR_GT.replace("plt.tight_layout()", "raise ValueError('boom')")


def panels(n: int) -> str:
  """n titled line panels on a 2x2 grid (3 of them: the reference layout)."""
  return f"""
import matplotlib.pyplot as plt
fig = plt.figure(figsize=(6, 6))
for i in range({n}):
  ax = fig.add_subplot(2, 2, i + 1)
  ax.plot([0, 1], [i, i + 1])
  ax.set_title(f"Panel {{i}}")
plt.show()
"""
