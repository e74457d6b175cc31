"""Two JAX processes on this machine (coordinator on 127.0.0.1) train like one process.

A cold-started tiny policy (SFT in one process, exported) is trained by `rrvf_jax.main` with a few
SFT steps and GRPO steps twice on the same global batches: once as one process with 4 CPU devices,
once as two processes with 2 CPU devices each. Each host samples its own share of the prompts on
its own devices, renders and judges them itself, and the shares form the global batch of every
update. Another pair of runs gives the sampler devices of its own (`roles.sampler_devices`), so the
weights cross from the trainer's devices to the sampler's after every update. Losses, rewards and
the final weights must agree within float32 noise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = (
  "--config=configs/chart.py:demo",
  "--config.data.num_train=64",
  "--config.data.num_test=8",
  "--config.answer_check.num_examples=0",
  "--config.eval.enabled=False",
  # Answer-only SFT at a short length: after the cold start some one-turn answers below render and
  # some do not, so rewards differ within groups and GRPO has a signal.
  "--config.sft.conversations=False",
  "--config.sft.max_length=384",
)

# The cold start: enough SFT that sampled episodes differ in reward (GRPO has a signal).
COLD_START = (
  "--config.sft.steps=300",
  "--config.grpo.steps=0",
  "--config.checkpoint.save_every=100",
)

# Continued SFT, then GRPO, from the cold start's export.
TRAIN = (
  "--config.sft.steps=2",
  "--config.sft.learning_rate=1e-4",
  "--config.sft.warmup_steps=0",
  "--config.sft.log_every=1",
  "--config.grpo.steps=3",
  "--config.grpo.prompts_per_step=2",
  "--config.grpo.group_size=4",
  "--config.grpo.max_turns=1",
  "--config.grpo.max_new_tokens=64",
  "--config.grpo.max_total_tokens=1024",
  "--config.grpo.epochs=2",
  "--config.grpo.micro_batches=2",
  "--config.grpo.eval_examples=0",
  "--config.grpo.log_every=1",
  "--config.grpo.images_every=1",
  "--config.checkpoint.save_every=2",
  # Adam moves an element with a ~0 gradient by up to lr whatever the gradient's rounding noise:
  # a larger epsilon keeps such elements in the linear regime, so the weights compare at float32
  # noise between device layouts whose reductions round differently.
  "--config.sft.adam_eps=1e-3",
  "--config.grpo.adam_eps=1e-3",
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, extra: dict[str, str] | None = None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
  env |= {
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
  }
  return env | (extra or {})


def _main(workdir, args, *, processes: int, devices: int, timeout: float = 900) -> list[str]:
  """Runs `rrvf_jax.main` as `processes` JAX processes; returns each process's output."""
  command = [sys.executable, "-m", "rrvf_jax.main", *args, f"--workdir={workdir}"]
  port = _free_port()
  procs, logs = [], []
  with contextlib.ExitStack() as files:
    for rank in range(processes):
      logs.append(files.enter_context(open(f"{workdir}.{rank}.log", "w+")))
      env = _env(devices, _distributed_env(rank, processes, port))
      procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=logs[-1], stderr=logs[-1]))
    try:
      codes = [p.wait(timeout=timeout) for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read())
  for rank, (code, out) in enumerate(zip(codes, outputs, strict=True)):
    assert code == 0, f"process {rank} exited with {code}:\n{out[-5000:]}"
  return outputs


def _distributed_env(rank: int, processes: int, port: int) -> dict[str, str]:
  """What `sharding.distributed_request` reads: coordinator on 127.0.0.1, this process's id."""
  if processes == 1:
    return {}
  return {
    "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
    "JAX_NUM_PROCESSES": str(processes),
    "JAX_PROCESS_ID": str(rank),
  }


def _records(workdir, stage: str) -> list[dict]:
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory):
  """(export directory of an SFT'd tiny policy, shared dataset directory)."""
  root = tmp_path_factory.mktemp("multihost")
  data = str(root / "data")
  _main(
    str(root / "cold"),
    (*COMMON, *COLD_START, f"--config.data.data_dir={data}"),
    processes=1,
    devices=4,
  )
  return str(root / "cold" / "export"), data


@pytest.fixture(scope="module")
def runs(cold_start, tmp_path_factory):
  """Workdirs (and outputs) of the one-process and the two-process run of `TRAIN`."""
  export, data = cold_start
  root = tmp_path_factory.mktemp("runs")
  args = (
    *COMMON,
    *TRAIN,
    f"--config.model.checkpoint_dir={export}",
    f"--config.data.data_dir={data}",
  )
  one, two = str(root / "one"), str(root / "two")
  _main(one, args, processes=1, devices=4)
  outputs = _main(two, args, processes=2, devices=2)
  return one, two, outputs, export, args


