"""Rollouts: the jitted multimodal samplers (lock-step KV cache; paged, continuous batching)."""

from rrvf_jax.rollout.paged import PagedSampler
from rrvf_jax.rollout.sampler import Completion, Sampler, SamplerStats, Segment, Session
from rrvf_jax.rollout.sampling import SamplingParams

__all__ = [
  "Completion",
  "PagedSampler",
  "Sampler",
  "SamplerStats",
  "SamplingParams",
  "Segment",
  "Session",
]
