"""Config keys shared by every task, each with a one-line comment, and the demo overrides."""

import ml_collections


def parse_preset(arg: str | None, known: tuple[str, ...]) -> str:
  """The preset named by the `:arg` of `--config=file.py:arg`; errors list the known presets."""
  preset = arg or known[0]
  if preset not in known:
    raise ValueError(f"unknown config preset {preset!r}; known presets: {', '.join(known)}")
  return preset


def base_config() -> ml_collections.ConfigDict:
  """The paper-scale defaults (shared/DESIGN.md §4; SFT sizes are ours: the paper is silent)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seed of every random stream in the run (init, data order, sampling).
  c.task = "chart"  # Which environment: chart (matplotlib) or web (HTML).

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint_dir = ""  # Local HF checkpoint dir (config, safetensors, tokenizer).
  c.model.preset = "qwen2.5-vl-7b"  # Preset (random weights) used when checkpoint_dir is "".
  c.model.dtype = "bfloat16"  # Parameter and compute dtype: float32 or bfloat16.
  c.model.tokenizer_dir = ""  # Tokenizer dir; "" means checkpoint_dir (or a tiny one for presets).

  c.image = ml_collections.ConfigDict()
  c.image.width = 672  # Target/render canvas width in pixels (multiple of 28: no resampling).
  c.image.height = 672  # Target/render canvas height in pixels (multiple of 28).
  c.image.dpi = 96  # Chart canvas dots per inch (targets and policy renders alike).
  c.image.min_pixels = 3136  # Image processor lower bound on pixels (hub value).
  c.image.max_pixels = 12845056  # Image processor upper bound on pixels (hub value).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # Data-parallel mesh axis size (-1: all remaining devices).
  c.mesh.fsdp = -1  # Fully-sharded data-parallel axis size (-1: all remaining devices).
  c.mesh.tensor = 1  # Tensor-parallel axis size (heads, MLP, vocabulary).
  c.mesh.rules = "fsdp_tp"  # Logical-axis rules preset of rrvf_jax.sharding (fsdp_tp, replicated).

  c.data = ml_collections.ConfigDict()
  c.data.name = "rrvf_coldstart"  # Dataset: synthetic_charts, synthetic_web, rrvf_coldstart, ...
  c.data.data_dir = ""  # Where built datasets live; "" means WORKDIR/data.
  c.data.manual_dir = ""  # Downloaded files of manual datasets; "": DATA_DIR/downloads/manual.
  c.data.train_split = "train"  # Split trained on.
  c.data.eval_split = "test"  # Held-out split of the answer check.
  c.data.complexity = "full"  # Synthetic datasets only: simple (short programs) or full.
  c.data.num_train = 2048  # Synthetic datasets only: training examples generated.
  c.data.num_test = 64  # Synthetic datasets only: held-out examples generated.

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 500  # Cold-start SFT optimiser steps (0: skip the stage).
  c.sft.batch_size = 64  # Global examples per step.
  c.sft.micro_batches = 4  # Gradient-accumulation micro-batches per step (divides batch_size).
  c.sft.max_length = 2048  # Padded sequence length; longer examples are an error.
  c.sft.learning_rate = 1e-5  # Peak learning rate.
  c.sft.schedule = "cosine"  # Learning-rate schedule after warm-up: constant or cosine.
  c.sft.warmup_steps = 25  # Linear warm-up steps from 0.
  c.sft.end_value = 0.0  # Cosine schedule's final learning rate.
  c.sft.weight_decay = 0.0  # AdamW decoupled weight decay (matrices only).
  c.sft.max_grad_norm = 1.0  # Global-norm gradient clipping (0: off).
  c.sft.remat = "dots"  # Rematerialisation: none, dots (keep matmul outputs) or full.
  c.sft.chunk_size = 512  # Sequence chunk of the LM head + log-softmax (bounds [B, T, V] memory).
  c.sft.log_every = 10  # Steps between metric writes and progress lines.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.save_every = 100  # Steps between (asynchronous) checkpoints.
  c.checkpoint.keep = 3  # Checkpoints kept per stage.
  c.checkpoint.export_hf = True  # Write the final policy as an HF checkpoint to WORKDIR/export.

  c.answer_check = ml_collections.ConfigDict()
  c.answer_check.num_examples = 64  # Held-out examples answered greedily after training (0: skip).
  c.answer_check.batch_size = 16  # Prompts per sampler call.
  c.answer_check.max_new_tokens = 1024  # Token budget of an answer.
  return c


def apply_demo(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config to the tiny CPU demo (minutes on 2 cores, nothing downloaded)."""
  c.model.preset = "tiny"
  c.model.dtype = "float32"
  c.image.width = 224
  c.image.height = 224
  c.data.complexity = "simple"
  c.data.num_train = 256
  c.data.num_test = 16
  c.sft.steps = 600
  c.sft.batch_size = 8
  c.sft.micro_batches = 1
  c.sft.max_length = 256
  c.sft.learning_rate = 3e-3
  c.sft.warmup_steps = 20
  c.sft.end_value = 3e-4
  c.sft.remat = "none"
  c.sft.log_every = 10
  c.checkpoint.save_every = 50
  c.answer_check.num_examples = 16
  c.answer_check.batch_size = 8
  c.answer_check.max_new_tokens = 96
