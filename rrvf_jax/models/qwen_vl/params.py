"""HF checkpoint import (`from_hf`) and export (`to_hf`), streaming one tensor at a time.

Safetensors files are parsed directly (8-byte header length, JSON header, raw bytes) and memory-
mapped, so bf16 needs no torch and a 72B checkpoint never needs twice its size in host memory.

The machinery serves every registered family (`rrvf_jax.models.registry`): a family contributes
its config parser, model class and parameter-name table; this module holds the Qwen2(.5)-VL tables.
Keys are matched in the legacy hub layout (`model.*`, `visual.*`, `lm_head.weight`), into which
both v5 in-memory keys and Qwen3-VL's native layout are canonicalised on reading.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from rrvf_jax import sharding as sharding_lib
from rrvf_jax.models import registry
from rrvf_jax.models.qwen_vl import config as config_lib
from rrvf_jax.models.qwen_vl.model import QwenVL

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

# (our parameter path regex, HF hub key template). Our Dense kernels are `in_shape + out_shape`;
# the HF Linear/Conv weight is `[prod(out), prod(in)...]`, so one transpose rule covers them all.
TEXT_KEYS = [
  (r"text\.embed", "model.embed_tokens.weight"),
  (r"text\.norm\.scale", "model.norm.weight"),
  (r"lm_head", "lm_head.weight"),
  (r"text\.layers\.(\d+)\.input_norm\.scale", "model.layers.{0}.input_layernorm.weight"),
  (
    r"text\.layers\.(\d+)\.post_attn_norm\.scale",
    "model.layers.{0}.post_attention_layernorm.weight",
  ),
  (
    r"text\.layers\.(\d+)\.attn\.([qkvo])\.(kernel|bias)",
    "model.layers.{0}.self_attn.{1}_proj.{2}",
  ),
  (r"text\.layers\.(\d+)\.mlp\.(gate|up|down)\.kernel", "model.layers.{0}.mlp.{1}_proj.weight"),
  (r"text\.layers\.(\d+)\.attn\.([qk])_norm\.scale", "model.layers.{0}.self_attn.{1}_norm.weight"),
]
_VISION = [
  (r"visual\.patch_embed\.kernel", "visual.patch_embed.proj.weight"),
  (r"visual\.blocks\.(\d+)\.norm([12])\.(scale|bias)", "visual.blocks.{0}.norm{1}.{2}"),
  (r"visual\.blocks\.(\d+)\.attn\.(qkv|proj)\.(kernel|bias)", "visual.blocks.{0}.attn.{1}.{2}"),
  (r"visual\.merger\.norm\.(scale|bias)", "visual.merger.ln_q.{0}"),
  (r"visual\.merger\.fc1\.(kernel|bias)", "visual.merger.mlp.0.{0}"),
  (r"visual\.merger\.fc2\.(kernel|bias)", "visual.merger.mlp.2.{0}"),
]
_VISION_MLP = {
  "qwen2_5_vl": [
    (
      r"visual\.blocks\.(\d+)\.mlp\.(gate|up|down)\.(kernel|bias)",
      "visual.blocks.{0}.mlp.{1}_proj.{2}",
    )
  ],
  "qwen2_vl": [
    (r"visual\.blocks\.(\d+)\.mlp\.up\.(kernel|bias)", "visual.blocks.{0}.mlp.fc1.{1}"),
    (r"visual\.blocks\.(\d+)\.mlp\.down\.(kernel|bias)", "visual.blocks.{0}.mlp.fc2.{1}"),
  ],
}
_HF_SUFFIX = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def key_table(model_type: str) -> list[tuple[str, str]]:
  """(our parameter path regex, legacy hub key template) pairs of a Qwen2(.5)-VL model."""
  return TEXT_KEYS + _VISION + _VISION_MLP[model_type]


def hf_key(model_type: str, path: str) -> str:
  """Legacy hub-layout key of one of our parameter paths (e.g. 'text.layers.0.attn.q.kernel')."""
  for pattern, template in registry.family(model_type).keys:
    m = re.fullmatch(pattern, path)
    if m:
      return template.format(*(_HF_SUFFIX.get(g, g) for g in m.groups()))
  raise KeyError(f"no HF name for parameter {path!r}")


def canonical_hf_key(key: str) -> str:
  """Maps v5 in-memory keys (`model.language_model.*`, `model.visual.*`) to the hub layout."""
  if key.startswith("model.language_model."):
    return "model." + key[len("model.language_model.") :]
  if key.startswith("model.visual."):
    return key[len("model.") :]
  return key


def _is_kernel(path: str) -> bool:
  return path.endswith("kernel") or path == "lm_head"


def hf_to_ours(path: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Converts one HF tensor to our layout (transpose for kernels, reshape otherwise)."""
  if _is_kernel(path):
    tensor = tensor.reshape(tensor.shape[0], -1).T
  if tensor.size != int(np.prod(shape)):
    raise ValueError(
      f"shape mismatch for {path}: checkpoint has {tensor.shape}, model expects {shape}"
    )
  return tensor.reshape(shape)


