"""The run pipeline behind `rrvf_jax.main`: the stages a config asks for, in order.

Stages (each skipped when its size is 0 or it is disabled): cold-start SFT (`sft.steps`), RRVF
GRPO (`grpo.steps`, with greedy held-out episodes before and after it), the held-out answer check
(`answer_check.num_examples`), the HF export (`checkpoint.export_hf`) and the benchmark evaluation
(`eval.enabled`). Each training stage resumes from its own checkpoints when the command is re-run.
What the stages are built from (tokenizer, policy, data, renderer, judge, episode budget) comes from
`rrvf_jax.components`.
"""

from __future__ import annotations

import json
import os
import resource
import time

import jax
import ml_collections
from absl import logging
from flax import nnx

from rrvf_jax import checkpoint, components, env, metrics, models, roles, sharding
from rrvf_jax import data as data_lib
from rrvf_jax.eval import stage as eval_stage
from rrvf_jax.processing import chat, tokens
from rrvf_jax.rollout import answer_check
from rrvf_jax.train import grpo, optim, sft_loop
from rrvf_jax.train import state as state_lib

TASKS = ("chart", "web")
REMAT = ("none", "dots", "full")

JUDGE_POLICIES = ("wait", "drop_group")
ITEM_FIELDS = ("id", "text", "answered", "executed", "similarity", "turns", "tool_calls", "message")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def _check(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key} {message}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every value the pipeline depends on before any work starts."""
  _check(config.task in TASKS, "task", f"must be one of {list(TASKS)}, got {config.task!r}")
  m = config.model
  _check(
    m.dtype in components.DTYPES,
    "model.dtype",
    f"must be one of {sorted(components.DTYPES)}, got {m.dtype!r}",
  )
  if m.checkpoint_dir and not os.path.isfile(os.path.join(m.checkpoint_dir, "config.json")):
    raise ConfigError(
      f"config.model.checkpoint_dir {m.checkpoint_dir!r} is not an HF checkpoint directory"
    )
  if not m.checkpoint_dir:
    try:
      models.get_preset(m.preset)
    except ValueError as e:
      raise ConfigError(f"config.model.preset: {e}") from None
  for key in ("width", "height", "dpi"):
    _check(config.image[key] > 0, f"image.{key}", f"must be positive, got {config.image[key]}")
  for key in ("data", "fsdp", "tensor"):
    value = config.mesh[key]
    _check(value == -1 or value > 0, f"mesh.{key}", f"must be positive or -1, got {value}")
  _check(
    config.mesh.rules in sharding.RULES,
    "mesh.rules",
    f"must be one of {sorted(sharding.RULES)}, got {config.mesh.rules!r}",
  )
  _check(
    config.data.name in data_lib.BUILDERS,
    "data.name",
    f"must be one of {sorted(data_lib.BUILDERS)}, got {config.data.name!r}",
  )
  _validate_sft(config.sft)
  _validate_grpo(config.grpo)
  _validate_judge(config.judge)
  _check(config.roles.sampler_devices >= 0, "roles.sampler_devices", "must be >= 0")
  _check(config.roles.sampler_tensor > 0, "roles.sampler_tensor", "must be positive")
  _check(config.checkpoint.save_every > 0, "checkpoint.save_every", "must be positive")
  _check(config.checkpoint.keep > 0, "checkpoint.keep", "must be positive")
  a = config.answer_check
  _check(a.num_examples >= 0, "answer_check.num_examples", "must be >= 0")
  _check(a.batch_size > 0, "answer_check.batch_size", "must be positive")
  _check(a.max_new_tokens > 0, "answer_check.max_new_tokens", "must be positive")


def _validate_judge(j: ml_collections.ConfigDict) -> None:
  _check(j.name in ("local", "openai"), "judge.name", f"must be local or openai, got {j.name!r}")
  if j.name == "openai":
    missing = [k for k in ("base_url", "model") if not j[k]]
    _check(
      not missing,
      f"judge.{missing[0] if missing else ''}",
      "is empty: the openai judge needs judge.base_url and judge.model (an OpenAI-compatible "
      "endpoint serving the teacher MLLM), or use --config.judge.name=local",
    )
  _check(
    j.on_unavailable in JUDGE_POLICIES,
    "judge.on_unavailable",
    f"must be one of {list(JUDGE_POLICIES)}, got {j.on_unavailable!r}",
  )
  _check(j.max_wait_s > 0, "judge.max_wait_s", f"must be positive, got {j.max_wait_s}")


def _validate_sft(s: ml_collections.ConfigDict) -> None:
  _check(s.steps >= 0, "sft.steps", f"must be >= 0, got {s.steps}")
  _check(s.batch_size > 0, "sft.batch_size", f"must be positive, got {s.batch_size}")
  _check(
    s.micro_batches > 0 and s.batch_size % s.micro_batches == 0,
    "sft.micro_batches",
    f"must divide sft.batch_size={s.batch_size}, got {s.micro_batches}",
  )
  _check(s.max_length > 0, "sft.max_length", "must be positive")
  _check(s.max_images >= 0, "sft.max_images", f"must be >= 0, got {s.max_images}")
  _check(
    0 <= s.answer_steps <= s.steps,
    "sft.answer_steps",
    f"must be in [0, sft.steps={s.steps}], got {s.answer_steps}",
  )
  _check(s.answer_max_length > 0, "sft.answer_max_length", "must be positive")
  _check(s.learning_rate > 0, "sft.learning_rate", "must be positive")
  _check(s.adam_eps > 0, "sft.adam_eps", "must be positive")
  _check(
    s.schedule in optim.SCHEDULES,
    "sft.schedule",
    f"must be one of {list(optim.SCHEDULES)}, got {s.schedule!r}",
  )
  _check(
    s.steps == 0 or s.schedule != "cosine" or s.warmup_steps < s.steps,
    "sft.warmup_steps",
    f"must be smaller than sft.steps={s.steps} for the cosine schedule, got {s.warmup_steps}",
  )
  _check(s.remat in REMAT, "sft.remat", f"must be one of {list(REMAT)}, got {s.remat!r}")
  _check(s.log_every > 0, "sft.log_every", "must be positive")
  _check(s.chunk_size > 0, "sft.chunk_size", "must be positive")


def _validate_grpo(g: ml_collections.ConfigDict) -> None:
  _check(g.steps >= 0, "grpo.steps", f"must be >= 0, got {g.steps}")
  engines = ("lock_step", "paged")
  _check(g.engine in engines, "grpo.engine", f"must be one of {list(engines)}, got {g.engine!r}")
  for key in ("page_size", "decode_steps"):
    _check(g[key] > 0, f"grpo.{key}", f"must be positive, got {g[key]}")
  impls, attention = ("xla", "pallas"), g.get("paged_attention", "xla")
  _check(attention in impls, "grpo.paged_attention", f"must be xla or pallas, got {attention!r}")
  _check(g.decode_slots >= 0, "grpo.decode_slots", f"must be >= 0, got {g.decode_slots}")
  append_rows = g.get("append_rows", 0)
  _check(append_rows >= 0, "grpo.append_rows", f"must be >= 0, got {append_rows}")
  pool = g.get("pool_tokens", 0)
  _check(
    pool == 0 or pool >= g.max_total_tokens,
    "grpo.pool_tokens",
    f"must be 0 or hold one row's max_total_tokens={g.max_total_tokens}, got {pool}",
  )
  keys = ("prompts_per_step", "group_size", "max_turns", "max_new_tokens", "max_response_tokens")
  for key in (*keys, "epochs"):
    _check(g[key] > 0, f"grpo.{key}", f"must be positive, got {g[key]}")
  rows = g.prompts_per_step * g.group_size
  _check(
    g.mini_batches > 0 and rows % g.mini_batches == 0,
    "grpo.mini_batches",
    f"must divide prompts_per_step x group_size = {rows}, got {g.mini_batches}",
  )
  _check(
    g.micro_batches > 0 and (rows // max(g.mini_batches, 1)) % g.micro_batches == 0,
    "grpo.micro_batches",
    f"must divide a mini-batch's {rows // max(g.mini_batches, 1)} rows, got {g.micro_batches}",
  )
  _check(
    g.max_total_tokens > g.max_new_tokens,
    "grpo.max_total_tokens",
    f"must exceed grpo.max_new_tokens={g.max_new_tokens}",
  )
  _check(g.on_budget in ("force_answer", "fail"), "grpo.on_budget", "must be force_answer or fail")
  _check(g.temperature > 0, "grpo.temperature", "must be positive (GRPO samples)")
  _check(g.adam_eps > 0, "grpo.adam_eps", "must be positive")
  _check(g.remat in REMAT, "grpo.remat", f"must be one of {list(REMAT)}, got {g.remat!r}")
  _check(
    g.schedule in optim.SCHEDULES,
    "grpo.schedule",
    f"must be one of {list(optim.SCHEDULES)}, got {g.schedule!r}",
  )
  _check(g.eval_examples >= 0, "grpo.eval_examples", "must be >= 0")
  try:
    grpo.rl_config(g)
  except ValueError as e:
    raise ConfigError(f"config.grpo: {e}") from None


# ------------------------------------------------------------------------------------------------
# Stages.


def run_answer_check(config, workdir, stage: sft_loop.Stage, model) -> dict:
  """Greedy held-out episodes with the RRVF prompt, scored; writes answer_check/answers.json.

  Every host plays every example on its own sampler mesh (`grpo.make_sampler`); process 0 writes
  the files.
  """
  a = config.answer_check
  source = components.dataset(config, workdir, config.data.eval_split)
  n = min(a.num_examples, len(source))
  examples = sft_loop.decoded_examples([source[i] for i in range(n)])
  graphdef, params = state_lib.split_params(model)
  sampler, _ = grpo.make_sampler(stage, graphdef, params, cache_length=stage.cache_length)
  submit, close = components.canvas_renderer(config)
  environment = grpo.Environment(
    submit, components.make_judge(config), components.reward_config(config)
  )
  greedy = grpo.sampling_params(stage, greedy=True)

  def play(images):
    key = jax.random.key(0)  # unused by greedy sampling; fixed so runs are comparable
    played = grpo.play(stage, sampler, environment, images, group_size=1, params=greedy, key=key)
    return played.trajectories

  start = time.perf_counter()
  try:
    items = answer_check.run(
      examples,
      play=play,
      batch_size=a.batch_size,
      progress=lambda done, total: logging.info("answer_check: %d/%d", done, total),
    )
  finally:
    close()
  summary = answer_check.summarize(items) | {"seconds": round(time.perf_counter() - start, 1)}
  if jax.process_index() == 0:
    out = os.path.join(workdir, "answer_check")
    with metrics.MetricWriter(out, resume_step=None, tensorboard=True) as writer:
      pairs = [(ex["image"], item.render) for ex, item in zip(examples, items, strict=True)]
      writer.write_image_pairs(0, pairs, tag="answer_check", max_pairs=4)
      writer.write_scalars(0, {f"answer_check/{k}": v for k, v in summary.items()})
    with open(os.path.join(out, "answers.json"), "w") as f:
      rows = [{k: getattr(i, k) for k in ITEM_FIELDS} for i in items]
      json.dump({"summary": summary, "items": rows}, f, indent=1)
  return summary


def run_grpo(config, workdir, stage: sft_loop.Stage, model) -> tuple[nnx.Module, dict]:
  """The GRPO stage, with greedy held-out episodes before and after; (policy, summary)."""
  submit, close = components.canvas_renderer(config)
  environment = grpo.Environment(
    submit, components.make_judge(config), components.reward_config(config)
  )
  g = config.grpo
  held_out = []
  if g.eval_examples > 0:
    source = components.dataset(config, workdir, config.data.eval_split)
    n = min(g.eval_examples, len(source))
    held_out = sft_loop.decoded_examples([source[i] for i in range(n)])

  def evaluate(policy) -> dict:
    graphdef, params = state_lib.split_params(policy)
    sampler, _ = grpo.make_sampler(stage, graphdef, params, cache_length=stage.cache_length)
    # Batches of the training rollout's row count: a shape that divides the mesh's batch axes.
    batch = g.prompts_per_step * g.group_size
    return grpo.evaluate(stage, sampler, environment, held_out, batch_size=batch)

  out: dict = {}
  start = time.perf_counter()
  try:
    if held_out:
      out["before"] = evaluate(model)
      logging.info("grpo: held-out before %s", out["before"])
    model = grpo.run(
      stage, components.dataset(config, workdir, config.data.train_split), model, environment
    )
    if held_out:
      out["after"] = evaluate(model)
      logging.info("grpo: held-out after %s", out["after"])
  finally:
    close()
  out["seconds"] = round(time.perf_counter() - start, 1)
  return model, out


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The benchmark evaluation stage (of the exported policy when there is one)."""
  t = time.perf_counter()
  agg, out_dir = eval_stage.run(config, workdir)
  keys = ("benchmark", "n_items", "exec_rate", "text", "layout", "type", "color", "overall")
  return {k: agg[k] for k in keys if k in agg} | {
    "out_dir": out_dir,
    "seconds": round(time.perf_counter() - t, 1),
  }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every stage the config enables; returns the run summary (also in summary.json)."""
  validate_config(config)
  sharding.maybe_initialize_distributed()
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  placement = roles.make_roles(
    {k: config.mesh[k] for k in ("data", "fsdp", "tensor")},
    sampler_devices=config.roles.sampler_devices,
    sampler_tensor=config.roles.sampler_tensor,
  )
  mesh = placement.trainer_mesh
  rules = sharding.get_rules(config.mesh.rules)
  tok_dir = components.tokenizer_dir(config, workdir)
  tok = tokens.load_tokenizer(tok_dir)
  model_cfg = components.policy_config(config, tok)
  proc_cfg = components.image_processor_config(config)
  budget = components.episode_budget(config, tok, proc_cfg)
  if budget.tokens > config.grpo.max_total_tokens:
    logging.warning(
      "grpo.max_total_tokens=%d is below an episode's worst case (%d tokens): rows that use "
      "their whole turn and response budgets get fewer than grpo.max_turns - 1 = %d feedback "
      "rounds",
      config.grpo.max_total_tokens,
      budget.tokens,
      config.grpo.max_turns - 1,
    )
  summary: dict = {
    "task": config.task,
    "devices": len(jax.devices()),
    "processes": jax.process_count(),
    "mesh": dict(mesh.shape),
    "sampler_mesh": dict(placement.sampler_mesh.shape),
  }
  model = None
  stage = sft_loop.Stage(
    config=config,
    workdir=workdir,
    tokenizer=tok,
    model_config=model_cfg,
    make_model=components.fresh_model_fn(config, model_cfg),
    initial_model=lambda: components.pretrained_model(config, mesh, rules),
    mesh=mesh,
    rules=rules,
    proc_cfg=proc_cfg,
    instruction=env.task_instruction(config.task),
    system_prompt=chat.DEFAULT_SYSTEM_PROMPT,
    tools=tuple(env.tool_schemas(config.task)),
    sampler_mesh=placement.sampler_mesh,
    cache_length=budget.cache_slots,
  )
  if config.sft.steps > 0:
    t = time.perf_counter()
    model = sft_loop.run(stage, components.dataset(config, workdir, config.data.train_split))
    summary["sft"] = _sft_summary(workdir) | {"seconds": round(time.perf_counter() - t, 1)}
  if model is None:
    model = components.pretrained_model(config, mesh, rules)
    if model is None:
      model = components.fresh_model_fn(config, model_cfg)(nnx.Rngs(config.seed))
  logging.info("Parameter shardings:\n%s", sharding.sharding_table(model, mesh, rules))
  if config.grpo.steps > 0:
    model, summary["grpo"] = run_grpo(config, workdir, stage, model)
  if config.answer_check.num_examples > 0:
    summary["answer_check"] = run_answer_check(config, workdir, stage, model)
  if config.checkpoint.export_hf and (config.sft.steps > 0 or config.grpo.steps > 0):
    export = os.path.join(workdir, "export")
    graphdef, params = state_lib.split_params(model)
    # Weights sharded across hosts are gathered first: process 0 writes the files.
    readable = nnx.merge(graphdef, roles.fully_replicated_local(params))
    checkpoint.export_hf(readable, export, copy_from=tok_dir)
    if jax.process_index() == 0:
      with open(os.path.join(export, "preprocessor_config.json"), "w") as f:
        json.dump(proc_cfg.to_dict(), f, indent=2)
    summary["export"] = export
  if config.eval.enabled:
    summary["eval"] = run_eval(config, workdir)
  summary["seconds"] = round(time.perf_counter() - start, 1)
  summary["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def _sft_summary(workdir: str) -> dict:
  """First and last logged SFT loss (from the stage's metrics.jsonl)."""
  records = metrics.read_jsonl(os.path.join(workdir, "sft", "metrics.jsonl"))
  losses = [(r["step"], r["sft/loss"]) for r in records if "sft/loss" in r]
  if not losses:
    return {}
  return {"first_loss": losses[0], "last_loss": losses[-1], "steps": losses[-1][0]}


TABLE_COLUMNS = (
  ("exec rate", "exec_rate", "{:.1%}"),
  ("R_vis first", "r_vision_first", "{:.3f}"),
  ("R_vis final", "r_vision", "{:.3f}"),
  ("tool calls", "tool_call_rate", "{:.1%}"),
  ("turns", "turns", "{:.2f}"),
  ("reward", "reward", "{:.3f}"),
)


def held_out_table(*rows: dict, names=("before (SFT)", "after GRPO")) -> str:
  """The before/after table of greedy held-out episodes (R_vision of first draft and answer)."""
  lines = [f"{'':<14}" + "".join(f"{title:>12}" for title, _, _ in TABLE_COLUMNS)]
  for name, row in zip(names, rows, strict=True):
    cells = [fmt.format(row[key]) if key in row else "-" for _, key, fmt in TABLE_COLUMNS]
    lines.append(f"{name:<14}" + "".join(f"{c:>12}" for c in cells))
  return "\n".join(lines)


def print_summary(summary: dict) -> None:
  """The human-readable end-of-run table."""
  print(f"run finished in {summary['seconds']} s, peak RSS {summary['peak_rss_gib']} GiB")
  if summary.get("sft"):
    s = summary["sft"]
    print(
      f"cold-start SFT: {s['steps']} steps in {s['seconds']} s, loss "
      f"{s['first_loss'][1]:.3f} (step {s['first_loss'][0]}) -> {s['last_loss'][1]:.3f}"
    )
  if "grpo" in summary and "before" in summary["grpo"]:
    before, after = summary["grpo"]["before"], summary["grpo"]["after"]
    print(
      f"GRPO ({summary['grpo']['seconds']} s), greedy episodes on {before['items']} "
      "held-out targets:"
    )
    print(held_out_table(before, after))
  if "answer_check" in summary:
    a = summary["answer_check"]
    print(
      f"held-out answer check ({a['items']} items, greedy episodes): answered "
      f"{a['answered']:.0%}, executed {a['exec_rate']:.0%}, mean similarity "
      f"{a['similarity']:.3f}, tool calls in {a['tool_call_rate']:.0%}, {a['turns']:.2f} turns"
    )
  if "export" in summary:
    print(f"policy exported (HF format) to {summary['export']}")
  if "eval" in summary:
    e = summary["eval"]
    scores = ", ".join(
      f"{k} {e[k]:.1f}"
      for k in ("exec_rate", "text", "layout", "type", "color")
      if e.get(k) is not None
    )
    print(
      f"evaluation ({e['benchmark']}, {e['n_items']} items): {scores}; report in {e['out_dir']}"
    )
