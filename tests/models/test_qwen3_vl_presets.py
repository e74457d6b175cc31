"""Qwen3-VL presets: parameter counts equal transformers' model of the same config (meta device)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from rrvf_jax import models  # noqa: E402
from rrvf_jax.models import qwen3_vl  # noqa: E402

NAMES = sorted(qwen3_vl.PRESETS)


def _our_count(cfg) -> int:
  state = nnx.state(models.abstract_model(cfg), nnx.Param)
  return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(state))


def _hf_count(cfg) -> int:
  hf_cfg = transformers.AutoConfig.for_model(**qwen3_vl.to_hf_dict(cfg))
  with torch.device("meta"):
    model = transformers.Qwen3VLForConditionalGeneration(hf_cfg)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_transformers(name):
  cfg = models.get_preset(name)
  assert cfg.model_type == "qwen3_vl"
  assert _our_count(cfg) == _hf_count(cfg)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_hf_dict(name):
  cfg = models.get_preset(name)
  assert qwen3_vl.from_hf_dict(qwen3_vl.to_hf_dict(cfg)) == cfg


def test_hub_config_defaults_are_transformers_defaults():
  # A hub-style file (4.57 spelling: rope_scaling + rope_theta, vision model_type qwen3_vl).
  raw = qwen3_vl.to_hf_dict(models.get_preset("qwen3-vl-8b"))
  text = raw["text_config"]
  rope = text.pop("rope_parameters")
  text["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
  text["rope_theta"] = rope["rope_theta"]
  assert qwen3_vl.from_hf_dict(raw) == models.get_preset("qwen3-vl-8b")
  del text["head_dim"], text["rope_theta"]
  parsed = qwen3_vl.from_hf_dict(raw)
  hf = transformers.AutoConfig.for_model(**raw).text_config
  assert parsed.text.head_dim == hf.head_dim == 128
  assert parsed.text.rope_theta == hf.rope_parameters["rope_theta"]
