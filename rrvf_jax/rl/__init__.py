"""The GRPO family: group advantages, policy losses, KL estimators, overlong and dynamic sampling.

Everything is chosen by name from a config (`rl.algorithms.get_rl_config`, `make_policy_loss`).
Device math is pure JAX (`advantages`, `kl`, `losses`); per-rollout bookkeeping that happens on the
host between sampling and training is NumPy (`overlong`, `dynamic_sampling`).
"""
