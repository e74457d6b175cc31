"""Algorithm presets, config validation, and the config-driven loss, advantages and shaping."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rrvf_jax.rl import algorithms, losses


def test_presets_are_the_documented_combinations():
  grpo = algorithms.get_rl_config("grpo")
  assert (grpo.surrogate, grpo.clip_low, grpo.clip_high, grpo.loss_agg, grpo.kl_coef) == (
    "ppo_clip",
    0.2,
    0.2,
    "token-mean",
    0.0,
  )
  assert grpo.scale_advantages_by_std and not grpo.dynamic_sampling and not grpo.soft_overlong
  dr = algorithms.get_rl_config("dr_grpo", max_length=512)
  assert not dr.scale_advantages_by_std and dr.loss_agg == "seq-sum-norm"
  dapo = algorithms.get_rl_config("dapo", max_length=512, overlong_buffer=128)
  assert (dapo.clip_low, dapo.clip_high, dapo.loss_agg) == (0.2, 0.28, "token-mean")
  assert dapo.dynamic_sampling and dapo.soft_overlong
  gspo = algorithms.get_rl_config("gspo")
  assert (gspo.surrogate, gspo.clip_low, gspo.clip_high, gspo.loss_agg) == (
    "gspo",
    3e-4,
    4e-4,
    "seq-mean",
  )


def test_unknown_names_and_keys_are_one_clear_error():
  with pytest.raises(
    ValueError, match=r"unknown RL algorithm 'ppo'; known: \['dapo', 'dr_grpo', 'grpo', 'gspo'\]"
  ):
    algorithms.make_policy_loss("ppo")
  with pytest.raises(ValueError, match=r"unknown RL config keys \['clip'\]"):
    algorithms.get_rl_config("grpo", clip=0.3)
  with pytest.raises(ValueError, match=r"rl\.surrogate='ppo' is unknown"):
    algorithms.get_rl_config("grpo", surrogate="ppo")
  with pytest.raises(ValueError, match=r"rl\.kl_estimator='k5' is unknown"):
    algorithms.get_rl_config("grpo", kl_estimator="k5")


def test_required_lengths_are_named():
  with pytest.raises(ValueError, match=r"'seq-sum-norm' needs rl\.max_length"):
    algorithms.make_policy_loss("dr_grpo")
  with pytest.raises(
    ValueError, match=r"rl\.soft_overlong needs rl\.max_length and rl\.overlong_buffer"
  ):
    algorithms.make_policy_loss("dapo", max_length=100)
  with pytest.raises(ValueError, match=r"rl\.overlong_buffer must be in"):
    algorithms.get_rl_config("dapo", max_length=100, overlong_buffer=200)


def test_mapping_form_picks_the_preset_and_overrides():
  c = algorithms.get_rl_config({"algorithm": "gspo", "clip_high": 1e-3}, kl_coef=0.01)
  assert (c.surrogate, c.clip_high, c.kl_coef) == ("gspo", 1e-3, 0.01)
  assert algorithms.get_rl_config({"clip_high": 0.3}).surrogate == "ppo_clip"  # default grpo
  assert algorithms.get_rl_config(c) == c
  from_config_dict = algorithms.get_rl_config(ml_collections.ConfigDict({"algorithm": "gspo"}))
  assert from_config_dict == algorithms.get_rl_config("gspo")


@pytest.mark.parametrize("name", ["grpo", "gspo", "dr_grpo"])
def test_make_policy_loss_binds_the_config(name):
  rng = np.random.default_rng(0)
  new = jnp.asarray(rng.normal(-1, 0.5, (4, 6)), jnp.float32)
  old = new + jnp.asarray(rng.normal(0, 0.2, (4, 6)), jnp.float32)
  adv = jnp.asarray([1.0, -1.0, 0.5, -0.5])
  mask = jnp.asarray((np.arange(6)[None] < np.array([[2], [6], [4], [3]])).astype(np.float32))
  c = algorithms.get_rl_config(name, max_length=6)
  got = algorithms.make_policy_loss(c)(new, old, adv, mask)
  want = losses.policy_loss(
    new,
    old,
    adv,
    mask,
    surrogate=c.surrogate,
    clip_low=c.clip_low,
    clip_high=c.clip_high,
    loss_agg=c.loss_agg,
    max_length=6,
  )
  assert float(got[0]) == float(want[0]) and float(got[1]) == float(want[1])
  # The presets really differ on this batch.
  grpo = algorithms.make_policy_loss("grpo")(new, old, adv, mask)
  if name != "grpo":
    assert float(got[0] / got[1]) != pytest.approx(float(grpo[0] / grpo[1]), rel=1e-3)


def test_advantages_follow_the_preset():
  rewards = np.array([0.0, 1.0, 3.0, 0.0, 2.0, 6.0], np.float32)
  grpo = np.asarray(algorithms.compute_advantages(algorithms.get_rl_config("grpo"), rewards, 3))
  dr = np.asarray(
    algorithms.compute_advantages(algorithms.get_rl_config("dr_grpo", max_length=8), rewards, 3)
  )
  np.testing.assert_allclose(dr, [-4 / 3, -1 / 3, 5 / 3, -8 / 3, -2 / 3, 10 / 3], rtol=1e-6)
  np.testing.assert_allclose(grpo[:3], grpo[3:], rtol=1e-5)  # scale-free with the std


def test_reward_shaping_and_truncation_mask_follow_the_config():
  dapo = algorithms.get_rl_config("dapo", max_length=100, overlong_buffer=20)
  shaped = algorithms.shape_rewards(dapo, np.array([1.0, 1.0, 0.5]), np.array([10, 90, 100]))
  np.testing.assert_allclose(shaped, [1.0, 0.5, -0.5])
  grpo = algorithms.get_rl_config("grpo")
  np.testing.assert_array_equal(
    algorithms.shape_rewards(grpo, np.array([1.0]), np.array([100])), [1.0]
  )
  mask = np.ones((2, 3))
  truncated = np.array([True, False])
  np.testing.assert_array_equal(algorithms.loss_mask_for(grpo, mask, truncated), mask)
  filtered = algorithms.get_rl_config("grpo", mask_truncated=True)
  np.testing.assert_array_equal(
    algorithms.loss_mask_for(filtered, mask, truncated), [[0, 0, 0], [1, 1, 1]]
  )
