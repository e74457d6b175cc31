"""Compiles every program a run uses for a TPU topology ahead of time, on any CPU machine.

    python -m rrvf_jax.compile_check --config=configs/chart.py --topology=v5p-64 \\
      [--config.key=value ...] [--json=OUT.json] [--programs=grpo_step,decode]

libtpu (`requirements-tpu.txt`) compiles for TPU device descriptions with no TPU attached
(`jax.experimental.topologies.get_topology_desc`). The config builds the run's meshes
(`roles.make_roles` on the topology's devices), its abstract train state and batches, and its
sampler, and each jitted program of the run is lowered with the run's shapes and shardings and
compiled: the SFT step, the GRPO update (the real step over `grpo.micro_batches`, and one
micro-batch on its own), the log-prob pass, the sampler's empty cache, image encoding, prefill,
fork, appended turn and decode loop, the paged engine's decode loop (attention in XLA and in the
TPU kernel; with `grpo.engine=paged`, or at `--paged_context` tokens per row for any run), and
the weight reshard to the sampler when the roles do not share it. Nothing runs and no weights
are read (a checkpoint directory's config.json only).

Per program the table gives, per device: arguments, temporaries, outputs and aliased bytes from
the compiler's memory analysis, the buffers other programs keep alive meanwhile (the trainer's
state beside a rollout, the frozen reference beside an update), and their sum against the chip's
HBM; then compile seconds, the compiler's FLOPs and estimated seconds, and for train steps the
model FLOPs per second at that estimate as a fraction of the chip's peak. The MFU column comes
from the compiler's cost model, not a measurement, and where loops of unequal trip counts nest
(the layer scan around the flash tiles) the scaled estimate is rough. For decode it gives the
estimate of one step against the HBM-bandwidth bound (weights + KV cache read once per token);
the cost model does not see inside a Pallas kernel, so a step's kernel reads are added at that
bandwidth.

XLA's cost analysis counts a loop body once (a scan over 8 micro-batches costs one); the FLOPs
and seconds shown are scaled by the loops' trip counts (`rrvf_jax.hlo`: matmul FLOPs of every
computation times how often it runs, the estimate times the same ratio). The decode loop's trip
count is not static: its row is one step.

A program that does not fit, or a decode loop that all-gathers weights or KV cache every token, is
a failure: one line naming the program, the layout and the fix to try; the exit code is 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags

from rrvf_jax import cli, hlo, roles, sharding
from rrvf_jax.models.qwen_vl import rope
from rrvf_jax.models.qwen_vl.config import ModelConfig
from rrvf_jax.models.qwen_vl.model import ModelInputs
from rrvf_jax.processing import image, tokens

GIB = 2**30


# ------------------------------------------------------------------------------------------------
# Chips and topologies.


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation: what the compiler may use of its HBM, its peaks, how slices are named."""

  kind: str  # as in slice names: v4, v5e, v5p, v6e
  hbm_gib: float  # HBM per chip the compiler allocates from (its figure in out-of-memory errors)
  peak_tflops: float  # dense bf16 peak per chip (Cloud TPU spec sheet)
  hbm_gbps: float  # HBM bandwidth per chip, GB/s (spec sheet)
  cores_per_chip: int  # TensorCores a slice name counts per chip (v5p-8 is 4 chips)
  chip_config: str  # libtpu's chip_config_name: megacore (v4, v5p) or default
  dims: int  # 3 for the 3D torus of v4/v5p, 2 for v5e/v6e


CHIPS = {
  "v4": Chip("v4", 30.75, 275.0, 1228.0, 2, "megacore", 3),
  "v5e": Chip("v5e", 15.75, 197.0, 819.0, 1, "default", 2),
  "v5p": Chip("v5p", 95.74, 459.0, 2765.0, 2, "megacore", 3),
  "v6e": Chip("v6e", 31.25, 918.0, 1640.0, 1, "default", 2),
}

