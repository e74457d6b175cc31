"""Shared pieces of the command-line entry points: one-line errors, flag parsing, quiet logs."""

from __future__ import annotations

import functools
import glob
import importlib.util
import logging as std_logging
import os
import sys
from collections.abc import Callable, MutableMapping

from absl import flags


class QuietLibraries(std_logging.Filter):
  """Drops INFO records of Orbax (several lines per checkpoint); its warnings still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def one_line(error: BaseException) -> str:
  """An error's message on one line (a KeyError's without the quotes repr adds)."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return " ".join(str(text).split())


def _parse_flags(name: str, argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"{name}: error: {one_line(e)}\nPass --help for the flags.")
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # Raised by config overrides.
    sys.exit(f"{name}: config error: {one_line(e)}")


def flags_parser(name: str) -> Callable[[list[str]], list[str]]:
  """absl flag parsing where a config typo or bad override is one clear line, not a traceback."""
  return functools.partial(_parse_flags, name)


# Device files of accelerators JAX may use besides a TPU: NVIDIA (Linux, containers, WSL2), AMD.
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips sit on PCI with Google's vendor id (as JAX checks)


def _accelerator_present() -> bool:
  """True when this machine shows a TPU chip or a GPU (what JAX looks for at start-up)."""
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return any(os.path.exists(p) for p in GPU_DEVICE_FILES)


def prefer_cpu(env: MutableMapping[str, str], *, libtpu: bool, accelerator: bool) -> bool:
  """Sets JAX_PLATFORMS=cpu in `env` when libtpu is installed but no accelerator is; True if set.

  With libtpu installed (requirements-tpu.txt, for `rrvf_jax.compile_check`) and JAX_PLATFORMS
  unset, JAX starts by trying the TPU backend: on a machine without TPU chips that loads libtpu
  (~0.1 s, ~80 MB) and prints its warnings before falling back to the CPU. A JAX_PLATFORMS the
  user set is kept, and machines with a TPU or a GPU are left to JAX.
  """
  if "JAX_PLATFORMS" in env or not libtpu or accelerator:
    return False
  env["JAX_PLATFORMS"] = "cpu"
  return True


def skip_tpu_probe_without_tpu() -> bool:
  """`prefer_cpu` for this process (call before JAX is imported)."""
  return prefer_cpu(
    os.environ,
    libtpu=importlib.util.find_spec("libtpu") is not None,
    accelerator=_accelerator_present(),
  )
