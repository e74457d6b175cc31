"""Cold-start SFT: examples to padded batches, and the next-token loss on the assistant's turns.

Each example becomes one conversation: an optional system block (with the render tool's schema), a
user turn holding the target image and the task instruction (`env.task_instruction`, the prompt
GRPO plays with), then
- the example's own turns when it has a `conversation` (a whole RRVF episode: thoughts, render-tool
  calls, tool responses with the rendered images and the judge's comments, the final answer), or
- one assistant turn `<answer>\\n{code}\\n</answer>` (RRVF's final-answer format, which
  `env.parsing.parse_turn` reads back as an answer).
Only assistant bodies and their closing `<|im_end|>` are trained (the loss mask of
`processing.chat.encode_conversation`); tool responses and their images are masked exactly as in
GRPO trajectories, and so are assistant text items marked `loss: False` (a deliberately wrong
draft's defects, `data.revisions`). Tool responses are cut to `max_response_tokens` by the same
function the episode driver uses, so SFT shows the policy what GRPO will.

Images: an example holds its target and one image per rendered image in its tool responses. A
batch is padded to `max_images` images per example (copies of its first image, which no token
reads), so batches of conversations with different numbers of feedback rounds share one shape.

Length policy: every example is right-padded to `max_length` (one static shape per bucket). An
example longer than `max_length` is an error naming it: cutting it would drop the `</answer>` (and
teach the model to ramble) or the image tokens (and break the image). Filter long examples out
beforehand with `sft_example_length`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrvf_jax import env
from rrvf_jax.models.qwen_vl import rope
from rrvf_jax.models.qwen_vl.config import ModelConfig
from rrvf_jax.models.qwen_vl.model import ModelInputs, prepare_inputs
from rrvf_jax.processing import chat, image, tokens
from rrvf_jax.train import batch as batch_lib
from rrvf_jax.train.logprobs import token_logprobs

DEFAULT_INSTRUCTION = env.task_instruction("chart")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SFTBatch:
  """A padded SFT batch.

  Attributes:
    inputs: model inputs (ids, mask, M-RoPE positions, pixels, vision index).
    targets: `[B, L]` int32, the token after each position (padding past the end).
    loss_mask: `[B, L]` float32, 1 where `targets` is an assistant token to learn.
  """

  inputs: ModelInputs
  targets: Any
  loss_mask: Any


def answer_text(code: str) -> str:
  """The assistant's final answer for `code`, in the format the RRVF parser accepts."""
  body = code.strip("\n")
  return f"<answer>\n{body}\n</answer>"


def sft_messages(code: str, instruction: str = DEFAULT_INSTRUCTION) -> list[dict[str, Any]]:
  """User turn (image, then instruction) and assistant answer of one example."""
  return [_prompt_message(instruction), {"role": "assistant", "content": answer_text(code)}]


def _prompt_message(instruction: str) -> dict[str, Any]:
  """The user turn every episode starts with: the target image, then the instruction."""
  return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}


def _image_items(message: Mapping[str, Any]) -> int:
  """Image items in a message's content."""
  content = message.get("content")
  if not isinstance(content, list):
    return 0
  return sum(1 for i in content if i.get("type") == "image" or "image" in i or "image_url" in i)


