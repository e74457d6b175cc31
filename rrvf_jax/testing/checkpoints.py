"""Complete local policy directories (weights, config, tokenizer, image processor) for tests.

`config_for_tokenizer` is `rrvf_jax.components`'s, re-exported for the tests that use it.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
from flax import nnx

from rrvf_jax import models
from rrvf_jax.components import config_for_tokenizer
from rrvf_jax.processing import image, tiny_tokenizer, tokens


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
