"""Multi-turn rollouts: the paged engine (continuous batching) vs the lock-step engine, one run.

Scripted episodes with a realistic spread: each row (G rows per target image) takes 1..`--turns`
turns of `--min_tokens`..`--max_tokens` tokens each (seeded draws); between turns its code is
rendered in the real sandboxed chart pool and the render goes back as a tool-response turn with
the image. Both engines play the same scripts on the same model: the lock-step `Sampler` decodes
every active row until the turn's longest row is done, then waits for every render and appends
all responses at the shared offset; the `PagedSampler` streams rows through its decode slots, each
row stopping at its own length, leaving for its render and coming back when it is done. Printed:
wall time, useful tokens per second (the scripted lengths), KV slots held per useful token, and
the KV memory of a G-row group on a ~1k-token image prompt (shared pages vs G copies).

  python benchmarks/rollout_throughput.py [--preset tiny] [--prompts 2] [--group 8] [--turns 5] \
    [--min_tokens 64] [--max_tokens 1024] [--slots 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import numpy as np
import transformers

from rrvf_jax import env, models, rollout
from rrvf_jax.processing import tokens
from rrvf_jax.rollout import paged
from rrvf_jax.rollout.sampler import DEFAULT_BUCKETS, bucket_length
from rrvf_jax.testing import checkpoints
from rrvf_jax.testing import tokenizer as tiny_tokenizer
from rrvf_jax.testing.prompts import feedback_turn, image_prompt

CHART = "import matplotlib.pyplot as plt\nplt.bar(range({n}), [{values}])\nplt.title('draft {k}')"


def make_model(preset: str, tmp: str):
  """A random model of `preset` (made by transformers, loaded with `from_hf`) and its tokenizer."""
  tok = tokens.load_tokenizer(tiny_tokenizer.make_tiny_tokenizer(os.path.join(tmp, "tok")))
  cfg = checkpoints.config_for_tokenizer(preset, tok)
  hf_cfg = transformers.AutoConfig.for_model(**models.family(cfg.model_type).config_to_hf(cfg))
  transformers.set_seed(0)
  hf = transformers.AutoModelForImageTextToText.from_config(hf_cfg).eval()
  hf.save_pretrained(os.path.join(tmp, "model"))
  n_params = sum(p.numel() for p in hf.parameters())
  return models.from_hf(os.path.join(tmp, "model")), tok, n_params


def scripts(rows: int, turns: int, low: int, high: int, seed: int) -> list[list[int]]:
  """Per row, its turns' lengths: 1..turns turns, lengths log-uniform in [low, high]."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(rows):
    n = int(rng.integers(1, turns + 1))
    out.append([int(x) for x in np.exp(rng.uniform(np.log(low), np.log(high), n)).round()])
  return out


def render(pool, row: int, turn: int):
  """A real sandboxed render of the row's draft (a future of the preprocessed image)."""
  values = ", ".join(str((row * 7 + turn * 3 + i) % 10 + 1) for i in range(4 + row % 3))
  return env.submit_chart(CHART.format(n=4 + row % 3, values=values, k=turn), pool=pool)


def response(tok, result) -> rollout.Segment:
  img = result.image if result.ok else None
  return feedback_turn(tok, "Rendered. Compare it with the target and fix what differs.", img, True)


def play_lock_step(sampler, tok, prompts, group, plan, pool, key):
  """Turn by turn: every active row decodes until the turn's longest is done; then all renders."""
  rows = len(prompts) * group
  session = sampler.fork(sampler.prefill(prompts), group)
  for turn in range(max(len(p) for p in plan)):
    active = np.array([turn < len(plan[r]) for r in range(rows)])
    longest = max(plan[r][turn] for r in range(rows) if active[r])
    params = rollout.SamplingParams(max_new_tokens=longest, temperature=1.0)
    session, _ = sampler.generate(session, params, jax.random.fold_in(key, turn), active=active)
    going = [r for r in range(rows) if turn + 1 < len(plan[r])]
    if not going:
      break
    futures = {r: render(pool, r, turn) for r in going}
    empty = rollout.Segment(np.zeros((0,), np.int32))
    segments = [response(tok, futures[r].result()) if r in futures else empty for r in range(rows)]
    session = sampler.append(session, segments)
  jax.block_until_ready(session.state)
  return session.offset * rows