# Chips -> slice shape, as Cloud TPU documents them.
SHAPES_3D = {
  4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
  512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
}  # fmt: skip
SHAPES_2D = {
  1: "1x1",
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice (or several): chip generation, shape, chips per host."""

  name: str
  chip: Chip
  shape: tuple[int, ...]
  host_bounds: tuple[int, int, int]
  slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(self.shape) * self.slices

  @property
  def chips_per_host(self) -> int:
    return math.prod(self.host_bounds)

  @property
  def hosts(self) -> int:
    return self.chips // self.chips_per_host

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.kind}:{'x'.join(str(d) for d in self.shape)}"


def parse_topology(text: str, slices: int = 1) -> Topology:
  """A Topology from a slice name (`v5p-64`: cores, `v6e-8`: chips) or `v5p:2x4x4`.

  Hosts hold 4 chips (2x2x1), except v5e/v6e slices of at most 8 chips, which are one host.
  Raises a one-line ValueError listing what is known.
  """
  match = re.fullmatch(r"(v4|v5e|v5p|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))", text.strip())
  if not match:
    raise ValueError(
      f"--topology {text!r}: expected e.g. v5p-64, v6e-8 or v5p:2x4x4 (chips: {sorted(CHIPS)})"
    )
  chip = CHIPS[match.group(1)]
  table = SHAPES_3D if chip.dims == 3 else SHAPES_2D
  if match.group(2):
    count = int(match.group(2))
    if count % chip.cores_per_chip or count // chip.cores_per_chip not in table:
      known = ", ".join(f"{chip.kind}-{n * chip.cores_per_chip}" for n in table)
      raise ValueError(f"--topology {text!r}: unknown slice; known: {known}")
    shape_text = table[count // chip.cores_per_chip]
  else:
    shape_text = match.group(3)
  shape = tuple(int(d) for d in shape_text.split("x"))
  if len(shape) != chip.dims:
    raise ValueError(f"--topology {text!r}: {chip.kind} slices have {chip.dims} dimensions")
  full = (*shape, 1)[:3]
  single_host = chip.dims == 2 and math.prod(shape) <= 8
  bounds = full if single_host else tuple(min(b, d) for b, d in zip((2, 2, 1), full, strict=True))
  return Topology(text.strip(), chip, shape, bounds, slices)


def prepare_libtpu() -> None:
  """Environment libtpu reads when it starts without a TPU VM (kept where already set)."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # any valid name: the topology decides
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask
  # Compiling touches no chip: several checks (or tests) may run at once without libtpu's lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: Topology) -> list[jax.Device]:
  """Compile-only devices of the topology (libtpu; no TPU needed)."""
  from jax.experimental import topologies

  prepare_libtpu()
  desc = topologies.get_topology_desc(
    topology.libtpu_name,
    "tpu",
    chip_config_name=topology.chip.chip_config,
    chips_per_host_bounds=topology.host_bounds,
    num_slices=topology.slices,
  )
  return list(desc.devices)


# ------------------------------------------------------------------------------------------------
# Bytes per device and model FLOPs.


def device_bytes(tree: Any) -> int:
  """Bytes one device holds of every sharded ShapeDtypeStruct in `tree` (the largest share)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _kernels(params: nnx.State, prefix: str) -> int:
  """Elements of the matmul kernels under `prefix` (a dotted path start) of a parameter state."""
  total = 0
  for path, var in nnx.to_flat_state(params):
    name = ".".join(str(k) for k in path)
    if name.startswith(prefix) and path[-1] == "kernel":
      total += math.prod(var.get_value().shape)
  return total


def forward_flops(
  cfg: ModelConfig, params: nnx.State, rows: int, length: int, images: int, patches: int
) -> float:
  """Model FLOPs of one forward over `rows` x `length` tokens and `images` of `patches` patches.

  2 x matmul weights per token (decoder layers and the LM head) and per patch (vision blocks; the
  merger per merged unit), plus attention's 4 x keys x width per query and layer: the decoder's
  causal queries see (length + 1) / 2 keys on average (its attention skips the hidden tiles),
  the vision blocks' all the patches of their window or image.
  """
  t, v = cfg.text, cfg.vision
  tokens = rows * length
  flops = 2.0 * tokens * (_kernels(params, "text.layers") + t.vocab_size * t.hidden_size)
  flops += 4.0 * tokens * (length + 1) / 2 * t.num_layers * t.num_heads * t.head_dim
  p = images * patches
  flops += 2.0 * p * (_kernels(params, "visual.patch_embed") + _kernels(params, "visual.blocks"))
  flops += 2.0 * (p // v.merge_unit) * _kernels(params, "visual.merger")
  full = len(v.fullatt_block_indexes) if v.uses_windows else v.depth
  window = min(patches, (v.window_size // v.patch_size) ** 2) if v.uses_windows else patches
  flops += 4.0 * p * v.hidden_size * (full * patches + (v.depth - full) * window)
  return flops


# ------------------------------------------------------------------------------------------------
# The run: meshes, tokenizer, model config, abstract train state.


@dataclasses.dataclass(frozen=True)
class Run:
  """What the programs of a run are built from (all abstract: no device memory)."""

  config: ml_collections.ConfigDict
  topology: Topology
  placement: roles.Roles
  rules: sharding.Rules
  model_cfg: ModelConfig
  tokenizer: tokens.Tokenizer
  proc_cfg: image.ImageProcessorConfig
  stage: Any  # train.sft_loop.Stage
  grid: np.ndarray  # (1, 3) patch grid of one canvas image
  budget: Any  # rollout.budget.Budget: the worst-case episode (the sampler's cache length)

  @property
  def patches(self) -> int:
    return int(np.prod(self.grid))

  @property
  def image_tokens(self) -> int:
    return self.patches // self.model_cfg.vision.merge_unit

  @property
  def hosts(self) -> int:
    return self.topology.hosts

  def layout(self) -> str:
    """The trainer mesh and the sampler's, in words."""
    trainer = _mesh_text(self.placement.trainer_mesh)
    if self.placement.colocated:
      return f"{self.topology.name} ({self.hosts} hosts), mesh {trainer}, sampler on the same mesh"
    return (
      f"{self.topology.name} ({self.hosts} hosts), mesh {trainer}, sampler per host "
      f"{_mesh_text(self.placement.sampler_mesh)}"
    )


def _mesh_text(mesh: Mesh) -> str:
  return ",".join(f"{k}={v}" for k, v in mesh.shape.items())


def make_run(config: ml_collections.ConfigDict, topology: Topology, workdir: str) -> Run:
  """The Run of `config` on `topology`; raises a one-line ValueError for a bad config.

  The judge is not needed (no episode is played), so an `openai` judge without its URL passes.
  """
  from rrvf_jax import components, pipeline
  from rrvf_jax.train import sft_loop

  checked = config.copy_and_resolve_references()
  checked.judge.name = "local"
  pipeline.validate_config(checked)
  devices = topology_devices(topology)
  try:
    placement = roles.make_roles(
      {k: config.mesh[k] for k in sharding.MESH_AXES},
      sampler_devices=config.roles.sampler_devices,
      sampler_tensor=config.roles.sampler_tensor,
      devices=devices,
    )
  except AssertionError:
    if topology.slices == 1:
      raise
    # jax.make_mesh lays a mesh over one slice's torus; a DCN axis across slices would need
    # mesh_utils.create_hybrid_device_mesh, which sharding.make_mesh does not use.
    raise ValueError(
      f"--num_slices={topology.slices}: the run's mesh (sharding.make_mesh) cannot span slices"
    ) from None
  rules = sharding.get_rules(config.mesh.rules)
  tok = tokens.load_tokenizer(components.tokenizer_dir(config, workdir))
  model_cfg = components.policy_config(config, tok)
  proc_cfg = components.image_processor_config(config)
  canvas = np.zeros((config.image.height, config.image.width, 3), np.uint8)
  grid = image.preprocess_images([canvas], proc_cfg).image_grid_thw.reshape(1, 3)
  budget = components.episode_budget(config, tok, proc_cfg)
  stage = sft_loop.Stage(
    config=config,
    workdir=workdir,
    tokenizer=tok,
    model_config=model_cfg,
    make_model=components.fresh_model_fn(config, model_cfg),
    initial_model=lambda: None,
    mesh=placement.trainer_mesh,
    rules=rules,
    proc_cfg=proc_cfg,
    instruction=pipeline.env.task_instruction(config.task),
    system_prompt=pipeline.chat.DEFAULT_SYSTEM_PROMPT,
    tools=tuple(pipeline.env.tool_schemas(config.task)),
    sampler_mesh=placement.sampler_mesh,
    cache_length=budget.cache_slots,
  )
  return Run(config, topology, placement, rules, model_cfg, tok, proc_cfg, stage, grid, budget)


def _sds(shape: Sequence[int], dtype: Any, mesh: Mesh | None = None, spec=None):
  """A ShapeDtypeStruct, placed on `mesh` with `spec` (default: replicated) when a mesh is given."""
  placed = None if mesh is None else NamedSharding(mesh, spec or PartitionSpec())
  if not jax.dtypes.issubdtype(dtype, jax.dtypes.extended):  # PRNG keys stay as they are
    dtype = jax.dtypes.canonicalize_dtype(dtype)
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=placed)


def _abstract(tree: Any, mesh: Mesh | None = None) -> Any:
  """Host arrays (or ShapeDtypeStructs) as ShapeDtypeStructs, replicated on `mesh` if given."""
  return jax.tree.map(lambda x: _sds(np.shape(x), x.dtype, mesh), tree)


def _placed(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a matching tree)."""
  return jax.tree.map(lambda x, s: _sds(x.shape, x.dtype).update(sharding=s), tree, shardings)


def _stacked(tree: Any, micro_batches: int) -> Any:
  """A leading micro-batch axis on every leaf (as `batch.stack_micro_batches`), when M > 1."""
  if micro_batches == 1:
    return tree
  return jax.tree.map(lambda x: _sds((micro_batches, *x.shape), x.dtype), tree)


def model_inputs(run: Run, rows: int, length: int, pixels: tuple[int, ...], images: int):
  """Abstract ModelInputs: ids, mask, M-RoPE positions, pixels `pixels`, index of `images`."""
  index = rope.make_vision_index(np.tile(run.grid, (images, 1)), run.model_cfg.vision)
  return ModelInputs(
    input_ids=_sds((rows, length), np.int32),
    attention_mask=_sds((rows, length), np.int32),
    positions=_sds((3, rows, length), np.int32),
    pixel_values=_sds(pixels, np.float32),
    vision_index=_abstract(index),
  )


def sft_batch(run: Run, length: int, images_per_row: int) -> Any:
  """The SFT step's batch (`sft.make_sft_batch`): micro-batches of rows of `length` tokens.

  With `images_per_row` S > 0 each row has S image slots of the canvas size (one vision index);
  with 0, one image per row, concatenated.
  """
  from rrvf_jax.train import sft

  c = run.config.sft
  rows = c.batch_size // c.micro_batches
  dim = run.model_cfg.vision.patch_dim
  if images_per_row:
    inputs = model_inputs(run, rows, length, (rows * images_per_row, run.patches, dim), 1)
  else:
    inputs = model_inputs(run, rows, length, (rows * run.patches, dim), rows)
  batch = sft.SFTBatch(
    inputs=inputs,
    targets=_sds((rows, length), np.int32),
    loss_mask=_sds((rows, length), np.float32),
  )
  return _stacked(batch, c.micro_batches)


def grpo_length(run: Run) -> int:
  """The longest GRPO batch length: the longest trajectory's bucket (`grpo._Trainer.batch`)."""
  from rrvf_jax.rollout import sampler as sampler_lib
  from rrvf_jax.train import grpo

  longest = min(run.config.grpo.max_total_tokens, run.budget.tokens)
  return sampler_lib.bucket_length(longest, grpo.TRAIN_BUCKETS)


