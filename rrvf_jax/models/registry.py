"""Model families behind one registry, keyed by the `model_type` of HF's config.json.

A family brings its config parser and writer, its model class (which implements the `QwenVL`
protocol the sampler and trainers call), its presets and its parameter-name table. Everything
outside `rrvf_jax.models` picks a family only through here. A new family (e.g. Qwen3-VL MoE)
registers one more `Family` in `_families` and needs nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family.

  Attributes:
    model_type: HF `model_type` in config.json.
    model_class: `model_class(cfg, *, dtype, param_dtype, rngs)` builds the NNX model.
    config_from_hf: config.json dict -> `ModelConfig`.
    config_to_hf: `ModelConfig` -> config.json dict (loadable by transformers).
    keys: (our parameter path regex, legacy hub key template) pairs.
    export_key: legacy hub key -> the key this family's checkpoints use.
    presets: preset name -> `ModelConfig` factory.
  """

  model_type: str
  model_class: type
  config_from_hf: Callable[[dict[str, Any]], Any]
  config_to_hf: Callable[[Any], dict[str, Any]]
  keys: tuple[tuple[str, str], ...]
  export_key: Callable[[str], str]
  presets: Mapping[str, Callable[[], Any]]


@functools.cache
def _families() -> dict[str, Family]:
  # Imported here: the family modules import the shared machinery, which imports this registry.
  from rrvf_jax.models import qwen3_vl
  from rrvf_jax.models.qwen3_vl import params as qwen3_params
  from rrvf_jax.models.qwen_vl import config as qwen_config
  from rrvf_jax.models.qwen_vl import params as qwen_params
  from rrvf_jax.models.qwen_vl.model import QwenVL

  def qwen2(model_type: str) -> Family:
    presets = {k: f for k, f in qwen_config.PRESETS.items() if f().model_type == model_type}
    return Family(
      model_type,
      QwenVL,
      qwen_config.from_hf_dict,
      qwen_config.to_hf_dict,
      tuple(qwen_params.key_table(model_type)),
      lambda key: key,  # The legacy layout is Qwen2(.5)-VL's hub layout.
      presets,
    )

  qwen3 = Family(
    "qwen3_vl",
    qwen3_vl.Qwen3VL,
    qwen3_vl.from_hf_dict,
    qwen3_vl.to_hf_dict,
    tuple(qwen3_params.KEYS),
    qwen3_params.export_key,
    qwen3_vl.PRESETS,
  )
  return {f.model_type: f for f in (qwen2("qwen2_vl"), qwen2("qwen2_5_vl"), qwen3)}


def model_types() -> tuple[str, ...]:
  """The registered HF model types."""
  return tuple(sorted(_families()))


def family(model_type: str) -> Family:
  """The family of `model_type`; a one-line ValueError names the supported types."""
  families = _families()
  if model_type not in families:
    raise ValueError(
      f"model_type {model_type!r} is not supported; supported: {', '.join(model_types())}"
    )
  return families[model_type]


def presets() -> dict[str, Callable[[], Any]]:
  """Every family's presets by name."""
  return {k: v for f in _families().values() for k, v in f.presets.items()}


def get_preset(name: str):
  """The named preset's `ModelConfig`; raises a ValueError listing the known names."""
  known = presets()
  if name not in known:
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(known)}")
  return known[name]()


def config_from_hf_dict(raw: dict[str, Any]):
  """Parses a config.json dict with its family's parser (chosen by `model_type`)."""
  model_type = raw.get("model_type")
  if model_type not in _families():
    raise ValueError(
      f"config.json has model_type {model_type!r}; supported: {', '.join(model_types())}"
    )
  return family(model_type).config_from_hf(raw)


def load_hf_config(path: str | os.PathLike):
  """Reads and parses `config.json` of a local HF checkpoint directory."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no config.json in checkpoint directory {os.fspath(path)!r}")
  with open(file) as f:
    return config_from_hf_dict(json.load(f))


def model_class(cfg) -> type:
  """The NNX model class of `cfg`'s family."""
  return family(cfg.model_type).model_class


def build_model(cfg, *, dtype, param_dtype=None, rngs):
  """A freshly initialised model of `cfg`'s family."""
  param_dtype = dtype if param_dtype is None else param_dtype
  return model_class(cfg)(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