def ours_to_hf(path: str, value: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
  """Converts one of our parameters to the HF layout `hf_shape`."""
  if _is_kernel(path):
    out = int(np.prod(hf_shape[:1]))
    value = value.reshape(-1, out).T
  return np.ascontiguousarray(value.reshape(hf_shape))


def hf_shape(
  cfg: config_lib.ModelConfig, path: str, shape: tuple[int, ...], n_in: int
) -> tuple[int, ...]:
  """Shape of the HF tensor for one of our parameters with `n_in` input dimensions."""
  if path == "visual.patch_embed.kernel":
    v = cfg.vision
    return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  if _is_kernel(path):
    return (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))
  if path.endswith("bias"):  # Our biases keep the kernel's output shape, e.g. [heads, head_dim].
    return (int(np.prod(shape)),)
  return tuple(shape)


# ----------------------------------------------------------------------------------------------
# Safetensors reading and writing.
# ----------------------------------------------------------------------------------------------


def read_safetensors_header(file: str) -> tuple[dict, int]:
  """The JSON header of a safetensors file and the byte offset of its data section."""
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{file} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw)
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


class SafetensorsReader:
  """Lazy, memory-mapped access to the tensors of a local HF checkpoint directory."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._entries: dict[str, tuple[str, dict, int]] = {}
    for file in self._files():
      header, start = read_safetensors_header(file)
      for key, info in header.items():
        self._entries[canonical_hf_key(key)] = (file, info, start)
    self._maps: dict[str, np.memmap] = {}

  def _files(self) -> list[str]:
    index = os.path.join(self.path, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
      missing = [n for n in names if not os.path.isfile(os.path.join(self.path, n))]
      if missing:
        raise FileNotFoundError(
          f"checkpoint {self.path!r} is missing shard(s) {missing} listed in "
          "model.safetensors.index.json"
        )
      return [os.path.join(self.path, n) for n in names]
    single = os.path.join(self.path, "model.safetensors")
    if os.path.isfile(single):
      return [single]
    raise FileNotFoundError(
      f"no model.safetensors or model.safetensors.index.json in {self.path!r}"
    )

  def keys(self) -> set[str]:
    return set(self._entries)

  def get(self, key: str) -> np.ndarray:
    """The tensor as a read-only NumPy view of the memory-mapped file."""
    file, info, start = self._entries[key]
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{key}: unsupported safetensors dtype {info['dtype']}")
    if file not in self._maps:
      self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
    begin, end = info["data_offsets"]
    raw = self._maps[file][start + begin : start + end]
    return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(
  file: str, tensors: Iterator[tuple[str, tuple[int, ...], np.dtype, callable]]
):
  """Writes tensors given as (name, shape, dtype, fetch) without holding more than one in memory."""
  tensors = list(tensors)
  header, offset = {}, 0
  for name, shape, dtype, _ in tensors:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {
      "dtype": _ST_NAMES[np.dtype(dtype)],
      "shape": list(shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # The data section starts 8-byte aligned.
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, fetch in tensors:
      array = np.ascontiguousarray(fetch(), dtype=dtype)
      if array.shape != tuple(shape):
        raise ValueError(f"{name}: produced shape {array.shape}, expected {shape}")
      f.write(array.tobytes())


# ----------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------


def abstract_model(cfg: config_lib.ModelConfig, *, dtype=jnp.float32, param_dtype=None) -> QwenVL:
  """The model of `cfg`'s family with ShapeDtypeStruct parameters (no memory allocated)."""
  param_dtype = dtype if param_dtype is None else param_dtype
  cls = registry.family(cfg.model_type).model_class
  return nnx.eval_shape(lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def _path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def from_hf(
  path: str | os.PathLike,
  *,
  dtype=jnp.float32,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding_lib.Rules = sharding_lib.FSDP_TP,
) -> QwenVL:
  """Loads a local HF checkpoint directory of any registered family (`config.json`'s model_type).

  Args:
    path: directory with config.json and model.safetensors (or shards + index).
    dtype: parameter and compute dtype.
    mesh: when given, each parameter is placed sharded by its logical axes and `rules`.
    rules: logical-axis rules used with `mesh`.

  Raises:
    FileNotFoundError: config.json or a weight shard is missing.
    ValueError: unsupported model_type, missing/unexpected tensors or shape mismatches.
  """
  cfg = registry.load_hf_config(path)
  reader = SafetensorsReader(path)
  graphdef, state = nnx.split(abstract_model(cfg, dtype=dtype))
  flat = nnx.to_flat_state(state)
  wanted = {}
  for p, var in flat:
    wanted[hf_key(cfg.model_type, _path_str(p))] = (p, var)
  have = reader.keys()
  if cfg.text.tie_word_embeddings:
    have.discard("lm_head.weight")  # Some tied checkpoints still carry a copy.
  missing, unexpected = sorted(set(wanted) - have), sorted(have - set(wanted))
  if missing or unexpected:
    raise ValueError(
      f"checkpoint {os.fspath(path)!r} does not match a {cfg.model_type} model: "
      f"missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
      f"unexpected tensors {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
    )
  loaded = []
  for key, (p, var) in wanted.items():
    abstract = var.get_value()
    host = hf_to_ours(_path_str(p), reader.get(key), abstract.shape).astype(abstract.dtype)
    var.set_value(_place(host, var, mesh, rules, key))
    loaded.append((p, var))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _place(host: np.ndarray, var: nnx.Variable, mesh, rules, key: str) -> jax.Array:
  """Puts one host tensor on device(s), sharded by its logical axes when a mesh is given."""
  if mesh is None:
    return jnp.asarray(host)
  sharding = sharding_lib.param_sharding(var, mesh, rules)
  sharding_lib.check_divisible(host.shape, sharding, key)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# Files besides the weights that make a checkpoint directory servable (vLLM, SGLang, transformers).
COMPANION_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "vocab.json",
  "merges.txt",
  "special_tokens_map.json",
  "added_tokens.json",
  "chat_template.json",
  "chat_template.jinja",
  "preprocessor_config.json",
  "generation_config.json",
)


