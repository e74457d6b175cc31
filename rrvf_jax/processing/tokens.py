"""Qwen2, Qwen2.5 and Qwen3 special tokens; thin adapters over `tokenizers` and HF tokenizers.

The processing code accepts either a `tokenizers.Tokenizer` (loaded from `tokenizer.json`, no
transformers needed) or a transformers tokenizer; text is encoded without adding special tokens.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import tokenizers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# Qwen's added tokens in id order (151643...151664 in the real vocabulary). The first 14 are special
# (skip_special_tokens drops them); the rest are added but not special, so `<tool_call>` survives
# decoding.
SPECIAL_TOKENS = (
  ENDOFTEXT,
  IM_START,
  IM_END,
  "<|object_ref_start|>",
  "<|object_ref_end|>",
  "<|box_start|>",
  "<|box_end|>",
  "<|quad_start|>",
  "<|quad_end|>",
  VISION_START,
  VISION_END,
  "<|vision_pad|>",
  IMAGE_PAD,
  VIDEO_PAD,
)
NON_SPECIAL_ADDED_TOKENS = (
  TOOL_CALL_START,
  TOOL_CALL_END,
  "<|fim_prefix|>",
  "<|fim_middle|>",
  "<|fim_suffix|>",
  "<|fim_pad|>",
  "<|repo_name|>",
  "<|file_sep|>",
)
ADDED_TOKENS = SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS
# Qwen3's vocabulary adds these after the others (151665...151668), also not special.
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"
THINK_START = "<think>"
THINK_END = "</think>"
QWEN3_ADDED_TOKENS = (TOOL_RESPONSE_START, TOOL_RESPONSE_END, THINK_START, THINK_END)

Tokenizer = Any  # a tokenizers.Tokenizer or a transformers tokenizer


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
  """Token ids a Qwen-VL model config and the chat builder need."""

  endoftext: int
  im_start: int
  im_end: int
  vision_start: int
  vision_end: int
  image_pad: int
  video_pad: int
  tool_call_start: int
  tool_call_end: int
  vocab_size: int  # number of ids the tokenizer can emit (base vocabulary plus added tokens)

  @property
  def image_token_id(self) -> int:
    """Model-config name of `<|image_pad|>`."""
    return self.image_pad

  @property
  def video_token_id(self) -> int:
    """Model-config name of `<|video_pad|>`."""
    return self.video_pad

  @property
  def vision_start_token_id(self) -> int:
    """Model-config name of `<|vision_start|>`."""
    return self.vision_start

  @property
  def vision_end_token_id(self) -> int:
    """Model-config name of `<|vision_end|>`."""
    return self.vision_end

  @property
  def eos_token_ids(self) -> tuple[int, int]:
    """Generation stop ids `<|im_end|>`, `<|endoftext|>`, as Qwen's generation_config has them."""
    return (self.im_end, self.endoftext)

  @property
  def pad_token_id(self) -> int:
    """Qwen pads with `<|endoftext|>`."""
    return self.endoftext


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
  """Loads `tokenizer.json` from a model directory (or the file itself) without transformers."""
  file = os.fspath(path)
  if os.path.isdir(file):
    file = os.path.join(file, "tokenizer.json")
  return tokenizers.Tokenizer.from_file(file)


def token_id(tokenizer: Tokenizer, token: str) -> int:
  """Id of one vocabulary entry; raises KeyError if the tokenizer lacks it."""
  if isinstance(tokenizer, tokenizers.Tokenizer):
    i = tokenizer.token_to_id(token)
  else:
    i = tokenizer.get_vocab().get(token)
  if i is None:
    raise KeyError(f"tokenizer has no token {token!r}")
  return int(i)


def vocab_size(tokenizer: Tokenizer) -> int:
  """Number of ids the tokenizer can emit, added tokens included."""
  if isinstance(tokenizer, tokenizers.Tokenizer):
    return tokenizer.get_vocab_size(with_added_tokens=True)
  return len(tokenizer)


def special_token_ids(tokenizer: Tokenizer) -> SpecialTokenIds:
  """Looks up the Qwen special token ids in a tokenizer."""
  return SpecialTokenIds(
    endoftext=token_id(tokenizer, ENDOFTEXT),
    im_start=token_id(tokenizer, IM_START),
    im_end=token_id(tokenizer, IM_END),
    vision_start=token_id(tokenizer, VISION_START),
    vision_end=token_id(tokenizer, VISION_END),
    image_pad=token_id(tokenizer, IMAGE_PAD),
    video_pad=token_id(tokenizer, VIDEO_PAD),
    tool_call_start=token_id(tokenizer, TOOL_CALL_START),
    tool_call_end=token_id(tokenizer, TOOL_CALL_END),
    vocab_size=vocab_size(tokenizer),
  )


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
  """Token ids of `text`, with added tokens matched but nothing prepended or appended."""
  if not text:
    return []
  if isinstance(tokenizer, tokenizers.Tokenizer):
    return tokenizer.encode(text, add_special_tokens=False).ids
  return list(tokenizer.encode(text, add_special_tokens=False))


def encode_text_with_offsets(
  tokenizer: Tokenizer, text: str
) -> tuple[list[int], list[tuple[int, int]]]:
  """`encode_text`'s ids and each token's `[start, end)` character span in `text`."""
  if not text:
    return [], []
  if isinstance(tokenizer, tokenizers.Tokenizer):
    encoding = tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, [tuple(o) for o in encoding.offsets]
  out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]


def decode(tokenizer: Tokenizer, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
  """Text of `ids`; special tokens are dropped as HF does, `<tool_call>` (not special) is kept."""
  # Both tokenizer kinds share this signature; Qwen's config turns off HF's space clean-up anyway.
  return tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
