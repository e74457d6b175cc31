"""The sampler against references: transformers' greedy generate, full forwards, re-prefill."""

import jax
import numpy as np
import pytest

from rrvf_jax.models.qwen_vl import kv_cache
from rrvf_jax.rollout import Sampler, SamplingParams, Segment
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


@pytest.fixture(scope="module")
def sampler(model, tok):
  return Sampler(model, tok, cache_length=512)


@pytest.fixture(scope="module")
def prompts(tok):
  # Different text lengths and image sizes, so rows differ in length and image token count.
  return [image_prompt(tok, t, random_image(i, 56 + 28 * i)) for i, t in enumerate(TEXTS)]


def test_greedy_equals_transformers_generate(policy_dir, model, tok, sampler, prompts):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  _, completions = sampler.generate(sampler.prefill(prompts), GREEDY, jax.random.key(0))
  expected = hf_reference.hf_greedy_generate(
    policy_dir, prompts, GREEDY.max_new_tokens, sampler.pad_id, model.config.image_token_id
  )
  for row, completion in zip(expected, completions, strict=True):
    assert completion.finish_reason == "length"
    np.testing.assert_array_equal(completion.token_ids, row)


def test_logprobs_equal_full_forward(model, sampler, prompts):
  _, completions = sampler.generate(sampler.prefill(prompts), SAMPLED, jax.random.key(1))
  for prompt, completion in zip(prompts, completions, strict=True):
    assert len(completion.token_ids) == SAMPLED.max_new_tokens
    expected = reply_log_probs(model, [prompt], completion.token_ids)
    np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4, rtol=0)


def test_appended_turn_equals_reprefill(model, tok, sampler, prompts):
  """Turn 2 on the cache: next-token logits and sampled log-probs equal a from-scratch forward."""
  session = sampler.prefill(prompts)
  session, first = sampler.generate(session, SamplingParams(12, temperature=0.0), jax.random.key(2))
  # Row 1 gets feedback without an image, rows 0 and 2 a rendered image of differing size.
  feedback = [
    feedback_turn(tok, "the bars are too dark", random_image(10, 56, 56), True),
    feedback_turn(tok, "render failed: NameError", None, True),
    feedback_turn(tok, "closer; fix the title", random_image(11, 84, 56), True),
  ]
  before = sampler.stats.encoded_images
  session = sampler.append(session, feedback)
  assert sampler.stats.encoded_images - before == 2  # only the new images are encoded
  next_token = log_softmax(session.state.last_logits)
  contexts = [
    [prompt, Segment(reply.token_ids), turn]
    for prompt, reply, turn in zip(prompts, first, feedback, strict=True)
  ]
  for b, context in enumerate(contexts):
    expected = full_log_probs(model, context)[-1]
    np.testing.assert_allclose(next_token[b], expected, atol=1e-4, rtol=0)

  session, second = sampler.generate(session, SAMPLED, jax.random.key(3))
  for context, completion in zip(contexts, second, strict=True):
    expected = reply_log_probs(model, context, completion.token_ids)
    np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4, rtol=0)


def test_fork_prefills_once_and_samples_reproducibly(sampler, prompts):
  group = 4
  rows_before, images_before = sampler.stats.prefill_rows, sampler.stats.encoded_images
  session = sampler.fork(sampler.prefill(prompts[:2]), group)
  assert sampler.stats.prefill_rows - rows_before == 2
  assert sampler.stats.encoded_images - images_before == 2
  assert session.batch_size == 2 * group
  _, a = sampler.generate(session, SAMPLED, jax.random.key(7))
  texts = [tuple(c.token_ids) for c in a]
  assert len(set(texts[:group])) == group and len(set(texts[group:])) == group  # samples differ

  # The same key gives the same samples, and forking equals prefilling the copies separately.
  repeated = [p for p in prompts[:2] for _ in range(group)]
  _, b = sampler.generate(sampler.prefill(repeated), SAMPLED, jax.random.key(7))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x.token_ids, y.token_ids)
    np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
  _, c = sampler.generate(
    sampler.fork(sampler.prefill(prompts[:2]), group), SAMPLED, jax.random.key(8)
  )
  assert [tuple(x.token_ids) for x in c] != texts


def test_stop_token_ends_row_and_is_kept(sampler, prompts):
  _, free = sampler.generate(sampler.prefill(prompts[:1]), GREEDY, jax.random.key(0))
  ids = free[0].token_ids
  stop = int(ids[6])
  first = int(np.flatnonzero(ids == stop)[0])
  params = SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=(stop,))
  _, stopped = sampler.generate(sampler.prefill(prompts[:1]), params, jax.random.key(0))
  assert stopped[0].finish_reason == "stop"
  np.testing.assert_array_equal(stopped[0].token_ids, ids[: first + 1])


