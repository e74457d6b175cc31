"""Presets: parameter counts equal transformers' model built from the same config (meta device)."""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from rrvf_jax.models import qwen_vl  # noqa: E402
from rrvf_jax.models.qwen_vl import config as config_lib  # noqa: E402
from rrvf_jax.models.qwen_vl import params  # noqa: E402
from rrvf_jax.testing import hf_reference as ref  # noqa: E402

# Totals published for the released checkpoints (shared/research/qwen_vl_port.md §5), in billions.
PUBLISHED = {
  "qwen2.5-vl-3b": 3.755,
  "qwen2.5-vl-7b": 8.292,
  "qwen2.5-vl-32b": 33.45,
  "qwen2.5-vl-72b": 73.41,
}


@functools.cache
def _our_count(cfg):
  state = nnx.state(params.abstract_model(cfg), nnx.Param)
  return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(state))


def _hf_count(cfg):
  hf_cfg = transformers.AutoConfig.for_model(**config_lib.to_hf_dict(cfg))
  with torch.device("meta"):
    model = ref.hf_model_class(cfg.model_type)(hf_cfg)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_parameter_count_matches_transformers(name):
  cfg = qwen_vl.get_preset(name)
  assert _our_count(cfg) == _hf_count(cfg)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published_size(name):
  assert (
    round(_our_count(qwen_vl.get_preset(name)) / 1e9, 3 if "3b" in name or "7b" in name else 2)
    == PUBLISHED[name]
  )


def test_unknown_preset_lists_known_names():
  with pytest.raises(ValueError, match=r"qwen2\.5-vl-7b"):
    qwen_vl.get_preset("qwen2.5-vl-8b")


def test_config_round_trips_through_hf_dict():
  for name in config_lib.PRESETS:
    cfg = qwen_vl.get_preset(name)
    assert config_lib.from_hf_dict(config_lib.to_hf_dict(cfg)) == cfg
