"""Per-token log-probabilities (and entropies) of targets, computed chunk by chunk over the length.

The float32 logits of a whole batch, `[B, L, V]` with V ~ 152k, are the largest array of a
policy-gradient step (4 x 8192 x 152064 x 4 bytes = 20 GB). Here the LM head and the log-softmax
run on `[B, C, V]` chunks inside a `lax.map`, and each chunk is rematerialised in the backward pass
(`jax.checkpoint`), so neither the forward nor the gradient ever holds more than one chunk of
logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _chunk_stats(
  model: nnx.Module, hidden_bce: jax.Array, targets_bc: jax.Array, with_entropy: bool
) -> tuple[jax.Array, jax.Array | None]:
  """Target log-probs `[B, C]` (and entropies) of one chunk, logits in float32."""
  logits = model.logits(hidden_bce).astype(jnp.float32)
  logp_bcv = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(logp_bcv, targets_bc[..., None], axis=-1)[..., 0]
  if not with_entropy:
    return target_logp, None
  entropy = -jnp.sum(jnp.exp(logp_bcv) * logp_bcv, axis=-1)
  return target_logp, entropy


def token_logprobs(
  model: nnx.Module,
  hidden_ble: jax.Array,
  targets_bl: jax.Array,
  *,
  chunk_size: int = 512,
  with_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """log p(targets) `[B, L]` float32 under `model.logits(hidden)`, never materialising `[B, L, V]`.

  Args:
    model: anything with `logits(hidden [B, C, E]) -> [B, C, V]` (the QwenVL LM head).
    hidden_ble: final hidden states `[B, L, E]`.
    targets_bl: int `[B, L]` token ids to score at each position (already shifted: the target at
      position t is the token at t + 1).
    chunk_size: positions per chunk; L is padded up to a multiple of it (padding is sliced off).
    with_entropy: also return the entropy of each position's distribution, `[B, L]` float32.

  Returns:
    log-probs `[B, L]`, or (log-probs, entropies) when `with_entropy`.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  batch, length, width = hidden_ble.shape
  if targets_bl.shape != (batch, length):
    raise ValueError(f"targets shape {targets_bl.shape} != hidden's [B, L] {(batch, length)}")
  chunk = min(chunk_size, length)
  n_chunks = -(-length // chunk)
  pad = n_chunks * chunk - length
  hidden = jnp.pad(hidden_ble, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets_bl.astype(jnp.int32), ((0, 0), (0, pad)))
  # [N, B, C, ...]: the chunk index leads, for lax.map.
  hidden_nbce = hidden.reshape(batch, n_chunks, chunk, width).swapaxes(0, 1)
  targets_nbc = targets.reshape(batch, n_chunks, chunk).swapaxes(0, 1)

  # Rematerialised: the backward keeps only each chunk's hidden states, not its logits.
  @jax.checkpoint
  def one(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array | None]:
    return _chunk_stats(model, *args, with_entropy)

  logp_nbc, entropy_nbc = jax.lax.map(one, (hidden_nbce, targets_nbc))

  def unchunk(x_nbc: jax.Array) -> jax.Array:
    return x_nbc.swapaxes(0, 1).reshape(batch, n_chunks * chunk)[:, :length]

  if not with_entropy:
    return unchunk(logp_nbc)
  return unchunk(logp_nbc), unchunk(entropy_nbc)
