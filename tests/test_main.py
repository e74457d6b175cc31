"""The entry point: the demo config runs end to end, and bad configs fail with a clear message."""

import json
import os
import subprocess
import sys

import pytest

from configs import chart, web
from rrvf_jax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("config_module", [chart, web], ids=["chart", "web"])
def test_demo_policy_check_runs(tmp_path, config_module):
  config = config_module.get_config("demo")
  config.policy_check.max_new_tokens = 4
  pipeline.run(config, str(tmp_path))
  report = json.loads((tmp_path / "policy_check.json").read_text())
  assert report["task"] == config.task
  assert report["parsed_action"] in ("answer", "tool_call", "none")
  assert (tmp_path / "target.png").stat().st_size > 1000
  assert report["logits_finite"]
  assert report["image_grid_thw"] == [[1, 16, 16]]
  assert 1 <= len(report["generated_token_ids"]) <= 4
  assert report["prompt_tokens"] > 64  # 64 image tokens plus the chat template and instruction.


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match=r"unknown config preset 'tiny'.*demo"):
    chart.get_config("tiny")
  assert web.get_config("demo").task == "web"


def _main(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "rrvf_jax.main", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_rejects_a_config_typo(tmp_path):
  out = _main(
    "--config=configs/chart.py:demo",
    f"--workdir={tmp_path}",
    "--config.policy_chek.max_new_tokens=1",
  )
  assert out.returncode != 0
  assert "config error: 'policy_chek' Did you mean \"policy_check\"" in out.stderr
  assert "Traceback" not in out.stderr


def test_cli_rejects_a_bad_dtype(tmp_path):
  out = _main(
    "--config=configs/chart.py:demo", f"--workdir={tmp_path}", "--config.model.dtype=float8"
  )
  assert out.returncode != 0
  assert "config error: config.model.dtype must be one of ['bfloat16', 'float32']" in out.stderr
  assert "Traceback" not in out.stderr


def test_cli_rejects_a_missing_checkpoint_directory(tmp_path):
  missing = tmp_path / "no_such_checkpoint"
  out = _main(
    "--config=configs/chart.py", f"--workdir={tmp_path}", f"--config.model.checkpoint_dir={missing}"
  )
  assert out.returncode != 0
  assert f"config.model.checkpoint_dir '{missing}' is not an HF checkpoint directory" in out.stderr
  assert "Traceback" not in out.stderr
