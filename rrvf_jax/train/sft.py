"""Cold-start SFT: (image, code) examples to padded batches, and the next-token loss on the answer.

Each example becomes one conversation: an optional system block, a user turn holding the image and
the instruction, and an assistant turn `<answer>\\n{code}\\n</answer>` (RRVF's final-answer format,
which `env.parsing.parse_turn` reads back as an answer). Only the assistant body and its closing
`<|im_end|>` are trained (the loss mask of `processing.chat.encode_conversation`).

Length policy: every example is right-padded to `max_length` (one static shape per bucket). An
example longer than `max_length` is an error naming it: cutting it would drop the `</answer>` (and
teach the model to ramble) or the image tokens (and break the image). Filter long examples out
beforehand with `sft_example_length`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrvf_jax.models.qwen_vl import rope
from rrvf_jax.models.qwen_vl.config import ModelConfig
from rrvf_jax.models.qwen_vl.model import ModelInputs, prepare_inputs
from rrvf_jax.processing import chat, image, tokens
from rrvf_jax.train import batch as batch_lib
from rrvf_jax.train.logprobs import token_logprobs

DEFAULT_INSTRUCTION = (
  "Write Python matplotlib code that reproduces this chart exactly. "
  "Give the final code inside <answer></answer>."
)


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
  return [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]},
    {"role": "assistant", "content": answer_text(code)},
  ]


def encode_sft_example(
  tokenizer: tokens.Tokenizer,
  cfg: ModelConfig,
  example: Mapping[str, Any],
  *,
  image_processor_cfg: image.ImageProcessorConfig,
  system_prompt: str | None = chat.DEFAULT_SYSTEM_PROMPT,
  instruction: str = DEFAULT_INSTRUCTION,
  tools: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[chat.EncodedConversation, image.ProcessedImages]:
  """Token ids + loss mask and the image's patches of one {'image', 'code'} example."""
  missing = {"image", "code"} - set(example)
  if missing:
    raise ValueError(f"SFT example is missing keys {sorted(missing)}; it has {sorted(example)}")
  pixels = image.preprocess_images([np.asarray(example["image"])], image_processor_cfg)
  encoded = chat.encode_conversation(
    tokenizer,
    sft_messages(example["code"], instruction),
    image_grids=pixels.image_grid_thw,
    merge_size=cfg.vision.spatial_merge_size,
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
) -> SFTBatch:
  """A padded SFTBatch (host NumPy) of examples {'image': uint8 HWC array, 'code': str}.

  With `micro_batches` M > 1 the examples are split into M equal consecutive groups, each prepared
  on its own and stacked along a leading axis (the layout `make_train_step(micro_batches=M)`
  takes); the images must then all have one size. With `hosts` H > 1 this is one host's share of
  a global batch: the vision index is built for the H shares' images (one canvas size), so every
  host holds the same index (`batch.host_batch_to_global`).
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
    )
    rows.append(_pad_row(encoded, max_length, pad_id, i))
    patches.append(pixels.pixel_values)
    grids.append(pixels.image_grid_thw)
  ids, mask, targets, loss_mask = (np.stack(col) for col in zip(*rows, strict=True))
  grid = np.concatenate(grids)
  inputs = prepare_inputs(cfg, ids, mask, np.concatenate(patches), grid)
  if hosts > 1:
    if np.any(grid != grid[0]):
      raise ValueError("multi-host SFT needs every image at one size (set a fixed image canvas)")
    index = rope.make_vision_index(np.tile(grid, (hosts, 1)), cfg.vision)
    inputs = dataclasses.replace(inputs, vision_index=index)
  return SFTBatch(inputs=inputs, targets=targets, loss_mask=loss_mask)


def sft_loss(
  model: nnx.Module, batch: SFTBatch, *, chunk_size: int = 512
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(summed NLL of the assistant tokens, their count, {}): a `loss_fn` for `make_train_step`."""
  hidden = model.hidden_states(batch.inputs)
  logp = token_logprobs(model, hidden, batch.targets, chunk_size=chunk_size)
  mask = batch.loss_mask.astype(jnp.float32)
  # `where`, not a product: a masked position must not matter even if its log-prob is -inf.
  return -jnp.sum(jnp.where(mask > 0, logp * mask, 0.0)), jnp.sum(mask), {}
