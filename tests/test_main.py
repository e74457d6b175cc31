"""The entry point: the demo pipeline (SFT, answer check, export), resume, and one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from configs import chart, web
from rrvf_jax import metrics, pipeline, roles
from rrvf_jax.models import qwen_vl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few-second version of the chart demo: same code path, smaller sizes.
SMALL = [
  "--config.data.num_train=16",
  "--config.data.num_test=4",
  "--config.sft.steps=16",
  "--config.sft.batch_size=8",
  "--config.sft.warmup_steps=2",
  "--config.sft.log_every=1",
  "--config.checkpoint.save_every=4",
  "--config.answer_check.num_examples=4",
  "--config.answer_check.batch_size=8",
  # Answer-only SFT at a short length keeps the stage tests fast; the first test trains the
  # demo's conversations.
  "--config.sft.conversations=False",
  "--config.sft.max_length=384",
  "--config.grpo.max_new_tokens=24",
  "--config.grpo.steps=0",
  "--config.eval.enabled=False",
]


def small_config(module, data_dir: str, overrides=SMALL):
  config = module.get_config("demo")
  for override in overrides:
    key, value = override.removeprefix("--config.").split("=")
    section, name = key.split(".")
    kind = type(config[section][name])
    config[section][name] = value == "True" if kind is bool else kind(value)
  config.data.data_dir = data_dir
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("datasets"))


def _main(*args, wait=True):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  command = [sys.executable, "-m", "rrvf_jax.main", *args]
  if not wait:
    return subprocess.Popen(
      command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_chart_demo_trains_checks_exports_and_evaluates(tmp_path, data_dir):
  config = small_config(chart, data_dir)
  config.sft.conversations = True  # whole self-correction episodes, as the demo trains
  config.sft.max_length = 1024
  config.eval.enabled = True
  config.eval.max_items = 4
  config.eval.max_new_tokens = 16
  summary = pipeline.run(config, str(tmp_path))
  records = metrics.read_jsonl(tmp_path / "sft" / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, 17))
  losses = [r["sft/loss"] for r in records]
  assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])  # the loss falls
  # Saved every 4 steps, the last 3 kept.
  assert set(os.listdir(tmp_path / "sft" / "checkpoints")) == {"8", "12", "16"}
  check = summary["answer_check"]
  assert check["items"] == 4 and 0.0 <= check["exec_rate"] <= check["answered"] <= 1.0
  assert 1.0 <= check["turns"] <= 4.0 and 0.0 <= check["tool_call_rate"] <= 1.0
  answers = json.loads((tmp_path / "answer_check" / "answers.json").read_text())
  assert len(answers["items"]) == 4
  assert set(answers["items"][0]) == set(pipeline.ITEM_FIELDS)
  # The exported policy loads back with the trained weights.
  exported = qwen_vl.from_hf(tmp_path / "export")
  assert (
    exported.config.text.vocab_size == qwen_vl.load_hf_config(tmp_path / "export").text.vocab_size
  )
  assert (tmp_path / "export" / "tokenizer.json").is_file()
  assert (tmp_path / "export" / "preprocessor_config.json").is_file()
  assert json.loads((tmp_path / "summary.json").read_text())["sft"]["steps"] == 16
  # The eval stage scored the exported policy's answers with ChartMimic's metrics.
  assert summary["eval"]["benchmark"] == "chartmimic" and summary["eval"]["n_items"] == 4
  results = json.loads((tmp_path / "eval" / "synthetic_charts-test" / "results.json").read_text())
  assert len(results["items"]) == 4
  assert (tmp_path / "eval" / "synthetic_charts-test" / "report.html").is_file()


GRPO_SMALL = [
  "--config.eval.enabled=False",
  "--config.sft.steps=4",
  "--config.answer_check.num_examples=0",
  "--config.grpo.steps=2",
  "--config.grpo.prompts_per_step=2",
  "--config.grpo.group_size=4",
  "--config.grpo.max_new_tokens=24",
  "--config.grpo.eval_examples=2",
]


def test_grpo_stage_logs_what_it_did(tmp_path, data_dir):
  config = small_config(chart, data_dir, [*SMALL[:-2], *GRPO_SMALL])
  summary = pipeline.run(config, str(tmp_path))
  records = metrics.read_jsonl(tmp_path / "grpo" / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2]
  for key in (
    "grpo/reward",
    "grpo/r_vision",
    "grpo/exec_rate",
    "grpo/turns",
    "grpo/tool_calls_ok",
    "grpo/tool_call_rate",
    "grpo/dropped_groups",
    "grpo/policy_tokens",
    "grpo/loss",
    "grpo/clip_frac_low",
    "grpo/approx_kl",
    "grpo/entropy",
    "rollout/device_idle_fraction",
    "time/rollout",
    "time/update",
  ):
    assert key in records[0], key
  # The sampler's and the trainer's log-probs of the same sampled tokens agree (ratio 1).
  assert max(r["grpo/logprob_mismatch_max"] for r in records) < 1e-3
  assert set(summary["grpo"]) >= {"before", "after", "seconds"}
  assert summary["grpo"]["before"]["items"] == 2
  # Greedy held-out episodes also score each first draft: the self-correction gain's baseline.
  assert 0.0 <= summary["grpo"]["after"]["r_vision_first"] <= 1.0
  assert {"2"} <= set(os.listdir(tmp_path / "grpo" / "checkpoints"))


def test_grpo_stage_on_the_lock_step_engine_and_few_paged_slots(tmp_path, data_dir, monkeypatch):
  # The lock-step engine, and the paged one (the default) with rows streaming through 4 decode
  # slots, 8 tokens a call: the trainer's log-probs agree with the sampler's on both. The
  # lock-step run samples on a mesh of its own (tensor=2) over the trainer's devices: its weight
  # copy is freed after each rollout and the next step's sampler gets the updated weights.
  freed = []
  free_copies = roles.free_copies
  monkeypatch.setattr(roles, "free_copies", lambda *a: freed.append(free_copies(*a)) or freed[-1])
  lock = small_config(
    chart,
    data_dir,
    [*SMALL[:-2], *GRPO_SMALL, "--config.grpo.engine=lock_step", "--config.roles.sampler_tensor=2"],
  )
  pipeline.run(lock, str(tmp_path / "lock"))
  records = metrics.read_jsonl(tmp_path / "lock" / "grpo" / "metrics.jsonl")
  assert max(r["grpo/logprob_mismatch_max"] for r in records) < 1e-3
  assert len(freed) == 2 and min(freed) > 0  # one rollout per step
  monkeypatch.undo()
  engine = ["--config.grpo.decode_slots=4"]
  config = small_config(chart, data_dir, [*SMALL[:-2], *GRPO_SMALL, *engine])
  config.grpo.decode_steps = 8
  # A shared pool of three rows' budgets (grpo.pool_tokens) for the 8 rows, not 8 budgets.
  config.grpo.pool_tokens = 3 * config.grpo.max_total_tokens
  config.grpo.append_rows = 2  # tool responses and prompts two rows a call
  summary = pipeline.run(config, str(tmp_path))
  records = metrics.read_jsonl(tmp_path / "grpo" / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2]
  assert max(r["grpo/logprob_mismatch_max"] for r in records) < 1e-3
  assert all(0 < r["rollout/kv_slots_peak"] <= config.grpo.pool_tokens for r in records)
  assert summary["grpo"]["after"]["items"] == 2


def test_web_demo_runs_end_to_end(tmp_path, data_dir):
  """SFT, a GRPO step with Chromium renders, the answer check and the WebSight-metric eval."""
  config = small_config(web, data_dir, [*SMALL[:-2], *GRPO_SMALL[1:]])
  config.sft.steps = 4
  config.sft.max_length = 512  # pages are longer than the charts' programs
  config.grpo.steps = 1
  config.grpo.eval_examples = 0
  config.answer_check.num_examples = 2
  config.eval.max_items = 2
  config.eval.max_new_tokens = 16
  summary = pipeline.run(config, str(tmp_path))
  assert summary["sft"]["steps"] == 4
  assert [r["step"] for r in metrics.read_jsonl(tmp_path / "grpo" / "metrics.jsonl")] == [1]
  assert summary["answer_check"]["items"] == 2
  assert summary["eval"]["benchmark"] == "websight" and summary["eval"]["n_items"] == 2


def _wait_for_step(path, step: int, proc, timeout: float = 300.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if os.path.exists(path):
      records = metrics.read_jsonl(path)
      if records and records[-1]["step"] >= step:
        return
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    time.sleep(0.02)
  raise AssertionError(f"step {step} not reached")


def _training_records(workdir) -> list[dict]:
  return [
    {k: v for k, v in r.items() if k.startswith("sft/")}
    for r in metrics.read_jsonl(os.path.join(workdir, "sft", "metrics.jsonl"))
  ]


def test_sigkill_then_rerun_resumes_with_identical_metrics(tmp_path, data_dir):
  args = ["--config=configs/chart.py:demo", *SMALL, f"--config.data.data_dir={data_dir}"]
  args += ["--config.answer_check.num_examples=0", "--config.checkpoint.export_hf=False"]
  straight = tmp_path / "straight"
  assert _main(*args, f"--workdir={straight}").returncode == 0

  killed = tmp_path / "killed"
  proc = _main(*args, f"--workdir={killed}", wait=False)
  _wait_for_step(killed / "sft" / "metrics.jsonl", 10, proc)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  logged_before = len(metrics.read_jsonl(killed / "sft" / "metrics.jsonl"))
  assert logged_before < 16

  rerun = _main(*args, f"--workdir={killed}")
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "resuming from the checkpoint of step" in rerun.stderr
  expected, got = _training_records(straight), _training_records(killed)
  assert [r["sft/loss"] for r in got] == pytest.approx([r["sft/loss"] for r in expected], rel=1e-6)
  for key in ("sft/grad_norm", "sft/lr", "sft/tokens"):
    assert [r[key] for r in got] == pytest.approx([r[key] for r in expected], rel=1e-6), key


def test_sigterm_saves_and_exits_for_a_resume(tmp_path, data_dir):
  args = ["--config=configs/chart.py:demo", *SMALL, f"--config.data.data_dir={data_dir}"]
  args += ["--config.checkpoint.save_every=100", f"--workdir={tmp_path}"]
  proc = _main(*args, wait=False)
  _wait_for_step(tmp_path / "sft" / "metrics.jsonl", 3, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 143
  assert "stopped by SIGTERM after step" in proc.stderr.read().decode()
  saved = [int(s) for s in os.listdir(tmp_path / "sft" / "checkpoints") if s.isdigit()]
  last_logged = metrics.read_jsonl(tmp_path / "sft" / "metrics.jsonl")[-1]["step"]
  assert saved == [last_logged] and last_logged < 16  # saved off-schedule, at the stop


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match=r"unknown config preset 'tiny'.*demo"):
    chart.get_config("tiny")
  assert web.get_config("demo").task == "web"


def _assert_one_line_error(out, message: str) -> None:
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert message in last, out.stderr[-2000:]
  assert "Traceback" not in out.stderr


def test_cli_rejects_a_config_typo(tmp_path):
  out = _main("--config=configs/chart.py:demo", f"--workdir={tmp_path}", "--config.trian.steps=1")
  _assert_one_line_error(out, "config error: 'trian'")


def test_cli_rejects_a_bad_value(tmp_path):
  out = _main(
    "--config=configs/chart.py:demo", f"--workdir={tmp_path}", "--config.model.dtype=float8"
  )
  _assert_one_line_error(out, "config error: config.model.dtype must be one of")
  out = _main(
    "--config=configs/chart.py:demo", f"--workdir={tmp_path}", "--config.sft.micro_batches=3"
  )
  _assert_one_line_error(out, "config.sft.micro_batches must divide sft.batch_size=8, got 3")
  out = _main(
    "--config=configs/chart.py:demo",
    f"--workdir={tmp_path}",
    "--config.grpo.paged_attention=mosaic",
  )
  _assert_one_line_error(out, "config.grpo.paged_attention must be xla or pallas, got 'mosaic'")
  out = _main(
    "--config=configs/chart.py:demo", f"--workdir={tmp_path}", "--config.grpo.pool_tokens=1000"
  )
  _assert_one_line_error(
    out, "config.grpo.pool_tokens must be 0 or hold one row's max_total_tokens=1280, got 1000"
  )


def test_cli_rejects_a_missing_checkpoint_directory(tmp_path):
  missing = tmp_path / "no_such_checkpoint"
  out = _main(
    "--config=configs/chart.py", f"--workdir={tmp_path}", f"--config.model.checkpoint_dir={missing}"
  )
  _assert_one_line_error(out, f"config.model.checkpoint_dir '{missing}' is not an HF checkpoint")


def _coldstart_args(tmp_path, manual):
  return [
    "--config=configs/chart.py:demo",
    f"--workdir={tmp_path / 'run'}",
    "--config.data.name=rrvf_coldstart",
    f"--config.data.manual_dir={manual}",
    f"--config.data.data_dir={tmp_path / 'data'}",
  ]


def test_cli_rejects_an_empty_dataset(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "train.jsonl").write_text("")
  out = _main(*_coldstart_args(tmp_path, manual))
  _assert_one_line_error(out, "rrvf_jax.main: error:")
  assert str(manual) in out.stderr.strip().splitlines()[-1]


def test_cli_rejects_a_corrupt_image_in_a_dataset(tmp_path):
  manual = tmp_path / "manual"
  (manual / "images").mkdir(parents=True)
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(manual / "images" / "good.png")
  (manual / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  lines = [
    {"id": "a", "image": "images/good.png", "code": "import matplotlib.pyplot as plt"},
    {"id": "b", "image": "images/bad.png", "code": "import matplotlib.pyplot as plt"},
  ]
  (manual / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  out = _main(*_coldstart_args(tmp_path, manual))
  _assert_one_line_error(out, "rrvf_jax.main: error:")
  assert "bad.png" in out.stderr.strip().splitlines()[-1]


# The paged engine's schedule follows the host: which render finishes first decides when a row
# takes a slot again, so its decode calls and peak pages vary from run to run (what is sampled
# does not: every row draws with its own keys). A demo run beside the test suite and one alone
# differed in exactly these two keys.
SCHEDULE_KEYS = ("rollout/decode_calls", "rollout/kv_slots_peak")


def _is_timing(key: str) -> bool:
  """Keys of metrics.jsonl that measure time or follow the host's timing, not what was computed."""
  return key.startswith("time/") or key.endswith(("_s", "_fraction")) or key in SCHEDULE_KEYS


