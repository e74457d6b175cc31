"""RRVF on charts: `python -m rrvf_jax.main --config=configs/chart.py[:preset] --workdir=DIR`.

Presets:
  (default) paper-scale: Qwen2.5-VL-7B from a local HF checkpoint directory (set
            --config.model.checkpoint_dir=/path/to/Qwen2.5-VL-7B-Instruct).
  demo      the tiny CPU run: a tiny random Qwen2.5-VL and a tiny tokenizer made locally.

Status: the training stages (cold-start SFT, GRPO, evaluation) are not implemented yet. The pipeline
currently runs the `policy_check` stage only: it renders a target chart, builds the RRVF prompt,
runs the policy's forward pass and a short greedy generation, and writes `policy_check.json`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for preset `arg` (None: paper-scale)."""
  preset = common.parse_preset(arg, ("paper", "demo"))
  config = common.base_config()
  config.task = "chart"  # Which environment: chart (matplotlib) or web (HTML).
  if preset == "demo":
    common.apply_demo(config)
  return config
