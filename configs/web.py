"""RRVF on web pages: `python -m rrvf_jax.main --config=configs/web.py[:preset] --workdir=DIR`.

Same presets and stages as configs/chart.py; targets are HTML page screenshots. The paper released
no web cold-start data, so the paper preset skips SFT (RL would start from the instruct model).
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
  config.data.name = "websight"  # Held-out pages of the answer check.
  config.sft.steps = 0  # No released web cold-start data (see rrvf_method.md §9).
  config.grpo.max_new_tokens = 6144  # Tokens per assistant turn: HTML is longer than chart code.
  config.grpo.max_total_tokens = 43008  # The worst case of 5 turns at 448x336 is 41,476 tokens.
  config.eval.benchmark = "websight"  # WebSight pages from data.manual_dir.
  if preset == "demo":
    common.apply_demo(config)
    config.data.name = "synthetic_web"  # Built-in procedural pages.
    config.eval.benchmark = ""  # The held-out synthetic pages, scored with WebSight's metrics.
    config.image.width = 224
    config.image.height = 224
    config.sft.steps = 150  # Fewer steps than charts: the web demo only has to run end to end.
    config.grpo.steps = 10
    config.sft.max_length = 1280  # HTML is longer than the demo's chart programs.
    config.grpo.max_total_tokens = 1408  # The worst case at 224x224 is 1,284 tokens.
  return config


def sweep() -> list[dict[str, object]]:
  """Example sweep for `launch/xm_launch.py`: GRPO learning rate x turns per episode (4 units)."""
  # Each dict is one work unit's `--config.<key>=<value>` overrides; more turns, more feedback.
  return [{"grpo.learning_rate": lr, "grpo.max_turns": t} for lr in (5e-7, 1e-6) for t in (3, 5)]
