"""Synthetic builders: array_record files written and read without TensorFlow, deterministic,
targets equal to renders of their code, configs spelled out in (and parsed from) their names."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rrvf_jax import data
from rrvf_jax.data import SyntheticChartsConfig
from rrvf_jax.env import ChartCanvas, render_charts
from rrvf_jax.env.web import find_chromium

CONFIG_NAME = "simple-112x84-dpi48-train10-test4-seed0"  # the name of conftest's tiny_charts


def test_records_have_the_documented_fields(charts_dir, charts_train):
  assert len(charts_train) == 10
  assert set(charts_train.feature_names) == {
    "chart_type",
    "code",
    "id",
    "image",
    "num_subplots",
    "conversation",
    "turn_images",
  }
  assert set(charts_train[0]) == set(charts_train.feature_names)
  example = charts_train[0]
  assert example["id"] == "train-000000"
  assert isinstance(example["code"], str) and example["code"].startswith("import matplotlib")
  assert isinstance(example["chart_type"], str)
  assert example["num_subplots"] == 1 and type(example["num_subplots"]) is int
  assert isinstance(example["image"], bytes) and example["image"][:4] == b"\x89PNG"
  assert data.decode_image(example["image"], example["id"]).shape == (84, 112, 3)
  assert [e["id"] for e in charts_train.__getitems__([3, 1])] == ["train-000003", "train-000001"]
  assert charts_train[-1]["id"] == "train-000009"
  with pytest.raises(IndexError, match="index 10 out of range"):
    charts_train[10]
  files = sorted(
    p.name for p in (charts_dir / "synthetic_charts" / CONFIG_NAME / "1.1.0").iterdir()
  )
  assert "synthetic_charts-train.array_record-00000-of-00001" in files
  assert "tensorflow" not in sys.modules  # nothing on this path imported TensorFlow


def test_targets_are_exactly_renders_of_their_code(charts_train, chart_pool):
  examples = [charts_train[i] for i in range(4)]
  canvas = ChartCanvas(width=112, height=84, dpi=48)
  results = render_charts([e["code"] for e in examples], canvas=canvas, pool=chart_pool)
  for example, result in zip(examples, results):
    np.testing.assert_array_equal(data.decode_image(example["image"], example["id"]), result.image)


def test_test_split_shares_no_program_with_train(charts_dir, charts_train, tiny_charts):
  test = data.load("synthetic_charts", "test", data_dir=charts_dir, build=False, **tiny_charts)
  assert [e["id"] for e in test] == [f"test-{i:06d}" for i in range(4)]
  train_codes = {e["code"] for e in charts_train}
  assert len(train_codes) == 10
  assert not train_codes & {e["code"] for e in test}


def test_build_is_deterministic(tmp_path, charts_train, tiny_charts):
  """Another build with the same config (another dir) writes the same records."""
  again = data.load("synthetic_charts", "train", data_dir=tmp_path, **tiny_charts)
  assert list(again) == list(charts_train)
  other_seed = data.load(
    "synthetic_charts", "train", data_dir=tmp_path, **{**tiny_charts, "seed": 1, "num_test": 1}
  )
  assert [e["code"] for e in other_seed] != [e["code"] for e in charts_train]


def test_plain_tfds_apis_read_the_files(charts_dir):
  """tfds.data_source (config parsed from its name) and builder_from_directory both work."""
  source = tfds.data_source(f"synthetic_charts/{CONFIG_NAME}", split="test", data_dir=charts_dir)
  assert len(source) == 4 and source[0]["id"] == b"test-000000"
  path = charts_dir / "synthetic_charts" / CONFIG_NAME / "1.1.0"
  reader = tfds.builder_from_directory(str(path)).as_data_source(split="train")
  assert reader[2]["id"] == b"train-000002"
  info = json.loads((path / "dataset_info.json").read_text())
  assert (info["configName"], info["fileFormat"]) == (CONFIG_NAME, "array_record")


def test_config_names_round_trip_and_validate(tiny_charts):
  config = SyntheticChartsConfig.create(**tiny_charts)
  assert config.name == CONFIG_NAME
  parsed = SyntheticChartsConfig.from_name(CONFIG_NAME)
  assert parsed.params() == config.params()
  assert SyntheticChartsConfig.from_name("simple-112x84") is None
  with pytest.raises(ValueError, match="complexity must be one of simple, full, got 'huge'"):
    SyntheticChartsConfig.create(complexity="huge")
  with pytest.raises(ValueError, match="num_test must be at least 1, got 0"):
    SyntheticChartsConfig.create(num_test=0)
  with pytest.raises(ValueError, match="width must be an int"):
    SyntheticChartsConfig.create(width=224.0)
  with pytest.raises(ValueError, match=r"unknown SyntheticChartsConfig parameter\(s\) colour"):
    data.get_builder("synthetic_charts", data_dir="/nonexistent", colour="red")


def test_load_errors(tmp_path, charts_dir, tiny_charts):
  with pytest.raises(ValueError, match="unknown dataset 'charts'; known: synthetic_charts"):
    data.load("charts", "train", data_dir=tmp_path)
  with pytest.raises(ValueError, match="no split 'validation'; available: test, train"):
    data.load("synthetic_charts", "validation", data_dir=charts_dir, **tiny_charts)
  with pytest.raises(FileNotFoundError, match=r"not built at .* \(and build=False\)"):
    data.load("synthetic_charts", "train", data_dir=tmp_path, build=False, **tiny_charts)
  with pytest.raises(ValueError, match="chartmimic takes no parameters, got width"):
    data.load("chartmimic", "test", data_dir=tmp_path, width=3)


def test_full_complexity_builds(tmp_path):
  params = dict(complexity="full", width=168, height=140, num_train=3, num_test=1, seed=3)
  source = data.load("synthetic_charts", "train", data_dir=tmp_path, **params)
  examples = list(source)
  for e in examples:
    assert e["num_subplots"] == len(e["chart_type"].split("+"))
    assert data.decode_image(e["image"], e["id"]).shape == (140, 168, 3)


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium installed")
def test_synthetic_web_builds(tmp_path):
  params = dict(complexity="simple", width=160, height=120, num_train=3, num_test=2)
  source = data.load("synthetic_web", "train", data_dir=tmp_path, **params)
  assert set(source[0]) >= {"code", "id", "image", "num_sections", "page_type", "conversation"}
  example = source[1]
  assert example["id"] == "train-000001"
  assert example["code"].startswith("<body")
  assert example["page_type"] in ("heading", "button", "list", "box")
  assert example["num_sections"] == 1
  assert data.decode_image(example["image"], example["id"]).shape == (120, 160, 3)
  test = data.load("synthetic_web", "test", data_dir=tmp_path, **params)
  assert len(test) == 2 and not {e["code"] for e in test} & {e["code"] for e in source}


def test_train_examples_carry_self_correction_trajectories(charts_dir, charts_train, tiny_charts):
  from rrvf_jax.env import parse_turn

  rounds = []
  for example in charts_train:
    turns = json.loads(example["conversation"])
    calls = [t for t in turns[:-1] if t["role"] == "assistant"]
    tools = [t for t in turns if t["role"] == "tool"]
    assert len(calls) == len(tools)
    # A render shows an image; a draft that fails to run gets the error text only.
    shown = [t for t in tools if any(c.get("type") == "image" for c in t["content"])]
    assert len(shown) == len(example["turn_images"])
    rounds.append(len(calls))
    last = parse_turn(turns[-1]["content"], "chart")
    assert last.answer.ok and last.answer.code == example["code"].strip("\n")
    for png in example["turn_images"]:  # the renders the tool responses show
      assert data.decode_image(png, example["id"]).shape == (84, 112, 3)
  assert set(rounds) >= {0, 1}  # a mix (the 10 examples of seed 0 also have 2 rounds)
  test = data.load("synthetic_charts", "test", data_dir=charts_dir, build=False, **tiny_charts)
  assert all(e["conversation"] == "" and len(e["turn_images"]) == 0 for e in test)