def grpo_batch(run: Run, micro_batches: int) -> Any:
  """A GRPO micro-batch (`grpo.make_grpo_batch`), stacked `micro_batches` times (a mini-batch)."""
  from rrvf_jax.train import grpo

  c = run.config.grpo
  rows = c.prompts_per_step * c.group_size // c.mini_batches // c.micro_batches
  length = grpo_length(run)
  per_row = c.max_turns + 1
  pixels = (rows * per_row, run.patches, run.model_cfg.vision.patch_dim)
  inputs = model_inputs(run, rows, length, pixels, 1)
  batch = grpo.GRPOBatch(
    inputs=inputs,
    targets=_sds((rows, length), np.int32),
    loss_mask=_sds((rows, length), np.float32),
    old_logprobs=_sds((rows, length), np.float32),
    advantages=_sds((rows,), np.float32),
    ref_logprobs=_sds((rows, length), np.float32) if c.kl_coef > 0 else None,
  )
  return _stacked(batch, micro_batches)


def placed_batch(run: Run, batch: Any, micro_batches: int) -> Any:
  """`batch` with the shardings `batch.host_batch_to_global` gives it on the trainer mesh."""
  from rrvf_jax.train import batch as batch_lib

  mesh = run.placement.trainer_mesh
  return _placed(
    batch, batch_lib.batch_shardings(batch, mesh, run.rules, micro_batches=micro_batches)
  )


# ------------------------------------------------------------------------------------------------
# Programs.


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted program of the run, ready to lower with abstract arguments."""

  name: str
  what: str  # its shapes, in words
  lower: Callable[[dict[str, Any]], Any]  # earlier programs' output shardings -> Lowered
  kind: str  # train | forward | sampler | decode | transfer
  devices: int  # devices it runs on
  resident: int = 0  # bytes per device that other programs' buffers hold meanwhile
  model_flops: float = 0.0  # model FLOPs of one call, all devices (train and forward)
  read_bytes: int = 0  # decode: bytes per device one token reads (weights + KV cache)
  kernel_bytes: int = 0  # decode: of those, what Pallas kernels read (the cost model does not see)
  weight_like: frozenset = frozenset()  # decode: element counts of gathered weights or cache
  fix: str = ""  # what to try when it does not fit


def _gather_sizes(tree: Any, devices: int) -> set[int]:
  """Element counts an all-gather of a matrix of `tree` can produce on `devices` devices.

  Element counts, not dtypes: XLA may gather a float32 weight after casting it to bfloat16.
  Vectors (biases, norm scales) are left out: their sizes collide with activations'.
  """
  sizes = set()
  factors = [f for f in range(2, devices + 1) if devices % f == 0]
  for leaf in jax.tree.leaves(tree):
    if len(leaf.shape) < 2:
      continue
    local = math.prod(leaf.sharding.shard_shape(leaf.shape))
    full = math.prod(leaf.shape)
    sizes |= {local * f for f in factors if local * f <= full}
  return sizes


def _train_fix(
  section: str, c: ml_collections.ConfigDict, rows: int, rows_per_device: int, batch_devices: int
) -> str:
  """The knob to turn when a train step does not fit (or its micro-batch does not divide)."""
  total = rows * c.micro_batches
  if rows % batch_devices:
    if total % batch_devices == 0:
      return (
        f"--config.{section}.micro_batches={total // batch_devices} (micro-batches of "
        f"{batch_devices} rows: one per device)"
      )
    return f"a batch that divides by the {batch_devices} data-parallel devices"
  if rows_per_device > 1:
    return (
      f"--config.{section}.micro_batches={c.micro_batches * rows_per_device} (one row per "
      "device per micro-batch)"
    )
  if c.remat != "full":
    return f"--config.{section}.remat=full"
  # One row per chip already: only splitting each row's work shrinks it (XLA's dense attention
  # keeps several float32 [heads, length, length] buffers per layer in the backward).
  if batch_devices % 2 == 0:
    return (
      f"attention heads and MLP over 2 chips: --config.mesh.fsdp={batch_devices // 2} "
      f"--config.mesh.tensor=2 --config.{section}.micro_batches={2 * c.micro_batches}, or "
      "shorter sequences"
    )
  return "shorter sequences"


def _batch_devices(mesh: Mesh, rules: sharding.Rules) -> int:
  """How many ways the rules' batch axes split rows on `mesh`."""
  spec = sharding.logical_to_spec(("batch",), rules, mesh)
  names = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0] or ())
  return math.prod(mesh.shape[n] for n in names)


def _rows_per_device(rows: int, mesh: Mesh, rules: sharding.Rules) -> int:
  """Rows one device holds when `rows` shard over the rules' batch axes (whole if they do not)."""
  ways = _batch_devices(mesh, rules)
  return rows // ways if rows % ways == 0 else rows


def _lower_step(run: Run, fn, first: Any, batch: Any, micro_batches: int):
  """`lower(compiled)` of `fn(first, batch)`, the batch placed as the run places it."""

  def lower(_):
    return fn.lower(first, placed_batch(run, batch, micro_batches))

  return lower


def train_programs(run: Run) -> list[Program]:
  """The SFT step, the GRPO update (M micro-batches, and one), the log-prob pass."""
  from rrvf_jax.train import grpo, sft_loop
  from rrvf_jax.train import state as state_lib

  config, stage = run.config, run.stage
  mesh, rules = run.placement.trainer_mesh, run.rules
  devices = mesh.devices.size
  ways = _batch_devices(mesh, rules)
  flops = lambda params, rows, length, images: forward_flops(
    run.model_cfg, params, rows, length, images, run.patches
  )
  programs = []
  if config.sft.steps > 0:
    c = config.sft
    tx, schedule = sft_loop.make_optimizer(c)
    graphdef, state = state_lib.abstract_train_state(stage.make_model, tx, mesh=mesh, rules=rules)
    rows = c.batch_size // c.micro_batches
    step_fn = sft_loop.make_step(stage, graphdef, tx, schedule)
    # The curriculum's phases (`sft_loop.run`): answer-only rows first, then whole conversations.
    phases = [("sft_step", c.max_length, c.max_images)]
    if c.answer_steps > 0:
      phases.insert(0, ("sft_answers", c.answer_max_length, min(c.max_images, 1)))
    for name, length, slots in phases:
      images = c.batch_size * max(slots, 1)
      programs.append(
        Program(
          name=name,
          what=f"{c.micro_batches} x {rows} rows x {length} tokens, "
          f"{max(slots, 1)} images/row, remat={c.remat}",
          lower=_lower_step(run, step_fn, state, sft_batch(run, length, slots), c.micro_batches),
          kind="train",
          devices=devices,
          model_flops=3 * flops(state.params, c.batch_size, length, images),
          fix=_train_fix("sft", c, rows, _rows_per_device(rows, mesh, rules), ways),
        )
      )
  if config.grpo.steps == 0:
    return programs
  c = config.grpo
  tx, schedule = grpo.make_optimizer(c)
  rl_cfg = grpo.rl_config(c)
  graphdef, state = state_lib.abstract_train_state(stage.make_model, tx, mesh=mesh, rules=rules)
  # Beside an update: the frozen reference. The sampler's own weight copy is not there: the GRPO
  # loop frees it after each rollout where it shares the trainer's devices (`roles.free_copies`),
  # and a disaggregated sampler keeps it on devices of its own.
  ref = device_bytes(state.params) if c.kl_coef > 0 else 0
  mini = c.prompts_per_step * c.group_size // c.mini_batches
  rows = mini // c.micro_batches
  length = grpo_length(run)
  per_row = c.max_turns + 1
  forward = flops(state.params, mini, length, mini * per_row)
  fix = _train_fix("grpo", c, rows, _rows_per_device(rows, mesh, rules), ways)
  trainer = grpo._Trainer(stage, graphdef, tx, schedule, rl_cfg)
  batch = grpo_batch(run, c.micro_batches)
  programs.append(
    Program(
      name="grpo_step",
      what=f"{c.micro_batches} x {rows} rows x {length} tokens, {per_row} images/row, "
      f"remat={c.remat}",
      lower=_lower_step(run, trainer.train_step, state, batch, c.micro_batches),
      kind="train",
      devices=devices,
      resident=ref,
      model_flops=3 * forward,
      fix=fix,
    )
  )
  if c.micro_batches > 1:
    # One micro-batch through the same step (micro_batches=1): the accumulation's loop body.
    single = config.copy_and_resolve_references()
    single.grpo.micro_batches = 1
    micro = grpo._Trainer(dataclasses.replace(stage, config=single), graphdef, tx, schedule, rl_cfg)
    programs.append(
      Program(
        name="grpo_micro",
        what=f"one micro-batch: {rows} rows x {length} tokens, remat={c.remat}",
        lower=_lower_step(run, micro.train_step, state, grpo_batch(run, 1), 1),
        kind="train",
        devices=devices,
        resident=ref,
        model_flops=3 * forward / c.micro_batches,
        fix=fix,
      )
    )
  logprobs = trainer.logprobs if c.micro_batches == 1 else trainer.stacked_logprobs
  programs.append(
    Program(
      name="logprobs",
      what=f"{mini} rows x {length} tokens (sampler-vs-trainer check, reference log-probs)",
      lower=_lower_step(run, logprobs, state.params, batch, c.micro_batches),
      kind="forward",
      devices=devices,
      resident=device_bytes(state.opt_state) + ref,
      model_flops=forward,
      fix=fix,
    )
  )
  return programs


