"""The cold-start SFT stage: data -> jitted steps -> metrics and checkpoints, resumable.

Re-running the same command resumes from the stage's latest checkpoint (parameters, optimiser,
step, RNG and the data iterator's position), so the metrics from there on equal an uninterrupted
run's. SIGTERM finishes the current step, saves, and stops the run (`Preempted`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from rrvf_jax import checkpoint, metrics, sharding
from rrvf_jax import data as data_lib
from rrvf_jax.models.qwen_vl.config import ModelConfig
from rrvf_jax.processing import image, tokens
from rrvf_jax.train import batch as batch_lib
from rrvf_jax.train import optim, sft, step
from rrvf_jax.train import state as state_lib

# Keys that may change between attempts of a run without invalidating SFT checkpoints: logging,
# paths, and the later stages' sections.
RESUMABLE_KEYS = (
  "answer_check",
  "checkpoint",
  "sft.log_every",
  "data.data_dir",
  "data.manual_dir",
  "grpo",
  "reward",
  "judge",
  "eval",
)


class Preempted(RuntimeError):
  """The run was asked to stop (SIGTERM) and saved a checkpoint first."""

  def __init__(self, stage: str, step_: int):
    super().__init__(
      f"{stage} stopped by SIGTERM after step {step_}; its checkpoint is saved: re-run the same "
      "command to resume"
    )


@dataclasses.dataclass(frozen=True)
class Stage:
  """What a training stage needs from the pipeline."""

  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: tokens.Tokenizer
  model_config: ModelConfig
  make_model: Callable[[nnx.Rngs], nnx.Module]  # the policy with fresh weights
  initial_model: Callable[[], nnx.Module | None]  # pretrained weights to start from, or None
  mesh: Mesh
  rules: sharding.Rules
  proc_cfg: image.ImageProcessorConfig
  instruction: str
  system_prompt: str | None
  tools: tuple[dict[str, Any], ...] | None = None  # the render tool's schema in the system prompt
  sampler_mesh: Mesh | None = None  # this host's sampler mesh (None: the trainer's `mesh`)
  # The episodes' sampler cache length (`components.episode_budget`; None: grpo.max_total_tokens).
  cache_length: int | None = None


def make_optimizer(c: ml_collections.ConfigDict):
  """(AdamW with clipping, learning-rate schedule) from the `sft` section."""
  return optim.make_optimizer(
    c.learning_rate,
    schedule=c.schedule,
    warmup_steps=c.warmup_steps,
    total_steps=c.steps,
    end_value=c.end_value,
    weight_decay=c.weight_decay,
    eps=c.adam_eps,
    max_grad_norm=c.max_grad_norm or None,
  )


def make_step(stage: Stage, graphdef, tx, schedule):
  """The jitted SFT train step of the `sft` section (micro-batches, remat) on the stage's mesh."""
  c = stage.config.sft
  return step.make_train_step(
    graphdef,
    functools.partial(sft.sft_loss, chunk_size=c.chunk_size),
    tx,
    micro_batches=c.micro_batches,
    remat=False if c.remat == "none" else c.remat,
    mesh=stage.mesh,
    rules=stage.rules,
    schedule=schedule,
  )


