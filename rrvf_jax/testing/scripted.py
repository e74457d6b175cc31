"""Scripted episodes for tests: the real sampler with scripted turn texts, and turn builders."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from rrvf_jax.rollout.paged import PagedSampler
from rrvf_jax.rollout.sampler import Sampler


def call(code: str) -> str:
  """A well-formed tool-call turn."""
  body = json.dumps({"name": "render_chart", "arguments": {"code": code}})
  return f"<think>try</think>\n<tool_call>\n{body}\n</tool_call>"


def answer(code: str) -> str:
  """A well-formed final-answer turn."""
  return f"<think>done</think>\n<answer>\n{code}\n</answer>"


NO_ACTION = "<think>hmm</think> I do not know."
INVALID_CALL = "<think>try</think>\n<tool_call>\nthis is not json\n</tool_call>"


class TextScriptedSampler(Sampler):
  """The real sampler; only the text the driver parses is replaced, where a script gives one.

  Tokens, log-probs and the cache are the sampler's own (so every sampled token is a policy token
  whose log-prob is real); the script only steers the control flow (tool call, failure, answer).
  It also records what each row receives.
  """

  def __init__(self, *args, scripts, **kwargs):
    super().__init__(*args, **kwargs)
    self.scripts = scripts
    self.received = []
    self.sampled = []
    self.prefilling = False

  def prefill(self, prompts):
    self.received = [[np.asarray(p.token_ids)] for p in prompts]
    self.prefilling = True  # Sampler.prefill appends through self.append
    try:
      return super().prefill(prompts)
    finally:
      self.prefilling = False

  def fork(self, session, group_size):
    self.received = [list(r) for r in self.received for _ in range(group_size)]
    self.sampled = [[] for _ in self.received]
    return super().fork(session, group_size)

  def generate(self, session, params, key, active=None, first_row=0):
    session, completions = super().generate(session, params, key, active)
    out = []
    for r, c in enumerate(completions):
      if active is not None and not active[r]:
        assert len(c.token_ids) == 0
        out.append(c)
        continue
      c = dataclasses.replace(c, text=self.scripts[r][len(self.sampled[r])])
      self.sampled[r].append(c)
      self.received[r].append(np.asarray(c.token_ids))
      out.append(c)
    return session, out

  def append(self, session, segments):
    for r, s in enumerate(segments):
      if len(s.token_ids) and not self.prefilling:
        self.received[r].append(np.asarray(s.token_ids))
    return super().append(session, segments)


class TextScriptedPagedSampler(PagedSampler):
  """`TextScriptedSampler` for the paged engine: real tokens, scripted texts, recorded inputs."""

  def __init__(self, *args, scripts, **kwargs):
    super().__init__(*args, **kwargs)
    self.scripts = scripts
    self.received = []
    self.sampled = []

  def start(self, num_rows):
    super().start(num_rows)
    self.received = [[] for _ in range(num_rows)]
    self.sampled = [[] for _ in range(num_rows)]

  def fork(self, parent, children):
    for child in children:
      self.received[child] = list(self.received[parent])
    return super().fork(parent, children)

  def append(self, rows, segments):
    for r, s in zip(rows, segments, strict=True):
      if len(s.token_ids):
        self.received[r].append(np.asarray(s.token_ids))
    return super().append(rows, segments)

  def completion(self, turn, stop_strings):
    c = super().completion(turn, stop_strings)
    c = dataclasses.replace(c, text=self.scripts[turn.row][len(self.sampled[turn.row])])
    self.sampled[turn.row].append(c)
    self.received[turn.row].append(np.asarray(c.token_ids))
    return c
