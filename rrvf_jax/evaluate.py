"""Benchmark evaluation: `python -m rrvf_jax.evaluate --config=configs/chart.py --workdir=DIR`.

Loads the policy (the HF export at --checkpoint, default WORKDIR/export when it exists, else the
config's model: `model.checkpoint_dir`, or the preset with random weights), the benchmark split
(--benchmark with the config's `data.manual_dir`, else the dataset the config's `data` section
names), answers every item greedily (one turn, or the RRVF tool loop with --tool_loop), scores the
answers with the benchmark's own metrics and writes OUT_DIR (default WORKDIR/eval/DATASET-SPLIT):
items.jsonl (resumable: re-running the same command continues), results.json and report.html.
The aggregate table is printed at the end.

Settings come from the flags, else from the config's `eval` section when it has one, else from
`answer_check` (single turn) and `grpo` (tool loop). The benchmark judge score needs
`--config.judge.name=openai` (with base_url and model); without it ChartMimic's Overall is empty.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from rrvf_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Run config file, with an optional :preset.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory (its export/ is the default policy)."
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "HF-format policy directory (default: WORKDIR/export, else the config's)."
)
_BENCHMARK = flags.DEFINE_enum(
  "benchmark",
  None,
  ["chartmimic", "plot2code", "websight"],
  "Benchmark dataset, built from the config's data.manual_dir (default: the config's data.name).",
)
_SPLIT = flags.DEFINE_string(
  "split", None, "Split (default: direct_600 for ChartMimic, else test, else data.eval_split)."
)
_MAX_ITEMS = flags.DEFINE_integer("max_items", None, "Evaluate the first N items (0: all).")
_OUT_DIR = flags.DEFINE_string(
  "out_dir", None, "Output directory (default WORKDIR/eval/DATASET-SPLIT)."
)
_TOOL_LOOP = flags.DEFINE_boolean(
  "tool_loop", None, "Play greedy RRVF episodes (render tool + feedback) instead of one turn."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Items per sampler call.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Tokens per assistant turn.")
flags.mark_flags_as_required(["config", "workdir"])

NAME = "rrvf_jax.evaluate"


def main(argv):
  """Validates the config, evaluates, prints the table; bad input exits with one line."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(cli.QuietLibraries())
  from rrvf_jax import checkpoint, pipeline
  from rrvf_jax.eval import stage

  try:
    pipeline.validate_config(_CONFIG.value)
  except ValueError as e:
    sys.exit(f"{NAME}: config error: {cli.one_line(e)}")
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    agg, out_dir = stage.run(
      _CONFIG.value,
      workdir,
      checkpoint=_CHECKPOINT.value,
      benchmark=_BENCHMARK.value,
      split=_SPLIT.value,
      max_items=_MAX_ITEMS.value,
      out_dir=_OUT_DIR.value,
      tool_loop=_TOOL_LOOP.value,
      batch_size=_BATCH_SIZE.value,
      max_new_tokens=_MAX_NEW_TOKENS.value,
    )
  except (ValueError, OSError, checkpoint.CheckpointError) as e:
    # Bad input (checkpoint, data, settings) is one line; the traceback goes to a file.
    os.makedirs(workdir, exist_ok=True)
    trace = os.path.join(workdir, "evaluate_error.txt")
    with open(trace, "w") as f:
      traceback.print_exc(file=f)
    sys.exit(f"{NAME}: error: {cli.one_line(e)} (traceback: {trace})")
  print(stage.format_table(agg, out_dir))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(NAME))
