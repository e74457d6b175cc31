"""Model configurations of the Qwen-VL families; presets and config.json parsing of Qwen2(.5)-VL.

The dataclasses describe Qwen2-VL, Qwen2.5-VL and Qwen3-VL (fields only one family uses say so);
Qwen3-VL's presets and config.json parsing live in `rrvf_jax.models.qwen3_vl.config`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")  # What this module parses from config.json.
MODEL_TYPES = (*SUPPORTED_MODEL_TYPES, "qwen3_vl")  # What the dataclasses describe.


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Vision tower hyper-parameters (ViT + 2x2 patch merger)."""

  # "qwen2_5_vl" (RMSNorm, SwiGLU, windows), "qwen2_vl" (LayerNorm, quick-GELU MLP) or "qwen3_vl"
  # (LayerNorm, tanh-GELU MLP, patch bias, learned position table, DeepStack).
  model_type: str
  depth: int
  hidden_size: int  # ViT width D.
  num_heads: int
  intermediate_size: int  # ViT MLP width.
  out_hidden_size: int  # Merger output width (= LM width).
  patch_size: int = 14
  temporal_patch_size: int = 2
  in_channels: int = 3
  spatial_merge_size: int = 2
  window_size: int = 112  # Pixels; only Qwen2.5-VL uses windows.
  fullatt_block_indexes: tuple[int, ...] = ()
  rope_theta: float = 10000.0
  tokens_per_second: int = 2
  num_position_embeddings: int = 0  # Qwen3-VL: learned square position table, resampled per image.
  deepstack_visual_indexes: tuple[int, ...] = ()  # Qwen3-VL: blocks whose outputs feed DeepStack.

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def uses_windows(self) -> bool:
    return self.model_type == "qwen2_5_vl"

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Language-model (Qwen2 decoder) hyper-parameters."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = False
  explicit_head_dim: int | None = None  # HF `head_dim` when given (Qwen3); else width / heads.
  qkv_bias: bool = True  # Qwen2 decoders bias q, k and v; Qwen3's have no attention biases.
  qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before the rope.
  mrope_interleaved: bool = False  # Qwen3: frequencies cycle t, h, w (else t, h, w sections).

  @property
  def head_dim(self) -> int:
    return self.explicit_head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A whole Qwen-VL model: text decoder, vision tower and the special token ids."""

  model_type: str
  text: TextConfig
  vision: VisionConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int = 151643
  eos_token_id: int = 151645

  def __post_init__(self):
    _validate(self)

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)


def _validate(cfg: ModelConfig) -> None:
  """Raises ValueError naming the first inconsistent field."""
  if cfg.model_type not in MODEL_TYPES or cfg.vision.model_type != cfg.model_type:
    raise ValueError(
      f"model_type {cfg.model_type!r} (vision {cfg.vision.model_type!r}) is not supported; "
      f"expected one of {MODEL_TYPES}"
    )
  t, v = cfg.text, cfg.vision
  if t.explicit_head_dim is None and t.hidden_size % t.num_heads:
    raise ValueError(f"text.hidden_size {t.hidden_size} not divisible by num_heads {t.num_heads}")
  if t.num_heads % t.num_kv_heads:
    raise ValueError(f"text.num_heads {t.num_heads} not divisible by num_kv_heads {t.num_kv_heads}")
  if 2 * sum(t.mrope_section) != t.head_dim:
    raise ValueError(f"2 * sum(mrope_section {t.mrope_section}) must equal head_dim {t.head_dim}")
  if v.hidden_size % v.num_heads or v.head_dim % 4:
    raise ValueError(
      f"vision head_dim {v.hidden_size}/{v.num_heads} must be an integer divisible by 4"
    )
  if v.out_hidden_size != t.hidden_size:
    raise ValueError(
      f"vision.out_hidden_size {v.out_hidden_size} != text.hidden_size {t.hidden_size}"
    )
  if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
    raise ValueError(
      f"fullatt_block_indexes {v.fullatt_block_indexes} out of range for depth {v.depth}"
    )
  _validate_qwen3(cfg)


def _validate_qwen3(cfg: ModelConfig) -> None:
  """Raises ValueError for Qwen3-VL fields that do not fit together (or are set on other types)."""
  t, v = cfg.text, cfg.vision
  if cfg.model_type != "qwen3_vl":
    if v.num_position_embeddings or v.deepstack_visual_indexes or t.qk_norm:
      raise ValueError(f"{cfg.model_type}: position table, DeepStack and q/k norm are Qwen3-VL's")
    return
  side = math.isqrt(v.num_position_embeddings)
  if v.num_position_embeddings < 1 or side * side != v.num_position_embeddings:
    raise ValueError(f"num_position_embeddings {v.num_position_embeddings} is not a square > 0")
  if any(not 0 <= i < v.depth for i in v.deepstack_visual_indexes):
    raise ValueError(
      f"deepstack_visual_indexes {v.deepstack_visual_indexes} out of range for depth {v.depth}"
    )
  if len(v.deepstack_visual_indexes) > t.num_layers:
    raise ValueError(
      f"{len(v.deepstack_visual_indexes)} DeepStack levels but only {t.num_layers} decoder layers"
    )


# ----------------------------------------------------------------------------------------------
# Presets. Numbers from the hub config.json files (see shared/research/qwen_vl_port.md §5).
# ----------------------------------------------------------------------------------------------


def _qwen2_5_vision(out: int) -> VisionConfig:
  return VisionConfig(
    model_type="qwen2_5_vl",
    depth=32,
    hidden_size=1280,
    num_heads=16,
    intermediate_size=3420,
    out_hidden_size=out,
    fullatt_block_indexes=(7, 15, 23, 31),
  )


def _qwen2_vision(out: int) -> VisionConfig:
  return VisionConfig(
    model_type="qwen2_vl",
    depth=32,
    hidden_size=1280,
    num_heads=16,
    intermediate_size=5120,
    out_hidden_size=out,
  )


def _text(vocab, e, layers, h, kv, inter, tie, max_pos=128000):
  return TextConfig(
    vocab_size=vocab,
    hidden_size=e,
    num_layers=layers,
    num_heads=h,
    num_kv_heads=kv,
    intermediate_size=inter,
    tie_word_embeddings=tie,
    max_position_embeddings=max_pos,
  )


def _preset_qwen2_5(vocab, e, layers, h, kv, inter, tie) -> ModelConfig:
  return ModelConfig("qwen2_5_vl", _text(vocab, e, layers, h, kv, inter, tie), _qwen2_5_vision(e))


def _preset_qwen2(vocab, e, layers, h, kv, inter, tie) -> ModelConfig:
  return ModelConfig(
    "qwen2_vl", _text(vocab, e, layers, h, kv, inter, tie, max_pos=32768), _qwen2_vision(e)
  )


def tiny(model_type: str = "qwen2_5_vl", *, vocab_size: int = 512, **token_ids) -> ModelConfig:
  """A few-layer model for tests and the CPU demo (windows exercised by 2 full-attention blocks)."""
  text = TextConfig(
    vocab_size=vocab_size,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    mrope_section=(2, 3, 3),
    max_position_embeddings=4096,
    tie_word_embeddings=False,
  )
  if model_type == "qwen2_5_vl":
    vision = VisionConfig(
      model_type=model_type,
      depth=4,
      hidden_size=32,
      num_heads=2,
      intermediate_size=48,
      out_hidden_size=64,
      fullatt_block_indexes=(1, 3),
    )
  else:
    vision = VisionConfig(
      model_type=model_type,
      depth=2,
      hidden_size=32,
      num_heads=2,
      intermediate_size=128,
      out_hidden_size=64,
    )
  return ModelConfig(model_type, text, vision, **token_ids)


def small(vocab_size: int = 32000, **token_ids) -> ModelConfig:
  """A ~100M-parameter Qwen2.5-VL-shaped model for CPU benchmarks."""
  text = TextConfig(
    vocab_size=vocab_size,
    hidden_size=768,
    num_layers=10,
    num_heads=6,
    num_kv_heads=2,
    intermediate_size=2048,
    mrope_section=(16, 24, 24),
    max_position_embeddings=32768,
    tie_word_embeddings=True,
  )
  vision = VisionConfig(
    model_type="qwen2_5_vl",
    depth=8,
    hidden_size=384,
    num_heads=6,
    intermediate_size=1024,
    out_hidden_size=768,
    fullatt_block_indexes=(3, 7),
  )
  return ModelConfig("qwen2_5_vl", text, vision, **token_ids)


PRESETS = {
  "qwen2.5-vl-3b": lambda: _preset_qwen2_5(151936, 2048, 36, 16, 2, 11008, True),
  "qwen2.5-vl-7b": lambda: _preset_qwen2_5(152064, 3584, 28, 28, 4, 18944, False),
  "qwen2.5-vl-32b": lambda: _preset_qwen2_5(152064, 5120, 64, 40, 8, 27648, False),
  "qwen2.5-vl-72b": lambda: _preset_qwen2_5(152064, 8192, 80, 64, 8, 29568, False),
  "qwen2-vl-2b": lambda: _preset_qwen2(151936, 1536, 28, 12, 2, 8960, True),
  "qwen2-vl-7b": lambda: _preset_qwen2(152064, 3584, 28, 28, 4, 18944, False),
  "tiny": tiny,
  "tiny-qwen2-vl": lambda: tiny("qwen2_vl"),
  "small": small,
}


def get_preset(name: str) -> ModelConfig:
  """Returns the named preset; raises a ValueError listing the known names."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name]()


