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

  c.roles = ml_collections.ConfigDict()
  c.roles.sampler_devices = 0  # Per-host devices used only by the sampler (0: share the trainer's).
  c.roles.sampler_tensor = 1  # Tensor-parallel size of each host's sampler mesh.

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
  c.sft.max_length = 8192  # Padded sequence length; longer examples are an error.
  c.sft.conversations = True  # Train whole conversations when the data has them (else answers).
  c.sft.answer_steps = 0  # First steps on answer-only replies (a curriculum: code, then the loop).
  c.sft.answer_max_length = 2048  # Padded length of the answer-only steps.
  c.sft.max_images = 5  # Images per example (target + renders); 0: one image of any size.
  c.sft.learning_rate = 1e-5  # Peak learning rate.
  c.sft.schedule = "cosine"  # Learning-rate schedule after warm-up: constant or cosine.
  c.sft.warmup_steps = 25  # Linear warm-up steps from 0.
  c.sft.end_value = 0.0  # Cosine schedule's final learning rate.
  c.sft.weight_decay = 0.0  # AdamW decoupled weight decay (matrices only).
  c.sft.adam_eps = 1e-8  # AdamW epsilon (larger: elements with tiny gradients move less).
  c.sft.max_grad_norm = 1.0  # Global-norm gradient clipping (0: off).
  c.sft.remat = "dots"  # Rematerialisation: none, dots (keep matmul outputs) or full.
  c.sft.chunk_size = 512  # Sequence chunk of the LM head + log-softmax (bounds [B, T, V] memory).
  c.sft.log_every = 10  # Steps between metric writes and progress lines.

  c.grpo = ml_collections.ConfigDict()
  c.grpo.steps = 150  # RRVF GRPO steps, one rollout batch each (0: skip the stage).
  c.grpo.prompts_per_step = 32  # Target images per step.
  c.grpo.group_size = 8  # Episodes per target (G).
  c.grpo.max_turns = 5  # Assistant turns per episode (a forced answer comes on top).
  c.grpo.max_new_tokens = 4096  # Tokens per assistant turn (chart code; the web preset: 6144).
  c.grpo.max_response_tokens = 1024  # Tokens per tool response (image + comments; text is cut).
  # Tokens per trajectory: all max_turns - 1 feedback rounds fit in the worst case (a test checks;
  # 29,552 for charts at 672x672). The method notes' ~16k holds 5 turns only if they are short.
  c.grpo.max_total_tokens = 30720
  c.grpo.on_budget = "force_answer"  # At a limit: force_answer (ask for the answer) or fail.
  # Rollout engine: paged (every row its own KV pages and budget, continuous batching through
  # decode slots; rollout/paged.py) or lock_step (one shared cache, the batch decodes turn by turn).
  c.grpo.engine = "paged"
  c.grpo.page_size = 16  # paged: tokens per KV page.
  # paged: decode attention, xla (pure JAX) or pallas (JAX's TPU paged-attention kernel; heads of a
  # multiple of 128 dims, a bfloat16 model). Appended turns always use xla.
  c.grpo.paged_attention = "xla"
  c.grpo.decode_slots = 0  # paged: rows decoded together at most (0: every row of the rollout).
  # paged: rows per call of an appended turn (prompt or tool response) at most (0: decode_slots);
  # bounds the append's attention scores over the rows' pages.
  c.grpo.append_rows = 0
  # paged: the host sampler's KV pool in tokens (0: every row's max_total_tokens, never short). A
  # smaller pool makes rows wait for pages; a pool that every waiting row fills is an error (no
  # preemption), so keep it well above a few rows' worst case.
  c.grpo.pool_tokens = 0
  c.grpo.decode_steps = 64  # paged: decode steps per call at most (a finished row leaves sooner).
  c.grpo.temperature = 1.0  # Sampling temperature of the episodes (the loss uses the same).
  c.grpo.top_p = 1.0  # Nucleus sampling mass (1.0: off).
  c.grpo.algorithm = "grpo"  # Loss preset of rrvf_jax.rl.algorithms: grpo, dr_grpo, dapo, gspo.
  c.grpo.clip_low = 0.2  # Ratio clipped below at 1 - clip_low.
  c.grpo.clip_high = 0.2  # Ratio clipped above at 1 + clip_high (0.28: DAPO clip-higher).
  c.grpo.loss_agg = ""  # token-mean, seq-mean or seq-sum-norm; "": the preset's.
  c.grpo.kl_coef = 0.0  # KL-to-reference coefficient (0: no reference model is kept).
  c.grpo.learning_rate = 1e-6  # Peak learning rate.
  c.grpo.schedule = "constant"  # Learning-rate schedule after warm-up: constant or cosine.
  c.grpo.warmup_steps = 0  # Linear warm-up optimiser steps.
  c.grpo.end_value = 0.0  # Cosine schedule's final learning rate.
  c.grpo.weight_decay = 0.0  # AdamW decoupled weight decay (matrices only).
  c.grpo.adam_eps = 1e-8  # AdamW epsilon (larger: elements with tiny gradients move less).
  c.grpo.max_grad_norm = 1.0  # Global-norm gradient clipping (0: off).
  c.grpo.epochs = 1  # Passes over each rollout batch (> 1: old-policy ratios differ from 1).
  c.grpo.mini_batches = 1  # Optimiser steps per pass (the rollout batch split in rows).
  c.grpo.micro_batches = 8  # Gradient-accumulation micro-batches per mini-batch.
  # Rematerialisation: none, dots or full. At 30,720-token trajectories (one row per chip) only
  # full fits: 7B on v5p-64 needs 123 GiB per chip with dots, 30 GiB with full (compile_check).
  c.grpo.remat = "full"
  c.grpo.chunk_size = 512  # Sequence chunk of the LM head + log-softmax.
  c.grpo.log_every = 1  # Steps between metric writes and progress lines.
  c.grpo.images_every = 10  # Steps between target/render image pairs (0: never).
  c.grpo.eval_examples = 64  # Held-out targets played greedily before and after GRPO (0: skip).

  c.reward = ml_collections.ConfigDict()
  c.reward.w_vision = 1.0  # Weight of R_vision (the judge's score of the final render).
  c.reward.w_format = 0.2  # Weight of R_format (-1 for malformed output or non-executable code).
  c.reward.w_tool = 0.2  # Weight of R_tool (successful tool use, when R_vision is high enough).
  c.reward.tool_threshold = 0.5  # R_tool only when R_vision is above this.

  c.judge = ml_collections.ConfigDict()
  c.judge.name = "openai"  # openai (an MLLM endpoint, the paper's) or local (image similarity).
  c.judge.base_url = ""  # openai judge: the OpenAI-compatible endpoint, e.g. http://host:8000/v1.
  c.judge.model = ""  # openai judge: the served model name, e.g. Qwen/Qwen2.5-VL-72B-Instruct.
  # openai judge down: wait (retry up to max_wait_s, then stop the run) or drop_group (leave the
  # groups it could not judge out of the update, counted). Never a fallback judge: one group's
  # rewards must come from one judge.
  c.judge.on_unavailable = "wait"
  c.judge.max_wait_s = 600.0  # openai judge: longest wait for the service under 'wait'.

  c.eval = ml_collections.ConfigDict()
  c.eval.enabled = True  # Run the benchmark evaluation stage at the end of the run.
  c.eval.benchmark = "chartmimic"  # chartmimic, plot2code, websight ("": the data.name dataset).
  c.eval.split = ""  # "": direct_600 for ChartMimic, test for the others, else data.eval_split.
  c.eval.max_items = 0  # Evaluate only the first N items (0: all).
  c.eval.batch_size = 16  # Items per sampler call (divides the mesh's batch axes).
  c.eval.max_new_tokens = 1024  # Tokens per assistant turn.
  c.eval.tool_loop = False  # Greedy RRVF episodes (grpo.max_turns etc.) instead of one turn.

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
  # Small canvases keep sequences short (36 tokens an image); 72 dpi keeps the figure 2.33 in.
  c.image.width = 168
  c.image.height = 168
  c.image.dpi = 72
  c.data.complexity = "simple"
  c.data.num_train = 256
  c.data.num_test = 32
  c.sft.steps = 450
  c.sft.batch_size = 8
  c.sft.micro_batches = 1
  c.sft.max_length = 960
  c.sft.learning_rate = 3e-3
  c.sft.max_images = 3  # The target and up to two renders (the demo's conversations).
  c.sft.warmup_steps = 20
  c.sft.end_value = 3e-4
  c.sft.remat = "none"
  c.sft.log_every = 10
  c.checkpoint.save_every = 50
  c.answer_check.num_examples = 0  # the held-out episodes before/after GRPO say the same
  c.answer_check.batch_size = 8
  c.answer_check.max_new_tokens = 160
  # A short cold start leaves room for RL; GRPO at temperature 0.7 then has rewards that differ
  # within groups.
  c.grpo.steps = 15
  c.grpo.prompts_per_step = 4
  c.grpo.group_size = 4
  c.grpo.max_turns = 3
  c.grpo.max_new_tokens = 160
  c.grpo.max_response_tokens = 128
  c.grpo.max_total_tokens = 1280
  c.grpo.learning_rate = 1e-4
  c.grpo.temperature = 0.7
  c.grpo.epochs = 2
  c.grpo.micro_batches = 1
  c.grpo.remat = "none"
  c.grpo.images_every = 10
  c.grpo.eval_examples = 32
  c.eval.benchmark = ""  # the held-out synthetic charts, scored with ChartMimic's metrics
  c.eval.max_items = 16
  c.eval.batch_size = 8
  c.eval.max_new_tokens = 160
  c.eval.tool_loop = True  # the demo policy is trained for the loop, not the benchmark's prompt
  c.judge.name = "local"
