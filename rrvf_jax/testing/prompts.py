"""Sampler inputs for tests: deterministic images, image prompts and appended feedback turns."""

from __future__ import annotations

import numpy as np

from rrvf_jax.processing import chat, image
from rrvf_jax.rollout import Segment


def random_image(seed: int, height: int = 56, width: int = 84) -> np.ndarray:
  """A deterministic random RGB image."""
  return np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)


def image_prompt(tok, text: str, img: np.ndarray) -> Segment:
  """System + user(image, text) + assistant header, as a sampler segment."""
  proc = image.preprocess_images([img], image.ImageProcessorConfig())
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
  prompt = chat.build_prompt_ids(tok, messages, image_grids=proc.image_grid_thw)
  return Segment(prompt.input_ids, proc.pixel_values, proc.image_grid_thw)


def feedback_turn(tok, text: str, img: np.ndarray | None, close_open_turn: bool) -> Segment:
  """A user turn (optional image + text) appended after an assistant reply."""
  content = ([{"type": "image"}] if img is not None else []) + [{"type": "text", "text": text}]
  grids, pixels = np.zeros((0, 3), np.int64), None
  if img is not None:
    proc = image.preprocess_images([img], image.ImageProcessorConfig())
    grids, pixels = proc.image_grid_thw, proc.pixel_values
  piece = chat.append_turn_ids(
    tok, [{"role": "user", "content": content}], image_grids=grids, close_open_turn=close_open_turn
  )
  return Segment(piece.input_ids, pixels, grids if img is not None else None)
