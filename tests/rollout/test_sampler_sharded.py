"""The sampler under a mesh of 8 fake CPU devices gives the single-device results."""

import jax
import numpy as np
import pytest

from rrvf_jax import sharding
from rrvf_jax.models import qwen_vl
from rrvf_jax.models.qwen_vl.kv_cache import K_AXES
from rrvf_jax.models.qwen_vl.paged_kv import PAGE_AXES
from rrvf_jax.rollout import PagedSampler, Sampler, SamplingParams
from rrvf_jax.testing.prompts import feedback_turn, image_prompt, random_image

# The tiny tokenizer's vocabulary (1191) does not divide by the tensor axis: keep vocab replicated.
RULES = tuple((k, None if k in ("vocab", "act_vocab") else v) for k, v in sharding.FSDP_TP)


def run_episode(sampler: Sampler, tok) -> tuple[list, object]:
  """Prefill 4 prompts, fork x2, sample a turn, append feedback with an image, sample again."""
  prompts = [image_prompt(tok, "draw " * (i + 1), random_image(i)) for i in range(4)]
  session = sampler.fork(sampler.prefill(prompts), 2)
  params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9)
  session, first = sampler.generate(session, params, jax.random.key(0))
  turn = feedback_turn(tok, "closer", random_image(20), True)
  session = sampler.append(session, [turn] * session.batch_size)
  session, second = sampler.generate(session, params, jax.random.key(1))
  return first + second, session


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_equals_single_device(policy_dir, model, tok, mesh_shape):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (fake) devices")
  expected, _ = run_episode(Sampler(model, tok, cache_length=384), tok)
  mesh = sharding.make_mesh(*mesh_shape)
  sharded_model = qwen_vl.from_hf(policy_dir, mesh=mesh, rules=RULES)
  sharded = Sampler(sharded_model, tok, cache_length=384, mesh=mesh, rules=RULES)
  got, session = run_episode(sharded, tok)
  kernel = sharded.params["text"]["layers"][0]["attn"]["k"]["kernel"].get_value()
  assert kernel.sharding.spec == sharding.logical_to_spec(("embed", "kv_heads", None), RULES, mesh)
  # The cache lives sharded too: rows over data x fsdp, kv heads over tensor.
  cache_k = session.state.cache.k[0]
  want = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(K_AXES, RULES, mesh))
  assert cache_k.sharding.is_equivalent_to(want, cache_k.ndim), cache_k.sharding
  for a, b in zip(expected, got, strict=True):
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def run_paged_episode(sampler: PagedSampler, tok) -> list:
  """`run_episode` on the paged engine: 4 prompts x 2 rows through 4 slots, two turns."""
  prompts = [image_prompt(tok, "draw " * (i + 1), random_image(i)) for i in range(4)]
  sampler.start(8)
  sampler.prefill([0, 2, 4, 6], prompts)
  for parent in (0, 2, 4, 6):
    sampler.fork(parent, [parent + 1])
  params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9)
  first = sampler.generate_turns(list(range(8)), params, jax.random.key(0))
  turn = feedback_turn(tok, "closer", random_image(20), True)
  sampler.append(list(range(8)), [turn] * 8)
  return first + sampler.generate_turns(list(range(8)), params, jax.random.key(1), turn=1)


def test_paged_sharded_equals_single_device(policy_dir, model, tok):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (fake) devices")
  engine = {"row_tokens": 384, "page_size": 8, "decode_slots": 4, "decode_steps": 4}
  expected = run_paged_episode(PagedSampler(model, tok, **engine), tok)
  mesh = sharding.make_mesh(2, 2, 2)
  sharded_model = qwen_vl.from_hf(policy_dir, mesh=mesh, rules=RULES)
  sharded = PagedSampler(sharded_model, tok, mesh=mesh, rules=RULES, **engine)
  got = run_paged_episode(sharded, tok)
  # The pools keep their kv heads over tensor (pages are shared by rows, so not split by rows).
  pages = sharded.state.k[0]
  want = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(PAGE_AXES, RULES, mesh))
  assert pages.sharding.is_equivalent_to(want, pages.ndim), pages.sharding
  for a, b in zip(expected, got, strict=True):
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