def conversation_turns(example: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The turns after the prompt of an example with a `conversation` (ValueError naming it).

  A leading system message and the first user message (the example's own prompt) are dropped:
  the run's system prompt, tools and instruction replace them, so SFT and GRPO prompts agree.
  The turns must end with an assistant turn, and their image items must match `turn_images`.
  """
  name = example.get("id", "?")
  turns = example["conversation"]
  if isinstance(turns, str):
    turns = json.loads(turns)
  turns = list(turns)
  if turns and turns[0].get("role") == "system":
    turns = turns[1:]
  if turns and turns[0].get("role") == "user":
    turns = turns[1:]
  if not turns or turns[-1].get("role") != "assistant":
    raise ValueError(f"SFT example {name}: its conversation must end with an assistant turn")
  shown = sum(_image_items(m) for m in turns)
  given = len(example.get("turn_images") or ())
  if shown != given:
    raise ValueError(
      f"SFT example {name}: its conversation shows {shown} images after the prompt but has "
      f"{given} turn_images"
    )
  return turns


def _fit_tool_responses(
  tokenizer, turns: list[dict[str, Any]], grids: np.ndarray, merge_size: int, max_tokens: int
) -> list[dict[str, Any]]:
  """Each run of tool messages cut like the episode driver cuts an appended response."""
  out, i, image_at = [], 0, 0
  while i < len(turns):
    if turns[i].get("role") != "tool":
      image_at += _image_items(turns[i])
      out.append(turns[i])
      i += 1
      continue
    j = i
    while j < len(turns) and turns[j].get("role") == "tool":
      j += 1
    count = sum(_image_items(m) for m in turns[i:j])
    fitted, _ = chat.fit_appended_turn(
      tokenizer,
      turns[i:j],
      max_tokens=max_tokens,
      image_grids=grids[image_at : image_at + count],
      merge_size=merge_size,
    )
    out += fitted
    image_at += count
    i = j
  return out


def example_messages(
  example: Mapping[str, Any], instruction: str, *, use_conversation: bool = True
) -> list[dict[str, Any]]:
  """The example as messages: the prompt, then its conversation's turns or an answer-only reply."""
  if use_conversation and example.get("conversation"):
    return [_prompt_message(instruction), *conversation_turns(example)]
  return sft_messages(example["code"], instruction)


def encode_sft_example(
  tokenizer: tokens.Tokenizer,
  cfg: ModelConfig,
  example: Mapping[str, Any],
  *,
  image_processor_cfg: image.ImageProcessorConfig,
  system_prompt: str | None = chat.DEFAULT_SYSTEM_PROMPT,
  instruction: str = DEFAULT_INSTRUCTION,
  tools: Sequence[Mapping[str, Any]] | None = None,
  use_conversation: bool = True,
  max_response_tokens: int | None = None,
) -> tuple[chat.EncodedConversation, image.ProcessedImages]:
  """Token ids + loss mask and the images' patches of one example.

  The example holds 'image' (uint8 HWC), 'code', and optionally 'conversation' (messages or their
  JSON) with 'turn_images' (uint8 HWC, one per image in the conversation's tool responses).
  """
  missing = {"image", "code"} - set(example)
  if missing:
    raise ValueError(f"SFT example is missing keys {sorted(missing)}; it has {sorted(example)}")
  messages = example_messages(example, instruction, use_conversation=use_conversation)
  pictures = [np.asarray(example["image"])]
  if len(messages) > 2:
    pictures += [np.asarray(p) for p in example.get("turn_images") or ()]
  pixels = image.preprocess_images(pictures, image_processor_cfg)
  merge = cfg.vision.spatial_merge_size
  if max_response_tokens is not None and len(messages) > 2:
    turns = _fit_tool_responses(
      tokenizer, messages[1:], pixels.image_grid_thw[1:], merge, max_response_tokens
    )
    messages = [messages[0], *turns]
  encoded = chat.encode_conversation(
    tokenizer,
    messages,
    image_grids=pixels.image_grid_thw,
    merge_size=merge,
    tools=tools,
    system_prompt=system_prompt,
  )
  return encoded, pixels


def sft_example_length(tokenizer: tokens.Tokenizer, cfg: ModelConfig, example, **kw) -> int:
  """Token count of an example (for filtering by `max_length`); keywords as `encode_sft_example`."""
  return len(encode_sft_example(tokenizer, cfg, example, **kw)[0])


def _pad_row(encoded: chat.EncodedConversation, max_length: int, pad_id: int, index: int):
  """(ids, attention mask, targets, loss mask) of one example right-padded to `max_length`."""
  n = len(encoded)
  if n > max_length:
    raise ValueError(
      f"SFT example {index} has {n} tokens, more than max_length={max_length}; raise max_length "
      "or drop long examples (sft_example_length)"
    )
  ids = np.full((max_length,), pad_id, np.int32)
  ids[:n] = encoded.input_ids
  mask = np.zeros((max_length,), np.int32)
  mask[:n] = 1
  targets = np.full((max_length,), pad_id, np.int32)
  targets[: n - 1] = encoded.input_ids[1:]
  # Position t predicts token t + 1, which is trained when the chat mask marks it.
  loss_mask = np.zeros((max_length,), np.float32)
  loss_mask[: n - 1] = encoded.loss_mask[1:]
  return ids, mask, targets, loss_mask


def make_sft_batch(
  tokenizer: tokens.Tokenizer,
  cfg: ModelConfig,
  examples: Sequence[Mapping[str, Any]],
  *,
  max_length: int,
  image_processor_cfg: image.ImageProcessorConfig,
  system_prompt: str | None = chat.DEFAULT_SYSTEM_PROMPT,
  instruction: str = DEFAULT_INSTRUCTION,
  tools: Sequence[Mapping[str, Any]] | None = None,
  micro_batches: int = 1,
  hosts: int = 1,
  max_images: int = 0,
  use_conversation: bool = True,
  max_response_tokens: int | None = None,
) -> SFTBatch:
  """A padded SFTBatch (host NumPy) of examples (see `encode_sft_example`).

  With `max_images` S > 0 the images go to row slots (`batch.row_image_slots`: S per example, one
  size for all, a static shape whatever each conversation shows); with 0 they are concatenated in
  order (any sizes; one image per example keeps shapes static). With `micro_batches` M > 1 the
  examples are split into M equal consecutive groups, each prepared on its own and stacked along a
  leading axis (the layout `make_train_step(micro_batches=M)` takes); shapes must then agree. With
  `hosts` H > 1 this is one host's share of a global batch: concatenated images get a vision index
  built for the H shares' images (one canvas size), so every host holds the same index
  (`batch.host_batch_to_global`); slots need nothing global.
  """
  if not examples:
    raise ValueError("make_sft_batch needs at least one example")
  if len(examples) % micro_batches:
    raise ValueError(
      f"{len(examples)} SFT examples do not split into {micro_batches} micro-batches"
    )
  if micro_batches > 1:
    size = len(examples) // micro_batches
    one = functools.partial(
      make_sft_batch,
      tokenizer,
      cfg,
      max_length=max_length,
      image_processor_cfg=image_processor_cfg,
      system_prompt=system_prompt,
      instruction=instruction,
      tools=tools,
      hosts=hosts,
      max_images=max_images,
      use_conversation=use_conversation,
      max_response_tokens=max_response_tokens,
    )
    groups = [examples[i * size : (i + 1) * size] for i in range(micro_batches)]
    return batch_lib.stack_micro_batches([one(g) for g in groups])
  pad_id = tokens.special_token_ids(tokenizer).pad_token_id
  rows, patches, grids = [], [], []
  for i, example in enumerate(examples):
    encoded, pixels = encode_sft_example(
      tokenizer,
      cfg,
      example,
      image_processor_cfg=image_processor_cfg,
      system_prompt=system_prompt,
      instruction=instruction,
      tools=tools,
      use_conversation=use_conversation,
      max_response_tokens=max_response_tokens,
    )
    rows.append(_pad_row(encoded, max_length, pad_id, i))
    patches.append(pixels.pixel_values)
    grids.append(pixels.image_grid_thw)
  ids, mask, targets, loss_mask = (np.stack(col) for col in zip(*rows, strict=True))
  if max_images:
    images = [_per_image(p, g) for p, g in zip(patches, grids, strict=True)]
    for i, row in enumerate(images):
      if len(row) > max_images:
        raise ValueError(
          f"SFT example {examples[i].get('id', i)} shows {len(row)} images, more than "
          f"sft.max_images={max_images}"
        )
    inputs = batch_lib.slot_inputs(cfg, ids, mask, images, max_images)
    return SFTBatch(inputs=inputs, targets=targets, loss_mask=loss_mask)
  grid = np.concatenate(grids)
  inputs = prepare_inputs(cfg, ids, mask, np.concatenate(patches), grid)
  if hosts > 1:
    if np.any(grid != grid[0]):
      raise ValueError("multi-host SFT needs every image at one size (set a fixed image canvas)")
    index = rope.make_vision_index(np.tile(grid, (hosts, 1)), cfg.vision)
    inputs = dataclasses.replace(inputs, vision_index=index)
  return SFTBatch(inputs=inputs, targets=targets, loss_mask=loss_mask)


def _per_image(pixel_values: np.ndarray, grids: np.ndarray) -> list[batch_lib.Image]:
  """(patches, grid) of each image of concatenated `pixel_values`."""
  grids = np.asarray(grids).reshape(-1, 3)
  parts = np.split(np.asarray(pixel_values), np.cumsum(grids.prod(axis=1))[:-1])
  return [(p, g[None]) for p, g in zip(parts, grids, strict=True)]


def sft_loss(
  model: nnx.Module, batch: SFTBatch, *, chunk_size: int = 512
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(summed NLL of the assistant tokens, their count, {}): a `loss_fn` for `make_train_step`."""
  slots = batch.inputs.pixel_values is not None and batch.inputs.pixel_values.ndim == 3
  hidden = (
    batch_lib.row_slot_hidden_states(model, batch.inputs)
    if slots
    else model.hidden_states(batch.inputs)
  )
  logp = token_logprobs(model, hidden, batch.targets, chunk_size=chunk_size)
  mask = batch.loss_mask.astype(jnp.float32)
  # `where`, not a product: a masked position must not matter even if its log-prob is -inf.
  return -jnp.sum(jnp.where(mask > 0, logp * mask, 0.0)), jnp.sum(mask), {}
