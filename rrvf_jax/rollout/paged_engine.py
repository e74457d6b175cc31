"""The jitted core of the paged engine: append rows' turns to their pages, decode slots, fork.

Pure functions of `(model, state, arrays)`. The device holds only the page pools and each row's
next-token logits; which pages a row owns, how long it is and where its M-RoPE positions are, the
host says at every call (`paged.PagedSampler`), so rows of any lengths share a call and a row can
leave the decode slots (waiting for a render) and come back later at its own position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rrvf_jax.models.qwen_vl import paged_kv
from rrvf_jax.models.qwen_vl.model import QwenVL
from rrvf_jax.rollout import sampling
from rrvf_jax.rollout.engine import DecodeOutput


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedState:
  """Device state of the paged engine.

  Attributes:
    k: per layer, key pages `[K, P, page, H]`.
    v: per layer, value pages `[K, P, page, H]`.
    logits: `[R + 1, V]` float32 logits after each row's last token; row R is scratch (padding
      rows of a call read and write it).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  logits: jax.Array

  @property
  def scratch_row(self) -> int:
    return self.logits.shape[0] - 1


def empty_state(model: QwenVL, num_pages: int, page_size: int, rows: int, dtype) -> PagedState:
  """Empty pools and zero logits for `rows` rows."""
  cfg = model.config.text
  k, v = paged_kv.init(cfg, num_pages, page_size, dtype)
  return PagedState(k, v, jnp.zeros((rows + 1, cfg.vocab_size), jnp.float32))


def append(
  model: QwenVL,
  state: PagedState,
  rows: jax.Array,
  input_ids: jax.Array,
  positions: jax.Array,
  features,
  view: paged_kv.PageView,
) -> PagedState:
  """Prefills `[A, T]` right-padded new tokens of rows `rows` (`view.q_lens` real ones each).

  Token t of call row a goes to position `view.starts[a] + t` of its pages; `positions` `[3, A, T]`
  are absolute M-RoPE positions; `features` are the image features of the `<|image_pad|>` tokens
  in `input_ids`, row-major. Each row's logits after its last real token are stored; rows with no
  real token (padding) only touch the scratch row.
  """
  embeds = model.embed_with_features(input_ids, features)
  hidden, k, v = model.text.paged(embeds, positions, state.k, state.v, view)
  last = jnp.clip(view.q_lens - 1, 0)
  hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
  logits = model.logits(hidden_last)[:, 0].astype(jnp.float32)
  target = jnp.where(view.q_lens > 0, rows, state.scratch_row)
  return PagedState(k, v, state.logits.at[target].set(logits))


@dataclasses.dataclass
class _Loop:
  """Carry of the decode loop."""

  k: tuple
  v: tuple
  logits: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  done: jax.Array
  stopped: jax.Array
  lengths: jax.Array
  history: jax.Array
  step: jax.Array


