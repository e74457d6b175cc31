"""Train-test fixtures: the tiny tokenizer, a tiny model config covering it, an SFT batch."""

import dataclasses

import numpy as np
import pytest
from train_sizes import MAX_LENGTH

from rrvf_jax.processing import image
from rrvf_jax.testing import checkpoints
from rrvf_jax.testing import tokenizer as tiny_tokenizer
from rrvf_jax.train import sft


@pytest.fixture(scope="session")
def tok():
  """The tiny tokenizer (in memory)."""
  return tiny_tokenizer.build_tiny_tokenizer()


@pytest.fixture(scope="session")
def cfg(tok):
  """The tiny preset with the tokenizer's ids; vocabulary padded to a multiple of 8 (for TP)."""
  c = checkpoints.config_for_tokenizer("tiny", tok)
  vocab = -(-c.text.vocab_size // 64) * 64
  return c.replace(text=dataclasses.replace(c.text, vocab_size=vocab))


@pytest.fixture(scope="session")
def ipc():
  """Image processor settings (hub defaults: 56x56 images become a 4x4 patch grid)."""
  return image.ImageProcessorConfig()


@pytest.fixture(scope="session")
def examples():
  """Eight (image, code) examples with 56x56 images and codes of different lengths."""
  rng = np.random.default_rng(0)
  return [
    {
      "image": rng.integers(0, 256, (56, 56, 3), dtype=np.uint8),
      "code": "import matplotlib.pyplot as plt\nplt.plot([1, 2])" + "\nplt.grid()" * (i % 3),
    }
    for i in range(8)
  ]


@pytest.fixture(scope="session")
def sft_batch(tok, cfg, ipc, examples):
  """The eight examples as one padded SFT batch."""
  return sft.make_sft_batch(tok, cfg, examples, max_length=MAX_LENGTH, image_processor_cfg=ipc)
