"""Each benchmark's own generation prompt, for direct single-turn evaluation (no render tool).

Verbatim from the benchmarks' code: ChartMimic's Direct Mimic instruction
(`chart2code/prompts/DirectAgent/gpt-4-vision-preview.json`), Plot2Code's `direct_prompt`
(`plot2code/utils.py`) and Design2Code's direct prompt (`Design2Code/prompting/gpt4v.py`), which
WebSight-style evaluations use (RRVF does not publish its WebSight prompt). The RRVF tool loop
uses the training prompt instead (`env.task_instruction`).
"""

from __future__ import annotations

from collections.abc import Sequence

CHARTMIMIC_DIRECT = (
  "You are an expert Python developer who specializes in writing matplotlib code based on a given "
  "picture. I found a very nice picture in a STEM paper, but there is no corresponding source code "
  "available. I need your help to generate the Python code that can reproduce the picture based on "
  "the picture I provide.\nNote that it is necessary to use figsize=({width}, {height}) to set the "
  "image size to match the original size.\nNow, please give me the matplotlib code that reproduces "
  "the picture below."
)
PLOT2CODE_DIRECT = (
  "You are a helpful assistant that can generate Python code using matplotlib."
  "Generate the matplotlib code to create a plot that looks like the given image, as similar as "
  "possible.The generated code should be surrounded by ```python and ```\n"
)
DESIGN2CODE_DIRECT = (
  "You are an expert web developer who specializes in HTML and CSS.\n"
  "A user will provide you with a screenshot of a webpage.\n"
  "You need to return a single html file that uses HTML and CSS to reproduce the given website.\n"
  "Include all CSS code in the HTML file itself.\n"
  'If it involves any images, use "rick.jpg" as the placeholder.\n'
  "Some images on the webpage are replaced with a blue rectangle as the placeholder, use "
  '"rick.jpg" for those as well.\n'
  "Do not hallucinate any dependencies to external files. You do not need to include JavaScript "
  "scripts for dynamic interactions.\n"
  "Pay attention to things like size, text, position, and color of all the elements, as well as "
  "the overall layout.\n"
  "Respond with the content of the HTML+CSS file:\n"
)
# matplotlib's default savefig dpi: ChartMimic's reference images are figsize x 100 pixels.
_CHARTMIMIC_DPI = 100


def benchmark_prompt(benchmark: str, target_shape: Sequence[int]) -> str:
  """The benchmark's instruction for a target image of `target_shape` (H, W, ...)."""
  if benchmark == "chartmimic":
    height, width = target_shape[:2]
    return CHARTMIMIC_DIRECT.format(
      width=round(width / _CHARTMIMIC_DPI, 2), height=round(height / _CHARTMIMIC_DPI, 2)
    )
  if benchmark == "plot2code":
    return PLOT2CODE_DIRECT
  if benchmark == "websight":
    return DESIGN2CODE_DIRECT
  raise ValueError(f"unknown benchmark {benchmark!r}; expected chartmimic, plot2code or websight")
