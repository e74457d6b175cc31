"""GRPO on real multi-turn trajectories: ratio 1 via the training path, zero gradient off-policy."""

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rrvf_jax import env, hlo, sharding
from rrvf_jax.models import qwen_vl
from rrvf_jax.models.qwen_vl import rope
from rrvf_jax.processing import tokens
from rrvf_jax.rl import algorithms
from rrvf_jax.rollout import SamplingParams, episode
from rrvf_jax.testing import checkpoints
from rrvf_jax.testing.scripted import NO_ACTION, TextScriptedSampler, answer, call
from rrvf_jax.train import grpo, step
from rrvf_jax.train import state as state_lib

SIDE = 56  # targets and renders share one canvas, as in a run


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
  path = checkpoints.make_tiny_policy_dir(tmp_path_factory.mktemp("policy"), seed=5)
  return qwen_vl.from_hf(path), tokens.load_tokenizer(path)


class BlockRenderer:
  """Renders in a thread at the canvas size: code with FAIL fails, other code draws a block."""

  def __init__(self):
    self.pool = concurrent.futures.ThreadPoolExecutor(2)

  def __call__(self, code):
    return self.pool.submit(self._render, code)

  @staticmethod
  def _render(code):
    if "FAIL" in code:
      return env.RenderResult("runtime_error", None, "NameError: name 'FAIL' is not defined")
    img = np.full((SIDE, SIDE, 3), 255, np.uint8)
    img[8:30, 8 : 12 + len(code) % 40] = (sum(code.encode()) % 200, 90, 40)
    return env.RenderResult("ok", img)


@pytest.fixture(scope="module")
def played(policy):
  """Scripted multi-turn episodes on the real sampler: 2 targets x G=2."""
  model, tok = policy
  scripts = [
    [answer("plt.plot([1])")],
    [call("plt.plot([2])"), answer("plt.plot([3])")],
    [call("plt.FAIL()"), call("plt.plot([5])"), answer("plt.plot([6])")],
    [NO_ACTION],
  ]
  sampler = TextScriptedSampler(
    model, tok, cache_length=1536, buckets=(64, 128, 256, 512), scripts=scripts
  )
  params = SamplingParams(
    max_new_tokens=12,
    temperature=1.0,
    stop_token_ids=tokens.special_token_ids(tok).eos_token_ids,
    banned_token_ids=grpo.banned_token_ids(tok),
  )
  rng = np.random.default_rng(0)
  targets = [rng.integers(0, 255, (SIDE, SIDE, 3), np.uint8) for _ in range(2)]
  batch = episode.run_episodes(
    sampler,
    targets,
    group_size=2,
    task="chart",
    render_submit=BlockRenderer(),
    judge=env.LocalJudge(),
    sampling=params,
    key=jax.random.key(1),
    max_turns=3,
    instruction="Reproduce this chart.",
  )
  assert [t.num_turns for t in batch.trajectories] == [1, 2, 3, 1]
  assert [len(t.images) for t in batch.trajectories] == [1, 2, 2, 1]
  return batch.trajectories


def make_batch(policy, trajectories, advantages):
  model, tok = policy
  return grpo.make_grpo_batch(
    model.config,
    trajectories,
    np.asarray(advantages, np.float32),
    length=1024,
    images_per_row=4,
    pad_id=tokens.special_token_ids(tok).pad_token_id,
  )


def test_trainer_logprobs_equal_sampler_logprobs(policy, played):
  """Ratio 1 at the first epoch: images encoded as a batch, banned ids, temperature all agree."""
  model, tok = policy
  batch = make_batch(policy, played, [0.5, -0.5, 1.0, -1.0])
  logp = grpo.policy_logprobs(
    model, batch, temperature=1.0, chunk_size=128, banned_token_ids=grpo.banned_token_ids(tok)
  )
  mask = batch.loss_mask > 0
  assert mask.sum() == sum(t.num_policy_tokens for t in played)
  np.testing.assert_allclose(np.asarray(logp)[mask], batch.old_logprobs[mask], atol=1e-4, rtol=0)
  # The tokens after the appended render (row 1, second turn) are among them.
  second_turn = played[1].turns[1]
  assert mask[1, second_turn.start - 1 : second_turn.end - 1].all()


