"""Host side of the paged engine: a page allocator, and rows that each own their pages.

`PagedSampler` keeps, per row of a rollout, its page list, its length and its next M-RoPE
position; the device (`paged_engine`) keeps the page pools and each row's next-token logits.

- `append(rows, segments)` runs rows' new turns at their own positions (one call per group of
  rows, padded to a length bucket; no row is padded to another row's length in the cache).
- `fork(parent, children)` gives children the parent's full pages by reference and their own copy
  of its partly filled last page: a group of G costs one prompt's KV plus its own tokens.
- `decode(turns, params)` decodes the rows currently in the decode slots (`TurnState`s), each from
  its own position and with its own token budget, until one finishes (its slot can be refilled)
  or `decode_steps` steps; rows not in the call keep their pages and wait (e.g. for a render).
- `release(row)` returns a finished row's pages.

The continuous-batching loop that moves rows in and out of the slots is the episode driver's
(`episode.run_episodes`); `generate_turns` is a plain one (every row decodes one turn).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rrvf_jax import sharding
from rrvf_jax.models.qwen_vl import paged_kv
from rrvf_jax.models.qwen_vl.model import QwenVL
from rrvf_jax.processing import tokens
from rrvf_jax.rollout import engine, paged_engine, sampling
from rrvf_jax.rollout.sampler import (
  DEFAULT_BUCKETS,
  Completion,
  SamplerBase,
  Segment,
  bucket_length,
  first_stop,
  pad_rows,
)


class PoolExhaustedError(RuntimeError):
  """The page pool has no free page for a request."""


class PageAllocator:
  """Free list and reference counts of a pool's pages (page 0, the null page, is never given)."""

  def __init__(self, num_pages: int):
    if num_pages < 2:
      raise ValueError(
        f"a page pool needs at least 2 pages (one is the null page), got {num_pages}"
      )
    self.num_pages = num_pages
    self.refs = np.zeros((num_pages,), np.int32)
    self.refs[paged_kv.NULL_PAGE] = 1
    self._free = list(range(num_pages - 1, 0, -1))
    self.peak_used = 0

  @property
  def free(self) -> int:
    return len(self._free)

  @property
  def used(self) -> int:
    return self.num_pages - 1 - len(self._free)

  def alloc(self, n: int) -> list[int]:
    """`n` fresh pages (reference count 1)."""
    if n > len(self._free):
      raise PoolExhaustedError(
        f"the page pool needs {n} more pages but has {len(self._free)} free of {self.num_pages}"
      )
    pages = [self._free.pop() for _ in range(n)]
    self.refs[pages] = 1
    self.peak_used = max(self.peak_used, self.used)
    return pages

  def share(self, pages: Sequence[int]) -> None:
    """One more reference to each of `pages`."""
    np.add.at(self.refs, np.asarray(pages, np.int64), 1)

  def release(self, pages: Sequence[int]) -> None:
    """Drops one reference to each page; pages nobody references are free again."""
    for page in pages:
      if self.refs[page] <= 0 or page == paged_kv.NULL_PAGE:
        raise ValueError(f"page {page} released but not held")
      self.refs[page] -= 1
      if self.refs[page] == 0:
        self._free.append(page)


@dataclasses.dataclass
class RowCache:
  """A row's place in the pool: its pages in order, its tokens, its next M-RoPE position."""

  pages: list[int] = dataclasses.field(default_factory=list)
  length: int = 0
  next_position: int = 0


@dataclasses.dataclass
class TurnState:
  """A row's turn being decoded: its key, budget, and what it has generated so far."""

  row: int
  key: jax.Array
  budget: int
  token_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  history: np.ndarray | None = None
  stopped: bool = False

  @property
  def done(self) -> bool:
    return self.stopped or len(self.token_ids) >= self.budget