def test_stop_string_truncates_and_trims_cache(model, tok, sampler, prompts):
  """A stop string cuts the reply; the dropped tokens leave the cache (next turn = re-prefill)."""
  _, free = sampler.generate(sampler.prefill(prompts[:2]), GREEDY, jax.random.key(0))
  stop_string = sampler.tokenizer.decode([int(t) for t in free[0].token_ids[8:11]])
  assert stop_string
  params = SamplingParams(max_new_tokens=40, temperature=0.0, stop_strings=(stop_string,))
  session, cut = sampler.generate(sampler.prefill(prompts[:2]), params, jax.random.key(0))
  text = sampler.tokenizer.decode([int(t) for t in cut[0].token_ids])
  assert cut[0].finish_reason == "stop" and stop_string in text
  assert len(cut[0].token_ids) <= 11
  shorter = sampler.tokenizer.decode([int(t) for t in cut[0].token_ids[:-1]])
  assert stop_string not in shorter
  np.testing.assert_array_equal(cut[0].token_ids, free[0].token_ids[: len(cut[0].token_ids)])

  turn = feedback_turn(tok, "again", None, True)
  session = sampler.append(session, [turn, turn])
  context = [prompts[0], Segment(cut[0].token_ids), turn]
  expected = full_log_probs(model, context)[-1]
  got = log_softmax(session.state.last_logits[0])
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_compilations_stay_fixed_over_varying_prompts(model, tok):
  sampler = Sampler(model, tok, cache_length=256, buckets=(128, 256))
  params = SamplingParams(max_new_tokens=8, temperature=1.0)
  for i in range(6):
    text = "word " * (1 + 3 * i)
    prompts = [
      image_prompt(tok, text, random_image(i)),
      image_prompt(tok, text[:-5], random_image(9)),
    ]
    sampler.generate(sampler.prefill(prompts), params, jax.random.key(i))
  assert dict(sampler.stats.traces) == {"encode": 1, "append": 1, "decode": 1}


def test_cache_overflow_is_a_clear_error(model, tok, prompts):
  sampler = Sampler(model, tok, cache_length=128, buckets=(128,))
  session = sampler.prefill(prompts[:1])
  with pytest.raises(ValueError, match=r"needs 168 cache slots .* cache_length=128"):
    sampler.generate(session, SamplingParams(max_new_tokens=40), jax.random.key(0))


def test_images_encoded_in_groups_equal_one_call(model, tok, prompts):
  # Regression (memory): the vision tower took every image of a call at once; the 256 rendered
  # images of a paper-scale turn needed 98 GiB per v5p chip in one encode (compile_check).
  segments = [*prompts, image_prompt(tok, "more", random_image(7, 84))]  # 4 images, 3 sizes
  one = Sampler(model, tok, cache_length=512)._features(segments)
  grouped = Sampler(model, tok, cache_length=512, encode_images=3)
  np.testing.assert_allclose(np.asarray(grouped._features(segments)), np.asarray(one), atol=1e-5)
  assert grouped.stats.encoded_images == 4
  # Images of one canvas (an episode's): every group, the padded last one too, is one program.
  canvas = Sampler(model, tok, cache_length=512, encode_images=2)
  same = [image_prompt(tok, "x", random_image(i, 56)) for i in range(5)]
  expected = Sampler(model, tok, cache_length=512)._features(same)
  np.testing.assert_allclose(np.asarray(canvas._features(same)), np.asarray(expected), atol=1e-5)
  assert canvas.stats.traces["encode"] == 1


def test_appended_queries_attend_in_blocks_as_at_once():
  # An appended turn's queries go QUERY_BLOCK at a time (its float32 scores over the whole cache
  # bound the append's memory); each query's softmax is its own, so nothing changes.
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 8, 4, 16)).astype(np.float32)
  k = rng.normal(size=(2, 2, 16, 32)).astype(np.float32)
  v = rng.normal(size=(2, 2, 32, 16)).astype(np.float32)
  mask = rng.random((2, 8, 32)) < 0.7
  mask[1, 3] = False  # a padding query: finite either way
  whole = kv_cache.cached_attention(q, k, v, mask, scale=0.25, block=8)
  blocks = kv_cache.cached_attention(q, k, v, mask, scale=0.25, block=2)
  np.testing.assert_allclose(np.asarray(blocks), np.asarray(whole), atol=1e-6, rtol=0)