def _sampler_params(run: Run) -> Any:
  """The sampler's parameters (abstract), on its mesh: the trainer's own when colocated."""
  from rrvf_jax.train import state as state_lib

  tx = _grpo_tx(run.config)
  _, state = state_lib.abstract_train_state(
    run.stage.make_model, tx, mesh=run.placement.trainer_mesh, rules=run.rules
  )
  if run.placement.colocated:
    return state.params
  targets = roles.sampler_shardings(state.params, run.placement.sampler_mesh, run.rules)
  return jax.tree.map(
    lambda x, t: x.replace(
      _sds(x.get_value().shape, x.get_value().dtype).update(sharding=t.get_value())
    ),
    state.params,
    targets,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def _grpo_tx(config: ml_collections.ConfigDict):
  from rrvf_jax.train import grpo

  return grpo.make_optimizer(config.grpo)[0]


def _rollout_resident(run: Run, state: Any) -> int:
  """Bytes per sampler device the other roles keep meanwhile: the trainer's state (less the
  weights the sampler shares with it), the frozen reference."""
  if run.config.roles.sampler_devices != 0:
    return 0
  resident = device_bytes(state.opt_state)
  resident += 0 if run.placement.colocated else device_bytes(state.params)
  resident += device_bytes(state.params) if run.config.grpo.kl_coef > 0 else 0
  return resident


def _pow2(n: int) -> int:
  """The least power of two >= n (and >= 1): the engines' padded batch and table sizes."""
  return 1 << max(n - 1, 0).bit_length()


def _turn_lengths(run: Run, buckets: Sequence[int], append_tokens: int) -> tuple[int, int, int]:
  """(real prompt tokens, prompt bucket, appended-turn bucket) of the run's rollout.

  The prompt is one canvas-sized target image with the stage's instruction, system prompt and
  tools; the longest appended tool turn is grpo.max_response_tokens (the episode's cap), unless
  `append_tokens` says otherwise.
  """
  from rrvf_jax.rollout import answer_check
  from rrvf_jax.rollout import sampler as sampler_lib

  config = run.config
  canvas = np.zeros((config.image.height, config.image.width, 3), np.uint8)
  prompt = answer_check.prompt_segment(
    run.tokenizer,
    canvas,
    instruction=run.stage.instruction,
    proc_cfg=run.proc_cfg,
    system_prompt=run.stage.system_prompt,
    tools=run.stage.tools,
  )
  real = len(prompt.token_ids)
  append = append_tokens or config.grpo.max_response_tokens
  return real, sampler_lib.bucket_length(real, buckets), sampler_lib.bucket_length(append, buckets)


def sampler_programs(run: Run, append_tokens: int = 0) -> list[Program]:
  """The lock-step engine's rollout on one host's sampler: cache, encode, prefill, fork, decode,
  append (none for a paged run)."""
  from rrvf_jax.rollout import sampler as sampler_lib
  from rrvf_jax.train import grpo
  from rrvf_jax.train import state as state_lib

  config, c = run.config, run.config.grpo
  if c.steps == 0 or c.get("engine", "lock_step") == "paged":
    return []  # the paged engine's programs are paged_programs'
  mesh, rules = run.placement.sampler_mesh, run.rules
  tx = _grpo_tx(config)
  graphdef, state = state_lib.abstract_train_state(
    run.stage.make_model, tx, mesh=run.placement.trainer_mesh, rules=rules
  )
  params = _sampler_params(run)
  sampler = sampler_lib.Sampler(
    nnx.merge(graphdef, params),
    run.tokenizer,
    cache_length=run.stage.cache_length,
    mesh=mesh,
    rules=rules,
  )
  prompts = c.prompts_per_step // run.hosts
  rows = prompts * c.group_size
  real_prompt, prompt_len, append_len = _turn_lengths(run, sampler.buckets, append_tokens)
  replicated = lambda shape, dtype: _sds(shape, dtype, mesh)  # what jit makes of host arrays
  width = run.model_cfg.text.hidden_size
  dtype = sampler.cache_dtype

  resident = _rollout_resident(run, state)
  devices = mesh.devices.size

  def session(batch: int, after: str | None, compiled: dict[str, Any]):
    shapes = jax.eval_shape(sampler.session_program(batch))
    if after in compiled:  # the state as the previous program leaves it
      return _placed(shapes, _state_out(compiled[after]))
    return _placed(shapes, jax.tree.map(lambda x: x.sharding, shapes))

  def features(images: int, compiled: dict[str, Any]):
    n = images * run.image_tokens
    padded = _pow2(n)
    return replicated((padded, width), dtype)

  def run_rules(fn):
    def lower(compiled):
      with sharding.activation_rules(mesh, rules):
        return fn(compiled)

    return lower

  # A turn's images go through the tower `encode_images` at a time (Sampler._features).
  images = min(rows, sampler.encode_images)

  def encode(compiled):
    index = rope.make_vision_index(np.tile(run.grid, (images, 1)), run.model_cfg.vision)
    pixels = replicated((images * run.patches, run.model_cfg.vision.patch_dim), np.float32)
    return sampler._jit_encode.lower(params, pixels, _abstract(index, mesh))

  def append(batch: int, length: int, after: str):
    def lower(compiled):
      return sampler._jit_append.lower(
        params,
        session(batch, after, compiled),
        replicated((batch, length), np.int32),
        replicated((batch, length), np.int32),
        replicated((3, batch, length), np.int32),
        features(batch, compiled),
        replicated((), np.int32),
      )

    return lower

  def fork(compiled):
    return sampler._jit_fork.lower(session(prompts, "prefill", compiled), c.group_size)

  sampling = grpo.sampling_params(run.stage)

  def decode(compiled):
    key = jax.eval_shape(lambda: jax.random.key(0))
    return sampler._jit_decode.lower(
      params,
      session(rows, "fork", compiled),
      replicated((), np.int32),
      replicated(key.shape, key.dtype),
      replicated((rows,), np.bool_),
      sampler.stop_table(sampling.stop_strings),
      replicated((), np.int32),
      sampling_params=sampling,
    )

  cache = session(rows, None, {}).cache
  cache_text = f"{rows} rows x {sampler.cache_length} slots"
  fix_rows = (
    f"fewer rows per sampler device: more devices per host sampler (--config.roles.sampler_tensor)"
    f", fewer prompts per host (grpo.prompts_per_step={c.prompts_per_step}) or a shorter cache "
    f"(the worst-case episode: grpo.max_turns={c.max_turns}, grpo.max_new_tokens="
    f"{c.max_new_tokens}, grpo.max_response_tokens={c.max_response_tokens})"
  )
  gather_fix = (
    f"--config.roles.sampler_tensor={run.topology.chips_per_host} (each host samples with the "
    "weights split over tensor, replicated over data: decode reads its own shard)"
  )
  programs = [
    Program(
      "cache_init", f"empty KV cache, {prompts} rows x {sampler.cache_length} slots",
      run_rules(lambda _: sampler.session_program(prompts).lower()), "sampler", devices,
      resident, fix=fix_rows,
    ),
    Program(
      "encode", f"{images} canvas images per call ({run.patches} patches each; {rows} a turn)",
      run_rules(encode),
      "sampler", devices, resident, fix=fix_rows,
    ),
    Program(
      "prefill", f"{prompts} prompts x {prompt_len} tokens ({real_prompt} real)",
      run_rules(append(prompts, prompt_len, "cache_init")), "sampler", devices, resident,
      fix=fix_rows,
    ),
    Program(
      "fork", f"{prompts} -> {rows} rows (G={c.group_size})", run_rules(fork), "sampler",
      devices, resident, fix=fix_rows,
    ),
    Program(
      "decode", f"{cache_text}, <= {c.max_new_tokens} new tokens, T={sampling.temperature}",
      run_rules(decode), "decode", devices, resident,
      read_bytes=device_bytes(params) + device_bytes((cache.k, cache.v)),
      weight_like=frozenset(_gather_sizes((params, cache.k, cache.v), devices)),
      fix=gather_fix,
    ),
    Program(
      "append", f"{cache_text}, a {append_len}-token turn with an image per row",
      run_rules(append(rows, append_len, "decode")), "sampler", devices, resident,
      fix=fix_rows,
    ),
  ]  # fmt: skip
  programs += _transfer_programs(run, state, params)
  return programs


def paged_programs(run: Run, context: int = 0, append_tokens: int = 0) -> list[Program]:
  """The paged engine's programs (rollout engine v2): pools, encode, prefill, fork, decode, append.

  Built when `grpo.engine` is paged, or for any run when `context` > 0 (its decode loops only):
  each of the host's rows owns pages for `context` tokens (0: `grpo.max_total_tokens`, what the
  GRPO stage gives a row) and every page table covers them, the worst case of a step. Prefill is
  the host's prompts in one call from empty rows; fork copies each child's partly filled last
  page; the appended tool turn runs on a full row. `paged_decode` attends with the pure-JAX
  gather, `paged_decode_pallas` with JAX's TPU paged-attention kernel (only where the kernel takes
  the model: heads of a multiple of 128 dims, a bfloat16 cache). The compiler's cost model does
  not see inside a Pallas kernel: that row's FLOPs and estimate leave the kernel's attention out,
  and the row adds the kernel's reads at HBM bandwidth (`kernel_s`).
  """
  from rrvf_jax.models.qwen_vl import paged_kv
  from rrvf_jax.rollout import paged as paged_lib
  from rrvf_jax.rollout import paged_engine
  from rrvf_jax.train import grpo
  from rrvf_jax.train import state as state_lib

  config, c = run.config, run.config.grpo
  is_paged = c.get("engine", "lock_step") == "paged"
  if c.steps == 0 or (not is_paged and context <= 0):
    return []
  context = context if context > 0 else c.max_total_tokens
  mesh, rules = run.placement.sampler_mesh, run.rules
  graphdef, state = state_lib.abstract_train_state(
    run.stage.make_model, _grpo_tx(config), mesh=run.placement.trainer_mesh, rules=rules
  )
  params = _sampler_params(run)
  model = nnx.merge(graphdef, params)
  prompts = c.prompts_per_step // run.hosts
  rows = prompts * c.group_size
  slots = min(c.decode_slots or rows, rows)
  row_pages = -(-context // c.page_size)
  pool = c.get("pool_tokens", 0) if is_paged else 0
  pool_pages = -(-pool // c.page_size) + 1 if pool else rows * row_pages + 1
  sampling = grpo.sampling_params(run.stage)
  replicated = lambda shape, dtype: _sds(shape, dtype, mesh)
  devices = mesh.devices.size
  resident = _rollout_resident(run, state)
  impls = ["xla"]
  try:
    paged_kv.check_kernel(run.model_cfg.text.head_dim, model.dtype)
    impls.append("pallas")
  except ValueError:
    pass  # the kernel cannot take this model: its program is left out

  def make_sampler(impl: str) -> paged_lib.PagedSampler:
    return paged_lib.PagedSampler(
      model,
      run.tokenizer,
      num_pages=pool_pages,
      max_rows=rows,
      page_size=c.page_size,
      decode_slots=slots,
      decode_steps=c.decode_steps,
      append_rows=c.get("append_rows", 0) or None,
      mesh=mesh,
      rules=rules,
      attention_impl=impl,
    )

  sampler = make_sampler("xla")
  pools = jax.eval_shape(sampler.state_program())
  pools = _placed(pools, jax.tree.map(lambda x: x.sharding, pools))
  token_bytes = device_bytes((pools.k, pools.v)) // (sampler.num_pages * c.page_size)
  pool_text = f"{sampler.num_pages} pages of {c.page_size} " + (
    f"(grpo.pool_tokens={pool})" if pool else f"({rows} rows x {context} tokens)"
  )
  fix_pool = (
    f"fewer rows per sampler device: more devices per host sampler (--config.roles."
    f"sampler_tensor), fewer prompts per host (grpo.prompts_per_step={c.prompts_per_step}), "
    f"fewer rows per append (grpo.append_rows={c.get('append_rows', 0)}), fewer decode slots "
    f"(grpo.decode_slots={c.decode_slots}), a smaller pool than every row's "
    f"budget (grpo.pool_tokens={pool}) or a shorter row budget (grpo.max_total_tokens="
    f"{c.max_total_tokens})"
  )

  def run_rules(fn):
    def lower(compiled):
      with sharding.activation_rules(mesh, rules):
        return fn(compiled)

    return lower

  def table(batch: int, tokens: int):
    width = _pow2(-(-tokens // c.page_size))
    return replicated((batch, width), np.int32)

  def decode_program(impl: str) -> Program:
    sampler = make_sampler(impl)
    stop_table = sampler.stop_table(sampling.stop_strings)
    history = 1 if stop_table is None else int(stop_table.shape[1])
    key = jax.eval_shape(lambda: jax.random.key(0))

    def lower(_):
      inputs = paged_engine.SlotInputs(
        rows=replicated((slots,), np.int32),
        page_table=table(slots, context),
        starts=replicated((slots,), np.int32),
        positions=replicated((slots,), np.int32),
        keys=replicated((slots, *key.shape), key.dtype),
        counts=replicated((slots,), np.int32),
        budgets=replicated((slots,), np.int32),
        history=replicated((slots, history), np.int32),
      )
      return sampler._jit_decode.lower(
        params,
        pools,
        inputs,
        stop_table,
        replicated((), np.bool_),
        sampling_params=sampling,
        steps=sampler.decode_steps,
      )

    # A step reads the weights and, per slot, the keys and values of its `context` tokens.
    name = "paged_decode" if impl == "xla" else f"paged_decode_{impl}"
    return Program(
      name,
      f"{slots} slots x {context} tokens ({rows} rows, {sampler.num_pages} pages of "
      f"{c.page_size}), <= {c.decode_steps} steps a call, T={sampling.temperature}, "
      f"attention {impl}",
      run_rules(lower),
      "decode",
      devices,
      resident,
      read_bytes=device_bytes(params) + slots * context * token_bytes,
      kernel_bytes=slots * context * token_bytes if impl == "pallas" else 0,
      weight_like=frozenset(_gather_sizes((params, pools.k, pools.v), devices)),
      fix=f"--config.roles.sampler_tensor={run.topology.chips_per_host}, fewer decode slots "
      f"(grpo.decode_slots={c.decode_slots}), a smaller KV pool (grpo.pool_tokens={pool}) or a "
      "shorter context",
    )

  programs = [decode_program(impl) for impl in impls]
  if not is_paged:  # --paged_context on a lock-step run: the decode loops only
    return programs

  real_prompt, prompt_len, append_len = _turn_lengths(run, sampler.buckets, append_tokens)
  # Appends go `append_rows or slots` rows a call, padded to a power of two (PagedSampler.append).
  group = lambda n: _pow2(min(n, c.get("append_rows", 0) or slots))
  width = run.model_cfg.text.hidden_size
  images = min(rows, sampler.encode_images)

  def features(batch: int):
    n = batch * run.image_tokens
    return replicated((_pow2(n), width), sampler.cache_dtype)

  def encode(_):
    index = rope.make_vision_index(np.tile(run.grid, (images, 1)), run.model_cfg.vision)
    pixels = replicated((images * run.patches, run.model_cfg.vision.patch_dim), np.float32)
    return sampler._jit_encode.lower(params, pixels, _abstract(index, mesh))

  def append(batch: int, length: int, tokens: int):
    def lower(_):
      view = paged_kv.PageView(
        table(batch, tokens),
        replicated((batch,), np.int32),
        replicated((batch,), np.int32),
      )
      return sampler._jit_append.lower(
        params,
        pools,
        replicated((batch,), np.int32),
        replicated((batch, length), np.int32),
        replicated((3, batch, length), np.int32),
        features(batch),
        view,
      )

    return lower

  children = _pow2(c.group_size - 1)

  def fork(_):
    return sampler._jit_fork.lower(
      pools,
      replicated((children,), np.int32),
      replicated((children,), np.int32),
      replicated((children,), np.int32),
      replicated((children,), np.int32),
    )

  prefill_rows, append_rows = group(prompts), group(rows)
  programs = [
    Program(
      "paged_pools", f"empty KV pools, {pool_text}",
      run_rules(lambda _: sampler.state_program().lower()), "sampler", devices, resident,
      fix=fix_pool,
    ),
    Program(
      "encode", f"{images} canvas images per call ({run.patches} patches each; {rows} a turn)",
      run_rules(encode), "sampler", devices, resident, fix=fix_pool,
    ),
    Program(
      "paged_prefill",
      f"{prefill_rows} prompts x {prompt_len} tokens ({real_prompt} real) into empty "
      f"rows", run_rules(append(prefill_rows, prompt_len, prompt_len)), "sampler", devices,
      resident, fix=fix_pool,
    ),
    Program(
      "paged_fork", f"1 -> {c.group_size - 1} rows (G={c.group_size}): last pages copied",
      run_rules(fork), "sampler", devices, resident, fix=fix_pool,
    ),
    *programs,
    Program(
      "paged_append",
      f"{append_rows} rows x a {append_len}-token turn with an image per row, page tables "
      f"covering {context} tokens", run_rules(append(append_rows, append_len, context)),
      "sampler", devices, resident, fix=fix_pool,
    ),
  ]  # fmt: skip
  return programs + _transfer_programs(run, state, params)


def _state_out(out_shardings: Any) -> Any:
  """A compiled sampler program's output shardings, as a SequenceState of shardings."""
  return out_shardings[0] if isinstance(out_shardings, tuple) else out_shardings


def _transfer_programs(run: Run, state: Any, params: Any) -> list[Program]:
  """The trainer -> sampler weight reshard (`roles.transfer`) when the roles do not share it."""
  if run.placement.colocated:
    return []
  mesh = run.placement.trainer_mesh
  targets = jax.tree.map(
    lambda v: v.replace(v.get_value().sharding),
    params,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  old_copy = device_bytes(params) if run.config.roles.sampler_devices == 0 else 0
  if run.config.roles.sampler_devices > 0:
    return []  # a device-to-device copy into the sampler's own devices, not a compiled program
  # `roles.host_reshard` moves the weights with one `jax.device_put` per leaf (one host: one
  # `device_put` of the tree, the same layout change): each leaf's shards are first reordered onto
  # the per-host layout's device order, then one small program reshards it. Here each distinct
  # leaf's program is compiled on a trainer-shaped mesh in that device order; the leaves run one
  # after another, so the temporaries are the largest leaf's and arguments and outputs add up.
  _, _, outputs = roles.host_reshard(state.params, run.placement, targets)
  spread_mesh = outputs[0].mesh
  relabeled = Mesh(spread_mesh.devices.reshape(mesh.devices.shape), mesh.axis_names)
  distinct: dict[Any, int] = {}
  for leaf, target in zip(jax.tree.leaves(state.params), outputs, strict=True):
    key = (leaf.shape, leaf.dtype, leaf.sharding.spec, target)
    distinct[key] = distinct.get(key, 0) + 1

  def lower(_):
    out = []
    for (shape, dtype, source, target), count in distinct.items():
      fn = jax.jit(lambda x: x, out_shardings=target)
      out.append((fn.lower(_sds(shape, dtype, relabeled, source)), count))
    return out

  return [
    Program(
      "transfer",
      f"trainer ({_mesh_text(mesh)}) -> sampler ({_mesh_text(run.placement.sampler_mesh)}) weights",
      lower,
      "transfer",
      mesh.devices.size,
      resident=device_bytes(state.opt_state) + old_copy,
      fix="a larger --config.roles.sampler_tensor (a smaller copy per device)",
    )
  ]


# ------------------------------------------------------------------------------------------------
# Compiling and reading the results.


@dataclasses.dataclass
class Result:
  """What compiling one program gave (bytes are per device)."""

  name: str
  what: str
  kind: str
  ok: bool = True
  failure: str = ""  # one line when it does not fit or gathers weights in the decode loop
  arguments: int = 0
  arguments_logical: int = 0  # the arguments' own bytes (what memory_plan's exact rows count)
  arguments_padded: int = 0  # the same in the compiler's tiled layouts (= arguments)
  temporaries: int = 0
  outputs: int = 0
  aliased: int = 0
  program_peak: int = 0  # the compiler's peak of the program itself
  resident: int = 0  # other programs' buffers alive meanwhile
  hbm: int = 0
  compile_s: float = 0.0
  flops: float | None = 0.0  # the compiler's FLOPs of one call, loops counted by their trips
  estimated_s: float | None = 0.0  # its estimate of one call (one step for decode), scaled
  compiler_flops: float = 0.0  # as XLA's cost analysis reports them (loop bodies once)
  compiler_s: float = 0.0
  loops: list = dataclasses.field(default_factory=list)  # [trips or None, matmul FLOPs per trip]
  model_flops: float = 0.0  # per device
  mfu: float | None = None  # train and forward: model FLOPs / estimate / chip peak (upper bound)
  bound_s: float | None = None  # decode: HBM-bandwidth bound of one step
  kernel_s: float | None = None  # decode: the kernels' reads at HBM bandwidth (not in estimated_s)
  collectives: dict = dataclasses.field(default_factory=dict)  # opcode -> [count, bytes] per call
  decode_step_collectives: dict = dataclasses.field(default_factory=dict)
  decode_gathers: list = dataclasses.field(default_factory=list)  # weights or cache, per step
  kernels: int = 0  # Pallas (Mosaic) kernel calls in the program's HLO (each loop body once)
  traceback: str = ""  # of a program that does not trace

  @property
  def peak(self) -> int:
    return self.program_peak + self.resident

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"peak": self.peak, "peak_fraction": self.peak / self.hbm}


# The custom call a Pallas TPU kernel lowers to.
TPU_KERNEL_CALL = "tpu_custom_call"
_OOM = re.compile(r"([\d.]+)([KMGT])\)? exceeds available HBM \(([\d.]+)([KMGT])")


def padded_bytes(shape: Sequence[int], dtype: Any, layout: Any) -> int:
  """Bytes of an array in a tiled device layout: its minor dimensions padded to the first tile."""
  dims = [shape[i] for i in layout.major_to_minor]
  tile = layout.tiling[0] if layout.tiling else ()
  dims = [1] * (len(tile) - len(dims)) + dims
  for j, size in enumerate(tile):
    i = len(dims) - len(tile) + j
    dims[i] = -(-dims[i] // size) * size
  return math.prod(dims) * np.dtype(dtype).itemsize


def argument_bytes(lowered: Any, executable: Any) -> tuple[int, int]:
  """(logical, padded) bytes per device of a compiled program's arguments.

  Logical: each argument's shard shape times its item size. Padded: the same in the layouts the
  compiler chose (`input_formats`); TPU tiles pad small minor dimensions (a [1, 8192] int32 shard
  takes 8 x 8192), and the padded sum is what the memory analysis reports. Arguments the program
  never reads (the vision tower's weights in a text-only append) are dropped by jit and not
  counted.
  """
  logical = padded = 0
  infos = jax.tree.leaves(lowered.args_info)
  formats = jax.tree.leaves(executable.input_formats)
  for info, fmt in zip(infos, formats, strict=True):
    if fmt.sharding is None:  # an argument the program does not read: jit drops it
      continue
    shape, dtype = fmt.sharding.shard_shape(info.shape), info.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):  # a PRNG key: uint32 words
      shape, dtype = (*shape, dtype.itemsize // 4), np.uint32
    logical += math.prod(shape) * np.dtype(dtype).itemsize
    padded += padded_bytes(shape, dtype, fmt.layout)
  return logical, padded


def _needed_bytes(message: str) -> int:
  """Bytes the compiler said it needed, from its out-of-memory message (0 if not found)."""
  scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  match = re.search(r"\(([\d.]+)([KMGT])\) exceeds", message)
  return int(float(match.group(1)) * scale[match.group(2)]) if match else 0


def compile_program(program: Program, run: Run, compiled: dict[str, Any]) -> Result:
  """Lowers and compiles one program; the Result says whether it fits and what it costs.

  A program may lower to several executables run one after another (the per-leaf weight
  reshard): their arguments, outputs and costs add up, their temporaries do not.
  """
  result = Result(program.name, program.what, program.kind, resident=program.resident)
  result.hbm = int(run.topology.chip.hbm_gib * GIB)
  start = time.perf_counter()
  try:
    lowered = program.lower(compiled)
  except ValueError as e:  # a shape that does not divide by its mesh axes
    result.ok = False
    result.failure = _failure(program, run, f"cannot be laid out: {cli.one_line(e)}")
    return result
  except Exception as e:  # a program that does not trace is a finding too
    result.ok = False
    error = f"{type(e).__name__}: {cli.one_line(e)}"[:400]
    result.failure = f"FAIL {program.name} on {run.layout()}: does not trace: {error}"
    result.traceback = traceback.format_exc()
    return result
  items = lowered if isinstance(lowered, list) else [(lowered, 1)]
  try:
    executables = [(item.compile(), count) for item, count in items]
  except jax.errors.JaxRuntimeError as e:
    message = cli.one_line(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    result.compile_s = time.perf_counter() - start
    result.program_peak = _needed_bytes(message)
    result.ok = False
    result.failure = _failure(program, run, f"needs {_gib(result.peak)} of {_gib(result.hbm)} HBM")
    return result
  result.compile_s = time.perf_counter() - start
  if len(executables) == 1:
    # Only what later programs read: the output shardings (a 7B executable is large).
    compiled[program.name] = executables[0][0].output_shardings
  summaries = []
  for (item, _), (executable, count) in zip(items, executables, strict=True):
    logical, padded = argument_bytes(item, executable)
    result.arguments_logical += count * logical
    result.arguments_padded += count * padded
    memory = executable.memory_analysis()
    result.arguments += count * memory.argument_size_in_bytes
    result.outputs += count * memory.output_size_in_bytes
    result.aliased += count * memory.alias_size_in_bytes
    result.temporaries = max(result.temporaries, memory.temp_size_in_bytes)
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    result.compiler_flops += count * float(cost.get("flops", 0.0))
    result.compiler_s += count * float(cost.get("optimal_seconds", 0.0))
    text = executable.as_text()
    summaries.append((hlo.summarize(text), count))
    result.kernels += count * text.count(f'custom_call_target="{TPU_KERNEL_CALL}"')
  # What the runtime allocates: the temporaries are one block of this size beside the arguments
  # and outputs (the compiler's own peak_memory_in_bytes, a heap simulation, can be lower).
  result.program_peak = result.arguments + result.temporaries + result.outputs - result.aliased
  _read_summaries(result, summaries, program, run)
  if result.peak > result.hbm:
    result.ok = False
    result.failure = _failure(program, run, f"needs {_gib(result.peak)} of {_gib(result.hbm)} HBM")
  elif result.decode_gathers:
    result.ok = False
    gathers = ", ".join(result.decode_gathers[:3])
    result.failure = _failure(program, run, f"the decode loop all-gathers {gathers} every token")
  return result


def _read_summaries(result: Result, summaries, program: Program, run: Run) -> None:
  """FLOPs and estimate scaled by loop trips, MFU or the bandwidth bound, collectives."""
  chip = run.topology.chip
  decode = program.kind == "decode"
  once = sum(count * s.flops_once for s, count in summaries)
  full = sum(count * s.flops for s, count in summaries)
  # Decode: the loop's trip count is not static, so its body (one token) counts once.
  scale = full / once if once and not decode else 1.0
  result.model_flops = program.model_flops / program.devices
  if result.compiler_flops < 0 or result.compiler_s < 0:
    # libtpu's cost model counts -1 for operations it cannot cost (seen on v6e): the sums mean
    # nothing then, and no estimate (nor MFU) is given.
    result.flops = result.estimated_s = None
  else:
    result.flops = result.compiler_flops * scale
    result.estimated_s = result.compiler_s * scale
  if program.model_flops and result.estimated_s:
    result.mfu = result.model_flops / result.estimated_s / (chip.peak_tflops * 1e12)
  for summary, count in summaries:
    result.loops += [[loop.trips, loop.flops_per_trip] for loop in summary.loops]
    for c in summary.collectives:
      n, nbytes = result.collectives.get(c.opcode, [0, 0])
      result.collectives[c.opcode] = [n + count * c.times, nbytes + count * c.times * c.bytes]
  if not decode or not summaries[0][0].loops:
    return
  summary = summaries[0][0]
  result.bound_s = program.read_bytes / (chip.hbm_gbps * 1e9)
  if program.kernel_bytes:
    result.kernel_s = program.kernel_bytes / (chip.hbm_gbps * 1e9)
  loop = max(summary.loops, key=lambda loop: loop.flops_per_trip)
  scope = set(loop.scope)
  for c in summary.collectives:
    if c.computation not in scope:
      continue
    n, nbytes = result.decode_step_collectives.get(c.opcode, [0, 0])
    result.decode_step_collectives[c.opcode] = [n + 1, nbytes + c.bytes]
    if c.opcode == "all-gather":
      result.decode_gathers += [
        f"{a.dtype}[{','.join(str(d) for d in a.dims)}]"
        for a in c.arrays
        if a.elements in program.weight_like
      ]


def _gib(n: float) -> str:
  return f"{n / GIB:.2f} GiB"


def _failure(program: Program, run: Run, reason: str) -> str:
  """The one-line failure: program, layout, why, and what to try."""
  return f"FAIL {program.name} on {run.layout()}: {reason}; try {program.fix}"


# ------------------------------------------------------------------------------------------------
# Table, JSON, command line.


def format_table(results: Sequence[Result], run: Run) -> str:
  """A fixed-width table of the results (GiB per device, seconds, TFLOP, MFU or decode bound)."""
  chip = run.topology.chip
  name = max([11] + [len(r.name) + 1 for r in results])  # the program column's width
  head = (
    f"{'program':<{name}}{'args':>7}{'temps':>7}{'out':>7}{'alias':>7}{'other':>7}{'peak':>8}"
    f"{'%HBM':>6}{'compile':>9}{'TFLOP':>10}{'est s':>10}  MFU / decode"
  )
  lines = [
    f"compile_check {run.layout()}; {chip.kind}: {chip.hbm_gib} GiB HBM, "
    f"{chip.peak_tflops:g} TFLOP/s bf16, {chip.hbm_gbps:g} GB/s per chip",
    head,
  ]
  for r in results:
    g = lambda n: f"{n / GIB:7.2f}"
    extra = ""
    if r.mfu is not None:
      extra = f"{100 * r.mfu:5.1f}%"
    if r.bound_s is not None:
      step = "n/a" if r.estimated_s is None else f"{1e3 * r.estimated_s:.2f} ms/token"
      if r.kernel_s is not None and r.estimated_s is not None:
        step = f"{1e3 * r.estimated_s:.2f} + {1e3 * r.kernel_s:.2f} ms/token (kernel reads)"
      extra = f"{step} vs {1e3 * r.bound_s:.2f} ms HBM bound"
    if not r.ok and not r.arguments:  # no executable: what stopped it
      if r.program_peak:
        lines.append(f"{r.name:<{name}}{'':>35}{r.peak / GIB:8.2f}{100 * r.peak / r.hbm:5.0f}%"
                     f"{r.compile_s:8.1f}s  does not fit")  # fmt: skip
      else:
        why = "cannot be laid out" if "laid out" in r.failure else "does not trace"
        lines.append(f"{r.name:<{name}}  {why}")
      continue
    lines.append(
      f"{r.name:<{name}}{g(r.arguments)}{g(r.temporaries)}{g(r.outputs)}{g(r.aliased)}{g(r.resident)}"
      f"{r.peak / GIB:8.2f}{100 * r.peak / r.hbm:5.0f}%{r.compile_s:8.1f}s"
      + (
        f"{'n/a':>10}{'n/a':>10}"
        if r.estimated_s is None
        else f"{r.flops / 1e12:10.2f}{r.estimated_s:10.3f}"
      )
      + f"  {extra}"
    )
  lines.append("shapes:")
  lines += [f"  {r.name}: {r.what}" for r in results]
  lines.append(
    "GiB per device; other = buffers other programs keep alive meanwhile (trainer state beside "
    "the rollout, the frozen reference beside the update); est = the compiler's cost model, loops "
    "scaled by their trip counts (n/a: the cost model had no figure for some operations); MFU = "
    "model FLOPs / est / peak: the compiler's model, not a measurement (rough where loops of "
    "unequal trip counts nest); decode: one step."
  )
  if any(r.kernel_s is not None for r in results):
    lines.append(
      "kernel reads: the cost model does not see inside a Pallas kernel; what the step's kernels "
      "read at HBM bandwidth is added to its estimate (their FLOPs are not in TFLOP)."
    )
  failures = [r.failure for r in results if not r.ok]
  lines += [f"compile_check: {f}" for f in failures]
  return "\n".join(lines)


def check(
  run: Run,
  *,
  append_tokens: int = 0,
  paged_context: int = 0,
  only: Sequence[str] = (),
  log=print,
  on_result: Callable[[list[Result]], None] = lambda _: None,
) -> list[Result]:
  """Compiles the run's programs (those named in `only`, or all) and returns their Results.

  `on_result(results so far)` is called after each program (a 7B program takes minutes).
  """
  programs = train_programs(run) + sampler_programs(run, append_tokens)
  programs += paged_programs(run, paged_context, append_tokens)
  unknown = set(only) - {p.name for p in programs}
  if unknown:
    raise ValueError(
      f"--programs: unknown {sorted(unknown)}; this run has {[p.name for p in programs]}"
    )
  compiled: dict[str, Any] = {}
  results = []
  for program in programs:
    if only and program.name not in only:
      continue
    log(f"compile_check: compiling {program.name} ({program.what}) ...")
    results.append(compile_program(program, run, compiled))
    log(f"compile_check: {program.name}: {results[-1].compile_s:.1f} s")
    if results[-1].traceback:
      log(results[-1].traceback)
    on_result(results)
  return results


def _flag_values(argv: Sequence[str]) -> flags.FlagValues:
  """The command line's flags (on their own FlagValues: importing this module defines none)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Run config file, with an optional :preset.",
    flag_values=fv,
    lock_config=True,
    sys_argv=list(argv),  # where its --config.key=value overrides are read from
  )
  flags.DEFINE_string("topology", None, "TPU slice: v5p-64, v6e-8, v5p:2x2x1, ...", flag_values=fv)
  flags.DEFINE_integer("num_slices", 1, "Slices (multi-slice over DCN).", flag_values=fv)
  flags.DEFINE_string("json", "", "Also write the results as JSON to this path.", flag_values=fv)
  flags.DEFINE_list("programs", [], "Only these programs (default: all).", flag_values=fv)
  flags.DEFINE_integer(
    "append_tokens",
    0,
    "Tokens of an appended tool turn (image + feedback); 0: grpo.max_response_tokens.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "paged_context",
    0,
    "Tokens per row of the paged engine's decode programs (compiled for any run when > 0); 0: "
    "grpo.max_total_tokens, and only when grpo.engine=paged.",
    flag_values=fv,
  )
  return fv


def _parse(argv: Sequence[str]) -> flags.FlagValues:
  """Parsed flags; a bad flag or config override exits with one line (status 2)."""
  fv = _flag_values(argv)
  if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
    print(__doc__ + "\n" + fv.get_help())
    sys.exit(0)
  try:
    fv(list(argv))
  except flags.Error as e:
    print(f"compile_check: error: {cli.one_line(e)}", file=sys.stderr)
    sys.exit(2)
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # raised by config overrides
    print(f"compile_check: config error: {cli.one_line(e)}", file=sys.stderr)
    sys.exit(2)
  for name in ("config", "topology"):
    if fv[name].value is None:
      print(f"compile_check: error: --{name} is required", file=sys.stderr)
      sys.exit(2)
  return fv


def main(argv: Sequence[str]) -> int:
  """Compiles, prints the table, writes the JSON; 1 when a program fails, 2 on a bad argument."""
  fv = _parse(argv)
  # The check runs nothing: CPU is the only backend it needs (a TPU VM's chips stay free).
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
  try:
    topology = parse_topology(fv.topology, fv.num_slices)
    with tempfile.TemporaryDirectory(prefix="rrvf_compile_check_") as workdir:
      run = make_run(fv.config, topology, workdir)
      results = check(
        run,
        append_tokens=fv.append_tokens,
        paged_context=fv.paged_context,
        only=fv.programs,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        on_result=lambda results: fv.json and write_json(fv.json, run, results),
      )
  except ValueError as e:
    print(f"compile_check: error: {cli.one_line(e)}", file=sys.stderr)
    return 2
  print(format_table(results, run))
  return 1 if any(not r.ok for r in results) else 0


def write_json(path: str, run: Run, results: Sequence[Result]) -> None:
  """The results as JSON: topology, layout, chip figures, one record per program, failures."""
  report = {
    "topology": run.topology.name,
    "layout": run.layout(),
    "chip": dataclasses.asdict(run.topology.chip),
    "hosts": run.topology.hosts,
    "programs": [r.as_dict() for r in results],
    "failures": [r.failure for r in results if not r.ok],
  }
  with open(path, "w") as f:
    json.dump(report, f, indent=1)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