# ----------------------------------------------------------------------------------------------
# HF config.json <-> ModelConfig. Accepts the flat v4 hub layout and the nested v5 layout.
# ----------------------------------------------------------------------------------------------


def _rope_params(d: dict[str, Any]) -> dict[str, Any]:
  return d.get("rope_parameters") or d.get("rope_scaling") or {}


def from_hf_dict(raw: dict[str, Any]) -> ModelConfig:
  """Parses a transformers config.json dict (v4 flat or v5 nested) into a ModelConfig."""
  model_type = raw.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f"config.json has model_type {model_type!r}; only {SUPPORTED_MODEL_TYPES} are supported"
    )
  t = dict(raw)
  t.update(raw.get("text_config") or {})  # v5 nests the LM fields; the flat keys are v4's.
  rope = _rope_params(t)
  theta = rope.get("rope_theta", t.get("rope_theta", 1e6))
  tie = raw.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
  text = TextConfig(
    vocab_size=t["vocab_size"],
    hidden_size=t["hidden_size"],
    num_layers=t["num_hidden_layers"],
    num_heads=t["num_attention_heads"],
    num_kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
    intermediate_size=t["intermediate_size"],
    rms_norm_eps=t.get("rms_norm_eps", 1e-6),
    rope_theta=float(theta),
    mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
    max_position_embeddings=t.get("max_position_embeddings", 128000),
    tie_word_embeddings=bool(tie),
  )
  v = raw["vision_config"]
  vrope = _rope_params(v)
  common = {
    "model_type": model_type,
    "depth": v["depth"],
    "num_heads": v["num_heads"],
    "patch_size": v.get("patch_size", 14),
    "temporal_patch_size": v.get("temporal_patch_size", 2),
    "in_channels": v.get("in_channels", v.get("in_chans", 3)),
    "spatial_merge_size": v.get("spatial_merge_size", 2),
    "rope_theta": float(vrope.get("rope_theta", 10000.0)),
  }
  if model_type == "qwen2_5_vl":
    vision = VisionConfig(
      hidden_size=v["hidden_size"],
      intermediate_size=v["intermediate_size"],
      out_hidden_size=v.get("out_hidden_size", text.hidden_size),
      window_size=v.get("window_size", 112),
      fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())),
      tokens_per_second=v.get("tokens_per_second", 2),
      **common,
    )
  else:  # Qwen2-VL: embed_dim is the ViT width, hidden_size the merger output.
    width = v["embed_dim"]
    vision = VisionConfig(
      hidden_size=width,
      intermediate_size=int(width * v.get("mlp_ratio", 4)),
      out_hidden_size=v.get("hidden_size", text.hidden_size),
      **common,
    )
  ids = {
    k: raw[k]
    for k in (
      "image_token_id",
      "video_token_id",
      "vision_start_token_id",
      "vision_end_token_id",
      "bos_token_id",
      "eos_token_id",
    )
    if isinstance(raw.get(k, t.get(k)), int)
  }
  for k in ("bos_token_id", "eos_token_id"):
    if k not in ids and isinstance(t.get(k), int):
      ids[k] = t[k]
  return ModelConfig(model_type, text, vision, **ids)


