"""The evaluation stage: load a policy and a benchmark split, answer, score, report (resumable).

Used by `python -m rrvf_jax.evaluate` and by the eval stage of `rrvf_jax.main`. Settings come
from the keyword arguments, else from the config's `eval` section, else from `answer_check`
(single turn) and `grpo` (tool loop).
"""

from __future__ import annotations

import copy
import hashlib
import os

from absl import logging

# Benchmark scoring for each dataset the config can name (synthetic and cold-start charts carry
# their ground-truth matplotlib code, so ChartMimic's metrics apply; synthetic pages: WebSight's).
BENCHMARK_OF_DATASET = {
  "chartmimic": "chartmimic",
  "plot2code": "plot2code",
  "websight": "websight",
  "synthetic_charts": "chartmimic",
  "rrvf_coldstart": "chartmimic",
  "synthetic_web": "websight",
}
DEFAULT_SPLIT = {"chartmimic": "direct_600", "plot2code": "test", "websight": "test"}


def setting(config, key: str, value, fallback):
  """`value` (a flag's) if given, else `config.eval.<key>` if the config has it, else fallback."""
  if value is not None:
    return value
  section = config.get("eval")
  if section is not None and key in section and section[key] not in (None, ""):
    return section[key]
  return fallback


def resolve_checkpoint(config, workdir: str, checkpoint: str | None) -> str:
  """The policy directory to load ('' means the config's preset with random weights)."""
  if checkpoint is not None:
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
      raise ValueError(
        f"--checkpoint {checkpoint} is not an HF checkpoint directory (no config.json)"
      )
    return checkpoint
  export = os.path.join(workdir, "export")
  if os.path.isfile(os.path.join(export, "config.json")):
    return export
  return config.model.checkpoint_dir


def checkpoint_fingerprint(checkpoint: str) -> str | None:
  """Name, size and mtime of the checkpoint's files, hashed: a re-export is another policy."""
  if not checkpoint:
    return None
  h = hashlib.sha256()
  for name in sorted(os.listdir(checkpoint)):
    if name.endswith((".safetensors", ".json")):
      stat = os.stat(os.path.join(checkpoint, name))
      h.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
  return h.hexdigest()[:16]


def resolve_data(config, benchmark: str | None, split: str | None) -> tuple[str, str, str]:
  """(dataset name, split, benchmark) from the flags, the eval section and the data section."""
  name = setting(config, "benchmark", benchmark, None) or config.data.name
  if name not in BENCHMARK_OF_DATASET:
    raise ValueError(
      f"dataset {name!r} has no benchmark scoring; use --benchmark=chartmimic|plot2code|websight"
    )
  default_split = DEFAULT_SPLIT.get(name, config.data.eval_split)
  split = setting(config, "split", split, None) or default_split
  return name, split, BENCHMARK_OF_DATASET[name]