def _assert_trains_like(one: str, other: str, start: str) -> None:
  """Per-step SFT and GRPO metrics and the exported weights of `other` equal `one`'s."""
  for stage, keys in (
    ("sft", ("sft/loss", "sft/grad_norm")),
    ("grpo", ("grpo/loss", "grpo/reward", "grpo/r_vision", "grpo/policy_tokens", "grpo/grad_norm")),
  ):
    a, b = _records(one, stage), _records(other, stage)
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for ra, rb in zip(a, b, strict=True):
      for key in keys:
        np.testing.assert_allclose(rb[key], ra[key], rtol=2e-5, atol=1e-6, err_msg=f"{stage} {key}")
  grpo = _records(one, "grpo")
  # The comparison has teeth: the rewards differ within groups, so the policy loss moves weights.
  assert any(abs(r["grpo/loss"]) > 1e-6 for r in grpo), grpo
  w1 = load_file(os.path.join(one, "export", "model.safetensors"))
  w2 = load_file(os.path.join(other, "export", "model.safetensors"))
  w0 = load_file(os.path.join(start, "model.safetensors"))
  assert w1.keys() == w2.keys() == w0.keys()
  assert any(not np.allclose(w1[k], w0[k], rtol=0, atol=1e-5) for k in w0), "nothing trained"
  for name in w1:
    np.testing.assert_allclose(w2[name], w1[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_two_processes_train_like_one(runs):
  one, two, _, start, _ = runs
  _assert_trains_like(one, two, start)


def test_two_processes_with_disaggregated_samplers_train_like_one(runs, tmp_path):
  # Each host: 1 device trains (a global trainer mesh of 2), 1 device samples; weights cross over
  # after every update. The one-process run splits its 4 devices the same way (2 train, 2 sample):
  # an equal trainer mesh keeps the reductions, and so Adam's steps, comparable.
  _, _, _, start, args = runs
  one, two = str(tmp_path / "one_split"), str(tmp_path / "two_split")
  _main(one, (*args, "--config.roles.sampler_devices=2"), processes=1, devices=4)
  outputs = _main(two, (*args, "--config.roles.sampler_devices=1"), processes=2, devices=2)
  for workdir, sampler_data in ((one, 2), (two, 1)):
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    assert summary["mesh"]["fsdp"] == 2, summary
    assert summary["sampler_mesh"] == {"data": sampler_data, "fsdp": 1, "tensor": 1}, summary
  assert all("Traceback" not in out for out in outputs)
  _assert_trains_like(one, two, start)


def test_only_process_zero_writes_and_both_see_two_processes(runs):
  _, two, outputs, _, _ = runs
  with open(os.path.join(two, "summary.json")) as f:
    summary = json.load(f)
  assert summary["processes"] == 2 and summary["devices"] == 4
  assert summary["sampler_mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  # One metrics file per stage, written once (process 1 would duplicate every line).
  steps = [r["step"] for r in _records(two, "grpo")]
  assert steps == sorted(set(steps)) == [1, 2, 3]
  # Orbax wrote one multi-host checkpoint per saved step.
  saved = sorted(os.listdir(os.path.join(two, "grpo", "checkpoints")))
  assert [s for s in saved if s.isdigit()] == ["2", "3"]
  for out in outputs:
    assert "Traceback" not in out


def test_resumed_run_samples_with_the_restored_weights(runs, tmp_path):
  # Regression guard for the sampler/trainer split: after a restore the sampler must get the
  # checkpoint's weights (not the initial ones), or step 3's episodes and loss would differ.
  one, _, _, _, args = runs
  resumed = str(tmp_path / "resumed")
  shutil.copytree(one, resumed)
  shutil.rmtree(os.path.join(resumed, "grpo", "checkpoints", "3"))
  outputs = _main(resumed, args, processes=1, devices=4)
  assert "grpo: resuming from the checkpoint of step 2" in outputs[0]
  want, got = _records(one, "grpo")[-1], _records(resumed, "grpo")[-1]
  assert got["step"] == want["step"] == 3
  for key in ("grpo/reward", "grpo/policy_tokens", "grpo/loss", "grpo/grad_norm"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
  assert got["grpo/logprob_mismatch_max"] < 1e-4
