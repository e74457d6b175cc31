"""Complete local policy directories (weights, config, tokenizer, image processor) for tests."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax.numpy as jnp
from flax import nnx

from rrvf_jax import models
from rrvf_jax.processing import image, tokens
from rrvf_jax.testing import tokenizer as tiny_tokenizer


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


def make_tiny_policy_dir(
  path: str | os.PathLike, *, preset: str = "tiny", seed: int = 0, dtype=jnp.float32
) -> pathlib.Path:
  """Writes a random `preset` policy in the HF layout with the tiny tokenizer; returns the path.

  Tokenizer and image processor are the preset's family's (Qwen3's vocabulary for Qwen3-VL).
  """
  out = pathlib.Path(path)
  family = models.get_preset(preset).model_type
  tiny_tokenizer.make_tiny_tokenizer(out, family=family)
  cfg = config_for_tokenizer(preset, tokens.load_tokenizer(out))
  model = models.build_model(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
  models.to_hf(model, out)
  with open(out / "preprocessor_config.json", "w") as f:
    json.dump(image.ImageProcessorConfig.for_model_type(family).to_dict(), f, indent=2)
  return out
