"""Decode throughput: our jitted KV-cache samplers vs transformers' PyTorch `generate` on one CPU.

Both engines (lock-step `Sampler`, paged `PagedSampler`) and transformers generate `--new` tokens
(greedy, no early stop) for a batch of image+text prompts with a
~100M-parameter preset of the chosen family (`small` for Qwen2.5-VL, `small-qwen3-vl` for Qwen3-VL;
same random weights, made by transformers and loaded with `from_hf`). Then the prefill-sharing
saving of group sampling: one prefill per prompt and a fork to G rows, against prefilling each
prompt G times.

  python benchmarks/sampler_throughput.py [--family qwen2_5_vl|qwen3_vl] [--batch 8] [--new 128] \
    [--image 336] [--group 8]
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

from rrvf_jax import models, rollout
from rrvf_jax.processing import chat, image, tokens
from rrvf_jax.testing import checkpoints
from rrvf_jax.testing import tokenizer as tiny_tokenizer

# The ~100M-parameter benchmark preset and the family's name in the printed table.
FAMILIES = {"qwen2_5_vl": ("small", "Qwen2.5-VL"), "qwen3_vl": ("small-qwen3-vl", "Qwen3-VL")}


def make_prompts(
  tok, batch: int, side: int, proc_cfg: image.ImageProcessorConfig, seed: int = 0
) -> list[rollout.Segment]:
  """`batch` chat prompts, each one random `side`x`side` image and an instruction."""
  rng = np.random.default_rng(seed)
  prompts = []
  for i in range(batch):
    img = rng.integers(0, 255, (side, side, 3), np.uint8)
    proc = image.preprocess_images([img], proc_cfg)
    text = "Write matplotlib code that reproduces this chart. " * (1 + i % 3)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    ids = chat.build_prompt_ids(tok, msgs, image_grids=proc.image_grid_thw).input_ids
    prompts.append(rollout.Segment(ids, proc.pixel_values, proc.image_grid_thw))
  return prompts


def seconds(fn, iters: int) -> float:
  """Median wall seconds per call after one warm-up (compilation) call."""
  fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def hf_generate_fn(hf, prompts, pad: int, image_token: int, new: int):
  """transformers `generate` on the left-padded batch (its convention for decoder batches)."""
  length = max(len(p.token_ids) for p in prompts)
  ids = np.full((len(prompts), length), pad)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, length - len(p.token_ids) :] = p.token_ids
    mask[i, length - len(p.token_ids) :] = 1
  kwargs = {
    "input_ids": torch.as_tensor(ids),
    "attention_mask": torch.as_tensor(mask),
    "mm_token_type_ids": torch.as_tensor((ids == image_token).astype(np.int64)),
    "pixel_values": torch.as_tensor(np.concatenate([p.pixel_values for p in prompts])),
    "image_grid_thw": torch.as_tensor(np.concatenate([p.image_grid_thw for p in prompts])),
  }

  def run():
    with torch.inference_mode():
      out = hf.generate(
        **kwargs,
        do_sample=False,
        max_new_tokens=new,
        min_new_tokens=new,
        eos_token_id=None,
        pad_token_id=pad,
      )
    assert out.shape[1] == length + new
    return out[:, length:].numpy()

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen2_5_vl")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--image", type=int, default=336, help="image side in pixels")
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--group_prompts", type=int, default=2, help="prompts in the fork test")
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args()

  preset, label = FAMILIES[args.family]
  with tempfile.TemporaryDirectory() as tmp:
    tok_dir = tiny_tokenizer.make_tiny_tokenizer(os.path.join(tmp, "tok"), family=args.family)
    tok = tokens.load_tokenizer(tok_dir)
    cfg = checkpoints.config_for_tokenizer(preset, tok)
    hf_cfg = transformers.AutoConfig.for_model(**models.family(cfg.model_type).config_to_hf(cfg))
    torch.manual_seed(0)
    hf = transformers.AutoModelForImageTextToText.from_config(hf_cfg).eval()
    hf.save_pretrained(os.path.join(tmp, "model"))
    ours = models.from_hf(os.path.join(tmp, "model"))
  n_params = sum(p.numel() for p in hf.parameters())
  proc_cfg = image.ImageProcessorConfig.for_model_type(args.family)
  prompts = make_prompts(tok, args.batch, args.image, proc_cfg)
  prompt_len = max(len(p.token_ids) for p in prompts)
  sampler = rollout.Sampler(
    ours,
    tok,
    cache_length=rollout.sampler.bucket_length(prompt_len, rollout.sampler.DEFAULT_BUCKETS)
    + args.new,
  )
  greedy = rollout.SamplingParams(max_new_tokens=args.new, temperature=0.0)

  def run_ours():
    session, completions = sampler.generate(sampler.prefill(prompts), greedy, jax.random.key(0))
    jax.block_until_ready(session.state)
    return np.stack([c.token_ids for c in completions])

  paged = rollout.PagedSampler(ours, tok, row_tokens=sampler.cache_length, decode_steps=args.new)

  def run_paged():
    completions = paged.sample(prompts, greedy, jax.random.key(0))
    jax.block_until_ready(paged.state)
    return np.stack([c.token_ids for c in completions])

  run_hf = hf_generate_fn(hf, prompts, sampler.pad_id, cfg.image_token_id, args.new)
  expected = run_hf()
  same = bool(np.array_equal(run_ours(), expected))
  same_paged = bool(np.array_equal(run_paged(), expected))
  ours_s = seconds(run_ours, args.iters)
  paged_s = seconds(run_paged, args.iters)
  hf_s = seconds(run_hf, args.iters)
  new_tokens = args.batch * args.new

  # Prefill sharing: P prompts x G samples.
  group_prompts = prompts[: args.group_prompts]
  repeated = [p for p in group_prompts for _ in range(args.group)]
  fork_sampler = rollout.Sampler(ours, tok, cache_length=sampler.cache_length)

  def prefill_fork():
    jax.block_until_ready(fork_sampler.fork(fork_sampler.prefill(group_prompts), args.group).state)

  def prefill_each():
    jax.block_until_ready(fork_sampler.prefill(repeated).state)

  fork_s = seconds(prefill_fork, args.iters)
  each_s = seconds(prefill_each, args.iters)

  print(
    f"Greedy generation, {n_params / 1e6:.1f}M-parameter {label} shape, batch {args.batch}, "
    f"prompts <= {prompt_len} tokens with one {args.image}x{args.image} image, "
    f"{args.new} new tokens"
  )
  print(
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
    f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
    f"transformers {transformers.__version__}, float32; same tokens: lock-step {same}, "
    f"paged {same_paged}"
  )
  print(f"{'implementation':<34}{'s / batch':>10}{'new tokens / s':>16}")
  print(f"{'rrvf_jax Sampler (jit, KV cache)':<34}{ours_s:>10.2f}{new_tokens / ours_s:>16.1f}")
  print(f"{'rrvf_jax PagedSampler (jit, pages)':<34}{paged_s:>10.2f}{new_tokens / paged_s:>16.1f}")
  print(f"{'transformers generate (PyTorch)':<34}{hf_s:>10.2f}{new_tokens / hf_s:>16.1f}")
  print(
    f"ratio (rrvf_jax / transformers): lock-step {hf_s / ours_s:.2f}x, paged {hf_s / paged_s:.2f}x"
  )
  print(
    f"Group sampling, {args.group_prompts} prompts x G={args.group}: prefill once + fork "
    f"{fork_s:.3f} s vs prefill every copy {each_s:.3f} s "
    f"-> {each_s / fork_s:.2f}x less prefill time"
  )


if __name__ == "__main__":
  main()
