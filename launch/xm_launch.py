"""XManager launcher: one work unit of `rrvf_jax.main` per point of a config file's `sweep()`.

  python launch/xm_launch.py --config=configs/chart.py --platform=h100x16 \
    --workdir_root=/gcs/BUCKET/rrvf --experiment_title=lr_x_group --dry_run

`--dry_run` prints each work unit (resources, command line, environment) and needs no xmanager;
without it the experiment is started on Vertex AI through open-source XManager
(`pip install xmanager`, then the same command without --dry_run, or `xmanager launch
launch/xm_launch.py -- <flags>`). Work unit N (numbered from 1, as XManager does) writes to
`<workdir_root>/<experiment_title>/<N>`; on Vertex AI, `/gcs/BUCKET/...` is the bucket mounted by
Cloud Storage FUSE on every replica, so checkpoints are shared by the hosts.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_MODULE = "rrvf_jax.main"
COORDINATOR_PORT = 1234  # Port of jax.distributed's coordinator on the first host.


@dataclasses.dataclass(frozen=True)
class Platform:
  """Where one work unit runs: hosts x accelerators, and how XManager asks for them."""

  name: str
  accelerator: str  # Human-readable accelerator kind ("" for CPU only).
  hosts: int
  chips_per_host: int  # TPU chips or GPUs per host (0: CPU only).
  xm_resource: str  # xm.ResourceType name of the accelerator ("" for CPU only).
  topology: str  # Accelerator topology of the whole slice ("" when counted per host).
  entrypoint: tuple[str, ...]  # Container command before the flags of rrvf_jax.main.
  env: tuple[tuple[str, str], ...]  # What each host's environment holds for JAX multi-host.

  @property
  def total_chips(self) -> int:
    """Accelerators in the whole work unit."""
    return self.hosts * self.chips_per_host


PLATFORMS: dict[str, Platform] = {
  "v5p-64": Platform(
    name="v5p-64",
    accelerator="TPU v5p",
    hosts=8,
    chips_per_host=4,
    xm_resource="tpu_v5p",
    topology="2x4x4",
    entrypoint=("python", "-m", MAIN_MODULE),
    # JAX finds the slice itself (sharding.distributed_request: TPU_WORKER_HOSTNAMES).
    env=(("TPU_WORKER_HOSTNAMES", "<the 8 hosts, set by the TPU runtime>"),),
  ),
  "h100x16": Platform(
    name="h100x16",
    accelerator="NVIDIA H100 80GB",
    hosts=2,
    chips_per_host=8,
    xm_resource="h100",
    topology="",
    # Vertex AI only tells the replicas about each other in CLUSTER_SPEC; the wrapper turns
    # it into the JAX_* variables that sharding.distributed_request reads.
    entrypoint=("python", "launch/vertex_entry.py"),
    env=(
      ("JAX_COORDINATOR_ADDRESS", f"<workerpool0 host>:{COORDINATOR_PORT}"),
      ("JAX_NUM_PROCESSES", "2"),
      ("JAX_PROCESS_ID", "<replica rank 0..1>"),
    ),
  ),
  "cpu": Platform(
    name="cpu",
    accelerator="",
    hosts=1,
    chips_per_host=0,
    xm_resource="",
    topology="",
    entrypoint=("python", "-m", MAIN_MODULE),
    env=(),
  ),
}


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  """One run of rrvf_jax.main: its overrides, flags, workdir and platform."""

  index: int  # 1-based, as XManager numbers work units.
  overrides: tuple[tuple[str, Any], ...]
  args: tuple[str, ...]  # Flags of rrvf_jax.main (--config, --workdir, --config.k=v...).
  workdir: str
  platform: Platform

  @property
  def command(self) -> tuple[str, ...]:
    """The container's full command line."""
    return (*self.platform.entrypoint, *self.args)


def split_config_arg(config_arg: str) -> tuple[str, str | None]:
  """`file.py[:preset]` -> (file, preset or None)."""
  path, _, preset = config_arg.partition(":")
  return path, (preset or None)


