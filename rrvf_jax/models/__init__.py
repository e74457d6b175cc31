"""Policy models behind a registry keyed by HF `model_type` (qwen2_vl, qwen2_5_vl, qwen3_vl).

`from_hf(path)` loads any registered family's checkpoint, `to_hf(model, path)` writes one that
transformers loads, and every family's model is called as
`model(input_ids, *, attention_mask=None, pixel_values=None, image_grid_thw=None)` -> logits.

Shape letters used in names and einsums: B batch, L length, S key/cache length, E model width,
N query heads, K key/value heads, H head dim, F MLP width, V vocab, P vision patches, D ViT width,
M merged image tokens.
"""

from rrvf_jax.models.qwen_vl.config import ModelConfig, TextConfig, VisionConfig
from rrvf_jax.models.qwen_vl.params import abstract_model, from_hf, to_hf
from rrvf_jax.models.registry import (
  build_model,
  family,
  get_preset,
  load_hf_config,
  model_class,
  model_types,
  presets,
)

__all__ = [
  "ModelConfig",
  "TextConfig",
  "VisionConfig",
  "abstract_model",
  "build_model",
  "family",
  "from_hf",
  "get_preset",
  "load_hf_config",
  "model_class",
  "model_types",
  "presets",
  "to_hf",
]
