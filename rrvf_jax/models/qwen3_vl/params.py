"""Qwen3-VL parameter names: our paths <-> the checkpoint keys (import/export in `qwen_vl.params`).

Keys are matched in the legacy layout the reader canonicalises to (`model.*`, `visual.*`); Qwen3-VL
checkpoints are written in their native layout (`model.language_model.*`, `model.visual.*`).
"""

from __future__ import annotations

from rrvf_jax.models.qwen_vl.params import TEXT_KEYS

VISION_KEYS = [
  (r"visual\.patch_embed\.(kernel|bias)", "visual.patch_embed.proj.{0}"),
  (r"visual\.pos_embed", "visual.pos_embed.weight"),
  (r"visual\.blocks\.(\d+)\.norm([12])\.(scale|bias)", "visual.blocks.{0}.norm{1}.{2}"),
  (r"visual\.blocks\.(\d+)\.attn\.(qkv|proj)\.(kernel|bias)", "visual.blocks.{0}.attn.{1}.{2}"),
  (r"visual\.blocks\.(\d+)\.mlp\.up\.(kernel|bias)", "visual.blocks.{0}.mlp.linear_fc1.{1}"),
  (r"visual\.blocks\.(\d+)\.mlp\.down\.(kernel|bias)", "visual.blocks.{0}.mlp.linear_fc2.{1}"),
  (r"visual\.merger\.norm\.(scale|bias)", "visual.merger.norm.{0}"),
  (r"visual\.merger\.fc([12])\.(kernel|bias)", "visual.merger.linear_fc{0}.{1}"),
  (r"visual\.deepstack\.(\d+)\.norm\.(scale|bias)", "visual.deepstack_merger_list.{0}.norm.{1}"),
  (
    r"visual\.deepstack\.(\d+)\.fc([12])\.(kernel|bias)",
    "visual.deepstack_merger_list.{0}.linear_fc{1}.{2}",
  ),
]
KEYS = TEXT_KEYS + VISION_KEYS


def export_key(key: str) -> str:
  """The native Qwen3-VL key of a legacy-layout key (`model.x` / `visual.x` move under `model.`)."""
  if key.startswith("model."):
    return "model.language_model." + key[len("model.") :]
  if key.startswith("visual."):
    return "model." + key
  return key
