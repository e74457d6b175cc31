"""The run pipeline behind `rrvf_jax.main`: the stages a config asks for, in order.

Implemented so far: `policy_check` (load or build the policy, render a target through the sandboxed
renderer, build the RRVF prompt with the render tool, run the forward pass and a short greedy
generation, parse the policy's turn). Cold-start SFT, GRPO and evaluation are
later stages, not implemented yet.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from rrvf_jax import env
from rrvf_jax.models import qwen_vl
from rrvf_jax.models.qwen_vl import model as model_lib
from rrvf_jax.processing import chat, image, tokens
from rrvf_jax.testing import checkpoints
from rrvf_jax.testing import tokenizer as tiny_tokenizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

INSTRUCTIONS = {
  "chart": (
    "Write matplotlib code that reproduces this chart. Think first, call the render tool with your "
    "code to see the result, and give the final code in <answer></answer>."
  ),
  "web": (
    "Write HTML that reproduces this web page. Think first, call the render tool with your code "
    "to see the result, and give the final code in <answer></answer>."
  ),
}

# The demo targets: our own code, rendered through the same sandboxed renderers as policy code.
DEMO_TARGETS = {
  "chart": (
    "import matplotlib.pyplot as plt\n"
    "fig, ax = plt.subplots()\n"
    "colors = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728']\n"
    "ax.bar(['A', 'B', 'C', 'D'], [3, 7, 5, 9], color=colors)\n"
    "ax.set_title('Sales')\n"
  ),
  "web": (
    "<html><body style='margin:0;font-family:sans-serif'>"
    "<div style='background:#1f4e79;color:white;padding:16px;font-size:24px'>Acme</div>"
    "<div style='padding:16px'><h2>Welcome</h2><p>Fast, simple, offline.</p>"
    "<button style='background:#ff7f0e;border:0;padding:8px 16px'>Start</button></div>"
    "</body></html>"
  ),
}


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks values the pipeline depends on before any work starts."""
  if config.task not in INSTRUCTIONS:
    raise ConfigError(f"config.task must be one of {sorted(INSTRUCTIONS)}, got {config.task!r}")
  if config.model.dtype not in _DTYPES:
    raise ConfigError(
      f"config.model.dtype must be one of {sorted(_DTYPES)}, got {config.model.dtype!r}"
    )
  ckpt = config.model.checkpoint_dir
  if ckpt and not os.path.isfile(os.path.join(ckpt, "config.json")):
    raise ConfigError(f"config.model.checkpoint_dir {ckpt!r} is not an HF checkpoint directory")
  if not ckpt:
    qwen_vl.get_preset(config.model.preset)  # Raises a ValueError listing the presets.
  for key in ("width", "height"):
    if config.image[key] <= 0:
      raise ConfigError(f"config.image.{key} must be positive, got {config.image[key]}")
  if config.policy_check.max_new_tokens < 0:
    raise ConfigError("config.policy_check.max_new_tokens must be >= 0")


def load_policy(config: ml_collections.ConfigDict, workdir: str):
  """The policy model and its tokenizer, from a local checkpoint or a preset (random weights)."""
  dtype = _DTYPES[config.model.dtype]
  if config.model.checkpoint_dir:
    model = qwen_vl.from_hf(config.model.checkpoint_dir, dtype=dtype)
    tok_dir = config.model.tokenizer_dir or config.model.checkpoint_dir
    return model, tokens.load_tokenizer(tok_dir)
  tok_dir = config.model.tokenizer_dir or _tiny_tokenizer_dir(workdir)
  tok = tokens.load_tokenizer(tok_dir)
  cfg = checkpoints.config_for_tokenizer(config.model.preset, tok)
  logging.info("No checkpoint_dir: building preset %r with random weights.", config.model.preset)
  model = qwen_vl.QwenVL(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(config.seed))
  return model, tok


def _tiny_tokenizer_dir(workdir: str) -> str:
  return os.fspath(tiny_tokenizer.make_tiny_tokenizer(os.path.join(workdir, "tiny_tokenizer")))


