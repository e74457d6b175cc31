"""One RRVF GRPO step on the ~100M-parameter `small` config on CPU, broken down by stage.

Episodes (4 targets x G=4, two turns: a tool call rendered in the sandbox and judged, then the
final answer, also rendered and judged) use the real sampler and the real renderers; the turn
texts are scripted (a random model writes no tool calls) but every token is sampled and decoded.
Then one GRPO update on the token-exact trajectories. Run twice: with the driver's overlap (renders
and judging in the background while other rows decode) and without it (each render waited for at
submission, one judging thread).

  python benchmarks/grpo_step.py [--prompts 4] [--group 4] [--new 64] [--image 336]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
from flax import nnx

from rrvf_jax import env, sharding
from rrvf_jax.models import qwen_vl
from rrvf_jax.processing import image, tokens
from rrvf_jax.rl import algorithms
from rrvf_jax.rollout import episode
from rrvf_jax.rollout.sampling import SamplingParams
from rrvf_jax.testing import checkpoints
from rrvf_jax.testing import tokenizer as tiny_tokenizer
from rrvf_jax.testing.scripted import TextScriptedSampler, answer, call
from rrvf_jax.train import batch as batch_lib
from rrvf_jax.train import grpo, optim, step
from rrvf_jax.train import state as state_lib

PROGRAMS = [
  "import matplotlib.pyplot as plt\nplt.bar(['a','b','c'],[3,1,2],color='tab:blue')\n",
  "import matplotlib.pyplot as plt\nplt.plot([1,2,3],[2,4,3],color='tab:red')\nplt.title('T')\n",
  "import matplotlib.pyplot as plt\nplt.pie([1,2,3],labels=['x','y','z'])\n",
  "import matplotlib.pyplot as plt\nplt.scatter([1,2,3],[3,1,2])\nplt.xlabel('x')\n",
]


def serial(submit):
  """A render_submit that waits for each render before returning (no overlap)."""

  def run(code):
    result = submit(code).result()
    done = concurrent.futures.Future()
    done.set_result(result)
    return done

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--group", type=int, default=4)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--image", type=int, default=336)
  args = parser.parse_args()
  rows = args.prompts * args.group

  with tempfile.TemporaryDirectory() as tmp:
    tok = tokens.load_tokenizer(tiny_tokenizer.make_tiny_tokenizer(os.path.join(tmp, "tok")))
  cfg = checkpoints.config_for_tokenizer("small", tok)
  model = qwen_vl.QwenVL(cfg, rngs=nnx.Rngs(0))
  canvas = env.ChartCanvas(args.image, args.image, dpi=96)
  submit = lambda code: env.submit_chart(code, canvas=canvas)
  targets = [submit(p).result().image for p in PROGRAMS[: args.prompts]]
  scripts = [
    [call(PROGRAMS[(r + 1) % len(PROGRAMS)]), answer(PROGRAMS[r % len(PROGRAMS)])]
    for r in range(rows)
  ]
  params = SamplingParams(
    max_new_tokens=args.new,
    temperature=1.0,
    stop_token_ids=tokens.special_token_ids(tok).eos_token_ids,
    banned_token_ids=grpo.banned_token_ids(tok),
  )
  proc_cfg = image.ImageProcessorConfig()

  def play(render_submit, host_workers):
    sampler = TextScriptedSampler(model, tok, cache_length=2048, scripts=scripts)
    return episode.run_episodes(
      sampler,
      targets,
      group_size=args.group,
      task="chart",
      render_submit=render_submit,
      judge=env.LocalJudge(),
      sampling=params,
      key=jax.random.key(0),
      max_turns=2,
      proc_cfg=proc_cfg,
      host_workers=host_workers,
    )

  tx, schedule = optim.make_optimizer(1e-6)
  graphdef, state = state_lib.train_state_from_model(
    qwen_vl.QwenVL(cfg, rngs=nnx.Rngs(0)), tx, mesh=sharding.make_mesh(1, 1, 1)
  )
  loss = functools.partial(
    grpo.grpo_loss,
    policy_loss=algorithms.make_policy_loss("grpo"),
    temperature=1.0,
    chunk_size=512,
    banned_token_ids=grpo.banned_token_ids(tok),
  )
  micro = 4  # 4 rows per micro-batch, rematerialised: the update fits a CPU host's memory
  train_step = step.make_train_step(
    graphdef, loss, tx, micro_batches=micro, remat="full", schedule=schedule
  )

  def update(trajectories):
    rewards = np.asarray([t.reward.total for t in trajectories], np.float32)
    adv = np.asarray(
      algorithms.compute_advantages(algorithms.get_rl_config("grpo"), rewards, args.group)
    )
    longest = max(t.length for t in trajectories)
    size = len(trajectories) // micro
    parts = [
      grpo.make_grpo_batch(
        cfg,
        trajectories[i * size : (i + 1) * size],
        adv[i * size : (i + 1) * size],
        length=-(-longest // 256) * 256,
        images_per_row=3,
        pad_id=tokens.special_token_ids(tok).pad_token_id,
      )
      for i in range(micro)
    ]
    batch = batch_lib.stack_micro_batches(parts)
    nonlocal state
    start = time.perf_counter()
    state, m = train_step(state, batch)
    jax.block_until_ready(m)
    return time.perf_counter() - start

  results = {}
  for name, render_submit, workers in (
    ("overlap", submit, 8),
    ("serial", serial(submit), 1),
  ):
    play(render_submit, workers)  # compile / warm the workers
    start = time.perf_counter()
    played = play(render_submit, workers)
    rollout_s = time.perf_counter() - start
    update(played.trajectories)  # compile
    update_s = update(played.trajectories)
    results[name] = (played.stats, rollout_s, update_s)

  n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(
    f"GRPO step, {n_params / 1e6:.1f}M-parameter Qwen2.5-VL shape, {args.prompts} targets x G="
    f"{args.group} = {rows} episodes, 2 turns of <= {args.new} tokens, {args.image}px canvas; "
    f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()})"
  )
  print(
    f"{'mode':<9}{'rollout s':>10}{'sample s':>10}{'render s*':>10}{'judge s*':>10}"
    f"{'host wait s':>12}{'idle %':>8}{'update s':>10}{'step s':>8}"
  )
  for name, (stats, rollout_s, update_s) in results.items():
    print(
      f"{name:<9}{rollout_s:>10.2f}{stats.sample_s:>10.2f}{stats.render_s:>10.2f}"
      f"{stats.judge_s:>10.2f}{stats.host_wait_s:>12.2f}{100 * stats.device_idle_fraction:>8.1f}"
      f"{update_s:>10.2f}{rollout_s + update_s:>8.2f}"
    )
  print(
    f"renders: {results['overlap'][0].renders} tool + {results['overlap'][0].final_renders} final; "
    "* summed over concurrent jobs (submission to result)"
  )
  print(f"overlap saves {results['serial'][1] - results['overlap'][1]:.2f} s of rollout time")


if __name__ == "__main__":
  main()
