"""Ahead-of-time TPU compilation of a run's programs (libtpu, no TPU): table fields and failures."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

pytest.importorskip("libtpu", reason="libtpu (requirements-tpu.txt) compiles for TPU topologies")

from configs import chart
from rrvf_jax import compile_check, hlo, memory_plan

TOPOLOGY = "v5p:2x2x1"


def tiny_config(**overrides):
  """The demo config (tiny model) in bfloat16 at smaller sizes, with `section.key=value` overrides.

  Small images and sequences keep each test's compiles within seconds on two CPU cores.
  """
  config = chart.get_config("demo")
  config.model.dtype = "bfloat16"
  config.image.width = config.image.height = 112
  config.sft.max_length = 512
  config.grpo.max_total_tokens = 1024
  config.grpo.max_new_tokens = 32
  config.grpo.max_turns = 1
  config.grpo.chunk_size = 128  # the LM head then loops over the 512-token trajectory bucket
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def make_run(tmp_path, **overrides):
  topology = compile_check.parse_topology(TOPOLOGY)
  return compile_check.make_run(tiny_config(**overrides), topology, str(tmp_path))


def v5p_mesh(shape=(1, 4, 1)):
  devices = compile_check.topology_devices(compile_check.parse_topology(TOPOLOGY))
  return Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp", "tensor"))


def test_topology_names():
  t = compile_check.parse_topology("v5p-64")
  assert (t.chips, t.hosts, t.shape, t.libtpu_name) == (32, 8, (2, 4, 4), "v5p:2x4x4")
  t = compile_check.parse_topology("v6e-8")
  assert (t.chips, t.hosts, t.libtpu_name) == (8, 1, "v6e:2x4")
  t = compile_check.parse_topology("v5p:2x2x1")
  assert (t.chips, t.hosts) == (4, 1)
  assert compile_check.parse_topology("v5p-128").hosts == 16
  for bad, words in [("v5p-6", "unknown slice"), ("tpu9", "expected e.g."), ("v6e:2x2x2", "2 dim")]:
    with pytest.raises(ValueError, match=words) as info:
      compile_check.parse_topology(bad)
    assert "\n" not in str(info.value)


def test_topology_devices_group_chips_by_host():
  devices = compile_check.topology_devices(compile_check.parse_topology("v5p-64"))
  assert len(devices) == 32 and len({d.process_index for d in devices}) == 8
  assert {d.device_kind for d in devices} == {"TPU v5"}


@pytest.mark.parametrize("kind", ["v5p", "v6e"])
def test_chip_hbm_is_what_the_compiler_allocates_from(kind):
  name = {"v5p": "v5p:2x2x1", "v6e": "v6e:2x4"}[kind]
  devices = compile_check.topology_devices(compile_check.parse_topology(name))
  mesh = Mesh(np.asarray(devices[:1]), ("x",))
  big = jax.ShapeDtypeStruct(
    (2**40 // 4,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec())
  )
  with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED") as info:
    jax.jit(lambda x: x + 1).lower(big).compile()
  assert f"available HBM ({compile_check.CHIPS[kind].hbm_gib:.2f}G)" in str(info.value)


def test_hlo_counts_loop_bodies_by_their_trips():
  # XLA's cost analysis counts a scan's body once; the HLO reader multiplies it by the trips.
  mesh = v5p_mesh()
  w = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
  xs = jax.ShapeDtypeStruct(
    (8, 64, 512), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec())
  )

  def scanned(w, xs):
    return jax.lax.scan(lambda c, x: (c + jnp.sum(x @ w), None), 0.0, xs)[0]

  compiled = jax.jit(scanned).lower(w, xs).compile()
  summary = hlo.summarize(compiled.as_text())
  per_trip = 2 * 64 * 512 * 512
  assert [(loop.trips, loop.flops_per_trip) for loop in summary.loops] == [(8, per_trip)]
  assert summary.flops == 8 * per_trip and summary.flops_once == per_trip
  assert compiled.cost_analysis()["flops"] < 2 * per_trip  # the body once
  # Without a loop the reader's matmul FLOPs are the compiler's (less its element-wise work).
  plain = (
    jax.jit(lambda w, x: x @ w).lower(w, jax.ShapeDtypeStruct((64, 512), jnp.bfloat16)).compile()
  )
  flops = hlo.summarize(plain.as_text()).flops
  assert flops == per_trip
  assert flops <= plain.cost_analysis()["flops"] < 1.05 * flops


def test_hlo_counts_grouped_attention_written_as_a_convolution():
  # Regression: the TPU compiler writes the flash tiles' grouped-query einsums (two batch dims)
  # as convolutions whose batch dims are spatial ones with a dilated input and padding; counting
  # the whole window gave 8x their FLOPs (4 query heads per kv head x 2 kv heads).
  from rrvf_jax.models.qwen_vl import flash

  mesh = v5p_mesh()
  sharded = lambda shape, dtype: jax.ShapeDtypeStruct(
    shape, dtype, sharding=NamedSharding(mesh, PartitionSpec())
  )
  q = sharded((1, 2048, 8, 128), jnp.bfloat16)
  kv = sharded((1, 2048, 2, 128), jnp.bfloat16)
  mask = sharded((1, 2048), jnp.bool_)
  attend = lambda q, k, v, m: flash.causal_flash_attention(q, k, v, m, scale=0.1, block=256)
  compiled = jax.jit(attend).lower(q, kv, kv, mask).compile()
  assert "convolution" in compiled.as_text()
  tiles = 8 * 9 // 2  # the causal tiles of 8 x 8 blocks
  per_tile = 2 * (2 * 256 * 256 * 8 * 128)  # scores and probabilities x values
  assert hlo.summarize(compiled.as_text()).flops == tiles * per_tile


def test_hlo_finds_collectives_and_their_bytes():
  mesh = v5p_mesh()
  w = jax.ShapeDtypeStruct(
    (1024, 256), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("fsdp"))
  )
  x = jax.ShapeDtypeStruct((8, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
  compiled = jax.jit(lambda w, x: x @ w, out_shardings=NamedSharding(mesh, PartitionSpec())).lower(
    w, x
  )
  found = hlo.summarize(compiled.compile().as_text()).collectives
  assert found, "a sharded contraction needs a collective"
  assert all(c.opcode in hlo.COLLECTIVES and c.bytes > 0 for c in found)


def _check_fields(results):
  hbm = int(compile_check.CHIPS["v5p"].hbm_gib * compile_check.GIB)
  for r in results:
    assert r.ok, r.failure
    assert r.hbm == hbm and r.compile_s > 0
    assert r.peak == r.arguments + r.temporaries + r.outputs - r.aliased + r.resident
    # The arguments' bytes in the compiler's tiled layouts are what its memory analysis counts.
    assert r.arguments_padded == r.arguments >= r.arguments_logical
  report = json.loads(json.dumps([r.as_dict() for r in results]))
  fields = {"arguments", "temporaries", "outputs", "aliased", "peak", "peak_fraction", "compile_s"}
  assert fields | {"flops", "estimated_s", "mfu", "bound_s"} <= set(report[0])
  return {r.name: r for r in results}


def test_tiny_train_programs_compile_with_the_table_fields(tmp_path):
  # The sampler's appended turn is compiled here too: memory_plan takes its temporaries.
  run = make_run(tmp_path, **{"grpo.engine": "lock_step"})
  results = compile_check.check(run, only=["sft_step", "grpo_step", "append"])
  by_name = _check_fields(results)
  append = by_name.pop("append")
  results = list(by_name.values())
  for r in results:
    assert r.arguments > 0 and r.temporaries > 0 and r.flops > 0 and r.estimated_s > 0
    assert 0 < r.mfu < 1
  # The update donates the state: its new state aliases the old one.
  assert by_name["grpo_step"].aliased > 0
  # The chunked LM head is a loop: its trips count in the FLOPs (XLA counts its body once).
  assert any(trips and trips > 1 for trips, _ in by_name["grpo_step"].loops)
  assert by_name["grpo_step"].flops > by_name["grpo_step"].compiler_flops
  table = compile_check.format_table(results, run)
  for word in ("program", "peak", "%HBM", "compile", "TFLOP", "est s", "MFU"):
    assert word in table
  assert "the compiler's model, not a measurement" in table
  # memory_plan's exact rows (parameters, optimiser state, the train batch) are the GRPO step's
  # arguments, byte for byte; TPU layouts then pad small minor dimensions on top.
  g, sizes = run.config.grpo, dict(run.placement.trainer_mesh.shape)
  state = memory_plan.state_bytes(run.model_cfg, jnp.bfloat16, sizes, run.rules)
  batch = memory_plan.train_batch_bytes(
    run.model_cfg,
    g.prompts_per_step * g.group_size,
    compile_check.grpo_length(run),
    g.max_turns + 1,
    run.config.image.width,
    sizes,
    run.rules,
  )
  plan = state.param_device + state.opt_device + memory_plan.STEP_RNG_BYTES + batch
  assert plan == by_name["grpo_step"].arguments_logical
  assert by_name["grpo_step"].arguments > plan  # 64-wide shards are padded to 128 lanes
  # With the compiled results, the plan's estimates give way to the compiler's temporaries.
  step = by_name["grpo_step"]
  kwargs = dict(
    prompts_per_step=g.prompts_per_step,
    group_size=g.group_size,
    max_turns=g.max_turns,
    max_total_tokens=g.max_total_tokens,
    seq_len=compile_check.grpo_length(run),
    micro_batches=g.micro_batches,
    remat=g.remat,
    image_size=run.config.image.width,
  )
  compiled = {"grpo_step": step.as_dict(), "append": append.as_dict()}
  planned = memory_plan.trainer_plan(run.model_cfg, sizes, compiled=compiled, **kwargs)
  rows = {r.name: r for r in planned.rows}
  assert not [r for r in planned.rows if r.how == "estimate"]
  assert rows["GRPO step temporaries (gradients, accumulator, activations)"].bytes == (
    step.temporaries
  )
  # Parameters, optimiser state, batch and layout padding: the step's arguments, plus its temps.
  assert planned.phase("static") + planned.phase("train") == step.arguments + step.temporaries
  # A paged run's appended turn is `paged_append`: the plan takes either.
  paged = {"grpo_step": step.as_dict(), "paged_append": append.as_dict()}
  assert memory_plan.trainer_plan(run.model_cfg, sizes, compiled=paged, **kwargs).rows == (
    planned.rows
  )
  with pytest.raises(ValueError, match="no \\['append or paged_append'\\]"):
    memory_plan.trainer_plan(run.model_cfg, sizes, compiled={"grpo_step": {}}, **kwargs)
  compiled["grpo_step"] = step.as_dict() | {"arguments_logical": plan + 1}
  with pytest.raises(ValueError, match="another layout"):
    memory_plan.trainer_plan(run.model_cfg, sizes, compiled=compiled, **kwargs)


def test_tiny_sampler_programs_compile_with_the_table_fields(tmp_path):
  # A sampler that splits the weights over tensor (no all-gather in the decode loop).
  run = make_run(tmp_path, **{"roles.sampler_tensor": 4, "grpo.engine": "lock_step"})
  sampler = ["cache_init", "encode", "prefill", "fork", "decode", "append", "transfer"]
  results = compile_check.check(run, only=["logprobs", *sampler])
  by_name = _check_fields(results)
  logprobs = by_name["logprobs"]
  assert logprobs.flops > 0 and 0 < logprobs.mfu < 1 and logprobs.aliased == 0
  decode = by_name["decode"]
  assert decode.bound_s > 0 and decode.estimated_s > 0 and decode.decode_gathers == []
  assert decode.loops and decode.loops[0][0] is None  # the decode loop has no static trip count
  assert by_name["cache_init"].outputs > 0 and by_name["transfer"].outputs > 0
  assert "HBM bound" in compile_check.format_table(results, run)


def test_tiny_paged_programs_compile_with_the_table_fields(tmp_path):
  # The default engine's rollout: its own programs, none of the lock-step cache's.
  run = make_run(tmp_path, **{"roles.sampler_tensor": 4})
  names = [p.name for p in compile_check.paged_programs(run)]
  assert names == [
    "paged_pools", "encode", "paged_prefill", "paged_fork", "paged_decode", "paged_append",
    "transfer",
  ]  # fmt: skip
  assert compile_check.sampler_programs(run) == []
  results = compile_check.check(run, only=[n for n in names if n != "encode"])
  by_name = _check_fields(results)
  assert by_name["paged_pools"].outputs > 0
  # Prefill, fork, decode and append donate the pools: the new pools alias the old ones.
  pools = by_name["paged_pools"].outputs
  for name in ("paged_prefill", "paged_fork", "paged_decode", "paged_append"):
    assert by_name[name].aliased >= pools * 0.99, name
  assert "16 rows x a 128-token turn" in by_name["paged_append"].what
  assert "covering 1024 tokens" in by_name["paged_append"].what
  assert by_name["paged_prefill"].what.startswith("4 prompts x 256 tokens")
  assert by_name["paged_fork"].what.startswith("1 -> 3 rows (G=4)")
  decode = by_name["paged_decode"]
  assert decode.bound_s > 0 and decode.decode_gathers == []
  with pytest.raises(ValueError, match="unknown \\['decode'\\]"):
    compile_check.check(run, only=["decode"])
  # grpo.append_rows caps the rows of an appended turn (the v5p-8 paper layout needs 64 of 256).
  fewer = make_run(tmp_path, **{"roles.sampler_tensor": 4, "grpo.append_rows": 4})
  (append,) = [p for p in compile_check.paged_programs(fewer) if p.name == "paged_append"]
  assert append.what.startswith("4 rows x a 128-token turn")


def test_colocated_fsdp_paged_sampler_gathers_weights_every_token(tmp_path):
  # The paged decode loop on the trainer's FSDP mesh gathers weights too, and says so.
  run = make_run(tmp_path)
  (decode,) = compile_check.check(run, only=["paged_decode"])
  assert not decode.ok and decode.decode_gathers
  assert decode.failure.startswith("FAIL paged_decode on v5p:2x2x1")
  assert "--config.roles.sampler_tensor=4" in decode.failure


def test_colocated_fsdp_sampler_gathers_weights_every_token(tmp_path):
  # The demo layout on 4 chips: the sampler decodes with the trainer's FSDP-sharded weights.
  run = make_run(tmp_path, **{"grpo.engine": "lock_step"})
  results = compile_check.check(run, only=["cache_init", "prefill", "fork", "decode"])
  decode = results[-1]
  assert not decode.ok and decode.decode_gathers
  assert decode.decode_step_collectives["all-gather"][0] >= len(decode.decode_gathers)
  assert decode.failure.startswith("FAIL decode on v5p:2x2x1")
  assert "all-gathers" in decode.failure and "--config.roles.sampler_tensor=4" in decode.failure
  assert "\n" not in decode.failure


def test_layout_that_cannot_fit_is_one_line(capsys, tmp_path):
  # 512 rows per chip appending a 1024-token turn to a cache of the worst-case episode (3 turns
  # of 16k tokens: ~52k slots): the scores alone need hundreds of GiB.
  args = [
    "compile_check",
    "--config=configs/chart.py:demo",
    f"--topology={TOPOLOGY}",
    "--config.grpo.prompts_per_step=256",
    "--config.grpo.max_total_tokens=65536",
    "--config.grpo.max_new_tokens=16384",
    "--config.grpo.max_response_tokens=1024",
    "--config.roles.sampler_tensor=4",
    "--config.grpo.engine=lock_step",
    "--programs=append",
    f"--json={tmp_path / 'out.json'}",
  ]
  assert compile_check.main(args) == 1
  out = capsys.readouterr().out.strip().splitlines()
  failure = out[-1]
  assert failure.startswith("compile_check: FAIL append on v5p:2x2x1 (1 hosts)")
  assert "GiB of 95.74 GiB HBM; try " in failure
  report = json.loads((tmp_path / "out.json").read_text())
  assert report["failures"] == [failure.removeprefix("compile_check: ")]
  assert not report["programs"][0]["ok"]


def test_micro_batch_that_does_not_divide_names_the_fix(tmp_path):
  run = make_run(tmp_path, **{"sft.batch_size": 6, "sft.micro_batches": 3})
  (result,) = compile_check.check(run, only=["sft_step"])
  assert not result.ok
  assert "cannot be laid out" in result.failure
  assert "try --config.sft.micro_batches=" not in result.failure  # 6 rows never divide by 4
  assert "divides by the 4 data-parallel devices" in result.failure


def test_append_attends_a_block_of_queries_at_a_time(tmp_path, monkeypatch):
  # Regression: an appended turn's float32 scores over the whole cache were alive for all its
  # queries at once: the paper preset's append needed 153.5 GiB per chip on a v5p-8 (73.3 GiB in
  # blocks of 256 queries). Here: 64 rows x 1024 new tokens x 8576 slots (the worst case of 3 turns
  # of 1536 tokens) on 4 chips.
  from rrvf_jax.models.qwen_vl import kv_cache

  run = make_run(
    tmp_path,
    **{
      "grpo.max_total_tokens": 8192,
      "grpo.max_turns": 3,
      "grpo.max_new_tokens": 1536,
      "grpo.max_response_tokens": 1024,
      "grpo.prompts_per_step": 16,
      "mesh.fsdp": 4,
      "grpo.engine": "lock_step",
    },
  )
  assert run.stage.cache_length == 8576
  (blocked,) = compile_check.check(run, only=["append"])
  monkeypatch.setattr(kv_cache, "QUERY_BLOCK", 1 << 20)
  (whole,) = compile_check.check(run, only=["append"])
  assert blocked.ok and whole.ok
  # 0.43 GB against 1.27 GB here: the scores shrink 4x (256 of 1024 queries), the rest does not.
  assert blocked.temporaries < whole.temporaries / 2.5


def test_gke_manifest_batches_lay_out_on_its_slice(tmp_path):
  # Regression: the v5p-64 manifest's SFT micro-batches (64 / 4 = 16 rows) did not divide over its
  # 32 FSDP chips, so the run would stop at the first SFT step (compile_check: "cannot be laid
  # out"). The batches only are placed here; the full compile of this layout is in the README.
  import yaml
  from absl import flags
  from ml_collections import config_flags

  from launch import gke

  (jobset,) = [
    o for o in yaml.safe_load_all(gke.documented()["tpu_v5p64.yaml"]) if o["kind"] == "JobSet"
  ]
  command = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  command = command["containers"][0]["command"]
  argv = ["prog", *[a for a in command if a.startswith("--config")]]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "test", flag_values=values, sys_argv=argv)
  values(argv)
  config = values.config
  config.model.checkpoint_dir = ""  # the preset's architecture: no weights are read
  run = compile_check.make_run(config, compile_check.parse_topology("v5p-64"), str(tmp_path))
  c = config.sft
  sft_batch = compile_check.sft_batch(run, c.max_length, c.max_images)
  compile_check.placed_batch(run, sft_batch, c.micro_batches)
  g = config.grpo
  compile_check.placed_batch(run, compile_check.grpo_batch(run, g.micro_batches), g.micro_batches)
  config.sft.micro_batches = 4
  with pytest.raises(ValueError, match="dimension 16 is not divisible"):
    compile_check.placed_batch(run, compile_check.sft_batch(run, c.max_length, c.max_images), 4)


def test_paged_decode_compiles_with_xla_attention_and_the_kernel(tmp_path, monkeypatch):
  # The tiny policy with 8 heads of 128 dims over 4 kv heads (the kernel wants a head dim of a
  # multiple of 128), sampling on tensor=4: one kv head per chip.
  import dataclasses

  from rrvf_jax import components

  policy_config = components.policy_config

  def heads_of_128(config, tok):
    cfg = policy_config(config, tok)
    text = dataclasses.replace(
      cfg.text, num_heads=8, num_kv_heads=4, explicit_head_dim=128, mrope_section=(16, 24, 24)
    )
    return cfg.replace(text=text)

  monkeypatch.setattr(components, "policy_config", heads_of_128)
  lock_step = make_run(tmp_path, **{"roles.sampler_tensor": 4, "grpo.engine": "lock_step"})
  assert compile_check.paged_programs(lock_step) == []  # a lock-step run does not use them
  run = make_run(tmp_path, **{"roles.sampler_tensor": 4})
  results = compile_check.check(
    run, paged_context=512, only=["paged_decode", "paged_decode_pallas"]
  )
  by_name = _check_fields(results)
  assert set(by_name) == {"paged_decode", "paged_decode_pallas"}
  xla, kernel = by_name["paged_decode"], by_name["paged_decode_pallas"]
  assert "16 slots x 512 tokens (16 rows, 513 pages of 16)" in xla.what
  assert xla.what.endswith("attention xla") and kernel.what.endswith("attention pallas")
  # One kernel call per layer in the decode loop's body; none on the pure-JAX path.
  assert (xla.kernels, kernel.kernels) == (0, run.model_cfg.text.num_layers)
  for r in (xla, kernel):
    assert r.bound_s > 0 and r.estimated_s > 0 and r.decode_gathers == []
    assert r.loops and r.loops[0][0] is None  # the decode loop has no static trip count
  # Both read the same bytes per step: the bound is the same; the pools are donated.
  assert kernel.bound_s == xla.bound_s and kernel.aliased == xla.aliased > 0
  # The cost model does not see the kernel's reads of the pools: the row adds them at bandwidth.
  assert xla.kernel_s is None and 0 < kernel.kernel_s < kernel.bound_s
  table = compile_check.format_table(list(by_name.values()), run)
  assert table.count("HBM bound") == 2 and table.count("(kernel reads)") == 1