def play_paged(sampler, tok, prompts, group, plan, pool, key):
  """Continuous batching: rows leave the slots for their renders and come back when done."""
  rows = len(prompts) * group
  sampler.start(rows)
  parents = list(range(0, rows, group))
  sampler.prefill(parents, prompts)
  for p in parents:
    sampler.fork(p, list(range(p + 1, p + group)))
  turn_of = [0] * rows
  ready, running, waiting = collections.deque(range(rows)), [], {}
  params = rollout.SamplingParams(max_new_tokens=max(max(p) for p in plan), temperature=1.0)
  while ready or running or waiting:
    done = [r for r, f in waiting.items() if f.done()]
    if done:
      sampler.append(done, [response(tok, waiting.pop(r).result()) for r in done])
      ready.extend(done)
    while ready and len(running) < sampler.slots:
      r = ready.popleft()
      key_r = sampler.turn_key(key, turn_of[r], r)
      running.append(paged.TurnState(r, key_r, plan[r][turn_of[r]]))
    if running:
      sampler.decode(running, params)
      for t in [t for t in running if t.done]:
        turn_of[t.row] += 1
        if turn_of[t.row] < len(plan[t.row]):
          waiting[t.row] = render(pool, t.row, turn_of[t.row] - 1)
        else:
          sampler.release(t.row)
      running = [t for t in running if not t.done]
    elif waiting:
      concurrent.futures.wait(waiting.values(), return_when=concurrent.futures.FIRST_COMPLETED)
  jax.block_until_ready(sampler.state)
  return sampler.allocator.peak_used * sampler.page_size


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--prompts", type=int, default=2)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--turns", type=int, default=5)
  parser.add_argument("--min_tokens", type=int, default=64)
  parser.add_argument("--max_tokens", type=int, default=1024)
  parser.add_argument("--slots", type=int, default=16, help="decode slots of the paged engine")
  parser.add_argument("--page_size", type=int, default=16)
  parser.add_argument("--decode_steps", type=int, default=64)
  parser.add_argument("--image", type=int, default=224, help="target image side in pixels")
  parser.add_argument(
    "--kv_image", type=int, default=896, help="image side of the group-KV prompt (896: ~1k tokens)"
  )
  parser.add_argument("--kv_only", action="store_true", help="only the group-KV measurement")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    model, tok, n_params = make_model(args.preset, tmp)
  rows = args.prompts * args.group
  plan = scripts(rows, args.turns, args.min_tokens, args.max_tokens, args.seed)
  rng = np.random.default_rng(args.seed)
  side = args.image
  targets = [rng.integers(0, 255, (side, side, 3), np.uint8) for _ in range(args.prompts)]
  prompts = [image_prompt(tok, "Write matplotlib code for this chart.", t) for t in targets]
  useful = sum(sum(p) for p in plan)
  prompt_len = max(len(p.token_ids) for p in prompts)
  feedback_len = len(
    response(tok, env.render_chart(CHART.format(n=4, values="1,2,3,4", k=0))).token_ids
  )
  turns = max(len(p) for p in plan)
  cache = bucket_length(prompt_len, DEFAULT_BUCKETS) + turns * args.max_tokens
  cache += (turns - 1) * bucket_length(feedback_len, DEFAULT_BUCKETS)
  row_tokens = prompt_len + sum(args.max_tokens for _ in range(turns)) + turns * feedback_len
  lock = rollout.Sampler(model, tok, cache_length=cache)
  pager = rollout.PagedSampler(
    model, tok, row_tokens=row_tokens, page_size=args.page_size, decode_slots=args.slots,
    decode_steps=args.decode_steps,
  )  # fmt: skip
  key = jax.random.key(args.seed)
  results = {}
  if not args.kv_only:
    with env.create_chart_pool() as pool:
      pool.wait_ready()
      engines = (("lock-step", play_lock_step, lock), ("paged", play_paged, pager))
      for name, play, sampler in engines:
        play(sampler, tok, prompts, args.group, plan, pool, key)  # compiles
        start = time.perf_counter()
        slots = play(sampler, tok, prompts, args.group, plan, pool, key)
        results[name] = (time.perf_counter() - start, slots)

  # KV memory of a group on one ~1k-token image prompt: pages after prefill + fork vs G copies.
  kv_side = args.kv_image
  kv_prompt = image_prompt(
    tok,
    "Write matplotlib code for this chart.",
    rng.integers(0, 255, (kv_side, kv_side, 3), np.uint8),
  )
  kv_sampler = rollout.PagedSampler(
    model, tok, row_tokens=len(kv_prompt.token_ids) + 16, page_size=args.page_size
  )
  kv_sampler.start(args.group)
  kv_sampler.prefill([0], [kv_prompt])
  kv_sampler.fork(0, list(range(1, args.group)))
  shared_tokens = kv_sampler.allocator.used * kv_sampler.page_size
  copies_tokens = args.group * len(kv_prompt.token_ids)
  cfg = model.config.text
  per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(model.dtype).itemsize

  if results:
    print(
      f"Scripted RRVF rollouts, {n_params / 1e6:.1f}M-parameter '{args.preset}' model, "
      f"{args.prompts} prompts x G={args.group} = {rows} rows, 1..{args.turns} turns of "
      f"{args.min_tokens}..{args.max_tokens} tokens (seed {args.seed}; {useful} useful tokens, "
      f"{sum(len(p) for p in plan)} turns), real sandboxed renders between turns"
    )
    print(
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
      f"jax {jax.__version__}; "
      f"paged: {args.slots} slots, pages of {args.page_size}, {args.decode_steps} steps a call"
    )
    print(
      f"{'engine':<12}{'wall s':>9}{'useful tok/s':>14}{'KV slots held':>15}{'slots/token':>13}"
    )
    for name, (wall, slots) in results.items():
      print(f"{name:<12}{wall:>9.2f}{useful / wall:>14.1f}{slots:>15d}{slots / useful:>13.2f}")
    (lock_s, lock_slots), (paged_s, paged_slots) = results["lock-step"], results["paged"]
    print(
      f"ratio (lock-step / paged): wall {lock_s / paged_s:.2f}x, "
      f"KV slots {lock_slots / paged_slots:.2f}x"
    )
  print(
    f"KV of a G={args.group} group on a {len(kv_prompt.token_ids)}-token image prompt: shared "
    f"pages {shared_tokens} token slots ({shared_tokens * per_token / 2**20:.2f} MiB) vs "
    f"{args.group} copies {copies_tokens} ({copies_tokens * per_token / 2**20:.2f} MiB): "
    f"{copies_tokens / shared_tokens:.2f}x less"
  )


if __name__ == "__main__":
  main()
