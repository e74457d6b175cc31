"""Greedy single-turn answers on held-out targets: do they parse, execute, and look like the target?

A quick, honest read-out after a training stage (the benchmarks' full scoring lives in `eval/`):
the policy sees each held-out image with the task instruction, answers greedily, the answer's code
is rendered in the sandbox and the render is scored against the target by the local judge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rrvf_jax import env
from rrvf_jax.processing import chat, image, tokens
from rrvf_jax.rollout import sampler as sampler_lib
from rrvf_jax.rollout import sampling


@dataclasses.dataclass(frozen=True)
class ItemResult:
  """One held-out item: what the policy wrote and how it scored."""

  id: str
  text: str
  answered: bool  # the turn holds a closed <answer> with code
  executed: bool  # that code rendered an image
  similarity: float  # local-judge score of render vs target (0 when nothing rendered)
  render: np.ndarray | None
  message: str  # render status / error, for the report


def summarize(items: Sequence[ItemResult]) -> dict[str, float]:
  """Fractions answered and executed, and mean similarity (failures count as 0)."""
  n = max(len(items), 1)
  return {
    "items": len(items),
    "answered": sum(i.answered for i in items) / n,
    "exec_rate": sum(i.executed for i in items) / n,
    "similarity": sum(i.similarity for i in items) / n,
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


def run(
  sampler: sampler_lib.Sampler,
  examples: Sequence[Mapping[str, Any]],
  *,
  task: str,
  render: Callable[[Sequence[str]], list[env.RenderResult]],
  judge: env.Judge,
  instruction: str,
  proc_cfg: image.ImageProcessorConfig,
  system_prompt: str | None,
  max_new_tokens: int,
  batch_size: int,
  tools: Sequence[Mapping[str, Any]] | None = None,
  progress: Callable[[int, int], None] | None = None,
) -> list[ItemResult]:
  """Answers every example {'id', 'image': uint8 HWC} greedily, renders and scores the answers."""
  special = tokens.special_token_ids(sampler.tokenizer)
  params = sampling.SamplingParams(
    max_new_tokens=max_new_tokens,
    temperature=0.0,
    stop_token_ids=special.eos_token_ids,
    stop_strings=("</answer>",),
  )
  results: list[ItemResult] = []
  for start in range(0, len(examples), batch_size):
    batch = list(examples[start : start + batch_size])
    # The last batch is padded with copies (dropped below): one compiled shape, and row counts
    # that divide the mesh's batch axes.
    padded = batch + [batch[-1]] * (batch_size - len(batch))
    prompts = [
      prompt_segment(
        sampler.tokenizer,
        ex["image"],
        instruction=instruction,
        proc_cfg=proc_cfg,
        system_prompt=system_prompt,
        tools=tools,
      )
      for ex in padded
    ]
    completions = sampler.sample(prompts, params, jax.random.key(0))[: len(batch)]
    results += _score(batch, completions, task=task, render=render, judge=judge)
    if progress is not None:
      progress(len(results), len(examples))
  return results


def _score(batch, completions, *, task, render, judge) -> list[ItemResult]:
  """Parses, renders and judges one batch of completions."""
  turns = [env.parse_turn(c.text, task) for c in completions]
  codes = [t.answer.code if t.answer is not None and t.answer.ok else None for t in turns]
  rendered = render([c for c in codes if c is not None])
  by_index = iter(rendered)
  results = []
  for ex, completion, code in zip(batch, completions, codes, strict=True):
    result = next(by_index) if code is not None else None
    ok = result is not None and result.status == "ok" and result.image is not None
    similarity = judge.judge(ex["image"], result.image, kind=task).score if ok else 0.0
    results.append(
      ItemResult(
        id=str(ex["id"]),
        text=completion.text,
        answered=code is not None,
        executed=ok,
        similarity=float(similarity or 0.0),
        render=result.image if ok else None,
        message="no answer" if result is None else f"{result.status}: {result.message}"[:300],
      )
    )
  return results
