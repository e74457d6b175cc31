"""Greedy held-out episodes: does the policy answer, does its code execute, does it look right?

A quick, honest read-out after a training stage (the benchmarks' full scoring lives in `eval/`):
the policy sees each held-out image with the task's RRVF prompt (the same words as in SFT and
GRPO), plays a greedy episode with the render tool and the judge's feedback, and its final answer
is rendered in the sandbox and scored by the judge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rrvf_jax.processing import chat, image, tokens
from rrvf_jax.rollout import sampler as sampler_lib


@dataclasses.dataclass(frozen=True)
class ItemResult:
  """One held-out item: what the policy wrote and how it scored."""

  id: str
  text: str  # the final turn
  answered: bool  # the episode ended with a closed <answer> with code
  executed: bool  # that code rendered an image
  similarity: float  # the judge's score of render vs target (0 when nothing rendered)
  render: np.ndarray | None
  message: str  # how the episode ended / render status, for the report
  turns: int = 1  # assistant turns played
  tool_calls: int = 0  # render-tool calls written


def summarize(items: Sequence[ItemResult]) -> dict[str, float]:
  """Fractions answered and executed, mean similarity (failures count as 0), turns, tool use."""
  n = max(len(items), 1)
  return {
    "items": len(items),
    "answered": sum(i.answered for i in items) / n,
    "exec_rate": sum(i.executed for i in items) / n,
    "similarity": sum(i.similarity for i in items) / n,
    "turns": sum(i.turns for i in items) / n,
    "tool_call_rate": sum(i.tool_calls > 0 for i in items) / n,
  }


def prompt_segment(
  tok: tokens.Tokenizer,
  target: np.ndarray,
  *,
  instruction: str,
  proc_cfg: image.ImageProcessorConfig,
  system_prompt: str | None,
  tools: Sequence[Mapping[str, Any]] | None = None,
) -> sampler_lib.Segment:
  """The chat prompt (system, user image + instruction, assistant header) for one target."""
  processed = image.preprocess_images([target], proc_cfg)
  messages = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}
  ]
  encoded = chat.build_prompt_ids(
    tok,
    messages,
    image_grids=processed.image_grid_thw,
    merge_size=proc_cfg.merge_size,
    tools=tools,
    system_prompt=system_prompt,
  )
  return sampler_lib.Segment(encoded.input_ids, processed.pixel_values, processed.image_grid_thw)


def item_result(example_id: str, trajectory: Any) -> ItemResult:
  """An `ItemResult` from a finished `records.Trajectory`."""
  render = trajectory.final_render
  executed = render is not None and render.ok and render.image is not None
  if render is not None and not executed:
    message = f"{render.status}: {render.message}"[:300]
  else:
    message = trajectory.end_reason
  return ItemResult(
    id=str(example_id),
    text=trajectory.turns[-1].text if trajectory.turns else "",
    answered=trajectory.end_reason == "answer" and render is not None,
    executed=executed,
    similarity=float(trajectory.reward.vision),
    render=render.image if executed else None,
    message=message,
    turns=trajectory.num_turns,
    tool_calls=trajectory.tool_calls,
  )


def run(
  examples: Sequence[Mapping[str, Any]],
  *,
  play: Callable[[list[np.ndarray]], Sequence[Any]],
  batch_size: int,
  progress: Callable[[int, int], None] | None = None,
) -> list[ItemResult]:
  """Plays one greedy episode per example {'id', 'image': uint8 HWC} and scores it.

  `play(images)` returns one `records.Trajectory` per image (greedy, group size 1; e.g.
  `grpo.play` with greedy sampling). The last batch is padded with copies (dropped here): one
  compiled shape, and row counts that divide the mesh's batch axes.
  """
  results: list[ItemResult] = []
  for start in range(0, len(examples), batch_size):
    batch = list(examples[start : start + batch_size])
    images = [ex["image"] for ex in batch]
    played = play(images + [images[-1]] * (batch_size - len(batch)))
    results += [item_result(ex["id"], t) for ex, t in zip(batch, played, strict=False)]
    if progress is not None:
      progress(len(results), len(examples))
  return results