def load_config_module(path: str) -> ModuleType:
  """Imports a config FILE (e.g. configs/chart.py) as a module, as ml_collections does."""
  full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
  if not os.path.isfile(full):
    raise ValueError(f"config file {path} does not exist")
  if REPO_ROOT not in sys.path:  # Config files import `configs.common` from the repo root.
    sys.path.insert(0, REPO_ROOT)
  name = "_rrvf_launch_config_" + os.path.splitext(os.path.basename(full))[0]
  spec = importlib.util.spec_from_file_location(name, full)
  if spec is None or spec.loader is None:
    raise ValueError(f"config file {path} cannot be imported as Python")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path} defines no get_config()")
  return module


def format_value(value: Any) -> str:
  """A value as ml_collections' `--config.key=value` parser reads it back."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (int, str)):
    return str(value)
  raise ValueError(f"sweep value {value!r} is not a bool, int, float or str")


def validate_override(config: Any, key: str, value: Any, where: str) -> None:
  """Raises one-line ValueError when `key` is not a config leaf or `value` has the wrong type."""
  import ml_collections

  node = config
  parts = key.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(f"{where}: unknown config key {key!r}")
    if depth < len(parts) - 1:
      node = node[part]
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    raise ValueError(f"{where}: config key {key!r} is a section, not a value")
  format_value(value)
  try:  # ConfigDict type-checks assignments (an int field rejects a float).
    node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    message = " ".join(str(e).split())
    raise ValueError(f"{where}: config key {key!r} cannot take {value!r}: {message}") from None


def sweep_points(module: ModuleType, path: str) -> list[dict[str, Any]]:
  """The config module's `sweep()` points, or one empty point when it defines no sweep."""
  sweep = getattr(module, "sweep", None)
  if sweep is None:
    return [{}]
  points = sweep()
  if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
    raise ValueError(f"{path}: sweep() must return a non-empty list of {{key: value}} dicts")
  return points


def work_units(
  config_arg: str,
  workdir_root: str,
  title: str,
  platform: str,
  *,
  use_sweep: bool = True,
) -> list[WorkUnit]:
  """The work units of an experiment: one per sweep point (one if no sweep), all validated."""
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; known: {', '.join(PLATFORMS)}")
  if not title or "/" in title:
    raise ValueError(f"experiment title {title!r} must be non-empty and contain no '/'")
  if not workdir_root:
    raise ValueError("--workdir_root is required")
  path, preset = split_config_arg(config_arg)
  module = load_config_module(path)
  config = module.get_config(preset)
  points = sweep_points(module, path) if use_sweep else [{}]
  units = []
  for index, point in enumerate(points, start=1):
    where = f"{path} sweep point {index}"
    trial = copy.deepcopy(config)
    for key, value in point.items():
      validate_override(trial, key, value, where)
    workdir = f"{workdir_root.rstrip('/')}/{title}/{index}"
    args = (
      f"--config={config_arg}",
      f"--workdir={workdir}",
      *(f"--config.{k}={format_value(v)}" for k, v in point.items()),
    )
    units.append(WorkUnit(index, tuple(point.items()), args, workdir, PLATFORMS[platform]))
  return units


def requirements_repr(platform: Platform) -> str:
  """The xm.JobRequirements of one host (Python syntax), as the real launch builds them."""
  if not platform.xm_resource:
    return "xm.JobRequirements(cpu=8)"
  if platform.topology:
    return f"xm.JobRequirements({platform.xm_resource}='{platform.topology}')"
  return f"xm.JobRequirements({platform.xm_resource}={platform.chips_per_host})"


