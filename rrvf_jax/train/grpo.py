"""The RRVF GRPO stage: multi-turn visual-feedback episodes -> rewards -> GRPO-family updates.

Each step samples `grpo.prompts_per_step` targets, plays `grpo.group_size` episodes per target with
the KV-cache sampler (render tool, judge feedback; `rollout.episode`), turns the rewards into group
advantages and runs `grpo.epochs` x `grpo.mini_batches` optimiser steps on the token-exact
trajectories with the loss chosen by `grpo.algorithm` (`rl.algorithms`). Trajectories are trained
as the sampler produced them: the loss mask is 1 only on sampled tokens, and the old log-probs are
the sampler's. Checkpoints, metrics, SIGTERM and resume work as in the SFT stage.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from rrvf_jax import checkpoint, env, metrics, roles
from rrvf_jax.models.qwen_vl.config import ModelConfig
from rrvf_jax.models.qwen_vl.model import ModelInputs
from rrvf_jax.processing import tokens
from rrvf_jax.rl import algorithms, dynamic_sampling
from rrvf_jax.rollout import batch as rollout_batch
from rrvf_jax.rollout import episode, paged, records, sampling
from rrvf_jax.rollout import sampler as sampler_lib
from rrvf_jax.train import batch as batch_lib
from rrvf_jax.train import optim, sft_loop, step
from rrvf_jax.train import state as state_lib
from rrvf_jax.train.logprobs import token_logprobs

# Keys that may change between attempts without invalidating GRPO checkpoints.
RESUMABLE_KEYS = (
  "answer_check",
  "checkpoint",
  "sft.log_every",
  "data.data_dir",
  "data.manual_dir",
  "grpo.log_every",
  "grpo.images_every",
  "grpo.eval_examples",
  "eval",
)


# Padded lengths of update batches: finer than the sampler's powers of two, because attention
# cost grows with the square of the length and multi-turn trajectories often land just above one.
TRAIN_BUCKETS = (
  256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768,
)  # fmt: skip


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GRPOBatch:
  """Padded trajectories for the policy loss (position t predicts token t + 1).

  Attributes:
    inputs: ids, attention mask and M-RoPE positions `[B, L]`; `pixel_values` holds every image
      slot `[N, P, D]` (N = rows x images per row: row b's j-th image is slot `b * N / B + j`,
      unused slots are zeros) and `vision_index` the index of ONE image: all images share the
      canvas size, so they are encoded as one batch of images (`encode_canvas_images`). Slots
      belong to rows, so a batch splits (and shards, and is assembled host by host) along rows
      like every other field, and each device encodes its own rows' images.
    targets: `[B, L]` the next token at each position.
    loss_mask: `[B, L]` float32, 1 where the target is a token the policy sampled.
    old_logprobs: `[B, L]` float32, the sampler's log-probs of those targets.
    advantages: `[B]` float32.
    ref_logprobs: `[B, L]` reference log-probs (only when the KL coefficient is positive).
  """

  inputs: ModelInputs
  targets: Any
  loss_mask: Any
  old_logprobs: Any
  advantages: Any
  ref_logprobs: Any = None


def make_grpo_batch(
  cfg: ModelConfig,
  trajectories: Sequence[records.Trajectory],
  advantages: np.ndarray,
  *,
  length: int,
  images_per_row: int,
  pad_id: int,
  loss_mask_rows: np.ndarray | None = None,
) -> GRPOBatch:
  """Host NumPy batch of `trajectories` right-padded to `length` tokens.

  `loss_mask_rows` `[B]` (optional) zeroes whole rows (overlong filtering, filler groups).
  """
  ids, mask, targets, loss_mask, old = rollout_batch.token_arrays(trajectories, length, pad_id)
  if loss_mask_rows is not None:
    loss_mask *= np.asarray(loss_mask_rows, np.float32)[:, None]
  for b, t in enumerate(trajectories):
    if len(t.images) > images_per_row:
      raise ValueError(f"trajectory {b} shows {len(t.images)} images, more than {images_per_row}")
  try:
    inputs = batch_lib.slot_inputs(cfg, ids, mask, [t.images for t in trajectories], images_per_row)
  except ValueError as e:
    raise ValueError(f"all images of a GRPO batch must share one canvas: {e}") from None
  return GRPOBatch(inputs, targets, loss_mask, old, np.asarray(advantages, np.float32))


@dataclasses.dataclass(frozen=True)
class _BannedHead:
  """The model's LM head with banned tokens at -inf, as the sampler draws them."""

  model: Any
  banned_token_ids: tuple[int, ...]

  def logits(self, hidden):
    return sampling.ban(self.model.logits(hidden), self.banned_token_ids)


