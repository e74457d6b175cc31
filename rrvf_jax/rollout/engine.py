"""The jitted core of the sampler: append tokens to a KV cache, decode in a `lax.while_loop`, fork.

Everything here is a pure function of `(params, state, arrays)` with static sampling settings; the
host side (`sampler.py`) pads inputs into length buckets so the number of compilations stays small.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from rrvf_jax.models.qwen_vl import kv_cache
from rrvf_jax.models.qwen_vl.model import QwenVL
from rrvf_jax.rollout import sampling


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SequenceState:
  """Device state of a batch of live conversations.

  Attributes:
    cache: the decoder KV cache.
    next_position: `[B]` int32 M-RoPE position of each row's next token (all three axes: text).
    last_logits: `[B, V]` float32 logits after each row's last token (the next token's law).
  """

  cache: kv_cache.KVCache
  next_position: jax.Array
  last_logits: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
  """What one decode call produced.

  Attributes:
    tokens: `[B, N]` int32 sampled tokens (pad after a row stopped).
    logprobs: `[B, N]` float32 log-probs of those tokens (0 after a row stopped).
    lengths: `[B]` int32 tokens generated per row (the stop token included).
    stopped: `[B]` bool, the row ended on a stop token or sequence (else on the token budget).
    steps: int32 scalar, loop iterations run (cache slots used).
  """

  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  stopped: jax.Array
  steps: jax.Array


def empty_state(model: QwenVL, batch: int, cache_length: int, cache_dtype) -> SequenceState:
  """A state with no tokens: empty cache, positions 0, zero logits."""
  cfg = model.config.text
  return SequenceState(
    cache=kv_cache.init(cfg, batch, cache_length, cache_dtype),
    next_position=jnp.zeros((batch,), jnp.int32),
    last_logits=jnp.zeros((batch, cfg.vocab_size), jnp.float32),
  )


def append(
  model: QwenVL,
  state: SequenceState,
  input_ids: jax.Array,
  mask: jax.Array,
  positions: jax.Array,
  features: jax.Array | None,
  offset: jax.Array,
) -> SequenceState:
  """Prefills `[B, T]` right-padded new tokens (`mask` 1 on real ones) at slots `offset + [0, T)`.

  `positions` `[3, B, T]` are absolute M-RoPE positions; `features` are the merged image features of
  the images whose `<|image_pad|>` tokens occur in `input_ids`, in row-major order (extra rows are
  ignored). Rows with no real token keep their state.
  """
  cache = kv_cache.write_valid(state.cache, mask, offset)
  embeds = model.embed_with_features(input_ids, features)
  hidden, cache = model.text.cached(embeds, positions, cache, offset)
  count = mask.sum(axis=1)
  last = jnp.clip(count - 1, 0)
  hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
  logits = model.logits(hidden_last)[:, 0].astype(jnp.float32)
  has_new = count > 0
  max_position = jnp.max(jnp.where(mask[None] != 0, positions, -1), axis=(0, 2))
  return SequenceState(
    cache=cache,
    next_position=jnp.where(has_new, max_position + 1, state.next_position).astype(jnp.int32),
    last_logits=jnp.where(has_new[:, None], logits, state.last_logits),
  )


@dataclasses.dataclass
class _Loop:
  """Carry of the decode loop."""

  state: SequenceState
  tokens: jax.Array
  logprobs: jax.Array
  done: jax.Array
  stopped: jax.Array
  lengths: jax.Array
  history: jax.Array
  step: jax.Array
  key: jax.Array


jax.tree_util.register_dataclass(
  _Loop,
  data_fields=[f.name for f in dataclasses.fields(_Loop)],
  meta_fields=[],
)


def decode(
  model: QwenVL,
  state: SequenceState,
  offset: jax.Array,
  key: jax.Array,
  active: jax.Array,
  stop_table: jax.Array | None,
  params: sampling.SamplingParams,
  pad_id: int,
  first_row: jax.Array | int = 0,
) -> tuple[SequenceState, DecodeOutput]:
  """Samples up to `params.max_new_tokens` per active row; token t goes to slot `offset + t`.

  Every sampled token (the stop token too) is run through the model and written to the cache, so
  the state is ready for the next appended turn. Stops early when every row is done. Row b draws
  with its own key (row id `first_row + b`), so splitting a batch over hosts changes no sample.
  """
  batch = active.shape[0]
  row_ids = first_row + jnp.arange(batch, dtype=jnp.int32)
  budget = params.max_new_tokens
  stop_ids = jnp.asarray(params.stop_token_ids or (-1,), jnp.int32)
  width = 1 if stop_table is None else stop_table.shape[1]

  def cond(loop: _Loop):
    return (loop.step < budget) & ~jnp.all(loop.done)

  def body(loop: _Loop) -> _Loop:
    key, sub = jax.random.split(loop.key)
    token, logprob = sampling.sample(loop.state.last_logits, sub, params, row_ids)
    live = ~loop.done
    token = jnp.where(live, token, pad_id)
    logprob = jnp.where(live, logprob, 0.0)
    slot = offset + loop.step
    cache = kv_cache.write_valid(loop.state.cache, live[:, None], slot)
    positions = jnp.broadcast_to(loop.state.next_position[None, :, None], (3, batch, 1))
    embeds = model.embed_with_features(token[:, None], None)
    hidden, cache = model.text.cached(embeds, positions, cache, slot)
    logits = model.logits(hidden)[:, 0].astype(jnp.float32)
    history = jnp.concatenate([loop.history[:, 1:], token[:, None]], axis=1)
    hit = jnp.isin(token, stop_ids)
    if stop_table is not None:
      hit |= sampling.ends_with_any(history, stop_table)
    hit &= live
    return _Loop(
      state=SequenceState(cache, loop.state.next_position + live, logits),
      tokens=jax.lax.dynamic_update_slice_in_dim(loop.tokens, token[:, None], loop.step, axis=1),
      logprobs=jax.lax.dynamic_update_slice_in_dim(
        loop.logprobs, logprob[:, None], loop.step, axis=1
      ),
      done=loop.done | hit,
      stopped=loop.stopped | hit,
      lengths=loop.lengths + live,
      history=history,
      step=loop.step + 1,
      key=key,
    )

  init = _Loop(
    state=state,
    tokens=jnp.full((batch, budget), pad_id, jnp.int32),
    logprobs=jnp.zeros((batch, budget), jnp.float32),
    done=~active,
    stopped=jnp.zeros((batch,), bool),
    lengths=jnp.zeros((batch,), jnp.int32),
    history=jnp.full((batch, width), -2, jnp.int32),
    step=jnp.zeros((), jnp.int32),
    key=key,
  )
  out = jax.lax.while_loop(cond, body, init)
  return out.state, DecodeOutput(out.tokens, out.logprobs, out.lengths, out.stopped, out.step)


def trim(
  state: SequenceState, offset: jax.Array, keep: jax.Array, lengths: jax.Array
) -> SequenceState:
  """Forgets generated tokens `keep .. lengths` of each row (decoded at slots `offset + t`)."""
  slot = jnp.arange(state.cache.length)[None, :]
  drop = (slot >= offset + keep[:, None]) & (slot < offset + lengths[:, None])
  cache = dataclasses.replace(state.cache, valid=state.cache.valid & ~drop)
  return dataclasses.replace(
    state, cache=cache, next_position=state.next_position - (lengths - keep)
  )


def fork(state: SequenceState, group_size: int) -> SequenceState:
  """Each row repeated `group_size` times (row b -> rows b*G .. b*G+G-1), sharing the prefill."""
  return jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=0), state)


def merge(graphdef: nnx.GraphDef, params: nnx.State) -> QwenVL:
  """The model from its split parts (inside jitted functions)."""
  return nnx.merge(graphdef, params)