def test_masked_tokens_get_exactly_zero_gradient(policy, played):
  """Prompt, tool-response, image and nudge tokens: d loss / d log p = 0 exactly."""
  batch = make_batch(policy, played, [0.5, -0.5, 1.0, -1.0])
  loss = algorithms.make_policy_loss("grpo")
  old = jnp.asarray(batch.old_logprobs)
  current = old + 0.05 * jnp.asarray(np.random.default_rng(0).normal(size=old.shape), jnp.float32)

  def total(logp):
    loss_sum, weight, _ = loss(
      logp, old, jnp.asarray(batch.advantages), jnp.asarray(batch.loss_mask)
    )
    return loss_sum / weight

  grad = np.asarray(jax.grad(total)(current))
  mask = batch.loss_mask > 0
  assert np.all(grad[~mask] == 0.0)
  assert np.count_nonzero(grad[mask]) == mask.sum()
  # The masked positions include every non-policy span (targets are shifted by one).
  for row, t in enumerate(played):
    for span in t.spans:
      if span.source != "policy":
        assert not mask[row, max(span.start - 1, 0) : span.end - 1].any(), span


def test_grpo_loss_is_finite_and_moves_with_advantages(policy, played):
  model, tok = policy
  loss = algorithms.make_policy_loss("grpo")
  values = []
  for sign in (1.0, -1.0):
    batch = make_batch(policy, played, sign * np.asarray([0.5, -0.5, 1.0, -1.0]))
    loss_sum, weight, aux = grpo.grpo_loss(
      model,
      batch,
      policy_loss=loss,
      temperature=1.0,
      chunk_size=128,
      banned_token_ids=grpo.banned_token_ids(tok),
    )
    assert np.isfinite(float(loss_sum)) and np.isfinite(float(aux["entropy"]))
    values.append(float(loss_sum / weight))
  assert values[0] == pytest.approx(-values[1], rel=1e-5)  # ratio 1: loss = -mean(A)


def test_batch_rejects_mixed_canvases_and_overflows(policy, played):
  model, _ = policy
  with pytest.raises(ValueError, match="more than the batch length 64"):
    grpo.make_grpo_batch(model.config, played, np.zeros(4), length=64, images_per_row=4, pad_id=0)
  with pytest.raises(ValueError, match="shows 2 images, more than 1"):
    grpo.make_grpo_batch(model.config, played, np.zeros(4), length=1024, images_per_row=1, pad_id=0)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_update_with_remat_equals_update_without(policy, played, remat):
  # Regression: with remat (the paper preset's grpo.remat=dots) the update failed to trace:
  # nnx.remat ran inside the lax.map that encoded images one by one and could not write the
  # layer's state back to a module from the outer trace ("Cannot mutate Param from a different
  # trace level"). `python -m rrvf_jax.compile_check` found it.
  model, tok = policy
  batch = make_batch(policy, played, [0.5, -0.5, 1.0, -1.0])
  tx = optax.sgd(1.0)  # the new parameters differ by the gradients (Adam would rescale noise)
  loss = functools.partial(
    grpo.grpo_loss,
    policy_loss=algorithms.make_policy_loss("grpo"),
    temperature=1.0,
    chunk_size=128,
    banned_token_ids=grpo.banned_token_ids(tok),
  )
  results = []
  for policy_name in ("none", remat):
    graphdef, params = state_lib.split_params(model)
    # A copy: the step donates its state, and the module fixture is shared.
    fresh = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))
    graphdef, state = state_lib.train_state_from_model(fresh, tx)
    train_step = step.make_train_step(
      graphdef, loss, tx, remat=False if policy_name == "none" else policy_name
    )
    results.append(train_step(state, batch))
  (plain, plain_metrics), (remat_state, remat_metrics) = results
  assert float(remat_metrics["loss"]) == pytest.approx(float(plain_metrics["loss"]), rel=1e-6)
  assert float(remat_metrics["grad_norm"]) == pytest.approx(
    float(plain_metrics["grad_norm"]), rel=1e-5
  )
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(remat_state.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_each_device_encodes_only_its_own_rows_images(policy):
  # Regression: the GRPO loss encoded images in a lax.map over all of them, so every device ran
  # every image: at 7B on 32 chips the update needed 422 GiB per chip (compile_check). As one
  # batch sharded over the mesh's batch axes, a device's matmul FLOPs are its own images'.
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (fake) devices")
  model, _ = policy
  graphdef, params = nnx.split(model)
  index = rope.make_vision_index(np.asarray([[1, 8, 8]]), model.config.vision)
  pixels = np.zeros((16, 64, model.config.vision.patch_dim), np.float32)
  flops = {}
  for devices in (1, 8):
    mesh = sharding.make_mesh(1, devices, 1, devices=jax.devices()[:devices])

    def encode(params, pixels, mesh=mesh):
      with sharding.activation_rules(mesh, sharding.FSDP_TP):
        return nnx.merge(graphdef, params).encode_canvas_images(pixels, index)

    placed = jax.device_put(pixels, NamedSharding(mesh, PartitionSpec("fsdp")))
    replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    compiled = jax.jit(encode).lower(replicated, placed).compile()
    flops[devices] = hlo.summarize(compiled.as_text()).flops
  assert flops[1] > 0 and flops[8] <= flops[1] / 7
