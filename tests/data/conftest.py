"""Data-test fixtures: one tiny synthetic_charts dataset built per session, a chart pool, PNGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rrvf_jax import data
from rrvf_jax.env import create_chart_pool

# Small enough to build in seconds, large enough for several batches.
TINY_CHARTS = dict(complexity="simple", width=112, height=84, dpi=48, num_train=10, num_test=4)


@pytest.fixture
def tiny_charts():
  """The config parameters of the tiny synthetic_charts dataset."""
  return dict(TINY_CHARTS)


@pytest.fixture(scope="session")
def charts_dir(tmp_path_factory):
  """A data_dir holding the tiny synthetic_charts dataset (built once)."""
  data_dir = tmp_path_factory.mktemp("data_charts")
  data.load("synthetic_charts", "train", data_dir=data_dir, **TINY_CHARTS)
  return data_dir


@pytest.fixture(scope="session")
def charts_train(charts_dir):
  """The tiny dataset's train split."""
  return data.load("synthetic_charts", "train", data_dir=charts_dir, build=False, **TINY_CHARTS)


@pytest.fixture(scope="session")
def chart_pool():
  """A two-worker chart renderer pool shared by the data tests."""
  with create_chart_pool(num_workers=2) as pool:
    yield pool


def _png(width: int = 6, height: int = 4, mode: str = "RGB", value: int = 0, fmt: str = "PNG"):
  """A small encoded image with a gradient (so images differ), in the given mode and format."""
  rgb = (np.arange(height * width * 3).reshape(height, width, 3) * 7 + value) % 256
  image = Image.fromarray(rgb.astype(np.uint8), "RGB").convert(mode)
  buf = io.BytesIO()
  image.save(buf, format=fmt)
  return buf.getvalue()


@pytest.fixture
def make_png():
  """Factory of small encoded test images: make_png(width, height, mode, value, fmt) -> bytes."""
  return _png
