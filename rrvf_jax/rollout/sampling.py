"""Token selection from logits (greedy, temperature, top-k, top-p) and the token's log-prob."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next assistant turn is sampled (hashable: it is static in the jitted loop).

  Attributes:
    max_new_tokens: decode steps at most.
    temperature: 0 is greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0: off).
    top_p: keep the smallest set of tokens with probability >= top_p (1.0: off).
    stop_token_ids: tokens that end a row (kept in the output), e.g. `<|im_end|>`.
    stop_strings: strings that end a row (kept), e.g. `</answer>`; checked on token ids inside the
      loop (their canonical tokenisation) and on the decoded text afterwards.
    banned_token_ids: tokens that are never sampled (their logits are -1e9 before the softmax, so
      the reported log-probs are of the renormalised law), e.g. `<|image_pad|>`: a generated image
      placeholder has no image behind it. A trainer recomputing log-probs must ban the same ids.
  """

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_token_ids: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()
  banned_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


# A banned token's logit: its probability underflows to exactly 0, while p * log p stays 0 (with
# -inf it would be NaN in an entropy).
BANNED_LOGIT = -1e9


def ban(logits: jax.Array, banned_token_ids: tuple[int, ...]) -> jax.Array:
  """Sets the banned tokens' logits (last axis) to `BANNED_LOGIT`."""
  if not banned_token_ids:
    return logits
  return logits.at[..., jnp.asarray(banned_token_ids)].set(BANNED_LOGIT)


def scaled_log_probs(
  logits_bv: jax.Array, temperature: float, banned_token_ids: tuple[int, ...] = ()
) -> jax.Array:
  """log-softmax of `logits / temperature` in float32 (temperature 0: of the raw logits).

  This is the distribution whose log-probs the sampler reports: the one the trainer recomputes
  (banned tokens excluded). Top-k / top-p only restrict which tokens can be drawn.
  """
  logits = ban(logits_bv.astype(jnp.float32), banned_token_ids)
  if temperature > 0:
    logits = logits / temperature
  return jax.nn.log_softmax(logits, axis=-1)


def _restrict(log_probs_bv: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets tokens outside the top-k / top-p set to -inf."""
  if top_k:
    kth = jax.lax.top_k(log_probs_bv, top_k)[0][:, -1:]
    log_probs_bv = jnp.where(log_probs_bv < kth, -jnp.inf, log_probs_bv)
  if top_p < 1.0:
    sorted_desc = -jnp.sort(-log_probs_bv, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # A token stays when the mass strictly before it is below top_p (so the first always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_desc, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    log_probs_bv = jnp.where(log_probs_bv < threshold, -jnp.inf, log_probs_bv)
  return log_probs_bv


def sample(
  logits_bv: jax.Array,
  key: jax.Array,
  params: SamplingParams,
  row_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row; returns `(tokens [B] int32, log-probs [B] float32)`.

  With `row_ids` `[B]`, row b draws with `fold_in(key, row_ids[b])`: a row's sample then depends
  on its id only, not on which other rows share the batch (or the host, or the device).
  """
  if row_ids is not None:
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids)
    return sample_rows(logits_bv, keys, params)
  log_probs = scaled_log_probs(logits_bv, params.temperature, params.banned_token_ids)
  if params.temperature == 0:
    tokens = jnp.argmax(log_probs, axis=-1)
  else:
    tokens = jax.random.categorical(key, _restrict(log_probs, params.top_k, params.top_p), axis=-1)
  tokens = tokens.astype(jnp.int32)
  return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def sample_rows(
  logits_bv: jax.Array, keys: jax.Array, params: SamplingParams
) -> tuple[jax.Array, jax.Array]:
  """`sample` with row b drawing with its own key `keys[b]`; returns `(tokens, log-probs)`."""
  log_probs = scaled_log_probs(logits_bv, params.temperature, params.banned_token_ids)
  if params.temperature == 0:
    tokens = jnp.argmax(log_probs, axis=-1)
  else:
    restricted = _restrict(log_probs, params.top_k, params.top_p)
    tokens = jax.vmap(jax.random.categorical)(keys, restricted)
  tokens = tokens.astype(jnp.int32)
  return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def stop_sequence_table(sequences: list[list[int]]) -> jax.Array | None:
  """Stop token sequences right-aligned in a `[S, M]` int32 table, -1 where shorter."""
  sequences = [s for s in sequences if s]
  if not sequences:
    return None
  width = max(len(s) for s in sequences)
  rows = [[-1] * (width - len(s)) + list(s) for s in sequences]
  return jnp.asarray(rows, jnp.int32)


def ends_with_any(history_bm: jax.Array, table_sm: jax.Array) -> jax.Array:
  """True per row when the last tokens `history [B, M]` end with one of the table's sequences."""
  match = (table_sm[None] == history_bm[:, None]) | (table_sm[None] < 0)
  return jnp.any(jnp.all(match, axis=-1), axis=-1)
