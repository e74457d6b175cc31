"""Prefill throughput: our jitted Flax Qwen-VL vs transformers' PyTorch model on the same CPU.

Runs a forward pass over a batch of image+text prompts with a ~100M-parameter preset of the chosen
family (`small` for Qwen2.5-VL, `small-qwen3-vl` for Qwen3-VL; random weights made by transformers,
loaded into ours with `from_hf`) and prints a table.

  python benchmarks/forward_throughput.py [--family qwen2_5_vl|qwen3_vl] [--batch 4] \
    [--length 512] [--image 448] [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import numpy as np
import torch
import transformers

from rrvf_jax import models
from rrvf_jax.models.qwen_vl import model as model_lib

# The ~100M-parameter benchmark preset and the family's name in the printed table.
FAMILIES = {"qwen2_5_vl": ("small", "Qwen2.5-VL"), "qwen3_vl": ("small-qwen3-vl", "Qwen3-VL")}


def make_inputs(cfg, batch: int, length: int, image: int, seed: int = 0):
  """A batch where every row holds one `image`x`image` picture followed by text."""
  rng = np.random.default_rng(seed)
  side = image // cfg.vision.patch_size
  grid = np.asarray([[1, side, side]] * batch)
  n_img = side * side // cfg.vision.merge_unit
  if n_img + 2 >= length:
    raise ValueError(f"length {length} too short for {n_img} image tokens")
  text = rng.integers(0, 1000, (batch, length - n_img - 2))
  ids = np.concatenate(
    [
      np.full((batch, 1), cfg.vision_start_token_id),
      np.full((batch, n_img), cfg.image_token_id),
      np.full((batch, 1), cfg.vision_end_token_id),
      text,
    ],
    axis=1,
  )
  pixels = rng.normal(size=(batch * side * side, cfg.vision.patch_dim)).astype(np.float32)
  return ids, pixels, grid


def time_calls(fn, iters: int) -> float:
  """Median seconds per call after one warm-up call."""
  fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen2_5_vl")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument(
    "--image", type=int, default=448, help="image side in pixels (multiple of 2 x patch size)"
  )
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()

  preset, label = FAMILIES[args.family]
  cfg = models.get_preset(preset).replace(
    image_token_id=31000, vision_start_token_id=31001, vision_end_token_id=31002
  )
  hf_cfg = transformers.AutoConfig.for_model(**models.family(cfg.model_type).config_to_hf(cfg))
  torch.manual_seed(0)
  hf = transformers.AutoModelForImageTextToText.from_config(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    ours = models.from_hf(tmp)
  ids, pixels, grid = make_inputs(cfg, args.batch, args.length, args.image)
  n_params = sum(p.numel() for p in hf.parameters())

  inputs = model_lib.prepare_inputs(cfg, ids, None, pixels, grid)
  inputs = jax.device_put(inputs)

  def run_ours():
    model_lib.jit_forward(ours, inputs).block_until_ready()

  t_ids, t_pix, t_grid = torch.from_numpy(ids), torch.from_numpy(pixels), torch.from_numpy(grid)
  mm = (t_ids == cfg.image_token_id).long()

  def run_hf():
    hf.model.rope_deltas = None
    with torch.inference_mode():
      hf(
        input_ids=t_ids,
        pixel_values=t_pix,
        image_grid_thw=t_grid,
        mm_token_type_ids=mm,
        logits_to_keep=0,
      )

  ours_s = time_calls(run_ours, args.iters)
  hf_s = time_calls(run_hf, args.iters)
  tokens = args.batch * args.length
  print(
    f"Prefill, {n_params / 1e6:.1f}M-parameter {label} shape, "
    f"batch {args.batch} x {args.length} tokens,"
  )
  print(
    f"one {args.image}x{args.image} image per row; {platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}), "
    f"torch {torch.__version__} "
    f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, float32"
  )
  print(f"{'implementation':<28}{'s / forward':>12}{'tokens / s':>14}")
  print(f"{'rrvf_jax (jit, XLA)':<28}{ours_s:>12.3f}{tokens / ours_s:>14.0f}")
  print(f"{'transformers (PyTorch, sdpa)':<28}{hf_s:>12.3f}{tokens / hf_s:>14.0f}")
  print(f"ratio (ours / transformers throughput): {hf_s / ours_s:.2f}x")


if __name__ == "__main__":
  main()
