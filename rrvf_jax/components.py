"""The pieces of a run built from its config: the policy's architecture for a preset."""

from __future__ import annotations

import dataclasses

from rrvf_jax import models
from rrvf_jax.processing import tokens


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