def render_target(task: str, width: int, height: int) -> np.ndarray:
  """The demo's target image, rendered by the sandboxed renderer of `task`."""
  if task == "chart":
    result = env.render_chart(DEMO_TARGETS["chart"], canvas=env.ChartCanvas(width, height, dpi=100))
  else:
    canvas = env.WebCanvas(width=width, height=height, max_height=height)
    with env.HtmlRenderer(canvas) as renderer:
      result = env.render_html(DEMO_TARGETS["web"], renderer=renderer)
  if result.status != "ok":
    raise RuntimeError(
      f"rendering the {task} demo target failed: {result.status}: {result.message}"
    )
  return result.image


def greedy_generate(
  model, tok, inputs: model_lib.ModelInputs, prompt_len: int, max_new: int
) -> list[int]:
  """Greedy tokens after a single prompt, by full forward passes over a fixed padded length.

  A placeholder until the KV-cache sampler exists: one compilation (fixed shapes), O(L^2) per token.
  """
  stop = set(tokens.special_token_ids(tok).eos_token_ids)
  ids = np.asarray(inputs.input_ids).copy()
  mask = np.asarray(inputs.attention_mask).copy()
  positions = np.asarray(inputs.positions).copy()
  out = []
  for step in range(max_new):
    cur = prompt_len + step
    step_inputs = model_lib.ModelInputs(
      ids, mask, positions, inputs.pixel_values, inputs.vision_index
    )
    logits = model_lib.jit_forward(model, step_inputs)
    token = int(jnp.argmax(logits[0, cur - 1]))
    out.append(token)
    if token in stop or cur >= ids.shape[1]:
      break
    ids[0, cur], mask[0, cur] = token, 1
    positions[:, 0, cur] = positions[:, 0, cur - 1] + 1  # Text after the prompt: +1 on every axis.
  return out


def policy_check(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the policy once on a target chart and reports what it did."""
  start = time.perf_counter()
  model, tok = load_policy(config, workdir)
  target = render_target(config.task, config.image.width, config.image.height)
  Image.fromarray(target).save(os.path.join(workdir, "target.png"))
  proc_cfg = image.ImageProcessorConfig(
    min_pixels=config.image.min_pixels, max_pixels=config.image.max_pixels
  )
  processed = image.preprocess_images([target], proc_cfg)
  text = INSTRUCTIONS[config.task]
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
  prompt = chat.build_prompt_ids(
    tok, messages, image_grids=processed.image_grid_thw, tools=env.tool_schemas(config.task)
  )
  prompt_len = len(prompt.input_ids)
  total = prompt_len + config.policy_check.max_new_tokens
  ids = np.zeros((1, total), np.int32)
  ids[0, :prompt_len] = prompt.input_ids
  mask = (np.arange(total) < prompt_len).astype(np.int32)[None]
  inputs = model_lib.prepare_inputs(
    model.config, ids, mask, processed.pixel_values, processed.image_grid_thw
  )
  logits = model_lib.jit_forward(model, inputs)
  generated = greedy_generate(model, tok, inputs, prompt_len, config.policy_check.max_new_tokens)
  generated_text = chat.decode(tok, generated, skip_special_tokens=False)
  turn = env.parse_turn(generated_text, config.task)
  report = {
    "task": config.task,
    "model_type": model.config.model_type,
    "parameters": sum(
      int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    ),
    "image_grid_thw": processed.image_grid_thw.tolist(),
    "prompt_tokens": prompt_len,
    "logits_finite": bool(jnp.isfinite(logits[0, :prompt_len]).all()),
    "generated_token_ids": generated,
    "generated_text": generated_text,
    "parsed_action": turn.action,
    "parse_issues": [issue.value for issue in turn.issues],
    "seconds": round(time.perf_counter() - start, 2),
    "devices": [str(d) for d in jax.devices()],
  }
  with open(os.path.join(workdir, "policy_check.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs every stage the config enables."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  if config.policy_check.max_new_tokens > 0:
    report = policy_check(config, workdir)
    logging.info(
      "policy_check: %s",
      json.dumps({k: v for k, v in report.items() if k != "generated_token_ids"}),
    )
    print(
      f"policy_check: {report['parameters']:,} parameters, {report['prompt_tokens']} prompt tokens "
      f"(image grid {report['image_grid_thw']}), logits finite: {report['logits_finite']}, "
      f"{len(report['generated_token_ids'])} tokens generated in {report['seconds']} s"
    )
    print(f"generated (untrained policy, so expect noise): {report['generated_text']!r}")
  print(
    "Training stages (cold-start SFT, GRPO, evaluation) are not implemented yet; see README.md."
  )
