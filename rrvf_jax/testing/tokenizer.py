"""The tiny tokenizer for tests; it lives in `rrvf_jax.processing.tiny_tokenizer` (demos use it)."""

# ruff: noqa: F401  (this module only re-exports)

from rrvf_jax.processing.tiny_tokenizer import (
  DEFAULT_VOCAB_SIZE,
  PRETOKENIZE_REGEX,
  build_tiny_tokenizer,
  make_tiny_tokenizer,
  tiny_special_token_ids,
)
