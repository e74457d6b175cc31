"""Entry point: `python -m rrvf_jax.main --config=configs/chart.py[:demo] --workdir=DIR`."""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Run config file (with :preset).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from rrvf_jax import pipeline

  logging.info(
    "JAX %s, process %d of %d, devices: %s",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.devices(),
  )
  pipeline.run(_CONFIG.value, os.path.abspath(_WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
