"""The sampler with a Qwen3-VL policy (DeepStack through prefill and appended turns).

Same references as the Qwen2.5-VL sampler tests: transformers' greedy generate, full forwards.
"""

import dataclasses

import jax
import numpy as np
import pytest

from rrvf_jax import models
from rrvf_jax.processing import image, tokens
from rrvf_jax.rollout import PagedSampler, Sampler, SamplingParams, Segment
from rrvf_jax.testing import checkpoints
from rrvf_jax.testing.prompts import (
  feedback_turn,
  full_log_probs,
  image_prompt,
  log_softmax,
  random_image,
)

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0)
# Qwen3-VL's processor (patch 16, factor 32) with a small lower bound, so test images stay small.
PROC = dataclasses.replace(image.ImageProcessorConfig.for_model_type("qwen3_vl"), min_pixels=1024)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
  return checkpoints.make_tiny_policy_dir(
    tmp_path_factory.mktemp("qwen3_policy"), preset="tiny-qwen3-vl", seed=5
  )


@pytest.fixture(scope="module")
def tok(policy_dir):
  return tokens.load_tokenizer(policy_dir)


@pytest.fixture(scope="module")
def model(policy_dir):
  return models.from_hf(policy_dir)


@pytest.fixture(scope="module")
def sampler(model, tok):
  return Sampler(model, tok, cache_length=384, buckets=(64, 128))


@pytest.fixture(scope="module")
def prompts(tok):
  sizes = [(64, 96), (128, 64), (96, 96)]  # Grids 4x6, 8x4 and 6x6 patches.
  texts = ["draw", "please reproduce this chart", "a longer instruction " * 3]
  return [
    image_prompt(tok, t, random_image(i, *hw), PROC)
    for i, (t, hw) in enumerate(zip(texts, sizes, strict=True))
  ]


def test_greedy_equals_transformers_generate(policy_dir, model, sampler, prompts):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, completions = sampler.generate(sampler.prefill(prompts), GREEDY, jax.random.key(0))

  hf = transformers.AutoModelForImageTextToText.from_pretrained(policy_dir, dtype=torch.float32)
  assert type(hf).__name__ == "Qwen3VLForConditionalGeneration"
  pad = sampler.pad_id
  length = max(len(p.token_ids) for p in prompts)
  ids = np.full((len(prompts), length), pad)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):  # transformers batches decoder prompts left-padded
    ids[i, length - len(p.token_ids) :] = p.token_ids
    mask[i, length - len(p.token_ids) :] = 1
  ids_t = torch.as_tensor(ids)
  with torch.no_grad():
    out = hf.eval().generate(
      input_ids=ids_t,
      attention_mask=torch.as_tensor(mask),
      mm_token_type_ids=(ids_t == model.config.image_token_id).long(),
      pixel_values=torch.as_tensor(np.concatenate([p.pixel_values for p in prompts])),
      image_grid_thw=torch.as_tensor(np.concatenate([p.image_grid_thw for p in prompts])),
      do_sample=False,
      max_new_tokens=GREEDY.max_new_tokens,
      eos_token_id=None,
      pad_token_id=pad,
    )
  expected = out[:, length:].numpy()
  for row, completion in zip(expected, completions, strict=True):
    assert completion.finish_reason == "length"
    np.testing.assert_array_equal(completion.token_ids, row)


