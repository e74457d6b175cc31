"""The pieces of a run, built from its config: tokenizer, policy, data, renderer, judge, budget.

The run's stages (`rrvf_jax.pipeline`), the evaluation stage (`rrvf_jax.eval.stage`) and the
compile check all build them here, so each builds them the same way (and the evaluation stage
needs nothing from the pipeline that runs it).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from rrvf_jax import data as data_lib
from rrvf_jax import env, models
from rrvf_jax.processing import chat, image, tiny_tokenizer, tokens
from rrvf_jax.rollout import answer_check
from rrvf_jax.rollout import budget as budget_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SYNTHETIC = {"chart": "synthetic_charts", "web": "synthetic_web"}


def tokenizer_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The tokenizer's directory: configured, the checkpoint's, or a tiny one made for presets."""
  if config.model.tokenizer_dir:
    return config.model.tokenizer_dir
  if config.model.checkpoint_dir:
    return config.model.checkpoint_dir
  family = models.get_preset(config.model.preset).model_type
  path = os.path.join(workdir, "tiny_tokenizer")
  return os.fspath(tiny_tokenizer.make_tiny_tokenizer(path, family=family))


def policy_config(config: ml_collections.ConfigDict, tok) -> models.ModelConfig:
  """The policy's architecture: the checkpoint's config.json or the preset fitted to `tok`."""
  if config.model.checkpoint_dir:
    return models.load_hf_config(config.model.checkpoint_dir)
  return config_for_tokenizer(config.model.preset, tok)


def config_for_tokenizer(preset: str, tok: tokens.Tokenizer) -> models.ModelConfig:
  """The preset with the tokenizer's special token ids and a vocabulary that covers it."""
  ids = tokens.special_token_ids(tok)
  cfg = models.get_preset(preset)
  return cfg.replace(
    text=dataclasses.replace(cfg.text, vocab_size=max(cfg.text.vocab_size, ids.vocab_size)),
    image_token_id=ids.image_token_id,
    video_token_id=ids.video_token_id,
    vision_start_token_id=ids.vision_start_token_id,
    vision_end_token_id=ids.vision_end_token_id,
    bos_token_id=ids.endoftext,
    eos_token_id=ids.im_end,
  )


def policy_model_type(config: ml_collections.ConfigDict) -> str:
  """The policy's HF model_type (its family in `rrvf_jax.models`)."""
  if config.model.checkpoint_dir:
    return models.load_hf_config(config.model.checkpoint_dir).model_type
  return models.get_preset(config.model.preset).model_type


def image_processor_config(config: ml_collections.ConfigDict) -> image.ImageProcessorConfig:
  """The image processor: the checkpoint's preprocessor_config.json (else the family's hub
  settings), bounded by the config."""
  base = image.ImageProcessorConfig.for_model_type(policy_model_type(config))
  proc_file = os.path.join(config.model.checkpoint_dir or "", "preprocessor_config.json")
  if config.model.checkpoint_dir and os.path.isfile(proc_file):
    base = image.ImageProcessorConfig.from_pretrained(proc_file)
  return dataclasses.replace(
    base, min_pixels=config.image.min_pixels, max_pixels=config.image.max_pixels
  )


def dataset(config: ml_collections.ConfigDict, workdir: str, split: str) -> data_lib.ExampleSource:
  """A split of the configured dataset, built on process 0 first if missing; never empty."""
  d = config.data
  kwargs = {}
  if d.name in SYNTHETIC.values():
    kwargs = {
      "complexity": d.complexity,
      "width": config.image.width,
      "height": config.image.height,
      "num_train": d.num_train,
      "num_test": d.num_test,
      "seed": config.seed,
    }
    if d.name == "synthetic_charts":
      kwargs["dpi"] = config.image.dpi

  def load(build: bool) -> data_lib.ExampleSource:
    return data_lib.load(
      d.name,
      split,
      data_dir=d.data_dir or os.path.join(workdir, "data"),
      manual_dir=d.manual_dir or None,
      build=build,
      **kwargs,
    )

  source = load(True) if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"dataset {d.name}/{split}")
    source = source or load(False)
  if len(source) == 0:
    raise ValueError(f"dataset {d.name} split {split!r} is empty")
  return source