def load_hf_config(path: str | os.PathLike) -> ModelConfig:
  """Reads `config.json` from a local HF checkpoint directory of any registered family."""
  from rrvf_jax.models import registry  # Not at import time: the registry imports this module.

  return registry.load_hf_config(path)


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
  """A config.json dict for transformers v5 (nested) that v4 / vLLM also read (flat keys)."""
  t, v = cfg.text, cfg.vision
  rope = {
    "rope_type": "default",
    "mrope_section": list(t.mrope_section),
    "rope_theta": t.rope_theta,
  }
  text = {
    "model_type": f"{cfg.model_type}_text",
    "vocab_size": t.vocab_size,
    "hidden_size": t.hidden_size,
    "num_hidden_layers": t.num_layers,
    "num_attention_heads": t.num_heads,
    "num_key_value_heads": t.num_kv_heads,
    "intermediate_size": t.intermediate_size,
    "rms_norm_eps": t.rms_norm_eps,
    "max_position_embeddings": t.max_position_embeddings,
    "hidden_act": "silu",
    "rope_parameters": rope,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": cfg.eos_token_id,
  }
  vision = {
    "model_type": cfg.model_type,
    "depth": v.depth,
    "num_heads": v.num_heads,
    "patch_size": v.patch_size,
    "temporal_patch_size": v.temporal_patch_size,
    "in_channels": v.in_channels,
    "in_chans": v.in_channels,
    "spatial_merge_size": v.spatial_merge_size,
  }
  if cfg.model_type == "qwen2_5_vl":
    vision.update(
      hidden_size=v.hidden_size,
      intermediate_size=v.intermediate_size,
      out_hidden_size=v.out_hidden_size,
      hidden_act="silu",
      window_size=v.window_size,
      fullatt_block_indexes=list(v.fullatt_block_indexes),
      tokens_per_second=v.tokens_per_second,
    )
  else:
    vision.update(
      embed_dim=v.hidden_size,
      hidden_size=v.out_hidden_size,
      mlp_ratio=_mlp_ratio(v),
      hidden_act="quick_gelu",
    )
  flat = {k: val for k, val in text.items() if k not in ("model_type", "rope_parameters")}
  return {
    "architectures": [_ARCHITECTURES[cfg.model_type]],
    "model_type": cfg.model_type,
    "text_config": text,
    "vision_config": vision,
    "tie_word_embeddings": t.tie_word_embeddings,
    "image_token_id": cfg.image_token_id,
    "video_token_id": cfg.video_token_id,
    "vision_start_token_id": cfg.vision_start_token_id,
    "vision_end_token_id": cfg.vision_end_token_id,
    # Flat v4 keys, for vLLM / SGLang / transformers 4.x readers.
    **flat,
    "rope_theta": t.rope_theta,
    "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
    "torch_dtype": "float32",
  }


def _mlp_ratio(v: VisionConfig) -> int | float:
  """Qwen2-VL stores the ViT MLP width as a ratio; transformers v5 wants an int when it is whole."""
  ratio = v.intermediate_size / v.hidden_size
  return int(ratio) if ratio.is_integer() else ratio


_ARCHITECTURES = {
  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
  "qwen2_vl": "Qwen2VLForConditionalGeneration",
}