def policy_logprobs(
  model,
  batch: GRPOBatch,
  *,
  temperature: float,
  chunk_size: int,
  banned_token_ids: tuple[int, ...] = (),
  with_entropy: bool = False,
):
  """Per-position log-probs of the targets `[B, L]` (and entropies) under the tempered policy."""
  hidden = batch_lib.row_slot_hidden_states(model, batch.inputs)
  if temperature > 0:
    # The LM head is linear without bias: logits / T == head(hidden / T).
    hidden = hidden / temperature
  head = _BannedHead(model, banned_token_ids) if banned_token_ids else model
  return token_logprobs(
    head, hidden, batch.targets, chunk_size=chunk_size, with_entropy=with_entropy
  )


def grpo_loss(
  model,
  batch: GRPOBatch,
  *,
  policy_loss,
  temperature: float,
  chunk_size: int,
  banned_token_ids: tuple[int, ...] = (),
):
  """(loss sum, weight, aux): the configured GRPO-family loss on one (micro-)batch."""
  logp, entropy = policy_logprobs(
    model,
    batch,
    temperature=temperature,
    chunk_size=chunk_size,
    banned_token_ids=banned_token_ids,
    with_entropy=True,
  )
  return policy_loss(
    logp,
    batch.old_logprobs,
    batch.advantages,
    batch.loss_mask,
    ref_logprobs=batch.ref_logprobs,
    entropy=entropy,
  )


# ------------------------------------------------------------------------------------------------
# The stage.


@dataclasses.dataclass(frozen=True)
class Environment:
  """Host-side pieces of an episode: the renderer, the judge, prompts and the reward rules."""

  render_submit: episode.RenderSubmit
  judge: env.Judge
  reward_config: env.RewardConfig


def make_optimizer(c: ml_collections.ConfigDict):
  """(AdamW with clipping, schedule) from the `grpo` section; one step per mini-batch."""
  return optim.make_optimizer(
    c.learning_rate,
    schedule=c.schedule,
    warmup_steps=c.warmup_steps,
    total_steps=c.steps * c.epochs * c.mini_batches,
    end_value=c.end_value,
    weight_decay=c.weight_decay,
    eps=c.adam_eps,
    max_grad_norm=c.max_grad_norm or None,
  )