@dataclasses.dataclass
class PagedStats:
  """Counters of the paged engine (on top of `SamplerStats`)."""

  decode_slot_steps: int = 0  # decode steps x slots of each call (the work done, padding included)
  peak_pages: int = 0
  forked_rows: int = 0
  shared_pages: int = 0  # page references given by forks instead of copies


def _pow2_at_least(n: int, floor: int = 1) -> int:
  return max(floor, 1 << max(n - 1, 0).bit_length())


class PagedSampler(SamplerBase):
  """Multimodal sampling with a paged KV cache: every row its own pages, length and budget."""

  def __init__(
    self,
    model: QwenVL,
    tokenizer: tokens.Tokenizer,
    *,
    row_tokens: int | None = None,
    num_pages: int | None = None,
    max_rows: int = 1,
    page_size: int = 16,
    decode_slots: int | None = None,
    decode_steps: int = 64,
    append_rows: int | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    cache_dtype=None,
    mesh: Mesh | None = None,
    rules: sharding.Rules | None = None,
    encode_images: int = 32,
    attention_impl: str = "xla",
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
    if page_size < 1 or max_rows < 1 or decode_steps < 1:
      raise ValueError("page_size, max_rows and decode_steps must be positive")
    if num_pages is None and row_tokens is None:
      raise ValueError("PagedSampler needs num_pages, or row_tokens to size the pool per rollout")
    self.row_tokens = row_tokens
    self.fixed_pages = num_pages
    self.page_size = page_size
    self.max_rows = max_rows
    self.num_pages = num_pages or self.pages_for(max_rows)
    self.decode_slots = decode_slots
    self.decode_steps = decode_steps
    self.append_rows = append_rows
    # Decode steps' attention (`paged_kv.attention`): 'xla', or the TPU kernel 'pallas'.
    self.attention_impl = paged_kv.check_impl(attention_impl)
    if attention_impl != "xla":
      paged_kv.check_kernel(self.config.text.head_dim, self.cache_dtype)
    self.paged = PagedStats()
    self.allocator = PageAllocator(self.num_pages)
    self.rows: list[RowCache] = []
    self.state: paged_engine.PagedState | None = None
    self._jit_append = jax.jit(self._append, donate_argnums=1)
    self._jit_decode = jax.jit(
      self._decode, static_argnames=("sampling_params", "steps"), donate_argnums=1
    )
    self._jit_fork = jax.jit(paged_engine.fork, donate_argnums=0)

  @property
  def cache_length(self) -> int:
    """Tokens the whole pool holds (a row alone could use all of them)."""
    return (self.num_pages - 1) * self.page_size

  @property
  def slots(self) -> int:
    """Rows decoded together at most (`decode_slots`; default: every row of the rollout)."""
    return self.decode_slots or self.max_rows

  def pages_for(self, rows: int) -> int:
    """A pool where `rows` rows of `row_tokens` tokens each never run out (the null page too)."""
    return rows * -(-self.row_tokens // self.page_size) + 1

  # --- jitted bodies (the counters run at trace time only) ---

  def _append(self, params, state, rows, input_ids, positions, features, view):
    self.stats.traces["paged_append"] += 1
    model = engine.merge(self.graphdef, params)
    with paged_kv.attention_impl(self.attention_impl):
      return paged_engine.append(model, state, rows, input_ids, positions, features, view)

  def _decode(self, params, state, slots, stop_table, yield_on_done, *, sampling_params, steps):
    self.stats.traces["paged_decode"] += 1
    model = engine.merge(self.graphdef, params)
    with paged_kv.attention_impl(self.attention_impl):
      return paged_engine.decode(
        model, state, slots, stop_table, yield_on_done, sampling_params, self.pad_id, steps
      )

  def state_program(self):
    """The jitted function (no arguments) that makes the empty pools and logits."""
    make = functools.partial(
      paged_engine.empty_state,
      engine.merge(self.graphdef, self.params),
      self.num_pages,
      self.page_size,
      self.max_rows,
      self.cache_dtype,
    )
    if self.mesh is None:
      return jax.jit(make)
    shapes = jax.eval_shape(make)
    pages = self._sharding(paged_kv.PAGE_AXES, shapes.k[0].shape)
    shardings = paged_engine.PagedState(
      k=(pages,) * len(shapes.k),
      v=(pages,) * len(shapes.v),
      logits=self._sharding((None, None), shapes.logits.shape),
    )
    return jax.jit(make, out_shardings=shardings)

  # --- rows ---

  def start(self, num_rows: int) -> None:
    """Begins a rollout of `num_rows` empty rows (every page of the last one is freed)."""
    pages = self.fixed_pages or self.pages_for(max(num_rows, self.max_rows))
    if num_rows > self.max_rows or pages != self.num_pages:  # a bigger rollout: new pools
      self.max_rows, self.num_pages, self.state = max(num_rows, self.max_rows), pages, None
    if self.state is None:
      self.state = self._run(self.state_program())
    self.allocator = PageAllocator(self.num_pages)
    self.rows = [RowCache() for _ in range(num_rows)]

  def release(self, row: int) -> None:
    """Frees a finished row's pages."""
    self.allocator.release(self.rows[row].pages)
    self.rows[row] = RowCache()

  def truncate(self, row: int, drop: int) -> None:
    """Forgets the row's last `drop` tokens (generated after a stop string)."""
    cache = self.rows[row]
    cache.length -= drop
    cache.next_position -= drop

  def _reserve(self, row: int, total: int) -> None:
    """Gives the row pages for `total` tokens."""
    cache = self.rows[row]
    need = -(-total // self.page_size) - len(cache.pages)
    if need > 0:
      cache.pages += self.allocator.alloc(need)
      self.paged.peak_pages = max(self.paged.peak_pages, self.allocator.used)

  def pages_needed(self, row: int, total: int) -> int:
    """New pages the row needs to hold `total` tokens."""
    return max(0, -(-total // self.page_size) - len(self.rows[row].pages))

  def _page_table(self, rows: Sequence[int], width_tokens: int, batch: int) -> np.ndarray:
    """`[batch, Pmax]` page tables (Pmax: a power of two covering `width_tokens`)."""
    width = _pow2_at_least(-(-width_tokens // self.page_size))
    table = np.full((batch, width), paged_kv.NULL_PAGE, np.int32)
    for i, r in enumerate(rows):
      pages = self.rows[r].pages[:width]
      table[i, : len(pages)] = pages
    return table

  def append(self, rows: Sequence[int], segments: Sequence[Segment]) -> None:
    """Runs each row's new tokens (and images) at its own position; only the new tokens run."""
    if len(rows) != len(segments):
      raise ValueError(f"got {len(segments)} segments for {len(rows)} rows")
    work = [(r, s) for r, s in zip(rows, segments, strict=True) if len(s.token_ids)]
    step = self.append_rows or self.slots
    for first in range(0, len(work), step):
      self._append_group(work[first : first + step])

  def _append_group(self, work: Sequence[tuple[int, Segment]]) -> None:
    rows = [r for r, _ in work]
    ids_list = [np.asarray(s.token_ids, np.int32).reshape(-1) for _, s in work]
    batch = _pow2_at_least(len(work))
    length = bucket_length(max(len(i) for i in ids_list), self.buckets)
    for r, ids in zip(rows, ids_list, strict=True):
      self._reserve(r, self.rows[r].length + len(ids))
    empty = [np.zeros((0,), np.int32)] * (batch - len(work))
    ids = pad_rows(ids_list + empty, length, self.pad_id)
    mask = pad_rows([np.ones_like(i) for i in ids_list] + empty, length, 0)
    starts = np.zeros((batch,), np.int32)
    starts[: len(rows)] = [self.rows[r].length for r in rows]
    next_positions = np.zeros((batch,), np.int32)
    next_positions[: len(rows)] = [self.rows[r].next_position for r in rows]
    segments = [s for _, s in work]
    positions = self.rope_positions(ids, mask, segments, next_positions)
    q_lens = mask.sum(axis=1).astype(np.int32)
    # The table covers the padded length (a bucket), so prompts of one bucket share a program.
    view = paged_kv.PageView(
      self._page_table(rows, int(starts.max()) + length, batch), starts, q_lens
    )
    row_ids = np.full((batch,), self.max_rows, np.int32)
    row_ids[: len(rows)] = rows
    self.state = self._run(
      self._jit_append,
      self.params,
      self.state,
      row_ids,
      ids,
      positions,
      self._features(segments),
      view,
    )
    for i, r in enumerate(rows):
      cache = self.rows[r]
      cache.length += int(q_lens[i])
      real = mask[i] != 0
      cache.next_position = int(positions[:, i][:, real].max()) + 1
    self.stats.appended_rows += len(rows)

  def prefill(self, rows: Sequence[int], prompts: Sequence[Segment]) -> None:
    """`append` of the rows' prompts (the rows must be empty)."""
    if any(self.rows[r].length for r in rows):
      raise ValueError("prefill: a row already holds tokens")
    self.append(rows, prompts)
    self.stats.prefill_rows += len(rows)

  def fork(self, parent: int, children: Sequence[int]) -> None:
    """Children continue from the parent's state: its full pages shared, the last page copied."""
    source = self.rows[parent]
    full, partial = divmod(source.length, self.page_size)
    copies: list[tuple[int, int]] = []
    for child in children:
      if self.rows[child].length or self.rows[child].pages:
        raise ValueError(f"fork: row {child} is not empty")
      pages = list(source.pages[:full])
      self.allocator.share(pages)
      self.paged.shared_pages += len(pages)
      if partial:
        own = self.allocator.alloc(1)
        copies.append((source.pages[full], own[0]))
        pages += own
      self.rows[child] = RowCache(pages, source.length, source.next_position)
    self.paged.peak_pages = max(self.paged.peak_pages, self.allocator.used)
    self.paged.forked_rows += len(children)
    n_pages = _pow2_at_least(len(copies))
    n_rows = _pow2_at_least(len(children))
    src_pages = np.zeros((n_pages,), np.int32)
    dst_pages = np.zeros((n_pages,), np.int32)
    for i, (s, d) in enumerate(copies):
      src_pages[i], dst_pages[i] = s, d
    src_rows = np.full((n_rows,), self.max_rows, np.int32)
    dst_rows = np.full((n_rows,), self.max_rows, np.int32)
    src_rows[: len(children)] = parent
    dst_rows[: len(children)] = children
    self.state = self._run(self._jit_fork, self.state, src_pages, dst_pages, src_rows, dst_rows)

  # --- decoding ---

  def turn_key(self, key: jax.Array, turn: int, row_id: int) -> jax.Array:
    """The key of a row's turn: `fold_in(fold_in(key, turn), row_id)` (token j: `fold_in(., j)`)."""
    return jax.random.fold_in(jax.random.fold_in(key, turn), row_id)

  def decode(
    self,
    turns: Sequence[TurnState],
    params: sampling.SamplingParams,
    *,
    yield_on_done: bool = True,
  ) -> None:
    """Decodes the turns in the slots (at most `slots`) for one call; updates them."""
    if not turns or len(turns) > self.slots:
      raise ValueError(f"decode takes 1..{self.slots} turns, got {len(turns)}")
    batch = _pow2_at_least(len(turns))
    stop_table = self.stop_table(params.stop_strings)
    width = 1 if stop_table is None else int(stop_table.shape[1])
    budgets = np.zeros((batch,), np.int32)
    for i, t in enumerate(turns):
      budgets[i] = min(t.budget - len(t.token_ids), self.decode_steps)
      self._reserve(t.row, self.rows[t.row].length + int(budgets[i]))
    rows = [t.row for t in turns]
    starts = np.zeros((batch,), np.int32)
    starts[: len(rows)] = [self.rows[r].length for r in rows]
    positions = np.zeros((batch,), np.int32)
    positions[: len(rows)] = [self.rows[r].next_position for r in rows]
    counts = np.zeros((batch,), np.int32)
    counts[: len(rows)] = [len(t.token_ids) for t in turns]
    history = np.full((batch, width), -2, np.int32)
    for i, t in enumerate(turns):
      if t.history is not None:
        history[i] = t.history
    row_ids = np.full((batch,), self.max_rows, np.int32)
    row_ids[: len(rows)] = rows
    keys = jnp.stack([t.key for t in turns] + [turns[0].key] * (batch - len(turns)))
    slots = paged_engine.SlotInputs(
      rows=row_ids,
      page_table=self._page_table(rows, int((starts + budgets).max()), batch),
      starts=starts,
      positions=positions,
      keys=keys,
      counts=counts,
      budgets=budgets,
      history=history,
    )
    self.state, out, history = self._run(
      self._jit_decode,
      self.params,
      self.state,
      slots,
      stop_table,
      np.bool_(yield_on_done),
      sampling_params=params,
      steps=self.decode_steps,
    )
    out, history = jax.device_get((out, history))
    self.stats.decode_calls += 1
    self.paged.decode_slot_steps += int(out.steps) * batch
    for i, t in enumerate(turns):
      n = int(out.lengths[i])
      t.token_ids += out.tokens[i, :n].tolist()
      t.logprobs += out.logprobs[i, :n].tolist()
      t.stopped |= bool(out.stopped[i])
      t.history = history[i]
      self.rows[t.row].length += n
      self.rows[t.row].next_position += n
      self.stats.generated_tokens += n

  def completion(self, turn: TurnState, stop_strings: Sequence[str]) -> Completion:
    """A finished turn as a `Completion`, cut after its first stop string (and forgotten after)."""
    ids = np.asarray(turn.token_ids, np.int32)
    n = len(ids)
    cut = first_stop(self.tokenizer, ids, stop_strings)
    reason = "stop" if turn.stopped or cut is not None else "length"
    if cut is not None and cut < n:
      self.truncate(turn.row, n - cut)
      n = cut
    text = tokens.decode(self.tokenizer, ids[:n], skip_special_tokens=False)
    return Completion(ids[:n], np.asarray(turn.logprobs[:n], np.float32), text, reason)

  def generate_turns(
    self,
    rows: Sequence[int],
    params: sampling.SamplingParams,
    key: jax.Array,
    turn: int = 0,
    first_row: int = 0,
  ) -> list[Completion]:
    """Decodes one turn of every row, streaming them through the decode slots."""
    pending = [
      TurnState(r, self.turn_key(key, turn, first_row + r), params.max_new_tokens) for r in rows
    ]
    pending.reverse()
    running: list[TurnState] = []
    finished: dict[int, Completion] = {}
    while pending or running:
      while pending and len(running) < self.slots:
        running.append(pending.pop())
      self.decode(running, params, yield_on_done=bool(pending))
      for t in [t for t in running if t.done]:
        finished[t.row] = self.completion(t, params.stop_strings)
      running = [t for t in running if not t.done]
    return [finished[r] for r in rows]

  def sample(
    self,
    prompts: Sequence[Segment],
    params: sampling.SamplingParams,
    key: jax.Array,
    group_size: int = 1,
  ) -> list[Completion]:
    """One turn for each prompt, G samples each (rows b*G .. b*G+G-1 belong to prompt b)."""
    self.start(len(prompts) * group_size)
    parents = [b * group_size for b in range(len(prompts))]
    self.prefill(parents, prompts)
    for p in parents:
      self.fork(p, list(range(p + 1, p + group_size)))
    return self.generate_turns(list(range(len(prompts) * group_size)), params, key)
