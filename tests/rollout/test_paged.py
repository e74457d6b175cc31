"""The paged engine against references: transformers' generate, full forwards, the dense cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrvf_jax.models.qwen_vl import kv_cache, paged_kv
from rrvf_jax.rollout import PagedSampler, Sampler, SamplingParams, Segment
from rrvf_jax.rollout.paged import PageAllocator, PoolExhaustedError, TurnState
from rrvf_jax.testing import hf_reference
from rrvf_jax.testing.prompts import (
  feedback_turn,
  full_log_probs,
  image_prompt,
  log_softmax,
  random_image,
  reply_log_probs,
)

GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=16, temperature=1.0)
TEXTS = ["draw", "please reproduce this chart in matplotlib code", "a longer instruction " * 5]


def paged(model, tok, **kwargs):
  # Small pages, few slots and short decode calls: rows stream through the slots and every turn
  # spans several calls and pages.
  kwargs = {"row_tokens": 512, "page_size": 8, "decode_slots": 2, "decode_steps": 16} | kwargs
  return PagedSampler(model, tok, **kwargs)


@pytest.fixture(scope="module")
def prompts(tok):
  return [image_prompt(tok, t, random_image(i, 56 + 28 * i)) for i, t in enumerate(TEXTS)]


def test_allocator_counts_references():
  pool = PageAllocator(6)
  a = pool.alloc(3)
  assert paged_kv.NULL_PAGE not in a and pool.free == 2
  pool.share(a[:2])
  pool.release(a)
  assert pool.free == 3  # the shared two are still held
  pool.release(a[:2])
  assert pool.free == 5 and pool.peak_used == 3
  with pytest.raises(PoolExhaustedError, match="needs 6 more pages but has 5 free of 6"):
    pool.alloc(6)
  with pytest.raises(ValueError, match="released but not held"):
    pool.release(a[:1])


def test_paged_attention_equals_the_dense_cache():
  """Rows of different lengths in scattered pages attend exactly as in a contiguous cache."""
  rng = np.random.default_rng(0)
  b, t, n, k, h, page = 3, 5, 4, 2, 8, 4
  starts = np.array([0, 7, 13], np.int32)
  q_lens = np.array([5, 2, 4], np.int32)
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  new_k = rng.normal(size=(b, t, k, h)).astype(np.float32)
  new_v = rng.normal(size=(b, t, k, h)).astype(np.float32)
  old_k = rng.normal(size=(b, 20, k, h)).astype(np.float32)
  old_v = rng.normal(size=(b, 20, k, h)).astype(np.float32)
  table = np.array([[9, 2, 0, 0, 0], [5, 1, 7, 0, 0], [3, 11, 4, 8, 6]], np.int32)
  k_pages = np.zeros((k, 12, page, h), np.float32)
  v_pages = np.zeros_like(k_pages)
  for r in range(b):  # the rows' earlier tokens, page by page
    for pos in range(starts[r]):
      k_pages[:, table[r, pos // page], pos % page] = old_k[r, pos]
      v_pages[:, table[r, pos // page], pos % page] = old_v[r, pos]
  view = paged_kv.PageView(table, starts, q_lens)
  k_pages, v_pages = paged_kv.write(jnp.asarray(k_pages), jnp.asarray(v_pages), new_k, new_v, view)
  got = np.asarray(paged_kv.attention(q, k_pages, v_pages, view, scale=0.3))
  assert not np.any(np.asarray(k_pages)[:, 10]), "a page no row owns was written"
  for r in range(b):
    keys = np.concatenate([old_k[r, : starts[r]], new_k[r, : q_lens[r]]])
    values = np.concatenate([old_v[r, : starts[r]], new_v[r, : q_lens[r]]])
    length = len(keys)
    cache_k = np.transpose(keys, (1, 2, 0))[None]  # [1, K, H, S]
    cache_v = np.transpose(values, (1, 0, 2))[None]  # [1, K, S, H]
    mask = np.arange(length)[None, :] <= (starts[r] + np.arange(q_lens[r]))[:, None]
    want = kv_cache.cached_attention(
      q[r : r + 1, : q_lens[r]], cache_k, cache_v, mask[None], scale=0.3
    )
    np.testing.assert_allclose(got[r, : q_lens[r]], np.asarray(want)[0], atol=1e-6)


def test_greedy_equals_transformers_generate(policy_dir, model, tok, prompts):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  sampler = paged(model, tok)
  completions = sampler.sample(prompts, GREEDY, jax.random.key(0))
  expected = hf_reference.hf_greedy_generate(
    policy_dir, prompts, GREEDY.max_new_tokens, sampler.pad_id, model.config.image_token_id
  )
  assert sampler.stats.decode_calls > 3  # 3 rows through 2 slots, 16 steps a call
  for row, completion in zip(expected, completions, strict=True):
    assert completion.finish_reason == "length"
    np.testing.assert_array_equal(completion.token_ids, row)


def test_logprobs_equal_full_forward(model, tok, prompts):
  completions = paged(model, tok).sample(prompts, SAMPLED, jax.random.key(1))
  for prompt, completion in zip(prompts, completions, strict=True):
    assert len(completion.token_ids) == SAMPLED.max_new_tokens
    expected = reply_log_probs(model, [prompt], completion.token_ids)
    np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4, rtol=0)


def test_samples_do_not_depend_on_slots_calls_or_rows_beside(model, tok, prompts):
  """Row r's turn draws with its own key: slot count, decode call length and batch split agree."""
  params = SamplingParams(max_new_tokens=24, temperature=1.0)
  key = jax.random.key(5)
  base = paged(model, tok, decode_slots=4, decode_steps=64).sample(prompts, params, key, 2)
  streamed = paged(model, tok, decode_slots=1, decode_steps=5).sample(prompts, params, key, 2)
  # Prompt 2 alone, as a second host would play it (its rows are global rows 4 and 5).
  alone = paged(model, tok)
  alone.start(2)
  alone.prefill([0], prompts[2:])
  alone.fork(0, [1])
  split = alone.generate_turns([0, 1], params, key, first_row=4)
  for a, b in zip(base, streamed, strict=True):
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  for a, b in zip(base[4:], split, strict=True):
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
  assert len({tuple(c.token_ids) for c in base}) == 6  # samples differ across rows