def run(
  config,
  workdir: str,
  *,
  checkpoint: str | None = None,
  benchmark: str | None = None,
  split: str | None = None,
  max_items: int | None = None,
  out_dir: str | None = None,
  tool_loop: bool | None = None,
  batch_size: int | None = None,
  max_new_tokens: int | None = None,
) -> tuple[dict, str]:
  """Loads policy and data, evaluates; returns (aggregate, output directory)."""
  import jax
  from flax import nnx

  from rrvf_jax import components, roles, sharding
  from rrvf_jax.eval import run as eval_run
  from rrvf_jax.processing import chat, tokens

  config = copy.deepcopy(config)
  name, split, benchmark = resolve_data(config, benchmark, split)
  checkpoint = resolve_checkpoint(config, workdir, checkpoint)
  config.model.checkpoint_dir = checkpoint
  config.data.name = name
  task = eval_run.TASKS[benchmark]
  if config.task != task:
    raise ValueError(f"benchmark {benchmark} is a {task} task but config.task is {config.task!r}")
  sharding.maybe_initialize_distributed()
  if jax.process_count() > 1:
    # Generation runs host-side loops over every row: each host evaluates on its own devices
    # (the same items, deterministically); process 0 writes the report.
    mesh = roles.local_mesh(jax.local_devices())
  else:
    mesh = sharding.mesh_from_config({k: config.mesh[k] for k in ("data", "fsdp", "tensor")})
  rules = sharding.get_rules(config.mesh.rules)
  source = components.dataset(config, workdir, split)  # built from data.manual_dir if missing
  tok = tokens.load_tokenizer(components.tokenizer_dir(config, workdir))
  model = components.pretrained_model(config, mesh, rules)
  if model is None:
    logging.warning("No checkpoint: evaluating preset %r with random weights.", config.model.preset)
    model = components.fresh_model_fn(config, components.policy_config(config, tok))(
      nnx.Rngs(config.seed)
    )
  tool_loop = bool(setting(config, "tool_loop", tool_loop, False))
  turn_section = config.grpo if tool_loop else config.answer_check
  turn_tokens = turn_section.max_new_tokens
  max_new_tokens = setting(config, "max_new_tokens", max_new_tokens, turn_tokens)
  batch_size = setting(config, "batch_size", batch_size, config.answer_check.batch_size)
  max_items = setting(config, "max_items", max_items, None) or None
  out_dir = out_dir or os.path.join(workdir, "eval", f"{name}-{split}")
  judge = components.make_judge(config) if config.judge.name == "openai" else None
  proc_cfg = components.image_processor_config(config)
  submit, close = components.canvas_renderer(config) if tool_loop else (None, lambda: None)
  logging.info(
    "Evaluating %s on %s/%s (%d items), policy %s, devices %s",
    benchmark, name, split, len(source), config.model.checkpoint_dir or "(random)", jax.devices(),
  )  # fmt: skip
  try:
    agg = eval_run.evaluate(
      model,
      tok,
      source,
      benchmark=benchmark,
      out_dir=out_dir,
      task=task,
      proc_cfg=proc_cfg,
      system_prompt=chat.DEFAULT_SYSTEM_PROMPT,
      tool_loop=tool_loop,
      max_turns=config.grpo.max_turns,
      max_new_tokens=int(max_new_tokens),
      max_total_tokens=config.grpo.max_total_tokens,
      max_response_tokens=config.grpo.max_response_tokens,
      cache_length=components.episode_budget(config, tok, proc_cfg).cache_slots
      if tool_loop
      else None,
      on_budget=config.grpo.on_budget,
      batch_size=int(batch_size),
      max_items=None if max_items is None else int(max_items),
      judge=judge,
      render_submit=submit,
      feedback_judge=components.make_judge(config) if tool_loop else None,
      mesh=mesh,
      rules=rules,
      meta={
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
        "checkpoint_fingerprint": checkpoint_fingerprint(checkpoint),
        "random_weights": not checkpoint,
      },
    )
  finally:
    close()
  return agg, out_dir


def format_table(agg: dict, out_dir: str) -> str:
  """The aggregate as a two-column table (the benchmark's headline metrics first) and notes."""
  from rrvf_jax.eval import report

  headline = [k for k in report.HEADLINE.get(agg["benchmark"], ()) if k in agg]
  counts = [k for k in ("n_items", "n_passed", "judge_items", "judge_missing") if k in agg]
  lines = [f"{agg['benchmark']}: {agg['n_items']} items, results in {out_dir}"]
  lines.append(f"{'metric':<20}{'value':>10}")
  for key in headline + counts:
    value = agg[key]
    text = "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
    lines.append(f"{key:<20}{text:>10}")
  for key in ("overall_note",):
    if agg.get(key):
      lines.append(f"note: {agg[key]}")
  lines.append(f"report: {os.path.join(out_dir, report.REPORT_NAME)}")
  return "\n".join(lines)