def open_stage(stage: Stage, name: str, source, batch_size: int, *, seed: int, resumable_keys):
  """(WORKDIR/name, this host's batch iterator, the stage's checkpointer) of a training stage."""
  iterator = data_lib.BatchIterator(
    source,
    batch_size,
    seed=seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  stage_dir = os.path.join(stage.workdir, name)
  ckpt = checkpoint.Checkpointer(
    os.path.join(stage_dir, "checkpoints"),
    save_every=stage.config.checkpoint.save_every,
    keep=stage.config.checkpoint.keep,
    config=stage.config,
    fingerprint_ignore=resumable_keys,
  )
  return stage_dir, iterator, ckpt


def decoded_examples(
  raw: Sequence[Mapping[str, Any]], *, conversations: bool = False
) -> list[dict[str, Any]]:
  """Dataset records with the PNGs decoded (a corrupt image raises a ValueError naming it).

  With `conversations`, a record's `conversation` (JSON) and `turn_images` come along decoded.
  """
  out = []
  for r in raw:
    image = data_lib.decode_image(r["image"], r["id"])
    example = {"id": r["id"], "image": image, "code": r["code"]}
    if conversations and r.get("conversation"):
      example["conversation"] = json.loads(r["conversation"])
      example["turn_images"] = [
        data_lib.decode_image(png, f"{r['id']} (turn image {k})")
        for k, png in enumerate(r.get("turn_images", ()))
      ]
    out.append(example)
  return out


def run(stage: Stage, source: data_lib.ExampleSource) -> nnx.Module:
  """Trains to `sft.steps` (resuming from a checkpoint if there is one); returns the policy."""
  c = stage.config.sft
  tx, schedule = make_optimizer(c)
  stage_dir, iterator, ckpt = open_stage(
    stage, "sft", source, c.batch_size, seed=stage.config.seed, resumable_keys=RESUMABLE_KEYS
  )
  try:
    graphdef, state, start = _initial_state(stage, tx, ckpt, iterator)
    train_step = make_step(stage, graphdef, tx, schedule)
    state = _train(stage, stage_dir, ckpt, iterator, train_step, state, start)
  finally:
    ckpt.close()  # waits for an asynchronous save in flight
  return state_lib.merge_model(graphdef, state)


def _initial_state(stage: Stage, tx, ckpt: checkpoint.Checkpointer, iterator):
  """(graphdef, state, first step): restored from the latest checkpoint, or freshly made."""
  seed = stage.config.seed
  graphdef, abstract = state_lib.abstract_train_state(
    stage.make_model, tx, mesh=stage.mesh, rules=stage.rules, seed=seed
  )
  restored = ckpt.restore_latest(abstract)
  if restored is not None:
    iterator.set_state(restored.metadata["data"])
    logging.info("sft: resuming from the checkpoint of step %d", restored.step)
    return graphdef, restored.state, restored.step
  model = stage.initial_model()
  if model is None:
    return (
      *state_lib.init_train_state(
        stage.make_model, tx, mesh=stage.mesh, rules=stage.rules, seed=seed
      ),
      0,
    )
  return (
    *state_lib.train_state_from_model(model, tx, mesh=stage.mesh, rules=stage.rules, seed=seed),
    0,
  )


def _train(stage: Stage, stage_dir: str, ckpt, iterator, train_step, state, start: int):
  """The step loop: batches, updates, NaN guard, metrics, checkpoints, SIGTERM."""
  c = stage.config.sft
  common = functools.partial(
    sft.make_sft_batch,
    stage.tokenizer,
    stage.model_config,
    image_processor_cfg=stage.proc_cfg,
    system_prompt=stage.system_prompt,
    instruction=stage.instruction,
    tools=stage.tools,
    micro_batches=c.micro_batches,
    hosts=jax.process_count(),
    max_response_tokens=stage.config.grpo.max_response_tokens,
  )
  # A curriculum: the first `answer_steps` learn to write the code (answer-only replies, short
  # sequences), the rest the whole loop. The step decides the phase, so a resume keeps it.
  answers = functools.partial(
    common, max_length=c.answer_max_length, max_images=min(c.max_images, 1), use_conversation=False
  )
  whole = functools.partial(
    common, max_length=c.max_length, max_images=c.max_images, use_conversation=c.conversations
  )
  progress = metrics.ProgressLogger(c.steps, c.log_every, keys=("loss", "grad_norm", "lr"))
  progress.start(start)
  timer = metrics.StageTimer()
  stop = checkpoint.install_sigterm_handler()
  with metrics.MetricWriter(stage_dir, resume_step=start or None) as writer:
    try:
      for i in range(start, c.steps):
        with timer("data"):
          make_batch = answers if i < c.answer_steps else whole
          batch = make_batch(decoded_examples(next(iterator), conversations=c.conversations))
          batch = batch_lib.host_batch_to_global(
            batch, stage.mesh, stage.rules, micro_batches=c.micro_batches
          )
        with timer("update"):
          state, scalars = train_step(state, batch)
          scalars = jax.device_get(scalars)
        done = i + 1
        metrics.check_finite(done, loss=scalars["loss"])
        if done % c.log_every == 0 or done == c.steps:
          writer.write_scalars(done, {f"sft/{k}": v for k, v in scalars.items()} | timer.scalars())
          progress.update(done, scalars)
        last = done == c.steps
        stopping = stop.should_stop(done)  # a collective: every host agrees
        ckpt.save(done, state, {"data": iterator.get_state()}, force=stopping or last)
        if stopping and not last:
          raise Preempted("sft", done)
    finally:
      stop.uninstall()
  return state