def rl_config(c: ml_collections.ConfigDict) -> algorithms.RLConfig:
  """The algorithm preset `grpo.algorithm` with the section's overrides."""
  overrides = {
    "clip_low": c.clip_low,
    "clip_high": c.clip_high,
    "kl_coef": c.kl_coef,
    "max_length": c.max_new_tokens * (c.max_turns + 1),
  }
  if c.loss_agg:
    overrides["loss_agg"] = c.loss_agg
  if c.algorithm == "dapo":
    overrides["overlong_buffer"] = max(1, c.max_new_tokens // 4)
  return algorithms.get_rl_config(c.algorithm, **overrides)


def banned_token_ids(tok: tokens.Tokenizer) -> tuple[int, ...]:
  """Vision placeholders the policy must not write: no image stands behind a sampled one."""
  s = tokens.special_token_ids(tok)
  return (s.image_pad, s.video_pad, s.vision_start, s.vision_end)


def sampling_params(stage: sft_loop.Stage, *, greedy: bool = False):
  """Per-turn sampling of the episodes (greedy for held-out evaluation)."""
  c = stage.config.grpo
  params = episode.episode_sampling_params(
    stage.tokenizer,
    max_new_tokens=c.max_new_tokens,
    temperature=0.0 if greedy else c.temperature,
    top_p=1.0 if greedy else c.top_p,
  )
  return dataclasses.replace(params, banned_token_ids=banned_token_ids(stage.tokenizer))


def play(
  stage,
  sampler,
  environment,
  images,
  *,
  group_size,
  params,
  key,
  first_row: int = 0,
  score_drafts: bool = False,
) -> records.EpisodeBatch:
  """Episodes on target images with the stage's prompts and limits (row ids from `first_row`)."""
  c = stage.config.grpo
  drop = stage.config.judge.get("on_unavailable", "wait") == "drop_group"
  return episode.run_episodes(
    sampler,
    images,
    group_size=group_size,
    task=stage.config.task,
    render_submit=environment.render_submit,
    judge=environment.judge,
    sampling=params,
    key=key,
    max_turns=c.max_turns,
    max_total_tokens=c.max_total_tokens,
    on_budget=c.on_budget,
    instruction=stage.instruction,
    system_prompt=stage.system_prompt,
    proc_cfg=stage.proc_cfg,
    reward_config=environment.reward_config,
    max_response_tokens=c.max_response_tokens,
    score_drafts=score_drafts,
    judge_failure="drop" if drop else "raise",
    first_row=first_row,
  )


def to_sampler_mesh(stage: sft_loop.Stage, params):
  """The trainer's `params` placed on this host's sampler mesh (no copy when colocated)."""
  placement = roles.Roles(stage.mesh, stage.sampler_mesh or stage.mesh)
  shardings = roles.sampler_shardings(params, placement.sampler_mesh, stage.rules)
  return roles.transfer(params, placement, shardings)


def make_sampler(stage: sft_loop.Stage, graphdef, params, *, cache_length: int | None = None):
  """(sampler on this host's sampler mesh, `update(params)` that gives it the trainer's weights).

  `cache_length` None: the stage's (`components.episode_budget`), else `grpo.max_total_tokens`.
  """
  c = stage.config.grpo
  model = nnx.merge(graphdef, to_sampler_mesh(stage, params))
  placement = {"mesh": stage.sampler_mesh or stage.mesh, "rules": stage.rules}
  if c.get("engine", "lock_step") == "paged":
    # Every row's pages hold its own budget (max_total_tokens; no bucket padding to reserve), or
    # the rows share a pool of grpo.pool_tokens and wait for pages when it is full.
    pool = c.get("pool_tokens", 0)
    size = {"row_tokens": c.max_total_tokens}
    if pool:
      size = {"num_pages": -(-pool // c.page_size) + 1}
    sampler = paged.PagedSampler(
      model,
      stage.tokenizer,
      **size,
      page_size=c.page_size,
      decode_slots=c.decode_slots or None,
      decode_steps=c.decode_steps,
      append_rows=c.get("append_rows", 0) or None,
      attention_impl=c.get("paged_attention", "xla"),
      **placement,
    )
  else:
    cache_length = cache_length or stage.cache_length or c.max_total_tokens
    sampler = sampler_lib.Sampler(model, stage.tokenizer, cache_length=cache_length, **placement)
  return sampler, lambda new_params: sampler.set_params(to_sampler_mesh(stage, new_params))


def mean_over_hosts(values: dict[str, float]) -> dict[str, float]:
  """Each value averaged over the hosts (every host passes the same keys; equal-sized shares)."""
  if jax.process_count() == 1:
    return values
  keys = sorted(values)
  gathered = multihost_utils.process_allgather(np.asarray([values[k] for k in keys], np.float64))
  return dict(zip(keys, np.asarray(gathered).reshape(-1, len(keys)).mean(0).tolist(), strict=True))


def max_over_hosts(value: int) -> int:
  """The largest of the hosts' `value`s (shapes every host must agree on)."""
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def episode_summary(trajectories: Sequence[records.Trajectory]) -> dict[str, float]:
  """Means over episodes: reward parts, final exec rate, turns, tool calls, policy tokens.

  `r_vision_first` (the first draft's R_vision; see `Trajectory.first_draft_score`) is there when
  the episodes were played with `score_drafts`.
  """
  n = max(len(trajectories), 1)

  def mean(fn) -> float:
    return float(sum(fn(t) for t in trajectories) / n)

  first = [t.first_draft_score for t in trajectories]
  extra = {}
  if trajectories and all(f is not None for f in first):
    extra["r_vision_first"] = float(sum(first) / n)
  return extra | {
    "reward": mean(lambda t: t.reward.total),
    "r_vision": mean(lambda t: t.reward.vision),
    "r_format": mean(lambda t: t.reward.format),
    "r_tool": mean(lambda t: t.reward.tool),
    "exec_rate": mean(lambda t: t.final_render is not None and t.final_render.status == "ok"),
    "answered": mean(lambda t: t.end_reason == "answer"),
    "turns": mean(lambda t: t.num_turns),
    "tool_calls": mean(lambda t: t.reward.n_tool_calls),
    "tool_call_rate": mean(lambda t: t.reward.n_tool_calls > 0),
    "tool_calls_ok": mean(lambda t: t.reward.n_successful_tool_calls),
    "policy_tokens": mean(lambda t: t.num_policy_tokens),
    "truncated": mean(lambda t: t.truncated),
    "judge_failed": mean(lambda t: t.judge_failed),
  }


def evaluate(stage, sampler, environment, examples, *, batch_size: int) -> dict[str, float]:
  """Greedy episodes (one per held-out target), summarised: the before/after table's numbers."""
  trajectories = []
  for start in range(0, len(examples), batch_size):
    images = [ex["image"] for ex in examples[start : start + batch_size]]
    padded = images + [images[-1]] * (batch_size - len(images))  # one shape; rows divide the mesh
    played = play(
      stage,
      sampler,
      environment,
      padded,
      group_size=1,
      params=sampling_params(stage, greedy=True),
      key=jax.random.key(0),
      score_drafts=True,
    )
    trajectories += played.trajectories[: len(images)]
  return episode_summary(trajectories) | {"items": len(trajectories)}


def _split(n: int, parts: int) -> list[slice]:
  size = n // parts
  return [slice(i * size, (i + 1) * size) for i in range(parts)]


class _Trainer:
  """Jitted pieces of the update: the train step and the log-prob function."""

  def __init__(self, stage, graphdef, tx, schedule, rl_cfg):
    c = stage.config.grpo
    self.stage = stage
    self.rl_cfg = rl_cfg
    self.micro_batches = c.micro_batches
    loss = functools.partial(
      grpo_loss,
      policy_loss=algorithms.make_policy_loss(rl_cfg),
      temperature=c.temperature,
      chunk_size=c.chunk_size,
      banned_token_ids=banned_token_ids(stage.tokenizer),
    )
    self.train_step = step.make_train_step(
      graphdef,
      loss,
      tx,
      micro_batches=c.micro_batches,
      remat=False if c.remat == "none" else c.remat,
      mesh=stage.mesh,
      rules=stage.rules,
      schedule=schedule,
    )
    logprobs = functools.partial(
      policy_logprobs,
      temperature=c.temperature,
      chunk_size=c.chunk_size,
      banned_token_ids=banned_token_ids(stage.tokenizer),
    )
    self.logprobs = jax.jit(lambda params, batch: logprobs(nnx.merge(graphdef, params), batch))
    # Micro-batch-stacked batches: one compiled map, not a fresh trace of `lax.map` per step.
    self.stacked_logprobs = jax.jit(
      lambda params, batch: jax.lax.map(lambda b: logprobs(nnx.merge(graphdef, params), b), batch)
    )
    self.mismatch = jax.jit(_mismatch)

  def batch(self, trajectories, advantages, keep) -> GRPOBatch:
    """The (micro-batch-stacked) host batch of some rows, at a bucketed length."""
    c = self.stage.config.grpo
    # One length on every host: the global batch is assembled from the hosts' shares.
    longest = max_over_hosts(max(t.length for t in trajectories))
    length = sampler_lib.bucket_length(longest, TRAIN_BUCKETS)
    pad_id = tokens.special_token_ids(self.stage.tokenizer).pad_token_id
    parts = []
    for part in _split(len(trajectories), self.micro_batches):
      parts.append(
        make_grpo_batch(
          self.stage.model_config,
          trajectories[part],
          advantages[part],
          length=length,
          images_per_row=c.max_turns + 1,
          pad_id=pad_id,
          loss_mask_rows=keep[part],
        )
      )
    if self.micro_batches == 1:
      return parts[0]
    return batch_lib.stack_micro_batches(parts)


def _check_host_shares(c: ml_collections.ConfigDict, hosts: int) -> None:
  """Each host plays whole groups and splits its rows into the configured batches."""
  if c.prompts_per_step % hosts:
    raise ValueError(
      f"grpo.prompts_per_step={c.prompts_per_step} must be a multiple of the {hosts} hosts"
    )
  rows = c.prompts_per_step // hosts * c.group_size
  if rows % (c.mini_batches * c.micro_batches):
    raise ValueError(
      f"each host's {rows} rollouts must split into grpo.mini_batches={c.mini_batches} x "
      f"grpo.micro_batches={c.micro_batches}"
    )


def run(stage: sft_loop.Stage, source, model: nnx.Module, environment: Environment) -> nnx.Module:
  """Trains to `grpo.steps` from `model` (resuming if a checkpoint exists); returns the policy.

  Multi-host: each host plays its own share of the prompts on its sampler mesh (with its own
  renderer and judge), the shares form the global batch of every update, and metrics are means
  over hosts. A mini-batch is the same slice of every host's share.
  """
  c = stage.config.grpo
  _check_host_shares(c, jax.process_count())
  rl_cfg = rl_config(c)
  tx, schedule = make_optimizer(c)
  prompts = c.prompts_per_step * (2 if rl_cfg.dynamic_sampling else 1)
  stage_dir, iterator, ckpt = sft_loop.open_stage(
    stage, "grpo", source, prompts, seed=stage.config.seed + 1, resumable_keys=RESUMABLE_KEYS
  )
  try:
    graphdef, abstract = state_lib.abstract_train_state(
      stage.make_model, tx, mesh=stage.mesh, rules=stage.rules, seed=stage.config.seed
    )
    # The frozen reference (the policy GRPO starts from) is kept only when the KL term needs it.
    ref_params = None
    if rl_cfg.kl_coef > 0:
      ref_params = jax.tree.map(jnp.copy, state_lib.split_params(model)[1])
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
      state, start = restored.state, restored.step
      iterator.set_state(restored.metadata["data"])
      logging.info("grpo: resuming from the checkpoint of step %d", start)
    else:
      graphdef, state = state_lib.train_state_from_model(
        model, tx, mesh=stage.mesh, rules=stage.rules, seed=stage.config.seed
      )
      start = 0
    trainer = _Trainer(stage, graphdef, tx, schedule, rl_cfg)
    # Built from the restored (or initial) weights; every step hands it the current ones.
    sampler, update_sampler = make_sampler(stage, graphdef, state.params)
    state = _loop(
      stage,
      stage_dir,
      ckpt,
      iterator,
      trainer,
      (sampler, update_sampler),
      environment,
      state,
      start,
      ref_params,
    )
  finally:
    ckpt.close()
  return state_lib.merge_model(graphdef, state)


def _loop(
  stage, stage_dir, ckpt, iterator, trainer, samplers, environment, state, start, ref_params
):
  """Rollouts -> rewards -> updates, with metrics, checkpoints and SIGTERM.

  `samplers`: (the sampler, the function that hands it the trainer's weights).
  """
  c = stage.config.grpo
  rl_cfg = trainer.rl_cfg
  sampler, update_sampler = samplers
  placement = roles.Roles(stage.mesh, stage.sampler_mesh or stage.mesh)
  # The sampler's own weight copy is dead during the update: free it where it takes trainer HBM.
  free_sampler = not placement.colocated and roles.shares_devices(placement)
  host_prompts = c.prompts_per_step // jax.process_count()
  progress = metrics.ProgressLogger(c.steps, c.log_every, keys=("reward", "exec_rate", "loss"))
  progress.start(start)
  timer = metrics.StageTimer()
  stop = checkpoint.install_sigterm_handler()
  with metrics.MetricWriter(stage_dir, resume_step=start or None) as writer:
    try:
      for i in range(start, c.steps):
        done = i + 1
        examples = sft_loop.decoded_examples(next(iterator))
        update_sampler(state.params)
        with timer("rollout"):
          played = play(
            stage,
            sampler,
            environment,
            [ex["image"] for ex in examples],
            group_size=c.group_size,
            params=sampling_params(stage),
            key=jax.random.fold_in(jax.random.key(stage.config.seed), done),
            first_row=jax.process_index() * len(examples) * c.group_size,
          )
        if free_sampler:  # the next step's update_sampler hands it new ones
          roles.free_copies(sampler.params, state.params)
        trajectories, keep_groups = _select(played.trajectories, rl_cfg, c, host_prompts)
        rewards = np.asarray([t.reward.total for t in trajectories], np.float32)
        lengths = np.asarray([t.num_policy_tokens for t in trajectories])
        shaped = algorithms.shape_rewards(rl_cfg, rewards, lengths)
        advantages = np.asarray(
          algorithms.compute_advantages(rl_cfg, jnp.asarray(shaped), c.group_size)
        )
        truncated = np.asarray([t.truncated for t in trajectories])
        keep = algorithms.loss_mask_for(rl_cfg, np.ones((len(trajectories), 1)), truncated)[:, 0]
        judged = judged_groups(trajectories, c.group_size)
        keep = keep * np.repeat(keep_groups * judged, c.group_size)
        with timer("update"):
          state, update_metrics = _update(
            trainer, state, trajectories, advantages, keep, ref_params
          )
        host_scalars = (
          {f"grpo/{k}": v for k, v in episode_summary(trajectories).items()}
          | {"grpo/dropped_groups": float(len(judged) - judged.sum())}
          | played.stats.as_dict("rollout/")
          | timer.scalars()
        )
        scalars = mean_over_hosts(host_scalars) | {
          f"grpo/{k}": v for k, v in update_metrics.items()
        }
        metrics.check_finite(done, loss=update_metrics["loss"])
        if done % c.log_every == 0 or done == c.steps:
          writer.write_scalars(done, scalars)
          progress.update(done, {k.split("/")[-1]: v for k, v in scalars.items()})
        if c.images_every and (done % c.images_every == 0 or done == c.steps):
          pairs = [
            (ex["image"], t.final_render.image if t.final_render is not None else None)
            for ex, t in zip(examples, trajectories[:: c.group_size], strict=False)
          ]
          writer.write_image_pairs(done, pairs, tag="grpo", max_pairs=4)
        last = done == c.steps
        stopping = stop.should_stop(done)  # a collective: every host agrees
        ckpt.save(done, state, {"data": iterator.get_state()}, force=stopping or last)
        if stopping and not last:
          raise sft_loop.Preempted("grpo", done)
    finally:
      stop.uninstall()
  return state


def judged_groups(trajectories: Sequence[records.Trajectory], group_size: int) -> np.ndarray:
  """1.0 per group whose rewards all come from the judge, 0.0 where a judge call failed.

  A group with a failed judge call would compare rewards of two scales (or an unjudged 0), so it
  is left out of the update (`judge.on_unavailable='drop_group'`).
  """
  failed = np.asarray([t.judge_failed for t in trajectories], bool)
  return (~failed.reshape(-1, group_size).any(axis=1)).astype(np.float64)


def _select(trajectories, rl_cfg, c, prompts: int):
  """Dynamic sampling: keep `prompts` groups (this host's), preferring unequal rewards."""
  if not rl_cfg.dynamic_sampling:
    return trajectories, np.ones(len(trajectories) // c.group_size)
  rewards = np.asarray([t.reward.total for t in trajectories])
  chosen = dynamic_sampling.select_groups(rewards, c.group_size, prompts)
  return [trajectories[r] for r in chosen.rows], np.asarray(chosen.informative, np.float64)


def _update(trainer: _Trainer, state, trajectories, advantages, keep, ref_params):
  """`epochs` x `mini_batches` optimiser steps; returns the state and averaged metrics."""
  c = trainer.stage.config.grpo
  stage = trainer.stage
  batches = []
  for part in _split(len(trajectories), c.mini_batches):
    batch = trainer.batch(trajectories[part], advantages[part], keep[part])
    batch = batch_lib.host_batch_to_global(
      batch, stage.mesh, stage.rules, micro_batches=c.micro_batches
    )
    if ref_params is not None:
      batch = dataclasses.replace(batch, ref_logprobs=_logprobs(trainer, ref_params, batch))
    batches.append(batch)
  # Sampler vs trainer: the same policy should give the same log-probs (ratio 1 before updating).
  recomputed = _logprobs(trainer, state.params, batches[0])
  mismatch_mean, mismatch_max = jax.device_get(
    trainer.mismatch(recomputed, batches[0].old_logprobs, batches[0].loss_mask)
  )
  totals: dict[str, float] = {}
  for _ in range(c.epochs):
    for batch in batches:
      state, m = trainer.train_step(state, batch)
      for k, v in jax.device_get(m).items():
        totals[k] = totals.get(k, 0.0) + float(v) / (c.epochs * c.mini_batches)
  totals["logprob_mismatch_mean"] = float(mismatch_mean)
  totals["logprob_mismatch_max"] = float(mismatch_max)
  return state, totals


def _mismatch(recomputed, old_logprobs, loss_mask):
  """(mean, max) |recomputed - sampler| log-prob over the loss tokens (0 when there are none)."""
  diff = jnp.where(loss_mask > 0, jnp.abs(recomputed - old_logprobs), 0.0)
  count = jnp.sum(loss_mask > 0)
  return jnp.sum(diff) / jnp.maximum(count, 1), jnp.max(diff)


def _logprobs(trainer: _Trainer, params, batch: GRPOBatch):
  """Log-probs of a (possibly micro-batch-stacked) batch under `params`."""
  if trainer.micro_batches == 1:
    return trainer.logprobs(params, batch)
  return trainer.stacked_logprobs(params, batch)
