"""Tiny random Qwen-VL checkpoints made by transformers (PyTorch), the reference for parity tests.

Needs torch and transformers (test dependencies); nothing here is imported by the library itself.
"""

from __future__ import annotations

import os

import numpy as np

TINY_TOKEN_IDS = {
  "image_token_id": 500,
  "video_token_id": 501,
  "vision_start_token_id": 502,
  "vision_end_token_id": 503,
  "bos_token_id": 504,
  "eos_token_id": 505,
}


def tiny_hf_config(model_type: str = "qwen2_5_vl", *, tie: bool = False, vocab_size: int = 512):
  """A transformers config of a tiny model, written independently of our presets."""
  import transformers

  text = {
    "vocab_size": vocab_size,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "bos_token_id": TINY_TOKEN_IDS["bos_token_id"],
    "eos_token_id": TINY_TOKEN_IDS["eos_token_id"],
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
  }
  if model_type == "qwen2_5_vl":
    vision = {
      "depth": 4,
      "hidden_size": 32,
      "num_heads": 2,
      "intermediate_size": 48,
      "out_hidden_size": 64,
      "patch_size": 14,
      "spatial_merge_size": 2,
      "temporal_patch_size": 2,
      "window_size": 112,
      "fullatt_block_indexes": [1, 3],
      "hidden_act": "silu",
    }
    cls = transformers.Qwen2_5_VLConfig
  elif model_type == "qwen2_vl":
    vision = {
      "depth": 2,
      "embed_dim": 32,
      "hidden_size": 64,
      "num_heads": 2,
      "mlp_ratio": 4,
      "patch_size": 14,
      "spatial_merge_size": 2,
      "temporal_patch_size": 2,
      "hidden_act": "quick_gelu",
    }
    cls = transformers.Qwen2VLConfig
  elif model_type == "qwen3_vl":
    # An explicit head dim unlike width / heads, 3 decoder layers fed by 2 DeepStack levels, and a
    # 6 x 6 position table that every test image's grid resamples.
    text.update(
      num_hidden_layers=3,
      head_dim=32,
      rope_parameters={
        "rope_type": "default",
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
        "rope_theta": 10000.0,
      },
    )
    vision = {
      "depth": 4,
      "hidden_size": 32,
      "num_heads": 2,
      "intermediate_size": 64,
      "out_hidden_size": 64,
      "patch_size": 16,
      "spatial_merge_size": 2,
      "temporal_patch_size": 2,
      "num_position_embeddings": 36,
      "deepstack_visual_indexes": [1, 3],
      "hidden_act": "gelu_pytorch_tanh",
    }
    cls = transformers.Qwen3VLConfig
  else:
    raise ValueError(model_type)
  return cls(text_config=text, vision_config=vision, tie_word_embeddings=tie, **TINY_TOKEN_IDS)


def hf_model_class(model_type: str):
  """The transformers class for conditional generation of `model_type`."""
  import transformers

  return {
    "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
    "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
  }[model_type]


def make_tiny_checkpoint(
  path: str | os.PathLike,
  model_type: str = "qwen2_5_vl",
  *,
  seed: int = 0,
  tie: bool = False,
  max_shard_size: str | None = None,
):
  """Builds a random tiny transformers model, saves it to `path`, returns it in eval mode."""
  import torch

  torch.manual_seed(seed)
  config = tiny_hf_config(model_type, tie=tie)
  config._attn_implementation = "eager"
  model = hf_model_class(model_type)(config).eval()
  # Random init leaves some tensors (norms, biases) at constants; perturb everything so that a
  # transposed or misplaced tensor cannot go unnoticed.
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(path, **kwargs)
  return model


def hf_logits(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
  """float32 NumPy logits of a transformers Qwen-VL model (positions from mm_token_type_ids)."""
  import torch

  ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
  kwargs = {
    "input_ids": ids,
    "mm_token_type_ids": (ids == model.config.image_token_id).long(),
  }
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
  if pixel_values is not None:
    kwargs["pixel_values"] = torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32)
    kwargs["image_grid_thw"] = torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.long)
  model.model.rope_deltas = None  # HF caches deltas on the module between calls.
  with torch.no_grad():
    return model(**kwargs).logits.float().numpy()


def hf_greedy_generate(policy_dir, prompts, max_new_tokens: int, pad_id: int, image_token_id: int):
  """transformers' greedy `generate` on sampler prompt segments (left-padded batch), new ids only.

  No stop token: every row generates `max_new_tokens` ids, `[B, max_new_tokens]`.
  """
  import torch
  import transformers

  hf = transformers.AutoModelForImageTextToText.from_pretrained(policy_dir, dtype=torch.float32)
  hf.eval()
  length = max(len(p.token_ids) for p in prompts)
  ids = np.full((len(prompts), length), pad_id)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):  # transformers batches decoder prompts left-padded
    ids[i, length - len(p.token_ids) :] = p.token_ids
    mask[i, length - len(p.token_ids) :] = 1
  ids_t = torch.as_tensor(ids)
  with torch.no_grad():
    out = hf.generate(
      input_ids=ids_t,
      attention_mask=torch.as_tensor(mask),
      mm_token_type_ids=(ids_t == image_token_id).long(),
      pixel_values=torch.as_tensor(np.concatenate([p.pixel_values for p in prompts])),
      image_grid_thw=torch.as_tensor(np.concatenate([p.image_grid_thw for p in prompts])),
      do_sample=False,
      max_new_tokens=max_new_tokens,
      eos_token_id=None,
      pad_token_id=pad_id,
    )
  return out[:, length:].numpy()