def describe(unit: WorkUnit, title: str) -> str:
  """A readable, multi-line spec of one work unit (what --dry_run prints)."""
  p = unit.platform
  if p.chips_per_host:
    resources = (
      f"{p.hosts} host(s) x {p.chips_per_host} {p.accelerator} per host = {p.total_chips}"
      + (f" (topology {p.topology})" if p.topology else "")
    )
  else:
    resources = f"{p.hosts} host(s), CPU only"
  overrides = ", ".join(f"{k}={v!r}" for k, v in unit.overrides) or "(none)"
  env = "\n".join(f"    {k}={v}" for k, v in p.env) or "    (none needed)"
  return "\n".join(
    [
      f"work unit {unit.index} of experiment {title!r}",
      f"  platform:     {p.name}",
      f"  resources:    {resources}",
      f"  requirements: {requirements_repr(p)} per host, {p.hosts} replica(s)",
      f"  overrides:    {overrides}",
      f"  workdir:      {unit.workdir}",
      f"  command:      {shlex.join(unit.command)}",
      "  env:",
      env,
    ]
  )


def launch(units: Sequence[WorkUnit], title: str, image_env: Mapping[str, str]) -> None:
  """Starts the experiment with open-source XManager on Vertex AI (needs `pip install xmanager`)."""
  try:
    from xmanager import xm, xm_local
  except ImportError:
    raise ValueError(
      "xmanager is not installed: `pip install xmanager` (and set up gcloud), or pass --dry_run"
    ) from None
  platform = units[0].platform
  if platform.topology:
    # Open-source XManager's Vertex AI executor asks only for TPU v2/v3 (cloud-tpu machines).
    raise ValueError(
      f"open-source XManager cannot start {platform.name} slices on Vertex AI; use "
      "launch/gke.py or launch/tpu_vm.sh (or --dry_run to see the work units)"
    )

  def requirements(replicas: int) -> Any:
    if not platform.xm_resource:
      return xm.JobRequirements(cpu=8, replicas=replicas)
    return xm.JobRequirements(**{platform.xm_resource: platform.chips_per_host}, replicas=replicas)

  with xm_local.create_experiment(experiment_title=title) as experiment:
    [executable] = experiment.package(
      [
        xm.dockerfile_container(
          executor_spec=xm_local.Vertex.Spec(),
          path=REPO_ROOT,
          dockerfile=os.path.join(REPO_ROOT, "launch", "Dockerfile"),
          env_vars=dict(image_env),
        )
      ]
    )
    for unit in units:
      # Vertex AI's first worker pool must be one replica: host 0 (the JAX coordinator) there,
      # the other hosts in a second pool; CLUSTER_SPEC lists both.
      job = lambda replicas, unit=unit: xm.Job(
        executable=executable,
        executor=xm_local.Vertex(requirements=requirements(replicas)),
        args=xm.SequentialArgs.from_collection(list(unit.command)),
      )
      if platform.hosts == 1:
        experiment.add(job(1))
      else:
        experiment.add(xm.JobGroup(chief=job(1), workers=job(platform.hosts - 1)))


def define_flags() -> None:
  """Defines the command-line flags (only when run as a script: tests import this module)."""
  flags.DEFINE_string("config", None, "Config file with an optional :preset.")
  flags.DEFINE_string(
    "workdir_root", None, "Shared directory; work unit N writes to <root>/<title>/<N>."
  )
  flags.DEFINE_enum("platform", "cpu", list(PLATFORMS), "Where each work unit runs.")
  flags.DEFINE_string("experiment_title", "rrvf", "Experiment name (a path component).")
  flags.DEFINE_bool("sweep", True, "One work unit per sweep() point of the config file.")
  flags.DEFINE_bool("dry_run", False, "Print the work units; start nothing.")
  flags.mark_flags_as_required(["config", "workdir_root"])


def main(argv: Sequence[str]) -> None:
  """Builds the work units and prints them (--dry_run) or starts them with XManager."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    units = work_units(f.config, f.workdir_root, f.experiment_title, f.platform, use_sweep=f.sweep)
    if f.dry_run:
      print(f"{len(units)} work unit(s), platform {f.platform} (dry run: nothing started)")
      for unit in units:
        print(describe(unit, f.experiment_title))
      return
    launch(units, f.experiment_title, {"PYTHONUNBUFFERED": "1"})
  except ValueError as e:
    sys.exit(f"xm_launch: error: {' '.join(str(e).split())}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
