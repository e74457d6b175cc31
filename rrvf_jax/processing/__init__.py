"""Host-side Qwen-VL processing: images, special tokens, chat format with loss masks.

`chat` is the Qwen2-VL / Qwen2.5 format; `qwen3_vl_chat` has the same API for Qwen3-VL's templates.
"""

from rrvf_jax.processing import qwen3_vl_chat
from rrvf_jax.processing.chat import (
  DEFAULT_SYSTEM_PROMPT,
  QWEN2_VL_CHAT_TEMPLATE,
  EncodedConversation,
  Turn,
  append_turn_ids,
  build_prompt_ids,
  concatenate,
  decode,
  encode_assistant_reply,
  encode_conversation,
  format_tool_call,
  format_tools_system_prompt,
  render_conversation,
)
from rrvf_jax.processing.image import (
  ImageProcessorConfig,
  ProcessedImages,
  image_grid_thw,
  load_image,
  num_image_tokens,
  preprocess_image,
  preprocess_images,
  smart_resize,
)
from rrvf_jax.processing.tokens import SpecialTokenIds, load_tokenizer, special_token_ids

__all__ = [
  "DEFAULT_SYSTEM_PROMPT",
  "QWEN2_VL_CHAT_TEMPLATE",
  "EncodedConversation",
  "ImageProcessorConfig",
  "ProcessedImages",
  "SpecialTokenIds",
  "Turn",
  "append_turn_ids",
  "build_prompt_ids",
  "concatenate",
  "decode",
  "encode_assistant_reply",
  "encode_conversation",
  "format_tool_call",
  "format_tools_system_prompt",
  "image_grid_thw",
  "load_image",
  "load_tokenizer",
  "num_image_tokens",
  "preprocess_image",
  "preprocess_images",
  "qwen3_vl_chat",
  "render_conversation",
  "smart_resize",
  "special_token_ids",
]
