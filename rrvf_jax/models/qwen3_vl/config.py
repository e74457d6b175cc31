"""Qwen3-VL (dense) presets and config.json parsing, into the shared Qwen-VL config dataclasses.

Numbers of the released sizes are the hub config.json files' (shared/research/qwen_vl_port.md §5);
missing keys take transformers' `Qwen3VLConfig` defaults, which differ from Qwen2.5-VL's (head dim
128, rope theta 5e5, M-RoPE sections [24, 20, 20]).
"""

from __future__ import annotations

from typing import Any

from rrvf_jax.models.qwen_vl.config import ModelConfig, TextConfig, VisionConfig

MODEL_TYPE = "qwen3_vl"
ARCHITECTURE = "Qwen3VLForConditionalGeneration"
_VISION_ACT = "gelu_pytorch_tanh"


def _text(vocab, e, layers, h, kv, inter, tie, **kw) -> TextConfig:
  """A Qwen3 decoder: no attention biases, q/k norm, interleaved M-RoPE, explicit head dim."""
  defaults = {
    "rope_theta": 5e6,
    "mrope_section": (24, 20, 20),
    "max_position_embeddings": 262144,
    "explicit_head_dim": 128,
  }
  return TextConfig(
    vocab_size=vocab,
    hidden_size=e,
    num_layers=layers,
    num_heads=h,
    num_kv_heads=kv,
    intermediate_size=inter,
    tie_word_embeddings=tie,
    qkv_bias=False,
    qk_norm=True,
    mrope_interleaved=True,
    **(defaults | kw),
  )


def _vision(depth, width, inter, out, deepstack, **kw) -> VisionConfig:
  """A Qwen3-VL vision tower: patch 16, a 48 x 48 position table, 16 heads unless given."""
  defaults = {"num_heads": 16, "patch_size": 16, "num_position_embeddings": 2304}
  return VisionConfig(
    model_type=MODEL_TYPE,
    depth=depth,
    hidden_size=width,
    intermediate_size=inter,
    out_hidden_size=out,
    deepstack_visual_indexes=deepstack,
    **(defaults | kw),
  )


def _preset(e, layers, h, inter, tie, vision_depth, vision_width, vision_inter, deepstack):
  return ModelConfig(
    MODEL_TYPE,
    _text(151936, e, layers, h, 8, inter, tie),
    _vision(vision_depth, vision_width, vision_inter, e, deepstack),
  )


def tiny(*, vocab_size: int = 512, **token_ids) -> ModelConfig:
  """A few-layer Qwen3-VL for tests and the CPU demo (2 DeepStack levels into 3 decoder layers)."""
  text = _text(
    vocab_size, 64, 3, 4, 2, 128, False,
    explicit_head_dim=32, mrope_section=(6, 5, 5), max_position_embeddings=4096,
  )  # fmt: skip
  vision = _vision(4, 32, 64, 64, (1, 3), num_heads=2, num_position_embeddings=36)
  return ModelConfig(MODEL_TYPE, text, vision, **token_ids)


def small(vocab_size: int = 32000, **token_ids) -> ModelConfig:
  """A ~100M-parameter Qwen3-VL-shaped model for CPU benchmarks."""
  text = _text(vocab_size, 768, 10, 6, 2, 2048, True, max_position_embeddings=32768)
  vision = _vision(8, 384, 1024, 768, (1, 3, 5), num_heads=6, num_position_embeddings=1024)
  return ModelConfig(MODEL_TYPE, text, vision, **token_ids)


PRESETS = {
  "qwen3-vl-2b": lambda: _preset(2048, 28, 16, 6144, True, 24, 1024, 4096, (5, 11, 17)),
  "qwen3-vl-4b": lambda: _preset(2560, 36, 32, 9728, True, 24, 1024, 4096, (5, 11, 17)),
  "qwen3-vl-8b": lambda: _preset(4096, 36, 32, 12288, False, 27, 1152, 4304, (8, 16, 24)),
  "qwen3-vl-32b": lambda: _preset(5120, 64, 64, 25600, False, 27, 1152, 4304, (8, 16, 24)),
  "tiny-qwen3-vl": tiny,
  "small-qwen3-vl": small,
}


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig.
# ----------------------------------------------------------------------------------------------

_TOKEN_KEYS = (
  "image_token_id",
  "video_token_id",
  "vision_start_token_id",
  "vision_end_token_id",
  "bos_token_id",
  "eos_token_id",
)


