"""GRPO's training path with a Qwen3-VL policy: per-row image slots carry DeepStack, ratio 1."""

import concurrent.futures
import dataclasses

import jax
import numpy as np

from rrvf_jax import env, models
from rrvf_jax.processing import image, tokens
from rrvf_jax.rollout import SamplingParams, episode
from rrvf_jax.testing import checkpoints
from rrvf_jax.testing.scripted import TextScriptedSampler, answer, call
from rrvf_jax.train import grpo

SIDE = 64  # Targets and renders share one canvas (a multiple of Qwen3-VL's 32-pixel factor).
PROC = dataclasses.replace(image.ImageProcessorConfig.for_model_type("qwen3_vl"), min_pixels=1024)


def _render(code):
  img = np.full((SIDE, SIDE, 3), 255, np.uint8)
  img[8:30, 8 : 12 + len(code) % 40] = (sum(code.encode()) % 200, 90, 40)
  return env.RenderResult("ok", img)


def test_trainer_logprobs_equal_sampler_logprobs(tmp_path):
  path = checkpoints.make_tiny_policy_dir(tmp_path, preset="tiny-qwen3-vl", seed=2)
  model, tok = models.from_hf(path), tokens.load_tokenizer(path)
  scripts = [[answer("plt.plot([1])")], [call("plt.plot([2])"), answer("plt.plot([3])")]]
  sampler = TextScriptedSampler(
    model, tok, cache_length=1024, buckets=(64, 128, 256), scripts=scripts
  )
  params = SamplingParams(
    max_new_tokens=10,
    temperature=1.0,
    stop_token_ids=tokens.special_token_ids(tok).eos_token_ids,
    banned_token_ids=grpo.banned_token_ids(tok),
  )
  pool = concurrent.futures.ThreadPoolExecutor(1)
  target = np.random.default_rng(0).integers(0, 255, (SIDE, SIDE, 3), np.uint8)
  played = episode.run_episodes(
    sampler,
    [target],
    group_size=2,
    task="chart",
    render_submit=lambda code: pool.submit(_render, code),
    judge=env.LocalJudge(),
    sampling=params,
    key=jax.random.key(1),
    max_turns=3,
    instruction="Reproduce this chart.",
    proc_cfg=PROC,
  ).trajectories
  assert [len(t.images) for t in played] == [1, 2]  # Row 1 saw its render: a second image slot.
  batch = grpo.make_grpo_batch(
    model.config,
    played,
    np.asarray([0.5, -0.5], np.float32),
    length=768,
    images_per_row=2,
    pad_id=tokens.special_token_ids(tok).pad_token_id,
  )
  logp = grpo.policy_logprobs(
    model, batch, temperature=1.0, chunk_size=64, banned_token_ids=grpo.banned_token_ids(tok)
  )
  mask = batch.loss_mask > 0
  assert mask.sum() == sum(t.num_policy_tokens for t in played)
  np.testing.assert_allclose(np.asarray(logp)[mask], batch.old_logprobs[mask], atol=1e-4, rtol=0)
