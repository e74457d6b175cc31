"""rrvf_jax: visual-feedback reinforcement learning (RRVF) for vision-language models in JAX."""
