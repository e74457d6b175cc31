"""RRVF on charts: `python -m rrvf_jax.main --config=configs/chart.py[:preset] --workdir=DIR`.

Presets:
  (default) paper-scale: Qwen2.5-VL-7B from a local HF checkpoint directory (set
            --config.model.checkpoint_dir=/path/to/Qwen2.5-VL-7B-Instruct), cold-start SFT on the
            RRVF cold-start data in --config.data.manual_dir.
  demo      the tiny CPU run: a tiny random Qwen2.5-VL and tokenizer made locally, SFT and GRPO
            on the built-in synthetic charts, evaluated on held-out charts.
  demo_qwen3  the same run with a tiny random Qwen3-VL (DeepStack, Qwen3 decoder) and tokenizer.

Any family of `rrvf_jax.models` is a policy: `--config.model.preset=qwen3-vl-8b`, or a checkpoint
directory whose config.json names its model_type.

Stages run in order, each skipped when its size is 0 (or disabled): cold-start SFT (`sft.steps`),
RRVF GRPO (`grpo.steps`, with greedy held-out episodes before and after), the held-out answer check
(`answer_check.num_examples`), the HF export, and the benchmark evaluation (`eval.enabled`).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for preset `arg` (None: paper-scale)."""
  preset = common.parse_preset(arg, ("paper", "demo", "demo_qwen3"))
  config = common.base_config()
  config.task = "chart"  # Which environment: chart (matplotlib) or web (HTML).
  if preset in ("demo", "demo_qwen3"):
    common.apply_demo(config)
    config.data.name = "synthetic_charts"  # Built-in procedural charts.
  if preset == "demo_qwen3":
    config.model.preset = "tiny-qwen3-vl"  # The model family follows from the preset.
  return config


def sweep() -> list[dict[str, object]]:
  """Example sweep for `launch/xm_launch.py`: GRPO learning rate x group size (4 work units)."""
  # Each dict is one work unit's `--config.<key>=<value>` overrides; the paper ran lr 1e-6, G=8.
  return [{"grpo.learning_rate": lr, "grpo.group_size": g} for lr in (5e-7, 1e-6) for g in (4, 8)]
