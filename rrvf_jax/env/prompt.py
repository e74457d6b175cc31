"""The RRVF task prompt: one instruction per task for SFT, GRPO, tool-loop evaluation, answer check.

The instruction says what RRVF's loop is: think in `<think>`, call the task's render tool to see
the code's render and the judge's comments, revise, and give the final code in `<answer>`. Every
stage that plays or teaches episodes takes it from `task_instruction`, so the policy is trained
and evaluated on the same words. Direct single-turn benchmark evaluation uses each benchmark's
own prompt instead (`rrvf_jax.eval.run`).
"""

from __future__ import annotations

from rrvf_jax.env.parsing import tool_for_kind

_INSTRUCTIONS = {
  "chart": (
    "Reproduce this chart with Python matplotlib code. Think in <think></think>, call {tool} to "
    "see your code's render and how it differs from the target, revise, then give the final code "
    "in <answer></answer>."
  ),
  "web": (
    "Reproduce this web page as one HTML document with inline CSS. Think in <think></think>, call "
    "{tool} to see your page's render and how it differs from the target, revise, then give the "
    "final HTML in <answer></answer>."
  ),
}

# The user turn that ends an episode at a limit (max_turns or the token budget).
FORCE_ANSWER_PROMPT = (
  "You have reached the limit of tool calls, so your last call was not run. Do not call the tool "
  "again: reply now with your final code inside <answer></answer>."
)


def task_instruction(task: str) -> str:
  """The user instruction after the target image for `task` ('chart' or 'web'), naming its tool."""
  if task not in _INSTRUCTIONS:
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(_INSTRUCTIONS)}")
  return _INSTRUCTIONS[task].format(tool=tool_for_kind(task).name)
