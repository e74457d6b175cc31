"""The optimiser: AdamW with a warm-up + constant/cosine schedule and global-norm clipping.

`make_optimizer(...)` takes plain arguments; `optimizer_from_config(section)` takes the same names
from an ml_collections ConfigDict (or any mapping) and rejects unknown keys.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import optax

SCHEDULES = ("constant", "cosine")


def make_schedule(
  learning_rate: float,
  *,
  schedule: str = "constant",
  warmup_steps: int = 0,
  total_steps: int | None = None,
  end_value: float = 0.0,
) -> optax.Schedule:
  """Learning rate per step: linear warm-up from 0 to `learning_rate`, then constant or cosine.

  Cosine decays from `learning_rate` at `warmup_steps` to `end_value` at `total_steps` and stays
  there (the warm-up counts towards `total_steps`, as in optax).
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule {schedule!r} is unknown; known: {list(SCHEDULES)}")
  if not learning_rate > 0:
    raise ValueError(f"optimizer.learning_rate must be > 0, got {learning_rate}")
  if warmup_steps < 0:
    raise ValueError(f"optimizer.warmup_steps must be >= 0, got {warmup_steps}")
  if schedule == "constant":
    if warmup_steps == 0:
      return optax.constant_schedule(learning_rate)
    return optax.warmup_constant_schedule(0.0, learning_rate, warmup_steps)
  if total_steps is None or total_steps <= warmup_steps:
    raise ValueError(
      f"optimizer.total_steps ({total_steps}) must be greater than optimizer.warmup_steps "
      f"({warmup_steps}) for the cosine schedule"
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=learning_rate,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=end_value,
  )


def _matrices_only(params: Any) -> Any:
  """Weight-decay mask: True on parameters with two or more dimensions (not biases or norms)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
  learning_rate: float = 1e-6,
  *,
  schedule: str = "constant",
  warmup_steps: int = 0,
  total_steps: int | None = None,
  end_value: float = 0.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  decay_vectors: bool = False,
  max_grad_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled decay, scaled by the lr as in torch) after global-norm clipping.

  Args:
    learning_rate: peak learning rate.
    schedule: "constant" or "cosine" (see `make_schedule`).
    warmup_steps: linear warm-up steps from 0.
    total_steps: steps at which the cosine reaches `end_value` (cosine only).
    end_value: final learning rate of the cosine.
    b1, b2, eps: Adam moments' decay rates and denominator epsilon.
    weight_decay: decoupled weight-decay coefficient.
    decay_vectors: also decay one-dimensional parameters (biases, norm scales); off by default,
      as in Hugging Face's Trainer.
    max_grad_norm: clip the global gradient norm to this; None or 0 disables clipping.

  Returns:
    The optax transformation and the schedule (so the learning rate can be logged per step).
  """
  if not 0 <= b1 < 1 or not 0 <= b2 < 1:
    raise ValueError(f"optimizer.b1 and optimizer.b2 must be in [0, 1), got {b1}, {b2}")
  if eps <= 0 or weight_decay < 0:
    raise ValueError(f"optimizer.eps must be > 0 and weight_decay >= 0, got {eps}, {weight_decay}")
  if max_grad_norm is not None and max_grad_norm < 0:
    raise ValueError(f"optimizer.max_grad_norm must be >= 0 or None, got {max_grad_norm}")
  lr = make_schedule(
    learning_rate,
    schedule=schedule,
    warmup_steps=warmup_steps,
    total_steps=total_steps,
    end_value=end_value,
  )
  adamw = optax.adamw(
    lr,
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay=weight_decay,
    mask=None if decay_vectors else _matrices_only,
  )
  if max_grad_norm:
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw), lr
  return adamw, lr


_OPTIMIZER_KEYS = tuple(inspect.signature(make_optimizer).parameters)


def optimizer_from_config(
  section: Mapping[str, Any],
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`make_optimizer` from a config section (a ConfigDict or mapping); unknown keys are errors."""
  values = dict(section)
  unknown = sorted(set(values) - set(_OPTIMIZER_KEYS))
  if unknown:
    raise ValueError(f"optimizer config has unknown keys {unknown}; known: {list(_OPTIMIZER_KEYS)}")
  return make_optimizer(**values)
