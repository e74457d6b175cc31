"""Host side of the sampler: buckets, image encoding, sessions, stop strings, detokenisation.

A `Session` is a batch of live conversations on the device. `prefill` starts one from prompts,
`fork` turns each row into G rows that share its prefill, `generate` decodes the next assistant
turn of every row, and `append` adds a new user/tool turn (text and new images) to the cache
without re-running what is already there.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from rrvf_jax import sharding
from rrvf_jax.models.qwen_vl import kv_cache, rope
from rrvf_jax.models.qwen_vl.model import QwenVL
from rrvf_jax.processing import tokens
from rrvf_jax.rollout import engine, sampling

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class Segment:
  """New tokens for one row and the images whose `<|image_pad|>` runs they contain.

  Attributes:
    token_ids: `[T]` int ids (T may be 0: the row gets nothing new).
    pixel_values: `[P, D]` patches of the segment's images (None without images).
    image_grid_thw: `[I, 3]` grids of those images.
  """

  token_ids: np.ndarray
  pixel_values: np.ndarray | None = None
  image_grid_thw: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
  """One row's generated turn.

  Attributes:
    token_ids: `[n]` int32 tokens, the stop token or string included.
    logprobs: `[n]` float32 log-probs of those tokens under the sampling temperature.
    text: decoded text (special tokens kept).
    finish_reason: 'stop' (stop token or string), 'length' (token budget) or 'inactive'.
  """

  token_ids: np.ndarray
  logprobs: np.ndarray
  text: str
  finish_reason: str


@dataclasses.dataclass
class Session:
  """A batch of conversations living in a KV cache (`offset` slots used)."""

  state: engine.SequenceState
  offset: int

  @property
  def batch_size(self) -> int:
    return int(self.state.next_position.shape[0])


@dataclasses.dataclass
class SamplerStats:
  """Counters: how much work the sampler did, and how often each jitted function was traced."""

  prefill_rows: int = 0
  appended_rows: int = 0
  encoded_images: int = 0
  decode_calls: int = 0
  generated_tokens: int = 0
  traces: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length (beyond the largest: the next multiple of the largest)."""
  for b in buckets:
    if length <= b:
      return b
  top = buckets[-1]
  return -(-length // top) * top


def pad_rows(rows: Sequence[np.ndarray], length: int, fill: int) -> np.ndarray:
  out = np.full((len(rows), length), fill, np.int32)
  for i, row in enumerate(rows):
    out[i, : len(row)] = row
  return out


class SamplerBase:
  """What both engines share: parameters, image encoding, M-RoPE positions, stop strings."""

  def __init__(
    self,
    model: QwenVL,
    tokenizer: tokens.Tokenizer,
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    cache_dtype=None,
    mesh: Mesh | None = None,
    rules: sharding.Rules | None = None,
    encode_images: int = 32,
  ):
    self.config = model.config
    self.tokenizer = tokenizer
    self.special = tokens.special_token_ids(tokenizer)
    self.pad_id = self.special.pad_token_id
    self.buckets = tuple(sorted(buckets))
    self.cache_dtype = cache_dtype or model.dtype
    self.encode_images = encode_images  # images per call of the vision tower (bounds its memory)
    self.mesh = mesh
    self.rules = rules if rules is not None else sharding.FSDP_TP
    self.stats = SamplerStats()
    self.graphdef, self.params = nnx.split(model)
    self._jit_encode = jax.jit(self._encode)

  def set_params(self, params: nnx.State) -> None:
    """Samples with new weights from now on (same structure, e.g. after a train step)."""
    if jax.tree.structure(params) != jax.tree.structure(self.params):
      raise ValueError("set_params: the new parameters do not have the sampler's structure")
    self.params = params

  def _encode(self, params, pixel_values, vision_index):
    self.stats.traces["encode"] += 1
    return engine.merge(self.graphdef, params).encode_images(pixel_values, vision_index)

  def _run(self, fn, *args, **kwargs):
    """Calls a jitted function with the activation sharding rules active (used when tracing)."""
    if self.mesh is None:
      return fn(*args, **kwargs)
    with sharding.activation_rules(self.mesh, self.rules):
      return fn(*args, **kwargs)

  def _sharding(self, axes, shape) -> NamedSharding:
    """Sharding of an array of `shape` by logical `axes`; non-dividing axes stay replicated."""
    axes = tuple(axes) + (None,) * (len(shape) - len(axes))
    spec = sharding.logical_to_spec(axes, self.rules, self.mesh)
    return NamedSharding(self.mesh, sharding.divisible_spec(shape, spec, self.mesh))

  def rope_positions(self, ids, mask, segments: Sequence[Segment], start) -> np.ndarray:
    """Absolute M-RoPE positions `[3, B, T]` of new tokens: row b continues from `start[b]`."""
    grids = [s.image_grid_thw for s in segments if s.image_grid_thw is not None]
    grid = np.concatenate([np.asarray(g).reshape(-1, 3) for g in grids]) if grids else None
    relative, _ = rope.get_rope_index(
      ids,
      grid,
      mask,
      image_token_id=self.config.image_token_id,
      spatial_merge_size=self.config.vision.spatial_merge_size,
    )
    return (relative + np.asarray(start)[None, :, None]).astype(np.int32)

  def _features(self, segments: Sequence[Segment]):
    """Image features of the segments' images (the model's pytree, token axis first on every
    leaf), padded to a power-of-two row count.

    At most `encode_images` images are encoded per call: the tower's full-attention scores of
    every image in a call are alive at once (256 canvas images at 672 px: 87 GiB per device).
    A last, smaller group is padded with copies of its last image, so every group of a canvas
    size compiles once.
    """
    with_images = [s for s in segments if s.pixel_values is not None]
    if not with_images:
      return None
    pixels = np.concatenate([np.asarray(s.pixel_values) for s in with_images])
    grid = np.concatenate([np.asarray(s.image_grid_thw).reshape(-1, 3) for s in with_images])
    starts = np.concatenate([[0], np.cumsum(np.prod(grid, axis=1))])
    merge = self.config.vision.merge_unit
    parts = []
    for first in range(0, len(grid), self.encode_images):
      chosen = list(range(first, min(first + self.encode_images, len(grid))))
      real = sum(int(np.prod(grid[i])) // merge for i in chosen)
      if len(grid) > self.encode_images:
        chosen += [chosen[-1]] * (self.encode_images - len(chosen))
      group = np.concatenate([pixels[starts[i] : starts[i + 1]] for i in chosen])
      index = rope.make_vision_index(grid[chosen], self.config.vision)
      encoded = self._run(self._jit_encode, self.params, group, index)
      parts.append(jax.tree.map(lambda f, real=real: f[:real], encoded))
    features = parts[0] if len(parts) == 1 else jax.tree.map(lambda *f: jnp.concatenate(f), *parts)
    self.stats.encoded_images += len(grid)
    rows = jax.tree.leaves(features)[0].shape[0]
    padded = 1 << max(rows - 1, 0).bit_length()
    pad = lambda f: jnp.pad(f, ((0, padded - rows),) + ((0, 0),) * (f.ndim - 1))
    return jax.tree.map(pad, features)

  def stop_table(self, stop_strings: Sequence[str]) -> jax.Array | None:
    """Canonical token sequences of the stop strings, for the in-loop check."""
    return sampling.stop_sequence_table(
      [tokens.encode_text(self.tokenizer, s) for s in stop_strings]
    )


class Sampler(SamplerBase):
  """Jitted multimodal sampling for a Qwen-VL policy, with a KV cache shared across turns.

  The lock-step engine: all rows share one cache offset, so an appended turn is padded to the
  longest row's bucket and a decode call runs until its slowest row stops (`paged.PagedSampler`
  gives every row its own pages).
  """

  def __init__(
    self,
    model: QwenVL,
    tokenizer: tokens.Tokenizer,
    *,
    cache_length: int = 4096,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    cache_dtype=None,
    mesh: Mesh | None = None,
    rules: sharding.Rules | None = None,
    encode_images: int = 32,
  ):
    super().__init__(
      model,
      tokenizer,
      buckets=buckets,
      cache_dtype=cache_dtype,
      mesh=mesh,
      rules=rules,
      encode_images=encode_images,
    )
    self.cache_length = cache_length
    self._jit_append = jax.jit(self._append, donate_argnums=1)
    self._jit_decode = jax.jit(self._decode, static_argnames=("sampling_params",), donate_argnums=1)
    self._jit_fork = jax.jit(engine.fork, static_argnums=1)
    self._jit_trim = jax.jit(engine.trim, donate_argnums=0)

  # --- jitted bodies (the counters run at trace time only) ---

  def _append(self, params, state, input_ids, mask, positions, features, offset):
    self.stats.traces["append"] += 1
    model = engine.merge(self.graphdef, params)
    return engine.append(model, state, input_ids, mask, positions, features, offset)

  def _decode(self, params, state, offset, key, active, stop_table, first_row, *, sampling_params):
    self.stats.traces["decode"] += 1
    model = engine.merge(self.graphdef, params)
    return engine.decode(
      model, state, offset, key, active, stop_table, sampling_params, self.pad_id, first_row
    )

  # --- sessions ---

  def new_session(self, batch_size: int) -> Session:
    """An empty session of `batch_size` rows."""
    return Session(self.session_program(batch_size)(), 0)

  def session_program(self, batch_size: int):
    """The jitted function (no arguments) that makes an empty state of `batch_size` rows.

    Its outputs are placed as the sampler's later calls expect them: rows over the rules' batch
    axes, KV heads over tensor (each replicated where it does not divide).
    """
    make = functools.partial(
      engine.empty_state,
      engine.merge(self.graphdef, self.params),
      batch_size,
      self.cache_length,
      self.cache_dtype,
    )
    if self.mesh is None:
      return jax.jit(make)
    shapes = jax.eval_shape(make)
    shardings = jax.tree.map(lambda x: self._sharding(("batch",), x.shape), shapes)
    k_shape, v_shape = shapes.cache.k[0].shape, shapes.cache.v[0].shape
    k, v = self._sharding(kv_cache.K_AXES, k_shape), self._sharding(kv_cache.V_AXES, v_shape)
    cache = dataclasses.replace(
      shardings.cache, k=(k,) * len(shapes.cache.k), v=(v,) * len(shapes.cache.v)
    )
    shardings = dataclasses.replace(shardings, cache=cache)
    return jax.jit(make, out_shardings=shardings)

  def prefill(self, prompts: Sequence[Segment]) -> Session:
    """A new session holding `prompts` (one row each), ready to `generate`."""
    session = self.append(self.new_session(len(prompts)), prompts)
    self.stats.prefill_rows += len(prompts)
    return session

  def fork(self, session: Session, group_size: int) -> Session:
    """G copies of every row, side by side; the cache is copied, nothing is recomputed."""
    if group_size < 1:
      raise ValueError(f"group_size must be >= 1, got {group_size}")
    if group_size == 1:
      return session
    state = self._run(self._jit_fork, session.state, group_size)
    return Session(state, session.offset)

  def append(self, session: Session, segments: Sequence[Segment]) -> Session:
    """Adds each row's new tokens (and images) to the cache; only the new tokens are run."""
    batch = session.batch_size
    if len(segments) != batch:
      raise ValueError(f"got {len(segments)} segments for a session of {batch} rows")
    ids_list = [np.asarray(s.token_ids, np.int32).reshape(-1) for s in segments]
    longest = max(len(r) for r in ids_list)
    if longest == 0:
      return session
    length = bucket_length(longest, self.buckets)
    self._check_room(session.offset + length, "appending this turn")
    ids = pad_rows(ids_list, length, self.pad_id)
    mask = pad_rows([np.ones_like(r) for r in ids_list], length, 0)
    positions = self._positions(ids, mask, segments, session)
    features = self._features(segments)
    state = self._run(
      self._jit_append,
      self.params,
      session.state,
      ids,
      mask,
      positions,
      features,
      np.int32(session.offset),
    )
    self.stats.appended_rows += sum(1 for r in ids_list if len(r))
    return Session(state, session.offset + length)

  def _check_room(self, needed: int, what: str) -> None:
    if needed > self.cache_length:
      raise ValueError(
        f"{what} needs {needed} cache slots but the sampler has cache_length="
        f"{self.cache_length}; build the Sampler with a larger cache_length"
      )

  def _positions(self, ids, mask, segments: Sequence[Segment], session: Session) -> np.ndarray:
    """Absolute M-RoPE positions of the new tokens: each row continues from its next position."""
    start = np.asarray(jax.device_get(session.state.next_position))
    return self.rope_positions(ids, mask, segments, start)

  # --- decoding ---

  def generate(
    self,
    session: Session,
    params: sampling.SamplingParams,
    key: jax.Array,
    active: Sequence[bool] | np.ndarray | None = None,
    first_row: int = 0,
  ) -> tuple[Session, list[Completion]]:
    """Decodes the next turn of every active row; returns the updated session and completions.

    Row b samples with the key `fold_in(key, first_row + b)`: give each host's rows their global
    ids and a multi-host batch samples what one host sampling every row would.
    """
    batch = session.batch_size
    self._check_room(session.offset + params.max_new_tokens, "decoding")
    active_arr = np.ones((batch,), bool) if active is None else np.asarray(active, bool)
    if active_arr.shape != (batch,):
      raise ValueError(f"active must have shape ({batch},), got {active_arr.shape}")
    state, out = self._run(
      self._jit_decode,
      self.params,
      session.state,
      np.int32(session.offset),
      key,
      active_arr,
      self.stop_table(params.stop_strings),
      np.int32(first_row),
      sampling_params=params,
    )
    out = jax.device_get(out)
    self.stats.decode_calls += 1
    self.stats.generated_tokens += int(out.lengths.sum())
    completions, keep = self._completions(out, active_arr, params.stop_strings)
    if np.any(keep < out.lengths):
      state = self._run(self._jit_trim, state, np.int32(session.offset), keep, out.lengths)
    return Session(state, session.offset + int(out.steps)), completions

  def _completions(
    self, out: engine.DecodeOutput, active: np.ndarray, stop_strings: Sequence[str]
  ) -> tuple[list[Completion], np.ndarray]:
    """Per-row completions, cut after the first stop string; and how many tokens each keeps."""
    completions, keep = [], np.asarray(out.lengths).copy()
    for b in range(len(active)):
      n = int(out.lengths[b])
      ids = np.asarray(out.tokens[b, :n], np.int32)
      cut = first_stop(self.tokenizer, ids, stop_strings)
      reason = "stop" if out.stopped[b] else "length"
      if cut is not None and cut < n:
        n, reason = cut, "stop"
        keep[b] = n
      elif cut is not None:
        reason = "stop"
      if not active[b]:
        reason = "inactive"
      text = tokens.decode(self.tokenizer, ids[:n], skip_special_tokens=False)
      completions.append(Completion(ids[:n], np.asarray(out.logprobs[b, :n]), text, reason))
    return completions, keep

  def sample(
    self,
    prompts: Sequence[Segment],
    params: sampling.SamplingParams,
    key: jax.Array,
    group_size: int = 1,
  ) -> list[Completion]:
    """One turn for each prompt, G samples each (rows b*G .. b*G+G-1 belong to prompt b)."""
    session = self.fork(self.prefill(prompts), group_size)
    _, completions = self.generate(session, params, key)
    return completions


def first_stop(tokenizer, ids: np.ndarray, stop_strings: Sequence[str]) -> int | None:
  """Fewest leading tokens whose text contains a stop string (None when none occurs)."""
  if not stop_strings or not len(ids):
    return None
  text = tokens.decode(tokenizer, ids, skip_special_tokens=False)
  if not any(s in text for s in stop_strings):
    return None
  lo, hi = 1, len(ids)
  while lo < hi:
    mid = (lo + hi) // 2
    prefix = tokens.decode(tokenizer, ids[:mid], skip_special_tokens=False)
    if any(s in prefix for s in stop_strings):
      hi = mid
    else:
      lo = mid + 1
  logging.log_first_n(logging.DEBUG, "stop string found by text at token %d", 1, lo)
  return lo
