"""Trajectories as the trainer's arrays: right-padded, shifted for next-token training.

`to_model_inputs` pads trajectories (`rollout.records`) into a `PolicyBatch` for the GRPO loss;
`token_arrays` is its token part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rrvf_jax.models.qwen_vl.config import ModelConfig
from rrvf_jax.models.qwen_vl.model import ModelInputs, prepare_inputs
from rrvf_jax.rollout.records import Trajectory


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PolicyBatch:
  """Padded trajectories for the policy loss; position t predicts token t + 1.

  Attributes:
    inputs: model inputs `[B, T]` (ids, attention mask, M-RoPE positions, every image's patches).
    targets: `[B, T]` int32, the token after each position (pad id past the end).
    loss_mask: `[B, T]` float32, 1 where `targets` is a sampled (policy) token.
    old_logprobs: `[B, T]` float32, the sampler's log-prob of `targets` where `loss_mask` is 1.
  """

  inputs: ModelInputs
  targets: Any
  loss_mask: Any
  old_logprobs: Any


def token_arrays(
  trajectories: Sequence[Trajectory], length: int, pad_id: int
) -> tuple[np.ndarray, ...]:
  """(ids, attention mask, targets, loss mask, old log-probs), each `[B, length]`, right-padded.

  Shifted for next-token training: position t's target is token t + 1, and its loss mask and old
  log-prob are that token's.
  """
  batch = len(trajectories)
  ids = np.full((batch, length), pad_id, np.int32)
  attention = np.zeros((batch, length), np.int32)
  targets = np.full((batch, length), pad_id, np.int32)
  loss_mask = np.zeros((batch, length), np.float32)
  old = np.zeros((batch, length), np.float32)
  for i, t in enumerate(trajectories):
    n = t.length
    if n > length:
      raise ValueError(
        f"trajectory {i} (prompt {t.prompt_index}, sample {t.group_index}) has {n} tokens, more "
        f"than the batch length {length}"
      )
    ids[i, :n] = t.token_ids
    attention[i, :n] = 1
    targets[i, : n - 1] = t.token_ids[1:]
    loss_mask[i, : n - 1] = t.loss_mask[1:]
    old[i, : n - 1] = t.old_logprobs[1:]
  return ids, attention, targets, loss_mask, old


def to_model_inputs(
  cfg: ModelConfig, trajectories: Sequence[Trajectory], length: int, *, pad_id: int = 0
) -> PolicyBatch:
  """Right-pads trajectories to `length` tokens and shifts masks and log-probs for next-token loss.

  The log-probs of `targets` from a forward over `inputs` (at the sampling temperature) are the
  current policy's, comparable with `old_logprobs` wherever `loss_mask` is 1. `pad_id` fills
  padding (the attention mask hides it; it must not be the image token).
  """
  if not trajectories:
    raise ValueError("to_model_inputs needs at least one trajectory")
  if pad_id == cfg.image_token_id:
    raise ValueError(f"pad_id {pad_id} is the image token id")
  ids, attention, targets, loss_mask, old = token_arrays(trajectories, length, pad_id)
  pixels = [np.asarray(p) for t in trajectories for p, _ in t.images]
  grids = [np.asarray(g).reshape(-1, 3) for t in trajectories for _, g in t.images]
  inputs = prepare_inputs(
    cfg,
    ids,
    attention,
    np.concatenate(pixels) if pixels else None,
    np.concatenate(grids) if grids else None,
  )
  return PolicyBatch(inputs=inputs, targets=targets, loss_mask=loss_mask, old_logprobs=old)