def test_forked_turns_with_new_images_equal_full_forwards(model, tok, sampler, prompts):
  """Prefill, fork, decode, append feedback with new images, decode: log-probs of a re-prefill."""
  session = sampler.fork(sampler.prefill(prompts[:2]), 2)
  session, first = sampler.generate(session, SAMPLED, jax.random.key(1))
  rows = [prompts[0], prompts[0], prompts[1], prompts[1]]
  feedback = [
    feedback_turn(tok, "the bars are too dark", random_image(10, 64, 64), True, PROC),
    feedback_turn(tok, "render failed: NameError", None, True, PROC),
    feedback_turn(tok, "closer; fix the title", random_image(11, 96, 64), True, PROC),
    feedback_turn(tok, "almost", random_image(12, 64, 128), True, PROC),
  ]
  before = sampler.stats.encoded_images
  session = sampler.append(session, feedback)
  assert sampler.stats.encoded_images - before == 3  # Only the new images are encoded.
  next_token = log_softmax(session.state.last_logits)
  _, second = sampler.generate(session, SAMPLED, jax.random.key(2))
  for b, (prompt, reply, turn, completion) in enumerate(
    zip(rows, first, feedback, second, strict=True)
  ):
    # One forward over the whole conversation checks both turns and the appended turn's logits.
    context = [prompt, Segment(reply.token_ids), turn]
    log_probs = full_log_probs(model, [*context, Segment(completion.token_ids)])
    starts = np.cumsum([0] + [len(s.token_ids) for s in context])
    for start, sampled in ((starts[1], reply), (starts[3], completion)):
      expected = log_probs[
        np.arange(start - 1, start - 1 + len(sampled.token_ids)), sampled.token_ids
      ]
      np.testing.assert_allclose(sampled.logprobs, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(next_token[b], log_probs[starts[3] - 1], atol=1e-4, rtol=0)


def test_paged_engine_with_deepstack_equals_full_forwards(model, tok, sampler, prompts):
  """The paged engine on Qwen3-VL: greedy ids as the lock-step engine's, and a forked, appended
  turn with new images (DeepStack at the appended image tokens) as a re-prefill."""
  paged = PagedSampler(
    model, tok, row_tokens=384, buckets=(64, 128), page_size=8, decode_slots=2, decode_steps=8
  )
  _, expected = sampler.generate(sampler.prefill(prompts), GREEDY, jax.random.key(0))
  for want, got in zip(expected, paged.sample(prompts, GREEDY, jax.random.key(0)), strict=True):
    np.testing.assert_array_equal(got.token_ids, want.token_ids)

  # A sampled image placeholder has no image behind it (the trainer bans it too).
  banned = tokens.token_id(tok, tokens.IMAGE_PAD)
  params = dataclasses.replace(SAMPLED, banned_token_ids=(banned,))
  paged.start(4)
  paged.prefill([0, 2], prompts[:2])
  paged.fork(0, [1])
  paged.fork(2, [3])
  first = paged.generate_turns([0, 1, 2, 3], params, jax.random.key(1))
  rows = [prompts[0], prompts[0], prompts[1], prompts[1]]
  feedback = [
    feedback_turn(tok, "the bars are too dark", random_image(10, 64, 64), True, PROC),
    feedback_turn(tok, "render failed: NameError", None, True, PROC),
    feedback_turn(tok, "closer; fix the title", random_image(11, 96, 64), True, PROC),
    feedback_turn(tok, "almost", random_image(12, 64, 128), True, PROC),
  ]
  paged.append([0, 1, 2, 3], feedback)
  second = paged.generate_turns([0, 1, 2, 3], params, jax.random.key(2), turn=1)
  for prompt, reply, turn, completion in zip(rows, first, feedback, second, strict=True):
    context = [prompt, Segment(reply.token_ids), turn]
    log_probs = full_log_probs(model, [*context, Segment(completion.token_ids)])
    # The sampler reports log-probs of the law without the banned token: renormalise.
    log_probs -= np.log1p(-np.exp(log_probs[:, banned]))[:, None]
    starts = np.cumsum([0] + [len(s.token_ids) for s in context])
    for start, sampled in ((starts[1], reply), (starts[3], completion)):
      expected_lp = log_probs[
        np.arange(start - 1, start - 1 + len(sampled.token_ids)), sampled.token_ids
      ]
      np.testing.assert_allclose(sampled.logprobs, expected_lp, atol=1e-4, rtol=0)
