"""Benchmark scoring (ChartMimic, Plot2Code, WebSight), judge prompts, results.json and report.html.

Host-only and JAX-free. Generated code runs in the project's sandbox through a tracing driver
(`_trace_driver.py`, plain Python + matplotlib); pages render in the project's offline Chromium.
Typical use by an evaluation loop:

    pool = create_trace_pool(config=eval_sandbox_config())
    results = score_chartmimic(items, codes, pool=pool, judge=judge_or_None, cache=TraceCache())
    write_report(results, workdir / "eval" / "chartmimic")
"""

# ruff: noqa: F401  (this module only re-exports)

from rrvf_jax.eval.chartmimic import (
  ChartMimicConfig,
  ChartMimicItem,
  aggregate_chartmimic,
  color_prf,
  extract_python_code,
  layout_prf,
  overall_score,
  response_to_code,
  score_chartmimic,
  score_chartmimic_item,
  text_prf,
  truncate_for_execution,
  type_prf,
)
from rrvf_jax.eval.judging import (
  CHARTMIMIC_JUDGE_PROMPT,
  PLOT2CODE_JUDGE_PROMPT,
  JudgeOutcome,
  extract_chartmimic_score,
  judge_chartmimic,
  judge_plot2code,
  judge_web,
  parse_plot2code_rating,
)
from rrvf_jax.eval.plot2code import (
  Plot2CodeConfig,
  Plot2CodeItem,
  aggregate_plot2code,
  extract_code,
  score_plot2code,
  score_plot2code_item,
  text_match_score,
)
from rrvf_jax.eval.report import (
  aggregate,
  report_html,
  write_report,
  write_report_html,
  write_results_json,
)
from rrvf_jax.eval.results import PRF, ItemResult
from rrvf_jax.eval.trace import (
  CodeTrace,
  TraceCache,
  create_trace_pool,
  default_trace_pool,
  eval_sandbox_config,
  submit_trace,
  trace_code,
)
from rrvf_jax.eval.websight import (
  WebItem,
  WebSightConfig,
  aggregate_websight,
  block_scores,
  score_websight,
  score_websight_item,
)