jax.tree_util.register_dataclass(
  _Loop, data_fields=[f.name for f in dataclasses.fields(_Loop)], meta_fields=[]
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotInputs:
  """What the host tells one decode call about the rows in its slots (`[S]` each).

  Attributes:
    rows: row ids (padding slots: the scratch row).
    page_table: `[S, Pmax]` each row's pages, covering `starts + budgets` positions.
    starts: tokens already in each row's pages.
    positions: M-RoPE position of each row's next token.
    keys: per-row key of the row's current turn.
    counts: tokens the row has generated in this turn before the call (its next token's index).
    budgets: tokens the row may still generate in this turn (0: the slot is empty).
    history: `[S, M]` the row's last generated tokens of this turn (-2 where none), for stop
      sequences spanning calls.
  """

  rows: jax.Array
  page_table: jax.Array
  starts: jax.Array
  positions: jax.Array
  keys: jax.Array
  counts: jax.Array
  budgets: jax.Array
  history: jax.Array


def decode(
  model: QwenVL,
  state: PagedState,
  slots: SlotInputs,
  stop_table: jax.Array | None,
  yield_on_done: jax.Array,
  params: sampling.SamplingParams,
  pad_id: int,
  steps: int,
) -> tuple[PagedState, DecodeOutput, jax.Array]:
  """Samples up to `steps` tokens per slot; row b's token i of its turn goes to `starts + i`.

  Token j of a row's turn is drawn with `fold_in(keys[b], j)`: a row samples the same tokens
  whatever slot it sits in, whoever shares the call and however its turn is cut into calls. A row
  stops at a stop token or sequence or at its budget; the call returns when every slot stopped,
  after `steps` steps, or (with `yield_on_done`) as soon as one row finishes, so its slot can be
  refilled. Every sampled token is run and written, ready for the row's next appended turn.
  Returns the state, the tokens of the call and the slots' updated histories.
  """
  batch = slots.rows.shape[0]
  stop_ids = jnp.asarray(params.stop_token_ids or (-1,), jnp.int32)
  active = slots.budgets > 0

  def cond(loop: _Loop):
    finished = jnp.any(loop.done & active) & yield_on_done
    return (loop.step < steps) & ~jnp.all(loop.done) & ~finished

  def body(loop: _Loop) -> _Loop:
    keys = jax.vmap(jax.random.fold_in)(slots.keys, slots.counts + loop.lengths)
    token, logprob = sampling.sample_rows(loop.logits, keys, params)
    live = ~loop.done
    token = jnp.where(live, token, pad_id)
    logprob = jnp.where(live, logprob, 0.0)
    view = paged_kv.PageView(slots.page_table, slots.starts + loop.lengths, live.astype(jnp.int32))
    position = slots.positions + loop.lengths
    positions = jnp.broadcast_to(position[None, :, None], (3, batch, 1))
    embeds = model.embed_with_features(token[:, None], None)
    hidden, k, v = model.text.paged(embeds, positions, loop.k, loop.v, view)
    logits = model.logits(hidden)[:, 0].astype(jnp.float32)
    history = jnp.concatenate([loop.history[:, 1:], token[:, None]], axis=1)
    hit = jnp.isin(token, stop_ids)
    if stop_table is not None:
      hit |= sampling.ends_with_any(history, stop_table)
    hit &= live
    lengths = loop.lengths + live
    return _Loop(
      k=k,
      v=v,
      logits=jnp.where(live[:, None], logits, loop.logits),
      tokens=jax.lax.dynamic_update_slice_in_dim(loop.tokens, token[:, None], loop.step, axis=1),
      logprobs=jax.lax.dynamic_update_slice_in_dim(
        loop.logprobs, logprob[:, None], loop.step, axis=1
      ),
      done=loop.done | hit | (lengths >= slots.budgets),
      stopped=loop.stopped | hit,
      lengths=lengths,
      history=jnp.where(live[:, None], history, loop.history),
      step=loop.step + 1,
    )

  init = _Loop(
    k=state.k,
    v=state.v,
    logits=state.logits[slots.rows],
    tokens=jnp.full((batch, steps), pad_id, jnp.int32),
    logprobs=jnp.zeros((batch, steps), jnp.float32),
    done=~active,
    stopped=jnp.zeros((batch,), bool),
    lengths=jnp.zeros((batch,), jnp.int32),
    history=slots.history,
    step=jnp.zeros((), jnp.int32),
  )
  out = jax.lax.while_loop(cond, body, init)
  logits = state.logits.at[slots.rows].set(out.logits)
  output = DecodeOutput(out.tokens, out.logprobs, out.lengths, out.stopped, out.step)
  return PagedState(out.k, out.v, logits), output, out.history


def fork(
  state: PagedState,
  source_pages: jax.Array,
  target_pages: jax.Array,
  source_rows: jax.Array,
  target_rows: jax.Array,
) -> PagedState:
  """Copies pages and logits: `source_pages[i]` to `target_pages[i]`, row j likewise.

  A forked row shares its parent's full pages (the host counts references) and gets its own copy
  of the partly filled last page, and the parent's next-token logits.
  """
  pairs = [paged_kv.copy_pages(k, v, source_pages, target_pages) for k, v in zip(state.k, state.v)]
  logits = state.logits.at[target_rows].set(state.logits[source_rows])
  return PagedState(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), logits)
