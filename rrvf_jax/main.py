"""Entry point: `python -m rrvf_jax.main --config=configs/chart.py[:demo] --workdir=DIR`."""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from rrvf_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Run config file, with an optional :preset.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.skip_tpu_probe_without_tpu()  # before JAX starts: no libtpu probe on a CPU-only machine
  import jax  # after flag parsing, so --help stays fast.

  logging.get_absl_handler().addFilter(cli.QuietLibraries())

  from rrvf_jax import checkpoint, pipeline, sharding
  from rrvf_jax.train import sft_loop

  try:
    # Before anything touches a JAX backend (process_index below does): JAX requires it.
    sharding.maybe_initialize_distributed()
  except ValueError as e:
    sys.exit(f"rrvf_jax.main: distributed set-up error: {cli.one_line(e)}")
  logging.info(
    "JAX %s, process %d of %d, devices: %s",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.devices(),
  )
  try:
    pipeline.validate_config(_CONFIG.value)
  except ValueError as e:
    sys.exit(f"rrvf_jax.main: config error: {cli.one_line(e)}")
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    summary = pipeline.run(_CONFIG.value, workdir)
  except sft_loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)  # 128 + SIGTERM, as if the signal had ended the process
  except (ValueError, OSError, FloatingPointError, checkpoint.CheckpointError) as e:
    # Bad input (data, checkpoint, numerics) is one line; the traceback goes to a file.
    trace = os.path.join(workdir, "error.txt")
    os.makedirs(workdir, exist_ok=True)
    with open(trace, "w") as f:
      traceback.print_exc(file=f)
    sys.exit(f"rrvf_jax.main: error: {cli.one_line(e)} (traceback: {trace})")
  pipeline.print_summary(summary)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("rrvf_jax.main"))