def to_hf(
  model: QwenVL,
  path: str | os.PathLike,
  *,
  max_shard_bytes: int = 4 << 30,
  copy_from: str | os.PathLike | None = None,
) -> None:
  """Writes config.json and safetensors (the family's hub layout, sharded with an index if large).

  Args:
    model: the policy to export.
    path: output directory (created).
    max_shard_bytes: largest safetensors file; more weights go to further shards plus an index.
    copy_from: a checkpoint directory whose tokenizer / processor / generation files are copied
      along, so the export can be served as it is.
  """
  cfg = model.config
  family = registry.family(cfg.model_type)
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  if copy_from is not None:
    for name in COMPANION_FILES:
      src = os.path.join(copy_from, name)
      if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(path, name))
  state = nnx.state(model, nnx.Param)
  entries = []
  for p, var in nnx.to_flat_state(state):
    name = _path_str(p)
    value = var.get_value()
    shape = hf_shape(cfg, name, value.shape, _n_in(model, p))
    dtype = np.dtype(value.dtype)
    fetch = lambda value=value, name=name, shape=shape: ours_to_hf(
      name, np.asarray(jax.device_get(value)), shape
    )
    entries.append((family.export_key(hf_key(cfg.model_type, name)), shape, dtype, fetch))
  shards = _split_shards(entries, max_shard_bytes)
  if len(shards) == 1:
    write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(os.path.join(path, fname), shard)
      weight_map.update({e[0]: fname for e in shard})
    total = sum(int(np.prod(e[1])) * e[2].itemsize for e in entries)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  hf_config = family.config_to_hf(cfg)
  hf_config["torch_dtype"] = hf_config["dtype"] = str(entries[0][2]) if entries else "float32"
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)


def _n_in(model: QwenVL, path: tuple) -> int:
  """Number of input dimensions of the Dense owning the kernel at `path` (1 for non-kernels)."""
  owner = model
  for p in path[:-1]:
    owner = owner[p] if isinstance(p, int) else getattr(owner, p)
  return getattr(owner, "n_in", 1)


def _split_shards(entries, max_bytes: int) -> list[list]:
  shards, current, size = [], [], 0
  for e in entries:
    nbytes = int(np.prod(e[1])) * e[2].itemsize
    if current and size + nbytes > max_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(e)
    size += nbytes
  return [*shards, current] if current else shards