def test_appended_turns_at_own_positions_equal_reprefill(model, tok, prompts):
  """Rows of different lengths get turns of different lengths, each at its own position."""
  sampler = paged(model, tok)
  sampler.start(3)
  sampler.prefill([0, 1, 2], prompts)
  first = sampler.generate_turns([0, 1, 2], SamplingParams(12, temperature=0.0), jax.random.key(2))
  feedback = [
    feedback_turn(tok, "the colours differ", random_image(11, 56), first[0].token_ids[-1] != 0),
    feedback_turn(tok, "error: NameError " * 4, None, True),
    feedback_turn(tok, "closer", random_image(12, 84), True),
  ]
  sampler.append([0, 1, 2], feedback)
  second = sampler.generate_turns([0, 1, 2], SAMPLED, jax.random.key(3), turn=1)
  for r in range(3):
    context = [prompts[r], Segment(first[r].token_ids), feedback[r]]
    expected = reply_log_probs(model, context, second[r].token_ids)
    np.testing.assert_allclose(second[r].logprobs, expected, atol=1e-4, rtol=0)
    assert sampler.rows[r].length == sum(len(s.token_ids) for s in context) + 16


def test_fork_shares_full_pages_and_copies_the_last(model, tok, prompts):
  group = 8
  sampler = paged(model, tok, row_tokens=256)
  sampler.start(group)
  sampler.prefill([0], prompts[:1])
  length = sampler.rows[0].length
  prompt_pages = -(-length // sampler.page_size)
  sampler.fork(0, list(range(1, group)))
  assert length % sampler.page_size, "the test wants a partly filled last page"
  assert sampler.allocator.used == prompt_pages + (group - 1)  # one own last page per child
  assert sampler.paged.shared_pages == (group - 1) * (prompt_pages - 1)
  assert sampler.stats.prefill_rows == 1 and sampler.stats.encoded_images == 1
  completions = sampler.generate_turns(list(range(group)), SAMPLED, jax.random.key(7))
  for c in completions:  # every child continues the prompt exactly
    expected = reply_log_probs(model, prompts[:1], c.token_ids)
    np.testing.assert_allclose(c.logprobs, expected, atol=1e-4, rtol=0)
  for r in range(group):
    sampler.release(r)
  assert sampler.allocator.used == 0


def test_stop_string_truncates_and_the_next_turn_follows_the_cut(model, tok, prompts):
  sampler = paged(model, tok)
  free = sampler.sample(prompts[:2], GREEDY, jax.random.key(0))
  stop_string = tok.decode([int(t) for t in free[0].token_ids[8:11]])
  params = SamplingParams(max_new_tokens=40, temperature=0.0, stop_strings=(stop_string,))
  cut = sampler.sample(prompts[:2], params, jax.random.key(0))
  assert cut[0].finish_reason == "stop" and len(cut[0].token_ids) <= 11
  np.testing.assert_array_equal(cut[0].token_ids, free[0].token_ids[: len(cut[0].token_ids)])
  turn = feedback_turn(tok, "again", None, True)
  sampler.append([0], [turn])
  expected = full_log_probs(model, [prompts[0], Segment(cut[0].token_ids), turn])[-1]
  got = log_softmax(np.asarray(sampler.state.logits[0]))
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_compilations_stay_fixed_over_varying_prompts(model, tok):
  sampler = PagedSampler(model, tok, row_tokens=256, buckets=(128, 256), decode_steps=8)
  params = SamplingParams(max_new_tokens=8, temperature=1.0)
  for i in range(6):
    text = "word " * (1 + 3 * i)
    two = [image_prompt(tok, text, random_image(i)), image_prompt(tok, text[:-5], random_image(9))]
    sampler.sample(two, params, jax.random.key(i))
  assert dict(sampler.stats.traces) == {"encode": 1, "paged_append": 1, "paged_decode": 1}


def test_a_full_pool_is_a_clear_error(model, tok, prompts):
  sampler = paged(model, tok, num_pages=4)
  sampler.start(1)
  with pytest.raises(PoolExhaustedError, match="more pages but has 3 free of 4"):
    sampler.prefill([0], prompts[:1])


def test_greedy_turns_equal_the_lock_step_engine(model, tok, prompts):
  lock = Sampler(model, tok, cache_length=512)
  _, expected = lock.generate(lock.prefill(prompts), GREEDY, jax.random.key(0))
  sampler = paged(model, tok, decode_slots=3, decode_steps=7)
  sampler.start(3)
  sampler.prefill([0, 1, 2], prompts)
  turns = [TurnState(r, sampler.turn_key(jax.random.key(0), 0, r), 40) for r in range(3)]
  while not all(t.done for t in turns):
    sampler.decode([t for t in turns if not t.done], GREEDY)
  for t, want in zip(turns, expected, strict=True):
    np.testing.assert_array_equal(t.token_ids, want.token_ids)
    np.testing.assert_allclose(t.logprobs, want.logprobs, atol=1e-5)
