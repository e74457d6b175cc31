"""`python -m rrvf_jax.generate`: text on stdout, token ids / text / log-probs in the JSON file."""

import json
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from rrvf_jax.processing import tokens
from rrvf_jax.rollout import Sampler, SamplingParams
from rrvf_jax.testing.prompts import image_prompt, random_image


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "rrvf_jax.generate", *args], capture_output=True, text=True, timeout=300
  )


def test_cli_writes_the_greedy_turn(policy_dir, model, tok, tmp_path):
  img = random_image(5, 70, 90)
  Image.fromarray(img).save(tmp_path / "chart.png")
  out = tmp_path / "out.json"
  proc = run_cli(
    f"--model_dir={policy_dir}",
    f"--image={tmp_path / 'chart.png'}",
    "--prompt=redraw this chart",
    "--max_new_tokens=12",
    f"--output_json={out}",
  )
  assert proc.returncode == 0, proc.stderr
  result = json.loads(out.read_text())
  assert set(result) == {"token_ids", "text", "logprobs"}
  assert len(result["token_ids"]) == len(result["logprobs"]) == 12
  assert proc.stdout.rstrip("\n") == result["text"]

  # The same turn in-process (the CLI's prompt is the plain chat prompt with the image).
  sampler = Sampler(model, tok, cache_length=256)
  params = SamplingParams(
    12, temperature=0.0, stop_token_ids=tokens.special_token_ids(tok).eos_token_ids
  )
  (completion,) = sampler.sample(
    [image_prompt(tok, "redraw this chart", img)], params, jax.random.key(0)
  )
  np.testing.assert_array_equal(result["token_ids"], completion.token_ids)
  np.testing.assert_allclose(result["logprobs"], completion.logprobs, atol=1e-5)


def test_cli_errors_are_one_line(policy_dir, tmp_path):
  proc = run_cli(f"--model_dir={tmp_path / 'missing'}", "--image=x.png", "--prompt=hi")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
    f"rrvf_jax.generate: error: --model_dir {tmp_path / 'missing'} is not a directory"
  )
  (tmp_path / "bad.png").write_bytes(b"not a png")
  proc = run_cli(f"--model_dir={policy_dir}", f"--image={tmp_path / 'bad.png'}", "--prompt=hi")
  assert proc.returncode != 0
  assert "cannot decode image" in proc.stderr.strip().splitlines()[-1]
