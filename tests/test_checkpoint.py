"""Run checkpoints: sharded round trips, retention, cadence, SIGTERM, config and corrupt dirs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rrvf_jax import checkpoint, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(lr=1e-6, group=8):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rl = ml_collections.ConfigDict({"lr": lr, "group_size": group, "clip": 0.2})
  c.log_every = 10
  return c


def _state(mesh, seed=0):
  """A run-state-like pytree: sharded params + optimizer moments, a scalar step, a typed key."""
  rng = np.random.default_rng(seed)
  w_sh = NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
  b_sh = NamedSharding(mesh, PartitionSpec("tensor"))
  rep = NamedSharding(mesh, PartitionSpec())
  w = rng.normal(size=(8, 4)).astype(np.float32)
  b = rng.normal(size=(4,)).astype(np.float32)
  return {
    "params": {"w": jax.device_put(w, w_sh), "b": jax.device_put(b.astype(jnp.bfloat16), b_sh)},
    "opt": {"mu": jax.device_put(w * 0.5, w_sh), "count": jax.device_put(np.int32(seed), rep)},
    "step": jax.device_put(np.int32(seed), rep),
    "rng": jax.device_put(jax.random.key(seed), rep),
  }


def _host(tree):
  """NumPy copy of every leaf (key arrays as their raw data)."""
  return jax.tree.map(
    lambda x: np.asarray(
      jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    ),
    tree,
  )


def _assert_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, _host(a), _host(b))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(data=2, fsdp=2, tensor=2)


def test_sharded_round_trip_restores_values_and_requested_shardings(tmp_path, mesh):
  state = _state(mesh, seed=3)
  meta = {"data": {"epoch": 1, "index": 17, "seed": 0}, "note": "é"}
  with checkpoint.Checkpointer(tmp_path, save_every=1, config=_config()) as ckpt:
    assert ckpt.save(3, state, meta)
    ckpt.wait()
  # Ask for different shardings than the saved ones: the restore must honour the request.
  other = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  abstract = checkpoint.abstract_like(state)
  abstract["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=other)
  with checkpoint.Checkpointer(tmp_path, save_every=1, config=_config()) as ckpt:
    step, restored, got_meta = ckpt.restore_latest(abstract)
  assert step == 3
  assert got_meta == meta
  _assert_equal(restored, state)
  assert restored["params"]["w"].sharding == other
  assert restored["params"]["b"].sharding == state["params"]["b"].sharding
  assert restored["params"]["b"].dtype == jnp.bfloat16
  assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  # The restored key still draws the same numbers as the original.
  np.testing.assert_array_equal(
    jax.random.uniform(restored["rng"], (3,)), jax.random.uniform(state["rng"], (3,))
  )


def test_no_checkpoint_returns_none(tmp_path, mesh):
  with checkpoint.Checkpointer(tmp_path / "ckpts", save_every=5) as ckpt:
    assert ckpt.restore_latest(checkpoint.abstract_like(_state(mesh))) is None
    assert ckpt.latest_step() is None


def test_save_every_keep_k_and_async_wait(tmp_path, mesh):
  state = _state(mesh)
  with checkpoint.Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
    saved = [s for s in range(1, 8) if ckpt.save(s, state, {"s": s})]
    assert saved == [2, 4, 6]
    # A forced save writes off-cadence steps; a step already saved is skipped.
    assert ckpt.save(7, state, {"s": 7}, force=True)
    assert not ckpt.save(7, state, {"s": 7}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [6, 7]


def test_async_save_survives_deleted_source_arrays(tmp_path, mesh):
  # The train step donates its state right after `save` returns: the save must not need it.
  state = _state(mesh, seed=5)
  expected = _host(state)
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.save(1, state, {})
    abstract = checkpoint.abstract_like(state)
    jax.tree.map(lambda x: x.delete(), state)
    ckpt.wait()
    _, restored, _ = ckpt.restore_latest(abstract)
  jax.tree.map(np.testing.assert_array_equal, _host(restored), expected)


def test_config_mismatch_names_the_differing_keys(tmp_path, mesh):
  state = _state(mesh)
  with checkpoint.Checkpointer(tmp_path, save_every=1, config=_config()) as ckpt:
    ckpt.save(1, state, {})
  new = _config(lr=3e-6, group=4)
  with (
    checkpoint.Checkpointer(tmp_path, save_every=1, config=new) as ckpt,
    pytest.raises(checkpoint.ConfigMismatchError) as err,
  ):
    ckpt.restore_latest(checkpoint.abstract_like(state))
  msg = str(err.value)
  assert str(tmp_path) in msg and "different run" in msg
  assert "rl.group_size: 8 -> 4" in msg and "rl.lr" in msg and "seed" not in msg
  # Ignored keys may change between attempts of one run.
  changed = _config()
  changed.log_every = 99
  with checkpoint.Checkpointer(
    tmp_path, save_every=1, config=changed, fingerprint_ignore=("log_every",)
  ) as ckpt:
    assert ckpt.restore_latest(checkpoint.abstract_like(state)).step == 1


def test_fingerprint_is_stable_and_sensitive():
  a = checkpoint.config_fingerprint(_config())
  assert a == checkpoint.config_fingerprint(_config().to_dict())
  assert a != checkpoint.config_fingerprint(_config(group=4))
  assert checkpoint.config_fingerprint(_config(), ignore=("rl",)) == checkpoint.config_fingerprint(
    _config(lr=1.0, group=1), ignore=("rl",)
  )


def test_corrupt_checkpoint_is_one_clear_error(tmp_path, mesh):
  state = _state(mesh)
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state, {})
    ckpt.save(2, state, {})
  # Garble every file of step 2's array item.
  for root, _, files in os.walk(tmp_path / "2" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  with (
    checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt,
    pytest.raises(checkpoint.CheckpointError) as err,
  ):
    ckpt.restore_latest(checkpoint.abstract_like(state))
  msg = str(err.value)
  assert "\n" not in msg
  assert f"step 2 in {tmp_path}" in msg and "resume from step 1" in msg


def test_unserialisable_metadata_is_named(tmp_path, mesh):
  with (
    checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt,
    pytest.raises(ValueError, match="metadata at step 1 is not JSON"),
  ):
    ckpt.save(1, _state(mesh), {"bad": object()})


_LOOP = textwrap.dedent(
  """
  import sys, time
  import jax, jax.numpy as jnp
  from rrvf_jax import checkpoint

  ckpt = checkpoint.Checkpointer(sys.argv[1], save_every=4, keep=3)
  stop = checkpoint.install_sigterm_handler()
  state = {"w": jnp.zeros((4,)), "step": jnp.int32(0)}
  for step in range(1, 100000):
    state = {"w": state["w"] + 1.0, "step": jnp.int32(step)}
    ckpt.save(step, state, {"data_index": step}, force=stop.requested)
    if stop.requested:
      print(f"stopped at {step}", flush=True)
      break
    print(f"step {step}", flush=True)
    if step == 6:  # Wait here for the parent's SIGTERM, so the stop step is known.
      deadline = time.monotonic() + 60
      while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)
  ckpt.close()
  """
)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  script = tmp_path / "loop.py"
  script.write_text(_LOOP)
  workdir = tmp_path / "ckpts"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}
  proc = subprocess.Popen(
    [sys.executable, str(script), str(workdir)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
    cwd=ROOT,
  )
  try:
    for line in proc.stdout:
      if line.startswith("step 6"):
        proc.send_signal(signal.SIGTERM)
        break
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-2000:]
  stopped = [int(x.split()[-1]) for x in out.splitlines() if x.startswith("stopped at")]
  # Step 7 is off the save cadence: only the SIGTERM-forced save writes it.
  assert stopped == [7], out
  final = 7
  abstract = {
    "w": jax.ShapeDtypeStruct((4,), jnp.float32),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
  }
  with checkpoint.Checkpointer(workdir, save_every=4) as ckpt:
    step, state, meta = ckpt.restore_latest(abstract)
    assert ckpt.all_steps() == [4, 7]
  assert step == final and meta == {"data_index": final}
  np.testing.assert_array_equal(state["w"], np.full((4,), float(final)))


def test_sigterm_handler_sets_flag_and_second_signal_goes_to_previous_handler():
  calls = []
  previous = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))
  try:
    stop = checkpoint.install_sigterm_handler(signals=(signal.SIGUSR1,))
    assert not stop.should_stop()
    os.kill(os.getpid(), signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while not stop.requested and time.monotonic() < deadline:
      time.sleep(0.01)
    assert stop.should_stop() and stop.signum == signal.SIGUSR1 and calls == []
    os.kill(os.getpid(), signal.SIGUSR1)
    while not calls and time.monotonic() < deadline:
      time.sleep(0.01)
    assert calls == [signal.SIGUSR1]
    stop.uninstall()
  finally:
    signal.signal(signal.SIGUSR1, previous)


def test_export_hf_writes_a_loadable_checkpoint(tmp_path):
  from flax import nnx

  from rrvf_jax.models import qwen_vl
  from rrvf_jax.models.qwen_vl import params

  # Random weights on an abstract tiny model (much faster than initialising it eagerly).
  graphdef, state = nnx.split(params.abstract_model(qwen_vl.get_preset("tiny")))
  rng = np.random.default_rng(0)
  model = nnx.merge(
    graphdef, jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), state)
  )
  src = tmp_path / "src"
  src.mkdir()
  (src / "tokenizer.json").write_text(json.dumps({"fake": True}))
  checkpoint.export_hf(model, tmp_path / "out", copy_from=src)
  assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == {"fake": True}
  again = qwen_vl.from_hf(tmp_path / "out")
  a = nnx.to_flat_state(nnx.state(model, nnx.Param))
  b = dict(nnx.to_flat_state(nnx.state(again, nnx.Param)))
  assert len(a) == len(b)
  for path, var in a:
    np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(b[path].get_value()))


def test_later_stages_settings_do_not_invalidate_a_stages_checkpoints():
  # Regression: turning the eval stage on after SFT refused the SFT checkpoints ("a different
  # run"), so a finished cold start could not be reused by a run that evaluates.
  from configs import chart
  from rrvf_jax.train import grpo, sft_loop

  base = chart.get_config("demo")
  later = chart.get_config("demo")
  later.eval.enabled = not base.eval.enabled
  later.eval.max_items = base.eval.max_items + 1
  later.grpo.max_turns = 1  # the ablation's setting: GRPO keys never touch SFT checkpoints
  for keys in (sft_loop.RESUMABLE_KEYS, (*grpo.RESUMABLE_KEYS, "grpo.max_turns")):
    assert checkpoint.config_fingerprint(base, keys) == checkpoint.config_fingerprint(later, keys)
  changed = chart.get_config("demo")
  changed.sft.learning_rate *= 2
  assert checkpoint.config_fingerprint(base, sft_loop.RESUMABLE_KEYS) != (
    checkpoint.config_fingerprint(changed, sft_loop.RESUMABLE_KEYS)
  )
