"""`configs/chart.py:demo_qwen3`, shrunk: a tiny Qwen3-VL through SFT, GRPO and the HF export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import chart
from rrvf_jax import metrics, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
  "data.num_train": 8,
  "data.num_test": 2,
  "sft.steps": 6,
  "sft.batch_size": 4,
  "sft.warmup_steps": 1,
  "sft.log_every": 1,
  "grpo.steps": 2,
  "grpo.prompts_per_step": 2,
  "grpo.group_size": 2,
  "grpo.max_new_tokens": 16,
  "grpo.eval_examples": 0,
  "answer_check.num_examples": 0,
  "eval.enabled": False,
}


@pytest.mark.slow
def test_qwen3_demo_trains_with_sft_and_grpo_and_exports(tmp_path):
  assert chart.get_config("demo_qwen3").model.preset == "tiny-qwen3-vl"
  # One CPU device (not the 8 test devices): the run is compile-bound, one device compiles fastest.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  args = [f"--config.{k}={v}" for k, v in SMALL.items()]
  command = [
    sys.executable, "-m", "rrvf_jax.main", "--config=configs/chart.py:demo_qwen3",
    f"--workdir={tmp_path}", *args,
  ]  # fmt: skip
  out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]

  losses = [r["sft/loss"] for r in metrics.read_jsonl(tmp_path / "sft" / "metrics.jsonl")]
  assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2])
  records = metrics.read_jsonl(tmp_path / "grpo" / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2]
  # The trainer's log-probs (DeepStack over per-row image slots) equal the sampler's.
  assert max(r["grpo/logprob_mismatch_max"] for r in records) < 1e-3
  exported = json.loads((tmp_path / "export" / "config.json").read_text())
  assert exported["model_type"] == "qwen3_vl"
  assert type(models.from_hf(tmp_path / "export")).__name__ == "Qwen3VL"
  proc = json.loads((tmp_path / "export" / "preprocessor_config.json").read_text())
  assert proc["patch_size"] == 16 and proc["image_mean"] == [0.5, 0.5, 0.5]
