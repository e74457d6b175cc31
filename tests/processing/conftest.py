"""Processing-test fixtures: the tiny tokenizer, as `tokenizers` and as transformers objects."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rrvf_jax.processing import tokens
from rrvf_jax.testing.tokenizer import make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
  """The tiny tokenizer saved in hub layout, built once per session."""
  return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tok(tiny_tokenizer_dir):
  """The tiny tokenizer as a `tokenizers.Tokenizer`."""
  return tokens.load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def hf_tok(tiny_tokenizer_dir):
  """The tiny tokenizer loaded by transformers' AutoTokenizer, offline."""
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