def fresh_model_fn(config: ml_collections.ConfigDict, model_cfg: models.ModelConfig):
  """`make_model(rngs)`: the policy architecture (its family's model class) with new weights."""
  dtype = DTYPES[config.model.dtype]
  return lambda rngs: models.build_model(model_cfg, dtype=dtype, rngs=rngs)


def pretrained_model(config, mesh, rules) -> nnx.Module | None:
  """The checkpoint's weights, sharded on `mesh`; None for presets (random weights)."""
  if not config.model.checkpoint_dir:
    logging.info("No checkpoint_dir: preset %r with random weights.", config.model.preset)
    return None
  return models.from_hf(
    config.model.checkpoint_dir, dtype=DTYPES[config.model.dtype], mesh=mesh, rules=rules
  )


def canvas_renderer(config: ml_collections.ConfigDict):
  """(submit(code) -> future of RenderResult, close()) of the task's sandboxed renderer."""
  width, height = config.image.width, config.image.height
  if config.task == "chart":
    canvas = env.ChartCanvas(width, height, dpi=config.image.dpi)
    return (lambda code: env.submit_chart(code, canvas=canvas)), (lambda: None)
  renderer = env.HtmlRenderer(env.WebCanvas(width=width, height=height, max_height=height))
  return renderer.submit, renderer.close


def make_judge(config: ml_collections.ConfigDict) -> env.Judge:
  """The configured judge (`judge.name`); an outage waits or fails, never falls back to another."""
  j = config.judge
  if j.name == "local":
    return env.LocalJudge()
  return env.OpenAIJudge(
    config=env.OpenAIJudgeConfig(
      base_url=j.base_url,
      model=j.model,
      # 'wait' retries up to max_wait_s and then raises (the run stops, to be resumed);
      # 'fail' raises after the retries, and the episode driver drops the row's group.
      on_unavailable="wait" if j.on_unavailable == "wait" else "fail",
      max_wait_s=j.max_wait_s,
      on_parse_failure="zero",  # an unreadable score is 0 on the judge's own scale
    )
  )


def judge_failure(config: ml_collections.ConfigDict) -> str:
  """What the episode driver does when the judge is unavailable (`episode.run_episodes`)."""
  return "drop" if config.judge.on_unavailable == "drop_group" else "raise"


def episode_budget(config, tok, proc_cfg: image.ImageProcessorConfig) -> budget_lib.Budget:
  """The worst case of one episode of this config, for a target at the canvas size.

  The sampler's cache is made this long (`cache_slots`), so only `grpo.max_total_tokens` can stop a
  row's tool loop; when it is below `tokens`, some worst-case rows get fewer feedback rounds.
  """
  g = config.grpo
  blank = np.full((config.image.height, config.image.width, 3), 255, np.uint8)
  prompt = answer_check.prompt_segment(
    tok,
    blank,
    instruction=env.task_instruction(config.task),
    proc_cfg=proc_cfg,
    system_prompt=chat.DEFAULT_SYSTEM_PROMPT,
    tools=env.tool_schemas(config.task),
  )
  return budget_lib.worst_case(
    prompt_tokens=len(prompt.token_ids),
    max_turns=g.max_turns,
    max_new_tokens=g.max_new_tokens,
    max_response_tokens=g.max_response_tokens,
    force_answer_tokens=budget_lib.force_answer_tokens(tok),
    forcing=g.on_budget == "force_answer",
  )


def reward_config(config: ml_collections.ConfigDict) -> env.RewardConfig:
  """Reward weights and the R_tool gate from the `reward` section."""
  r = config.reward
  return env.RewardConfig(
    w_vision=r.w_vision, w_format=r.w_format, w_tool=r.w_tool, tool_threshold=r.tool_threshold
  )
