"""Qwen2.5-VL / Qwen2-VL in Flax NNX, numerically equal to Hugging Face transformers."""

from rrvf_jax.models.qwen_vl.config import (
  ModelConfig,
  TextConfig,
  VisionConfig,
  get_preset,
  load_hf_config,
)
from rrvf_jax.models.qwen_vl.model import ModelInputs, QwenVL, prepare_inputs
from rrvf_jax.models.qwen_vl.params import from_hf, to_hf

__all__ = [
  "ModelConfig",
  "ModelInputs",
  "QwenVL",
  "TextConfig",
  "VisionConfig",
  "from_hf",
  "get_preset",
  "load_hf_config",
  "prepare_inputs",
  "to_hf",
]
