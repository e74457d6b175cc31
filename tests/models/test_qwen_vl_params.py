"""Checkpoint import/export: round trips through transformers, sharded loads and bad checkpoints."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from flax import nnx  # noqa: E402

from rrvf_jax import sharding  # noqa: E402
from rrvf_jax.models import qwen_vl  # noqa: E402
from rrvf_jax.models.qwen_vl import params  # noqa: E402
from rrvf_jax.testing import hf_reference as ref  # noqa: E402

IMG = ref.TINY_TOKEN_IDS["image_token_id"]
GRID = np.asarray([[1, 8, 12]])


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids = np.asarray([[1, 2, 502] + [IMG] * 24 + [503, 3, 4, 5]])
  pv = rng.normal(size=(96, 1176)).astype(np.float32)
  return ids, {"pixel_values": pv, "image_grid_thw": GRID}


def _flat_params(model):
  return {
    ".".join(map(str, p)): np.asarray(v.get_value())
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


@pytest.fixture(
  scope="module",
  params=[("qwen2_5_vl", False), ("qwen2_vl", True)],
  ids=["qwen2_5_vl", "qwen2_vl_tied"],
)
def checkpoint(request, tmp_path_factory):
  model_type, tie = request.param
  path = tmp_path_factory.mktemp("ckpt")
  hf = ref.make_tiny_checkpoint(path, model_type, tie=tie)
  return path, hf


def test_export_loads_in_transformers_with_same_logits(checkpoint, tmp_path):
  path, hf = checkpoint
  ours = qwen_vl.from_hf(path)
  qwen_vl.to_hf(ours, tmp_path)
  cls = ref.hf_model_class(ours.config.model_type)
  reloaded, info = cls.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids, kw = _inputs()
  np.testing.assert_allclose(
    ref.hf_logits(reloaded.eval(), ids, **kw), ref.hf_logits(hf, ids, **kw), atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(ours(ids, **kw)), ref.hf_logits(hf, ids, **kw), atol=1e-4)


def test_from_hf_of_to_hf_is_identical(checkpoint, tmp_path):
  ours = qwen_vl.from_hf(checkpoint[0])
  qwen_vl.to_hf(ours, tmp_path, max_shard_bytes=200_000)  # Forces several shards and an index.
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  again = qwen_vl.from_hf(tmp_path)
  a, b = _flat_params(ours), _flat_params(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert again.config == ours.config


def test_tied_checkpoint_has_no_lm_head(checkpoint, tmp_path):
  ours = qwen_vl.from_hf(checkpoint[0])
  qwen_vl.to_hf(ours, tmp_path)
  keys = params.SafetensorsReader(tmp_path).keys()
  assert ("lm_head.weight" in keys) == (not ours.config.text.tie_word_embeddings)


def test_sharded_hf_checkpoint_and_v5_key_layout(tmp_path):
  hf = ref.make_tiny_checkpoint(tmp_path / "sharded", "qwen2_5_vl", max_shard_size="100KB")
  assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
  ids, kw = _inputs(1)
  want = ref.hf_logits(hf, ids, **kw)
  np.testing.assert_allclose(
    np.asarray(qwen_vl.from_hf(tmp_path / "sharded")(ids, **kw)), want, atol=1e-4
  )
  # The in-memory transformers v5 layout (model.language_model.*, model.visual.*) loads too.
  v5 = tmp_path / "v5"
  v5.mkdir()
  shutil.copy(tmp_path / "sharded" / "config.json", v5)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  assert any(k.startswith("model.language_model.") for k in state)
  params.write_safetensors(
    str(v5 / "model.safetensors"), [(k, v.shape, v.dtype, lambda v=v: v) for k, v in state.items()]
  )
  np.testing.assert_allclose(np.asarray(qwen_vl.from_hf(v5)(ids, **kw)), want, atol=1e-4)


def test_sharded_load_on_a_mesh_gives_the_same_logits(checkpoint):
  path, _ = checkpoint
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  sharded = qwen_vl.from_hf(path, mesh=mesh)
  kernel = sharded.text.layers[0].mlp.gate.kernel.get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(kernel.addressable_shards) == 8
  ids, kw = _inputs(2)
  np.testing.assert_allclose(
    np.asarray(sharded(ids, **kw)), np.asarray(qwen_vl.from_hf(path)(ids, **kw)), atol=1e-5
  )


def test_bfloat16_load_agrees_on_top1(checkpoint):
  path, hf = checkpoint
  ours = qwen_vl.from_hf(path, dtype=jnp.bfloat16)
  assert ours.text.embed.get_value().dtype == jnp.bfloat16
  ids, kw = _inputs(3)
  got = np.asarray(ours(ids, **kw).astype(jnp.float32))
  want = ref.hf_logits(hf, ids, **kw)
  assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_missing_shard_is_named(tmp_path):
  ref.make_tiny_checkpoint(tmp_path, "qwen2_5_vl", max_shard_size="100KB")
  shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
  os.remove(tmp_path / shard)
  with pytest.raises(FileNotFoundError, match=shard):
    qwen_vl.from_hf(tmp_path)


def test_wrong_model_type_is_named(checkpoint, tmp_path):
  shutil.copytree(checkpoint[0], tmp_path, dirs_exist_ok=True)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["model_type"] = "llava"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="'llava'"):
    qwen_vl.from_hf(tmp_path)


def test_missing_directory_and_shape_mismatch(checkpoint, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config\.json"):
    qwen_vl.from_hf(tmp_path / "nope")
  shutil.copytree(checkpoint[0], tmp_path, dirs_exist_ok=True)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["text_config"]["intermediate_size"] = 96
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"shape mismatch.*mlp"):
    qwen_vl.from_hf(tmp_path)


def test_missing_tensor_is_named(checkpoint, tmp_path):
  reader = params.SafetensorsReader(checkpoint[0])
  keep = [k for k in sorted(reader.keys()) if k != "model.norm.weight"]
  shutil.copy(checkpoint[0] / "config.json", tmp_path)
  params.write_safetensors(
    str(tmp_path / "model.safetensors"),
    [(k, reader.get(k).shape, reader.get(k).dtype, lambda k=k: reader.get(k)) for k in keep],
  )
  with pytest.raises(ValueError, match=r"missing tensors \['model.norm.weight'\]"):
    qwen_vl.from_hf(tmp_path)


def test_image_token_count_mismatch_is_named(checkpoint):
  ours = qwen_vl.from_hf(checkpoint[0])
  ids, kw = _inputs()
  with pytest.raises(ValueError, match=r"image token count mismatch.*23.*24"):
    ours(np.delete(ids, 3, axis=1), **kw)
  with pytest.raises(ValueError, match="pixel_values shape"):
    ours(ids, pixel_values=kw["pixel_values"][:-4], image_grid_thw=GRID)


def test_forward_with_activation_sharding_equals_one_device(checkpoint):
  path, _ = checkpoint
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = qwen_vl.from_hf(path, mesh=mesh)
  rng = np.random.default_rng(7)
  ids = rng.integers(0, 400, (4, 16))
  with sharding.activation_rules(mesh, sharding.FSDP_TP):
    inputs = qwen_vl.prepare_inputs(sharded.config, ids)
    logits = nnx.jit(lambda m, x: m.forward(x))(sharded, inputs)
  assert logits.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(np.asarray(logits), np.asarray(qwen_vl.from_hf(path)(ids)), atol=1e-5)


def test_loading_streams_one_tensor_at_a_time(tmp_path):
  import dataclasses
  import tracemalloc

  from rrvf_jax.models.qwen_vl import config as config_lib

  tiny = config_lib.tiny()
  text = dataclasses.replace(
    tiny.text,
    vocab_size=1024,
    hidden_size=256,
    num_layers=6,
    intermediate_size=1024,
    mrope_section=(8, 12, 12),
  )
  cfg = tiny.replace(text=text, vision=dataclasses.replace(tiny.vision, out_hidden_size=256))
  qwen_vl.to_hf(qwen_vl.QwenVL(cfg, rngs=nnx.Rngs(0)), tmp_path)
  reader = params.SafetensorsReader(tmp_path)
  sizes = [reader.get(k).nbytes for k in sorted(reader.keys())]
  qwen_vl.from_hf(tmp_path)  # Warm-up: imports and caches.
  tracemalloc.start()
  qwen_vl.from_hf(tmp_path)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  # Host staging is bounded by the largest tensor (the memory-mapped file is not an allocation), not
  # by the checkpoint: loading everything first would peak above sum(sizes) (~23 MB here).
  assert peak < 4 * max(sizes) + (2 << 20), (peak, max(sizes), sum(sizes))
  assert 4 * max(sizes) + (2 << 20) < sum(sizes) / 2


def test_export_copies_tokenizer_and_processor_files(tmp_path):
  import transformers

  from rrvf_jax.testing import checkpoints

  src = checkpoints.make_tiny_policy_dir(tmp_path / "src")
  qwen_vl.to_hf(qwen_vl.from_hf(src), tmp_path / "out", copy_from=src)
  want = transformers.AutoTokenizer.from_pretrained(src)("<|im_start|>user\nhi<|im_end|>").input_ids
  got = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")(
    "<|im_start|>user\nhi<|im_end|>"
  )
  assert got.input_ids == want
  assert (tmp_path / "out" / "preprocessor_config.json").read_text() == (
    src / "preprocessor_config.json"
  ).read_text()
