"""RRVF on web pages: `python -m rrvf_jax.main --config=configs/web.py[:preset] --workdir=DIR`.

Same presets and status as configs/chart.py; the target is an HTML page screenshot.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for preset `arg` (None: paper-scale)."""
  preset = common.parse_preset(arg, ("paper", "demo"))
  config = common.base_config()
  config.task = "web"  # Which environment: chart (matplotlib) or web (HTML).
  config.image.width = 448  # Target canvas width in pixels (multiple of 28).
  config.image.height = 336  # Target canvas height in pixels (multiple of 28).
  if preset == "demo":
    common.apply_demo(config)
  return config
