"""Sampler inputs for tests (images, image prompts, feedback turns) and full-forward references."""

from __future__ import annotations

import numpy as np

from rrvf_jax.models.qwen_vl import model as model_lib
from rrvf_jax.processing import chat, image
from rrvf_jax.rollout import Segment


def random_image(seed: int, height: int = 56, width: int = 84) -> np.ndarray:
  """A deterministic random RGB image."""
  return np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)


def image_prompt(
  tok, text: str, img: np.ndarray, proc_cfg: image.ImageProcessorConfig | None = None
) -> Segment:
  """System + user(image, text) + assistant header, as a sampler segment."""
  proc = image.preprocess_images([img], proc_cfg or image.ImageProcessorConfig())
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
  prompt = chat.build_prompt_ids(tok, messages, image_grids=proc.image_grid_thw)
  return Segment(prompt.input_ids, proc.pixel_values, proc.image_grid_thw)


def feedback_turn(
  tok,
  text: str,
  img: np.ndarray | None,
  close_open_turn: bool,
  proc_cfg: image.ImageProcessorConfig | None = None,
) -> Segment:
  """A user turn (optional image + text) appended after an assistant reply."""
  content = ([{"type": "image"}] if img is not None else []) + [{"type": "text", "text": text}]
  grids, pixels = np.zeros((0, 3), np.int64), None
  if img is not None:
    proc = image.preprocess_images([img], proc_cfg or image.ImageProcessorConfig())
    grids, pixels = proc.image_grid_thw, proc.pixel_values
  piece = chat.append_turn_ids(
    tok, [{"role": "user", "content": content}], image_grids=grids, close_open_turn=close_open_turn
  )
  return Segment(piece.input_ids, pixels, grids if img is not None else None)


def full_log_probs(model, segments: list[Segment]) -> np.ndarray:
  """float64 log-softmax over a whole conversation (the concatenated segments), one forward."""
  ids = np.concatenate([s.token_ids for s in segments])
  with_images = [s for s in segments if s.pixel_values is not None]
  pixels = np.concatenate([s.pixel_values for s in with_images]) if with_images else None
  grid = np.concatenate([s.image_grid_thw for s in with_images]) if with_images else None
  inputs = model_lib.prepare_inputs(model.config, ids[None], None, pixels, grid)
  return log_softmax(np.asarray(model_lib.jit_forward(model, inputs)[0]))


def log_softmax(logits) -> np.ndarray:
  """float64 log-softmax over the last axis."""
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reply_log_probs(model, context: list[Segment], reply: np.ndarray) -> np.ndarray:
  """Log-probs of `reply`'s tokens after `context`, recomputed from scratch."""
  log_probs = full_log_probs(model, [*context, Segment(reply)])
  start = sum(len(s.token_ids) for s in context)
  return log_probs[np.arange(start - 1, start - 1 + len(reply)), reply]