def from_hf_dict(raw: dict[str, Any]) -> ModelConfig:
  """Parses a transformers Qwen3-VL config.json dict (nested text_config / vision_config)."""
  if raw.get("model_type") != MODEL_TYPE:
    raise ValueError(f"config.json has model_type {raw.get('model_type')!r}, not {MODEL_TYPE!r}")
  t, v = raw.get("text_config") or {}, raw.get("vision_config") or {}
  if not t or not v:
    raise ValueError("a qwen3_vl config.json needs text_config and vision_config")
  if t.get("attention_bias"):
    raise ValueError("qwen3_vl with attention_bias=true is not supported")
  if v.get("hidden_act", _VISION_ACT) != _VISION_ACT:
    raise ValueError(f"qwen3_vl vision hidden_act {v['hidden_act']!r} is not supported")
  rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
  text = _text(
    t["vocab_size"],
    t["hidden_size"],
    t["num_hidden_layers"],
    t["num_attention_heads"],
    t.get("num_key_value_heads") or t["num_attention_heads"],
    t["intermediate_size"],
    bool(raw.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
    rms_norm_eps=t.get("rms_norm_eps", 1e-6),
    rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 5e5))),
    mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
    max_position_embeddings=t.get("max_position_embeddings", 128000),
    explicit_head_dim=t.get("head_dim") or 128,
  )
  vrope = v.get("rope_parameters") or {}
  vision = _vision(
    v.get("depth", 27),
    v.get("hidden_size", 1152),
    v.get("intermediate_size", 4304),
    v.get("out_hidden_size", 3584),
    tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
    num_heads=v.get("num_heads", 16),
    num_position_embeddings=v.get("num_position_embeddings", 2304),
    patch_size=v.get("patch_size", 16),
    temporal_patch_size=v.get("temporal_patch_size", 2),
    in_channels=v.get("in_channels", 3),
    spatial_merge_size=v.get("spatial_merge_size", 2),
    rope_theta=float(vrope.get("rope_theta", 10000.0)),
  )
  ids = {}
  for k in _TOKEN_KEYS:
    value = raw.get(k, t.get(k))
    if isinstance(value, int):
      ids[k] = value
  return ModelConfig(MODEL_TYPE, text, vision, **ids)


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
  """A config.json dict in the hub layout, loadable by transformers 5 (and 4.57's readers)."""
  t, v = cfg.text, cfg.vision
  rope = {
    "rope_type": "default",
    "mrope_section": list(t.mrope_section),
    "mrope_interleaved": True,
    "rope_theta": t.rope_theta,
  }
  text = {
    "model_type": "qwen3_vl_text",
    "vocab_size": t.vocab_size,
    "hidden_size": t.hidden_size,
    "num_hidden_layers": t.num_layers,
    "num_attention_heads": t.num_heads,
    "num_key_value_heads": t.num_kv_heads,
    "head_dim": t.head_dim,
    "intermediate_size": t.intermediate_size,
    "rms_norm_eps": t.rms_norm_eps,
    "max_position_embeddings": t.max_position_embeddings,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rope_parameters": rope,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": cfg.eos_token_id,
  }
  vision = {
    "model_type": MODEL_TYPE,  # As on the hub; transformers 5 maps it to qwen3_vl_vision.
    "depth": v.depth,
    "hidden_size": v.hidden_size,
    "intermediate_size": v.intermediate_size,
    "num_heads": v.num_heads,
    "out_hidden_size": v.out_hidden_size,
    "patch_size": v.patch_size,
    "temporal_patch_size": v.temporal_patch_size,
    "in_channels": v.in_channels,
    "spatial_merge_size": v.spatial_merge_size,
    "num_position_embeddings": v.num_position_embeddings,
    "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
    "hidden_act": _VISION_ACT,
    "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
  }
  return {
    "architectures": [ARCHITECTURE],
    "model_type": MODEL_TYPE,
    "text_config": text,
    "vision_config": vision,
    "tie_word_embeddings": t.tie_word_embeddings,
    "image_token_id": cfg.image_token_id,
    "video_token_id": cfg.video_token_id,
    "vision_start_token_id": cfg.vision_start_token_id,
    "vision_end_token_id": cfg.vision_end_token_id,
    "torch_dtype": "float32",
  }
