"""Paged key/value cache: a pool of fixed-size pages per layer, read through per-row page tables.

Layout (per layer): keys and values `[K, P, page_size, H]`, kv heads first, the layout of JAX's TPU
paged-attention kernel (`jax.experimental.pallas.ops.tpu.paged_attention`), so the heads shard
over `tensor` and a row's pages are wherever the host allocator put them. Page 0 is the null page:
writes of padding tokens land there and no row ever reads it.

A `PageView` says, for each row of a call, which pages are its own (`page_table`, in order), where
its new tokens start (`starts`: tokens already in its pages) and how many of the call's T tokens
are real (`q_lens`). Token t of row b goes to position `starts[b] + t`, and attends to the row's
positions `<=` its own. Rows never see each other's pages, so rows of any lengths share one call.

Attention has two implementations, chosen per sampler (`attention_impl`, read at trace time):
'xla' (default), the pure-JAX gather below, for any call; and 'pallas', JAX's TPU paged-attention
kernel (`jax.experimental.pallas.ops.tpu.paged_attention`, Apache-2.0, shipped with the pinned
jax), for calls of one query per row (decode steps); an append (T > 1) still takes the pure-JAX
path, the kernel being decode-only. 'pallas_interpret' is the kernel interpreted on CPU, for tests.
The kernel needs a head dim that is a multiple of 128 and bfloat16 pages (`check_kernel`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rrvf_jax import sharding
from rrvf_jax.models.qwen_vl import kv_cache
from rrvf_jax.models.qwen_vl.config import TextConfig

# Logical axes of a layer's key and value pages, for `rrvf_jax.sharding`.
PAGE_AXES = ("act_heads", None, None, None)
NULL_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageView:
  """Which pages each row of a call owns, and where its new tokens go.

  Attributes:
    page_table: `[B, Pmax]` int32 page ids of each row, in order (unused entries: `NULL_PAGE`).
    starts: `[B]` int32 tokens already in the row's pages (its first new token's position).
    q_lens: `[B]` int32 real new tokens of the row (the rest of the call's T are padding).
  """

  page_table: jax.Array
  starts: jax.Array
  q_lens: jax.Array

  @property
  def kv_lens(self) -> jax.Array:
    """`[B]` tokens in each row's pages once the call's tokens are written."""
    return self.starts + self.q_lens


def init(cfg: TextConfig, num_pages: int, page_size: int, dtype) -> tuple[tuple, tuple]:
  """Empty key and value pools of `num_pages` pages (page 0 included) per layer."""
  shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
  k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return k, v


def _slots(view: PageView, num_tokens: int, page_size: int) -> tuple[jax.Array, jax.Array]:
  """Page id and in-page offset `[B, T]` of each new token (padding tokens: the null page)."""
  t = jnp.arange(num_tokens, dtype=jnp.int32)[None, :]
  position = view.starts[:, None] + t
  column = jnp.clip(position // page_size, 0, view.page_table.shape[1] - 1)
  page = jnp.take_along_axis(view.page_table, column, axis=1)
  real = t < view.q_lens[:, None]
  return jnp.where(real, page, NULL_PAGE), position % page_size


def write(k_pages, v_pages, k_btkh: jax.Array, v_btkh: jax.Array, view: PageView):
  """Writes T new keys/values `[B, T, K, H]` of each row to its positions `starts + [0, T)`."""
  page, offset = _slots(view, k_btkh.shape[1], k_pages.shape[2])
  k_new = jnp.transpose(k_btkh, (2, 0, 1, 3)).astype(k_pages.dtype)
  v_new = jnp.transpose(v_btkh, (2, 0, 1, 3)).astype(v_pages.dtype)
  return k_pages.at[:, page, offset].set(k_new), v_pages.at[:, page, offset].set(v_new)


# Queries of an append attended at once (as `kv_cache.QUERY_BLOCK`: bounds the f32 scores).
QUERY_BLOCK = 256


IMPLS = ("xla", "pallas", "pallas_interpret")
_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar(
  "rrvf_jax_paged_attention_impl", default="xla"
)


def check_impl(impl: str) -> str:
  """`impl` if it names an implementation of `attention`; a ValueError listing them otherwise."""
  if impl not in IMPLS:
    raise ValueError(f"unknown paged attention implementation {impl!r}; known: {list(IMPLS)}")
  return impl


@contextlib.contextmanager
def attention_impl(impl: str) -> Iterator[None]:
  """Within this context, `attention` without an `impl` uses `impl` (read at trace time)."""
  token = _IMPL.set(check_impl(impl))
  try:
    yield
  finally:
    _IMPL.reset(token)


def attention(
  q_btnh: jax.Array,
  k_pages,
  v_pages,
  view: PageView,
  *,
  scale: float,
  block: int | None = None,
  impl: str | None = None,
) -> jax.Array:
  """GQA attention of each row's `[T, N, H]` queries over its own pages; f32 scores and softmax.

  The pure-JAX ragged paged attention: every row gathers the pages of its table (the table is as
  wide as the call's longest row, bucketed by the host), so no row reads another's pages and no
  row reads more than the call's widest row. Query head n reads kv head n // (N/K) (HF's
  repeat-interleave). Padding queries come out finite.

  `impl` (default: `attention_impl`'s, else 'xla'): with 'pallas' or 'pallas_interpret' a call of
  one query per row goes to the TPU kernel (`kernel_attention`); longer calls stay here.
  """
  b, t, _, h = q_btnh.shape
  impl = check_impl(impl or _IMPL.get())
  if impl != "xla" and t == 1:
    return kernel_attention(
      q_btnh, k_pages, v_pages, view, scale=scale, interpret=impl == "pallas_interpret"
    )
  block = block or QUERY_BLOCK
  kv_heads = k_pages.shape[0]
  # [K, B, Pmax, page, H] -> [K, B, S, H]: each row's keys and values in position order.
  k = k_pages[:, view.page_table].reshape(kv_heads, b, -1, h)
  v = v_pages[:, view.page_table].reshape(kv_heads, b, -1, h)
  key_position = jnp.arange(k.shape[2], dtype=jnp.int32)
  query_position = view.starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  mask = (key_position[None, None, :] <= query_position[:, :, None]) & (
    key_position[None, None, :] < view.kv_lens[:, None, None]
  )
  attend = lambda q, mask: _attend(q, k, v, mask, scale=scale)
  return kv_cache.in_query_blocks(attend, q_btnh, mask, block)


def _attend(q_btnh, k_kbsh, v_kbsh, mask_bts, *, scale: float) -> jax.Array:
  """Attention of all the queries at once over gathered `[K, B, S, H]` keys and values."""
  b, t, n, h = q_btnh.shape
  kv_heads = k_kbsh.shape[0]
  q = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("btkgh,kbsh->bkgts", q, k_kbsh.astype(q.dtype))
  scores = scores.astype(jnp.float32) * scale
  scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_kbsh.dtype)
  out = jnp.einsum("bkgts,kbsh->btkgh", probs, v_kbsh)
  return out.reshape(b, t, n, h).astype(q_btnh.dtype)


# Tokens of a row the kernel loads per step at most (pages_per_compute_block x page_size): 2 x 512
# bfloat16 keys and values of head dim 128, double-buffered, are 0.5 MiB of VMEM.
KERNEL_BLOCK_TOKENS = 512
# The kernel prefetches its whole page table (flattened, int32) into SMEM, 1 MiB on v4, v5e, v5p
# and v6e: 256 rows of 1024 pages overflow it, so rows go to the kernel in groups of at most this
# many table entries (half of it, the rest for the kernel's other scalars).
KERNEL_TABLE_ENTRIES = 2**17
# Device kinds of chips whose device is two TensorCores (megacore): the kernel splits its grid
# over both only when told to (`megacore_mode`).
MEGACORE_KINDS = ("TPU v4", "TPU v5")


def check_kernel(head_dim: int, dtype) -> None:
  """Raises a ValueError naming the fix when the TPU kernel cannot take these pages."""
  if head_dim % 128:
    # Pallas' TPU lowering rejects 64: the kernel's blocks of its [..., 1] softmax statistics are
    # head_dim wide, and a block's last dim must be a multiple of 128 (or the array's own).
    raise ValueError(
      f"paged attention impl 'pallas' needs a head dim that is a multiple of 128, got "
      f"{head_dim}; use impl 'xla'"
    )
  if jnp.dtype(dtype) != jnp.bfloat16:
    # The kernel casts the pages it loads to bfloat16 (its dequantisation step), so float32 pages
    # would be rounded where the 'xla' path reads them exactly.
    raise ValueError(
      f"paged attention impl 'pallas' reads keys and values as bfloat16, the pages are "
      f"{jnp.dtype(dtype).name}; use a bfloat16 cache (cache_dtype=jnp.bfloat16) or impl 'xla'"
    )


def kernel_attention(
  q_btnh: jax.Array,
  k_pages,
  v_pages,
  view: PageView,
  *,
  scale: float,
  interpret: bool = False,
  megacore: str | None = "auto",
) -> jax.Array:
  """`attention` of one query per row `[B, 1, N, H]` with JAX's TPU paged-attention kernel.

  Row b reads its first `kv_lens[b]` positions (a decode query's own key included), as the 'xla'
  path; a row with no key at all comes out 0 (the 'xla' path: the mean of its table's values).
  Scores and softmax are float32, over the bfloat16 pages as they are. Under `sharding`'s
  activation rules the kernel runs per device on its kv heads (and rows) in a `shard_map`, as a
  custom call XLA cannot partition. `megacore` is the kernel's `megacore_mode`; 'auto': over kv
  heads or rows on two-TensorCore chips, none elsewhere (and interpreted: one simulated core).
  Rows go to the kernel in groups whose page tables fit its scalar memory (`KERNEL_TABLE_ENTRIES`).
  """
  # Imported here: Pallas' TPU modules load only where the kernel is used.
  from jax.experimental.pallas import tpu as pltpu
  from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

  b, t, _, h = q_btnh.shape
  if t != 1:
    raise ValueError(f"the paged-attention kernel takes one query per row, got {t}")
  check_kernel(h, k_pages.dtype)
  width = view.page_table.shape[1]
  # The kernel steps through a row's table in blocks that must divide the table's width.
  pages_per_block = math.gcd(width, max(1, KERNEL_BLOCK_TOKENS // k_pages.shape[2]))
  # The kernel does not scale: the queries go in pre-scaled, in float32 like the 'xla' scores.
  q = q_btnh[:, 0].astype(jnp.float32) * scale
  lengths = view.kv_lens.astype(jnp.int32)
  table = view.page_table.astype(jnp.int32)
  active = sharding.active_rules()
  mesh = active[0] if active else None
  device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]

  def kernel(q, k_pages, v_pages, lengths, table):
    mode = megacore
    if mode == "auto":
      mode = None
      if not interpret and device.device_kind in MEGACORE_KINDS:
        mode = "kv_head" if k_pages.shape[0] % 2 == 0 else "batch" if q.shape[0] % 2 == 0 else None
    run = functools.partial(
      paged_attention, pages_per_compute_block=pages_per_block, megacore_mode=mode
    )
    if not interpret:
      return run(q, k_pages, v_pages, lengths, table)
    # Megacore modes split the grid over two cores, each with its own scalar memory: the
    # interpreter must simulate two, or the second core waits for a copy it never started.
    params = pltpu.InterpretParams(num_cores_or_threads=2 if mode else 1)
    with pltpu.force_tpu_interpret_mode(params):
      return run(q, k_pages, v_pages, lengths, table)

  def call(q, k_pages, v_pages, lengths, table):
    group = max(1, KERNEL_TABLE_ENTRIES // width)
    group -= group % 2 if group > 1 else 0  # even groups keep megacore's split over rows
    outs = [
      kernel(q[i : i + group], k_pages, v_pages, lengths[i : i + group], table[i : i + group])
      for i in range(0, q.shape[0], group)
    ]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)

  if mesh is None:
    out = call(q, k_pages, v_pages, lengths, table)
  else:
    rules = active[1]
    heads = sharding.divisible_spec(
      k_pages.shape, sharding.logical_to_spec(PAGE_AXES, rules, mesh), mesh
    )[0]
    rows = sharding.divisible_spec((b,), sharding.logical_to_spec(("batch",), rules, mesh), mesh)[0]
    spec = PartitionSpec(rows, heads, None)
    pages = PartitionSpec(heads, None, None, None)
    out = jax.shard_map(
      call,
      mesh=mesh,
      in_specs=(spec, pages, pages, PartitionSpec(rows), PartitionSpec(rows, None)),
      out_specs=spec,
      check_vma=False,
    )(q, k_pages, v_pages, lengths, table)
  return out[:, None].astype(q_btnh.dtype)


def copy_pages(k_pages, v_pages, source: jax.Array, target: jax.Array):
  """Copies pages `source[i]` to `target[i]` (a forked row's own copy of a partly filled page)."""
  return k_pages.at[:, target].set(k_pages[:, source]), v_pages.at[:, target].set(
    v_pages[:, source]
  )
