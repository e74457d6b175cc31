"""The README's model example runs as written on a complete local policy directory."""

import os
import re

import numpy as np

from rrvf_jax.models import qwen_vl
from rrvf_jax.testing import checkpoints

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_model_example_runs(tmp_path):
  ckpt = checkpoints.make_tiny_policy_dir(tmp_path / "policy")
  with open(README) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  code = "\n".join(blocks[:2])  # the model example, then the sampler example that continues it
  code = code.replace('"/path/to/Qwen2.5-VL-7B-Instruct"', repr(str(ckpt)))
  code = code.replace('"/tmp/exported"', repr(str(tmp_path / "exported")))
  scope = {"rgb_uint8_array": np.random.default_rng(0).integers(0, 256, (56, 84, 3), np.uint8)}
  exec(compile(code, README, "exec"), scope)
  vocab = scope["model"].config.text.vocab_size
  assert scope["logits"].shape == (1, scope["ids"].shape[1], vocab)
  assert qwen_vl.load_hf_config(tmp_path / "exported") == scope["model"].config
  turns = scope["turns"]
  assert len(turns) == 8 and all(t.finish_reason in ("stop", "length") for t in turns)
  assert scope["sampler"].stats.prefill_rows == 1
