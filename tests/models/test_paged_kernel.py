"""JAX's TPU paged-attention kernel (interpreted on CPU) against the pure-JAX paged attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

from rrvf_jax import sharding
from rrvf_jax.models.qwen_vl import paged_kv

PAGE, HEAD_DIM = 16, 128


def scattered_rows(lengths, kv_heads, groups, *, seed=0, width=None):
  """Decode queries of rows of `lengths` keys (their last one the query's own) in shuffled pages.

  Returns float32 queries `[B, 1, N, H]`, bfloat16 key and value pools and the rows' view.
  """
  rng = np.random.default_rng(seed)
  pages = [-(-n // PAGE) for n in lengths]
  width = width or max(1, 1 << (max(pages) - 1).bit_length())
  num_pages = sum(pages) + 3  # the null page and two pages no row owns
  order = rng.permutation(np.arange(1, num_pages))
  table = np.zeros((len(lengths), width), np.int32)
  used = 0
  for r, n in enumerate(pages):
    table[r, :n] = order[used : used + n]
    used += n
  shape = (kv_heads, num_pages, PAGE, HEAD_DIM)
  k = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  v = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  q = rng.normal(size=(len(lengths), 1, kv_heads * groups, HEAD_DIM)).astype(np.float32)
  lengths = np.asarray(lengths, np.int32)
  # A row of n keys queries at position n - 1 (its new token's key is in its pages already).
  view = paged_kv.PageView(table, np.maximum(lengths - 1, 0), (lengths > 0).astype(np.int32))
  return q, k, v, view


def xla(q, k, v, view):
  """The pure-JAX path over the same (bfloat16) keys and values, in float32."""
  f32 = lambda x: x.astype(jnp.float32)
  return np.asarray(paged_kv.attention(q, f32(k), f32(v), view, scale=HEAD_DIM**-0.5, impl="xla"))


@pytest.mark.parametrize(
  "kv_heads, groups, megacore",
  [(2, 2, "auto"), (1, 4, None), (2, 2, "batch"), (2, 4, "kv_head")],
)
def test_kernel_equals_the_xla_path_on_scattered_rows(kv_heads, groups, megacore):
  """Rows of 1 to 513 keys (two kernel blocks), a finished row and an empty one; GQA N = 2K, 4K.

  The megacore modes split the grid over two (simulated) cores, as on v4 and v5p.
  """
  lengths = [1, 16, 17, 200, 513, 40, 0, 33]
  q, k, v, view = scattered_rows(lengths, kv_heads, groups)
  # Row 7 finished its turn: no new token (q_lens 0), it reads the keys it has, as in the loop.
  starts, q_lens = np.asarray(view.starts).copy(), np.asarray(view.q_lens).copy()
  starts[7], q_lens[7] = lengths[7], 0
  view = paged_kv.PageView(view.page_table, starts, q_lens)
  got = np.asarray(
    paged_kv.kernel_attention(
      q, k, v, view, scale=HEAD_DIM**-0.5, interpret=True, megacore=megacore
    )
  )
  want = xla(q, k, v, view)
  keyed = np.asarray(lengths) > 0
  np.testing.assert_allclose(got[keyed], want[keyed], atol=2e-6, rtol=0)
  assert not np.any(got[~keyed]), "a row with no keys comes out 0"
  assert np.abs(want[keyed]).max() > 0.5  # the outputs are not trivially small


def test_rows_go_to_the_kernel_in_groups_its_scalar_memory_holds(monkeypatch):
  # The kernel keeps its flattened page table in SMEM (1 MiB: 256 rows x 1024 pages overflow it,
  # as the 7B compile check found): here groups of 2 rows of 4 pages (8 table entries).
  q, k, v, view = scattered_rows([5, 60, 1, 33, 17], 2, 2, seed=5)
  assert view.page_table.shape[1] == 4
  monkeypatch.setattr(paged_kv, "KERNEL_TABLE_ENTRIES", 8)
  got = paged_kv.attention(q, k, v, view, scale=HEAD_DIM**-0.5, impl="pallas_interpret")
  jaxpr = jax.make_jaxpr(
    lambda q: paged_kv.attention(q, k, v, view, scale=HEAD_DIM**-0.5, impl="pallas_interpret")
  )(q)
  calls = [e.params["jaxpr"].in_avals[0].shape for e in jaxpr.eqns if e.primitive.name == "jit"]
  assert calls == [(2, 4, 128), (2, 4, 128), (1, 4, 128)]  # rows 0-1, 2-3, 4
  np.testing.assert_allclose(got, xla(q, k, v, view), atol=2e-6, rtol=0)


def test_the_kernel_reads_float32_pages_as_bfloat16():
  """Why the kernel wants bfloat16 pages: it rounds what it loads (so float32 pages differ)."""
  q, k, v, view = scattered_rows([1, 30, 100], 2, 2, seed=1)
  rng = np.random.default_rng(2)
  k32 = k.astype(jnp.float32) + jnp.asarray(rng.normal(size=k.shape) * 1e-3, jnp.float32)
  v32 = v.astype(jnp.float32) + jnp.asarray(rng.normal(size=v.shape) * 1e-3, jnp.float32)
  scale = HEAD_DIM**-0.5
  with pltpu.force_tpu_interpret_mode():
    got = np.asarray(
      paged_attention(
        jnp.asarray(q[:, 0]) * scale, k32, v32, view.kv_lens, view.page_table,
        pages_per_compute_block=1,
      )
    )  # fmt: skip
  exact = np.asarray(paged_kv.attention(q, k32, v32, view, scale=scale, impl="xla"))[:, 0]
  rounded = xla(q, k32.astype(jnp.bfloat16), v32.astype(jnp.bfloat16), view)[:, 0]
  assert np.abs(got - exact).max() > 1e-4  # even the 1-key row: bfloat16(v), not v
  np.testing.assert_allclose(got, rounded, atol=2e-6, rtol=0)
  with pytest.raises(ValueError, match="reads keys and values as bfloat16, the pages are float32"):
    paged_kv.attention(q, k32, v32, view, scale=scale, impl="pallas_interpret")
  with pytest.raises(ValueError, match="head dim that is a multiple of 128, got 64"):
    paged_kv.check_kernel(64, jnp.bfloat16)
  with pytest.raises(ValueError, match="unknown paged attention implementation 'mosaic'"):
    paged_kv.attention(q, k, v, view, scale=scale, impl="mosaic")


def test_appends_take_the_xla_path():
  """The kernel is decode-only: a call of several queries per row is the pure-JAX one."""
  q, k, v, view = scattered_rows([20, 50], 2, 2, seed=3)
  q = np.repeat(q, 4, axis=1)  # 4 new tokens per row, at positions starts .. starts + 3
  view = paged_kv.PageView(view.page_table, view.starts - 3, view.q_lens + 3)
  scale = HEAD_DIM**-0.5
  with paged_kv.attention_impl("pallas_interpret"):
    got = paged_kv.attention(q, k, v, view, scale=scale)
  np.testing.assert_array_equal(got, paged_kv.attention(q, k, v, view, scale=scale, impl="xla"))


def test_sharded_kernel_runs_per_device_on_its_heads_and_rows():
  """Under the activation rules the kernel runs in a shard_map: kv heads over tensor, rows over
  fsdp, every device with its heads' whole pool."""
  mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
  q, k, v, view = scattered_rows([3, 70, 129, 16], 2, 2, seed=4)
  place = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))
  P = jax.sharding.PartitionSpec
  args = (
    place(q, P("fsdp", None, "tensor")),
    place(k, P("tensor")),
    place(v, P("tensor")),
    paged_kv.PageView(*(place(np.asarray(x), P("fsdp")) for x in jax.tree.leaves(view))),
  )

  @jax.jit
  def run(q, k, v, view):
    return paged_kv.attention(q, k, v, view, scale=HEAD_DIM**-0.5, impl="pallas_interpret")

  with sharding.activation_rules(mesh, sharding.FSDP_TP):
    lowered = run.lower(*args)
    got = np.asarray(run(*args))
  assert "all-gather" not in lowered.compile().as_text()
  np.testing.assert_allclose(got, xla(q, k, v, view), atol=2e-6, rtol=0)
