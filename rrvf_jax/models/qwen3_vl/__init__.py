"""Qwen3-VL (dense) in Flax NNX, numerically equal to Hugging Face transformers."""

from rrvf_jax.models.qwen3_vl.config import PRESETS, from_hf_dict, to_hf_dict
from rrvf_jax.models.qwen3_vl.model import DeepStack, Embeddings, Qwen3VL
from rrvf_jax.models.qwen3_vl.vision import VisualFeatures

__all__ = [
  "PRESETS",
  "DeepStack",
  "Embeddings",
  "Qwen3VL",
  "VisualFeatures",
  "from_hf_dict",
  "to_hf_dict",
]
