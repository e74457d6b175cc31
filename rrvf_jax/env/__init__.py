"""Host-side environment: sandbox, chart and HTML renderers, parsing, judges, reward (no JAX)."""

# ruff: noqa: F401  (this module only re-exports)

from rrvf_jax.env.chart import (
  CHART_RC_PARAMS,
  ChartCanvas,
  create_chart_pool,
  default_chart_pool,
  render_chart,
  render_charts,
  submit_chart,
)
from rrvf_jax.env.codecheck import CodeLimits, CodeVerdict, check_code
from rrvf_jax.env.judges import (
  Judge,
  JudgeRequest,
  JudgeResult,
  JudgeUnavailableError,
  LocalJudge,
  LocalJudgeConfig,
  OpenAIJudge,
  OpenAIJudgeConfig,
  available_judges,
  make_judge,
)
from rrvf_jax.env.parsing import (
  CHART_TOOL,
  IMAGE_PLACEHOLDER,
  WEB_TOOL,
  AnswerStatus,
  CallStatus,
  ParsedTurn,
  ToolCall,
  ToolResponse,
  ToolSpec,
  TurnIssue,
  format_tool_response,
  make_tool_response,
  parse_tool_call,
  parse_turn,
  tool_for_kind,
  tool_schemas,
)
from rrvf_jax.env.prompt import FORCE_ANSWER_PROMPT, task_instruction
from rrvf_jax.env.reward import EpisodeSummary, RewardBreakdown, RewardConfig, compute_reward
from rrvf_jax.env.sandbox import (
  SandboxConfig,
  SandboxPool,
  SandboxResult,
  isolation_level,
  sandbox_metrics,
)
from rrvf_jax.env.types import STATUSES, RenderResult, Status
from rrvf_jax.env.web import HtmlRenderer, WebCanvas, default_html_renderer, render_html
