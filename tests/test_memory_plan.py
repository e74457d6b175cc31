"""The memory plan's exact numbers equal real sharded arrays on 8 fake devices and known counts."""

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from rrvf_jax import memory_plan, sharding
from rrvf_jax.models.qwen_vl import QwenVL, get_preset
from rrvf_jax.processing import tokens
from rrvf_jax.rollout import Sampler
from rrvf_jax.testing.tokenizer import make_tiny_tokenizer
from rrvf_jax.train import optim
from rrvf_jax.train import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def needs_8_devices():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (fake) devices")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  """The tiny tokenizer (the sampler reads its special token ids)."""
  return tokens.load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("memplan_tok")))


def shard_nbytes(tree) -> int:
  """Bytes device 0 holds of every array in `tree`."""
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(("mesh_shape", "dtype"), [((1, 4, 2), "float32"), ((2, 2, 2), "bfloat16")])
def test_tiny_state_bytes_equal_real_shards(mesh_shape, dtype):
  needs_8_devices()
  cfg = get_preset("tiny")
  jdtype = memory_plan.DTYPES[dtype]
  mesh = sharding.make_mesh(*mesh_shape)
  tx, _ = optim.make_optimizer(1e-6)
  make = lambda rngs: QwenVL(cfg, dtype=jdtype, param_dtype=jdtype, rngs=rngs)
  _, state = state_lib.init_train_state(make, tx, mesh=mesh, rules=sharding.FSDP_TP)
  sizes = dict(zip(sharding.MESH_AXES, mesh_shape, strict=True))
  plan = memory_plan.state_bytes(cfg, jdtype, sizes, sharding.FSDP_TP)
  assert plan.param_device == shard_nbytes(state.params)
  assert plan.opt_device == shard_nbytes(state.opt_state)
  assert plan.param_count == sum(x.size for x in jax.tree.leaves(state.params))
  assert plan.opt_dtypes == (dtype,)
  assert plan.warnings == ()


@pytest.mark.parametrize(("mesh_shape", "rows"), [((2, 2, 2), 8), ((1, 4, 2), 4), ((2, 2, 2), 3)])
def test_kv_cache_equals_real_sampler_session(tok, mesh_shape, rows):
  needs_8_devices()
  cfg = get_preset("tiny")
  model = QwenVL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh(*mesh_shape)
  sampler = Sampler(model, tok, cache_length=64, mesh=mesh, rules=sharding.FSDP_TP)
  session = sampler.new_session(rows)
  sizes = dict(zip(sharding.MESH_AXES, mesh_shape, strict=True))
  got = memory_plan.kv_cache_bytes(cfg, rows, 64, jnp.bfloat16, sizes, sharding.FSDP_TP)
  cache = session.state.cache
  assert got == shard_nbytes((cache.k, cache.v))
  rest = (cache.valid, session.state.last_logits, session.state.next_position)
  assert memory_plan.sampler_state_bytes(cfg, rows, 64, sizes, sharding.FSDP_TP) == shard_nbytes(
    rest
  )


def qwen_param_count(cfg) -> int:
  """Parameters of a Qwen2.5-VL model from its config (HF layout)."""
  t, v = cfg.text, cfg.vision
  e, nh, kh, f, layers = (
    t.hidden_size,
    t.num_heads * t.head_dim,
    t.num_kv_heads * t.head_dim,
    (t.intermediate_size),
    t.num_layers,
  )
  attn = e * nh + nh + 2 * (e * kh + kh) + nh * e
  text = t.vocab_size * e * 2 + layers * (attn + 3 * e * f + 2 * e) + e
  d, fv = v.hidden_size, v.intermediate_size
  block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * (d * fv + fv) + (fv * d + d)
  merged = 4 * d
  merger = d + merged * merged + merged + merged * v.out_hidden_size + v.out_hidden_size
  return text + v.patch_dim * d + v.depth * block + merger


def test_7b_parameter_count_and_per_device_bytes():
  cfg = get_preset("qwen2.5-vl-7b")
  sizes = {"data": 1, "fsdp": 8, "tensor": 4}
  plan = memory_plan.state_bytes(cfg, jnp.bfloat16, sizes, sharding.FSDP_TP)
  assert plan.param_count == qwen_param_count(cfg) == 8_292_166_656
  assert plan.param_total == 2 * plan.param_count
  # Bf16 AdamW moments mirror the parameters; the two step counts are int32 scalars.
  assert plan.opt_total == 2 * plan.param_total + 2 * 4
  assert plan.warnings == ()
  # Expected bytes per device, leaf family by leaf family, from the FSDP_TP rules by hand.
  t, v = cfg.text, cfg.vision
  e, nh, kh, f, layers = (
    t.hidden_size,
    t.num_heads * t.head_dim,
    t.num_kv_heads * t.head_dim,
    (t.intermediate_size),
    t.num_layers,
  )
  d, fv = v.hidden_size, v.intermediate_size
  on_both = 2 * t.vocab_size * e + layers * (2 * e * nh + 2 * e * kh + 3 * e * f)
  on_both += 4 * d * 4 * d + 4 * d * e  # merger fc1, fc2
  on_tensor = layers * (nh + 2 * kh) + 4 * d  # q/k/v biases, merger fc1 bias
  on_fsdp = (2 * layers + 1) * e + e  # text norms, merger fc2 bias
  on_fsdp += v.patch_dim * d + d + v.depth * (2 * d + 4 * d * d + d + 3 * d * fv + d)
  replicated = v.depth * (3 * d + 2 * fv)  # qkv biases, gate/up biases
  assert on_both + on_tensor + on_fsdp + replicated == plan.param_count
  expected = 2 * (on_both // 32 + on_tensor // 4 + on_fsdp // 8 + replicated)
  assert plan.param_device == expected
  assert plan.param_total / 32 < plan.param_device < plan.param_total / 8


def test_parse_mesh_fills_and_rejects():
  assert memory_plan.parse_mesh("data=1,fsdp=8,tensor=4", 32) == {"data": 1, "fsdp": 8, "tensor": 4}
  assert memory_plan.parse_mesh("tensor=8", 8) == {"data": 1, "fsdp": 1, "tensor": 8}
  assert memory_plan.parse_mesh("data=-1,tensor=4", 32) == {"data": 8, "fsdp": 1, "tensor": 4}
  for bad, words in [
    ("fsdp=8,tensoor=4", "tensoor"),
    ("fsdp=eight", "not an integer"),
    ("fsdp=8,tensor=8", "needs 64 devices"),
    ("fsdp=0", "must be >= 1"),
    ("fsdp=8,fsdp=4", "twice"),
    ("data=-1,fsdp=-1", "at most one"),
  ]:
    with pytest.raises(ValueError, match=words) as info:
      memory_plan.parse_mesh(bad, 32)
    assert "\n" not in str(info.value)


def test_cli_bad_mesh_is_one_line_error(capsys):
  assert memory_plan.main(["--devices", "32", "--mesh", "fsdp=8,tensoor=4"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("memory_plan: error: --mesh") and "\n" not in err


def test_cli_trainer_table_and_json(capsys):
  args = ["--preset", "tiny", "--devices", "8", "--mesh", "fsdp=4,tensor=2"]
  assert memory_plan.main([*args, "--max_total_tokens", "1024", "--image_size", "224"]) == 0
  table = capsys.readouterr().out
  assert "sampler KV cache" in table and "peak" in table and "% of 95 GiB" in table
  assert memory_plan.main([*args, "--json", "--device_memory_gib", "80"]) == 0
  plan = json.loads(capsys.readouterr().out)
  assert plan["param_count"] == qwen_param_count(get_preset("tiny"))
  rows = {r["name"].split(" (")[0]: r["bytes"] for r in plan["rows"]}
  static = rows["parameters"] + rows["optimizer state"]
  assert plan["peak_bytes"] >= static + rows["sampler KV cache"]
  assert plan["peak_fraction"] == pytest.approx(plan["peak_bytes"] / (80 * 2**30))


def test_activation_estimate_follows_its_formula():
  cfg = get_preset("tiny")
  t = cfg.text
  sizes = {"data": 2, "fsdp": 2, "tensor": 2}
  rows, length, a = 8, 256, 2
  b = rows // 4
  q, kv, f = (
    t.num_heads // 2 * t.head_dim,
    t.num_kv_heads // 2 * t.head_dim,
    t.intermediate_size // 2,
  )
  dots = a * (q + 2 * kv + 2 * t.hidden_size + 2 * f)
  other = a * (4 * t.hidden_size + 2 * q + kv + 2 * f)
  attn = t.num_heads // 2 * length * (4 + a)
  layer = dots + other + attn
  got = {
    r: memory_plan.train_activations(cfg, rows, length, r, a, sizes, sharding.FSDP_TP)
    for r in memory_plan.REMAT
  }
  assert got["none"].total == b * length * t.num_layers * layer
  assert got["dots"].total == b * length * (t.num_layers * dots + layer)
  assert got["full"].total == b * length * (t.num_layers * a * t.hidden_size + layer)
  buffer = memory_plan.logprob_buffer(cfg, rows, 128, length, sizes, sharding.FSDP_TP)
  assert buffer == b * 128 * (t.vocab_size // 2) * 4 * 2


def test_defaults_match_paper_scale_config():
  spec = importlib.util.spec_from_file_location("rrvf_common_cfg", ROOT / "configs" / "common.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.base_config()
  for key, value in memory_plan.DEFAULTS.items():
    want = c.image.width if key == "image_size" else c.grpo[key]
    assert value == want, key
  assert c.image.width == c.image.height


def test_judge_kv_cache_is_per_device_share():
  # 7B rather than 72B keeps the test fast; the arithmetic is the same.
  cfg = get_preset("qwen2.5-vl-7b")
  plan = memory_plan.judge_plan("qwen2.5-vl-7b", {"data": 1, "fsdp": 1, "tensor": 4}, concurrent=2)
  t = cfg.text
  kv = {r.name.split(" (")[0]: r.bytes for r in plan.rows}["KV cache"]
  assert kv == 2 * 8192 * t.num_layers * 2 * (t.num_kv_heads // 4) * t.head_dim * 2
  assert math.isclose(plan.peak, plan.phase("static") + kv)


def test_sampler_weights_equal_a_real_transfer_to_the_sampler_mesh():
  needs_8_devices()
  from rrvf_jax import roles

  cfg = get_preset("tiny")
  mesh = sharding.make_mesh(1, 8, 1)
  tx, _ = optim.make_optimizer(1e-6)
  make = lambda rngs: QwenVL(cfg, rngs=rngs)
  _, state = state_lib.init_train_state(make, tx, mesh=mesh, rules=sharding.FSDP_TP)
  placement = roles.Roles(mesh, roles.local_mesh(jax.devices(), tensor=2))
  targets = roles.sampler_shardings(state.params, placement.sampler_mesh, sharding.FSDP_TP)
  moved = roles.transfer(state.params, placement, targets)
  sizes = {"data": 1, "fsdp": 8, "tensor": 1}
  got = memory_plan.sampler_weight_bytes(cfg, jnp.float32, sizes, sharding.FSDP_TP, 1, 2)
  assert got == shard_nbytes(moved)
  assert got > shard_nbytes(state.params)  # a fuller copy than the trainer's FSDP shard
  with pytest.raises(ValueError, match="--sampler_tensor=3"):
    memory_plan.sampler_weight_bytes(cfg, jnp.float32, sizes, sharding.FSDP_TP, 2, 3)