def _numbers(workdir, stage) -> list[dict]:
  return [
    {k: v for k, v in r.items() if not _is_timing(k)}
    for r in metrics.read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))
  ]


def test_same_seed_same_numbers(tmp_path, data_dir):
  # Two runs of one config on one machine compute the same numbers, bit for bit: the SFT losses,
  # every GRPO rollout statistic and update, and the greedy held-out tables (timings aside).
  config = small_config(chart, data_dir, [*SMALL[:-2], *GRPO_SMALL])
  config.sft.conversations = True
  config.sft.max_length = 1024
  config.grpo.epochs = 2
  summaries = [pipeline.run(config, str(tmp_path / run)) for run in ("a", "b")]
  for stage in ("sft", "grpo"):
    first, second = _numbers(tmp_path / "a", stage), _numbers(tmp_path / "b", stage)
    assert first and first == second, stage
  assert summaries[0]["grpo"]["before"] == summaries[1]["grpo"]["before"]
  assert summaries[0]["grpo"]["after"] == summaries[1]["grpo"]["after"]


def test_cpu_only_machine_with_libtpu_skips_the_tpu_probe():
  from rrvf_jax import cli

  env = {}
  assert cli.prefer_cpu(env, libtpu=True, accelerator=False) and env == {"JAX_PLATFORMS": "cpu"}
  for env, libtpu, accelerator in [
    ({"JAX_PLATFORMS": "tpu"}, True, False),  # the user's choice stays
    ({}, False, False),  # no libtpu: JAX has nothing to probe
    ({}, True, True),  # a TPU VM or a GPU machine: JAX picks the accelerator
  ]:
    before = dict(env)
    assert not cli.prefer_cpu(env, libtpu=libtpu, accelerator=accelerator)
    assert env == before
