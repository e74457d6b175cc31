"""Rollouts: the jitted multimodal sampler (KV cache, group fork, multi-turn append)."""

from rrvf_jax.rollout.sampler import Completion, Sampler, SamplerStats, Segment, Session
from rrvf_jax.rollout.sampling import SamplingParams

__all__ = ["Completion", "Sampler", "SamplerStats", "SamplingParams", "Segment", "Session"]
