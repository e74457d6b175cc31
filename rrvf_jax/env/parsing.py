"""Parse a policy turn into think / tool calls / answer, and build the next turn's tool response.

A policy turn follows the Qwen2.5 function-calling convention::

  <think>…</think>
  <tool_call>
  {"name": "render_chart", "arguments": {"code": "import matplotlib…"}}
  </tool_call>

or ends the episode with ``<answer>final code</answer>``. Models get this wrong in many ways
(raw newlines in JSON strings, single quotes, trailing commas, a code fence instead of JSON,
unescaped quotes in the code…). Every tool call is kept and carries a ``CallStatus`` saying
exactly what was wrong; when the code can still be recovered the call stays ``executable`` (the
policy gets useful feedback) while the status lets the reward count it as a format error.
Nothing is dropped silently.

Host-only: the standard library, no JAX.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Kind = Literal["chart", "web"]

# Qwen2.5-VL's image placeholder: the processor expands `<|image_pad|>` into the vision tokens.
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


# --------------------------------------------------------------------------------------------------
# Tool schema (data, so the system prompt can list it).


@dataclasses.dataclass(frozen=True)
class ToolSpec:
  """One render tool as the policy sees it: a name, a description and one string argument."""

  name: str
  description: str
  arg_name: str = "code"
  arg_description: str = ""
  language: str = "python"
  # Argument names accepted besides `arg_name` (the paper's figure uses `html_code`).
  arg_aliases: tuple[str, ...] = ()
  # Tool names accepted besides `name` (the paper's figure calls `html_render_and_compare_tool`).
  name_aliases: tuple[str, ...] = ()

  def schema(self) -> dict[str, Any]:
    """Return the OpenAI/Qwen2.5 function schema (the JSON listed inside <tools></tools>)."""
    return {
      "type": "function",
      "function": {
        "name": self.name,
        "description": self.description,
        "parameters": {
          "type": "object",
          "properties": {self.arg_name: {"type": "string", "description": self.arg_description}},
          "required": [self.arg_name],
        },
      },
    }


CHART_TOOL = ToolSpec(
  name="render_chart",
  description="Render matplotlib code; returns the image and how it differs from the target.",
  arg_description="A complete Python script that draws the chart with matplotlib.",
  language="python",
  arg_aliases=("python_code",),
  # The paper names only the web tool; this is its chart counterpart (research notes §1.2).
  name_aliases=("chart_render_and_compare_tool",),
)

WEB_TOOL = ToolSpec(
  name="render_html",
  description="Render an HTML page; returns the screenshot and how it differs from the target.",
  arg_description="A complete HTML document (inline CSS, no external resources).",
  language="html",
  arg_aliases=("html_code",),
  name_aliases=("html_render_and_compare_tool",),
)

TOOLS: Mapping[str, ToolSpec] = {"chart": CHART_TOOL, "web": WEB_TOOL}


def tool_for_kind(kind: Kind) -> ToolSpec:
  """Return the render tool for a task kind ('chart' or 'web')."""
  try:
    return TOOLS[kind]
  except KeyError:
    raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(TOOLS)}") from None


def tool_schemas(kind: Kind) -> list[dict[str, Any]]:
  """Return the schema list for a task kind, ready to be JSON-dumped into the system prompt."""
  return [tool_for_kind(kind).schema()]


# --------------------------------------------------------------------------------------------------
# Statuses.


class CallStatus(enum.StrEnum):
  """What parsing one <tool_call> found: 'ok', a repair (code recovered), or an error (no code)."""

  OK = "ok"
  # Repairs: the code was recovered, but the call was not strictly well formed.
  RAW_CONTROL_CHARS = "raw_control_chars"  # raw newline/tab inside a JSON string
  SINGLE_QUOTES = "single_quotes"  # Python-style 'strings'
  TRAILING_COMMA = "trailing_comma"  # {"a": 1,}
  INVALID_ESCAPE = "invalid_escape"  # \d, \( … inside a JSON string
  PYTHON_LITERAL = "python_literal"  # True/False/None instead of true/false/null
  EXTRA_TEXT = "extra_text"  # prose or a ```json fence around the JSON object
  ARGUMENTS_AS_STRING = "arguments_as_string"  # "arguments": "{\"code\": …}" (OpenAI wire style)
  UNESCAPED_QUOTES = "unescaped_quotes"  # code salvaged from JSON broken by unescaped quotes
  CODE_FENCE = "code_fence"  # a ```python block instead of JSON
  MISSING_NAME = "missing_name"  # no "name", but only one tool exists
  UNCLOSED_TAG = "unclosed_tag"  # no </tool_call>, but the body parsed
  # Errors: nothing can be executed.
  EMPTY = "empty"
  INVALID_JSON = "invalid_json"
  NOT_AN_OBJECT = "not_an_object"
  UNKNOWN_TOOL = "unknown_tool"
  NAME_REQUIRED = "name_required"  # no "name" and several tools to choose from
  MISSING_ARGUMENTS = "missing_arguments"
  BAD_ARGUMENTS = "bad_arguments"
  MISSING_CODE = "missing_code"
  EMPTY_CODE = "empty_code"
  SKIPPED = "skipped"  # a well-formed call beyond the per-turn limit


REPAIR_STATUSES = frozenset(
  {
    CallStatus.RAW_CONTROL_CHARS,
    CallStatus.SINGLE_QUOTES,
    CallStatus.TRAILING_COMMA,
    CallStatus.INVALID_ESCAPE,
    CallStatus.PYTHON_LITERAL,
    CallStatus.EXTRA_TEXT,
    CallStatus.ARGUMENTS_AS_STRING,
    CallStatus.UNESCAPED_QUOTES,
    CallStatus.CODE_FENCE,
    CallStatus.MISSING_NAME,
    CallStatus.UNCLOSED_TAG,
  }
)


class AnswerStatus(enum.StrEnum):
  """What happened when parsing the <answer> block."""

  OK = "ok"
  UNCLOSED = "unclosed"  # no </answer> (e.g. cut by the token limit); the code is recovered anyway
  EMPTY = "empty"


class TurnIssue(enum.StrEnum):
  """A turn-level format problem (tag structure rather than one call's JSON)."""

  MISSING_THINK = "missing_think"
  UNBALANCED_THINK = "unbalanced_think"
  UNBALANCED_TOOL_CALL = "unbalanced_tool_call"
  MULTIPLE_TOOL_CALLS = "multiple_tool_calls"
  MULTIPLE_ANSWERS = "multiple_answers"
  UNCLOSED_ANSWER = "unclosed_answer"
  TOOL_CALL_AND_ANSWER = "tool_call_and_answer"
  NO_ACTION = "no_action"  # neither a tool call nor an answer


# --------------------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One parsed <tool_call>: the code to render (if recoverable) and what was wrong with it."""

  raw: str
  status: CallStatus
  message: str
  name: str | None = None
  code: str | None = None
  # Every repair applied, in order (status is the first repair when the call is otherwise fine).
  repairs: tuple[CallStatus, ...] = ()

  @property
  def ok(self) -> bool:
    """True when the call was strictly well formed."""
    return self.status is CallStatus.OK

  @property
  def executable(self) -> bool:
    """True when there is code to render (strict or repaired)."""
    return self.code is not None and (self.ok or self.status in REPAIR_STATUSES)


@dataclasses.dataclass(frozen=True)
class Answer:
  """The parsed <answer>: the final code (fence removed) and its status."""

  raw: str
  status: AnswerStatus
  code: str | None

  @property
  def ok(self) -> bool:
    """True when the answer was closed and holds code."""
    return self.status is AnswerStatus.OK


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
  """One policy turn split into its parts, with every format issue found."""

  text: str
  think: str | None
  tool_calls: tuple[ToolCall, ...]
  answer: Answer | None
  issues: tuple[TurnIssue, ...]

  @property
  def action(self) -> Literal["answer", "tool_call", "none"]:
    """What the episode driver should do: finish on an answer, render a tool call, or neither."""
    if self.answer is not None:
      return "answer"
    if self.tool_calls:
      return "tool_call"
    return "none"


# --------------------------------------------------------------------------------------------------
# Code extraction.

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|```)", re.DOTALL)
_OPEN_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*)\Z", re.DOTALL)
_LANG_ALIASES = {"python": {"python", "py", "python3"}, "html": {"html", "htm", "xhtml"}}


def extract_code(text: str, language: str | None = None) -> str:
  """Return the code in `text`: the first fenced block (preferring `language`), else the text."""
  blocks = _FENCE_RE.findall(text)
  if blocks:
    wanted = _LANG_ALIASES.get(language or "", {language} if language else set())
    for lang, body in blocks:
      if lang.lower() in wanted:
        return body.strip("\n")
    return blocks[0][1].strip("\n")
  # An opening fence with no closing one (truncated output): take everything after it.
  match = _OPEN_FENCE_RE.search(text)
  if match:
    return match.group(2).rstrip().rstrip("`").strip("\n")
  return text.strip()


# --------------------------------------------------------------------------------------------------
# Tolerant JSON.

_JSON_ESCAPES = frozenset('"\\/bfnrtu')
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}


def _repair_json(text: str) -> tuple[str, list[CallStatus]]:
  """Rewrite near-JSON into strict JSON, listing each class of repair that was needed."""
  out: list[str] = []
  repairs: list[CallStatus] = []

  def note(status: CallStatus) -> None:
    if status not in repairs:
      repairs.append(status)

  i, n = 0, len(text)
  quote: str | None = None  # the quote character of the string we are in, if any
  while i < n:
    c = text[i]
    if quote is None:
      if c in "\"'":
        if c == "'":
          note(CallStatus.SINGLE_QUOTES)
        quote = c
        out.append('"')
      elif c == ",":
        j = i + 1
        while j < n and text[j].isspace():
          j += 1
        if j < n and text[j] in "}]":
          note(CallStatus.TRAILING_COMMA)
        else:
          out.append(c)
      elif c.isalpha():
        j = i
        while j < n and (text[j].isalnum() or text[j] == "_"):
          j += 1
        word = text[i:j]
        if word in _PY_LITERALS:
          note(CallStatus.PYTHON_LITERAL)
          word = _PY_LITERALS[word]
        out.append(word)
        i = j
        continue
      else:
        out.append(c)
      i += 1
      continue
    # Inside a string.
    if c == quote:
      quote = None
      out.append('"')
    elif c == "\\" and i + 1 < n:
      nxt = text[i + 1]
      if nxt == "'" and quote == "'":
        out.append("'")
      elif nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2 : i + 6]):
        out.append(text[i : i + 6])
        i += 6
        continue
      elif nxt in _JSON_ESCAPES and nxt != "u":
        out.append(c + nxt)
      else:
        # Keep the backslash literally, as Python would for an unknown escape like "\d".
        note(CallStatus.INVALID_ESCAPE)
        out.append("\\\\")
        i += 1
        continue
      i += 2
      continue
    elif c == '"':  # a double quote inside a single-quoted string
      out.append('\\"')
    elif ord(c) < 0x20:
      note(CallStatus.RAW_CONTROL_CHARS)
      out.append(json.dumps(c)[1:-1])
    else:
      out.append(c)
    i += 1
  return "".join(out), repairs


def _loads_tolerant(text: str) -> tuple[Any, list[CallStatus], str | None]:
  """Parse JSON strictly, else after repairs; return (value, repairs, error message or None)."""
  try:
    return json.loads(text), [], None
  except json.JSONDecodeError as e:
    strict_error = f"{e.msg} at line {e.lineno} column {e.colno}"
  fixed, repairs = _repair_json(text)
  try:
    return json.loads(fixed), repairs, None
  except json.JSONDecodeError:
    return None, repairs, strict_error


def _first_object(text: str) -> tuple[Any, list[CallStatus], None] | None:
  """Decode the first JSON object of `text` when more follows it (e.g. two objects in one call)."""
  fixed, repairs = _repair_json(text)
  try:
    value, end = json.JSONDecoder().raw_decode(fixed)
  except json.JSONDecodeError:
    return None
  return (value, repairs, None) if fixed[end:].strip() else None


_CODE_KEY_RE = r"""(["'])({keys})\1\s*:\s*(["'])"""
_NAME_RE = re.compile(r"""["']name["']\s*:\s*["']([^"'\n]+)["']""")


def _decode_string_lenient(s: str) -> str:
  """Decode JSON-style escapes in `s`, keeping unknown escapes and raw characters as they are."""
  simple = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "b": "\b",
    "f": "\f",
    '"': '"',
    "'": "'",
    "\\": "\\",
    "/": "/",
  }
  out: list[str] = []
  i = 0
  while i < len(s):
    c = s[i]
    if c == "\\" and i + 1 < len(s):
      nxt = s[i + 1]
      if nxt in simple:
        out.append(simple[nxt])
        i += 2
        continue
      if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", s[i + 2 : i + 6]):
        out.append(chr(int(s[i + 2 : i + 6], 16)))
        i += 6
        continue
    out.append(c)
    i += 1
  return "".join(out)


def _salvage(body: str, code_keys: Sequence[str]) -> dict[str, Any] | None:
  """Rebuild a call object from JSON broken by unescaped quotes: the code runs to the end."""
  key_re = re.compile(_CODE_KEY_RE.format(keys="|".join(re.escape(k) for k in code_keys)))
  match = key_re.search(body)
  if not match:
    return None
  key, quote = match.group(2), match.group(3)
  tail = body[match.end() :]
  # The code is the last value of the object: it ends at the last quote before the closing braces.
  end = re.search(re.escape(quote) + r"\s*\}\s*\}?\s*\Z", tail)
  if not end:
    return None
  value: dict[str, Any] = {"arguments": {key: _decode_string_lenient(tail[: end.start()])}}
  name = _NAME_RE.search(body[: match.start()])
  if name:
    value["name"] = name.group(1)
  return value


# --------------------------------------------------------------------------------------------------
# Tool calls.


def _error(raw: str, status: CallStatus, message: str, **kw: Any) -> ToolCall:
  """Build a non-executable ToolCall."""
  return ToolCall(raw=raw, status=status, message=message, **kw)


def _strip_json_wrapper(body: str) -> tuple[str, bool]:
  """Cut `body` down to its outermost {...}; report whether anything but whitespace was cut."""
  start, end = body.find("{"), body.rfind("}")
  if start < 0 or end < start:
    return body, False
  outside = body[:start] + body[end + 1 :]
  return body[start : end + 1], bool(outside.strip())


def parse_tool_call(
  raw: str, tools: Sequence[ToolSpec] = (CHART_TOOL,), *, closed: bool = True
) -> ToolCall:
  """Parse the body of one <tool_call> block into a ToolCall (never raises on bad input)."""
  if not tools:
    raise ValueError("parse_tool_call needs at least one ToolSpec")
  by_name = {name: t for t in tools for name in (t.name, *t.name_aliases)}
  repairs: list[CallStatus] = [] if closed else [CallStatus.UNCLOSED_TAG]
  body = raw.strip()
  if not body:
    return _error(raw, CallStatus.EMPTY, "The tool call is empty.")

  # A bare code fence instead of JSON: run it with the only tool, if the choice is unambiguous.
  fence = re.match(r"```[ \t]*([A-Za-z0-9_+.-]*)", body)
  if fence and fence.group(1).lower() != "json":
    if len(tools) != 1:
      return _error(
        raw, CallStatus.NAME_REQUIRED, "A code block was given instead of JSON with a name."
      )
    code = extract_code(body, tools[0].language)
    if not code.strip():
      return _error(raw, CallStatus.EMPTY_CODE, "The code block is empty.")
    return ToolCall(
      raw=raw,
      status=[*repairs, CallStatus.CODE_FENCE][0],
      message=_repair_message([*repairs, CallStatus.CODE_FENCE]),
      name=tools[0].name,
      code=code,
      repairs=(*repairs, CallStatus.CODE_FENCE),
    )
  value, json_repairs, json_error = _loads_tolerant(body)
  if json_error is not None and "{" not in body:
    return _error(raw, CallStatus.INVALID_JSON, f"The tool call is not JSON: {body[:60]!r}")
  if json_error is not None:
    # Prose or a ```json fence around the object: parse the outermost {...} alone.
    inner, had_extra = _strip_json_wrapper(body)
    value, json_repairs, json_error = _loads_tolerant(inner)
    if had_extra:
      repairs.append(CallStatus.EXTRA_TEXT)
    if json_error is not None:
      first = _first_object(inner)
      if first is not None:
        value, json_repairs, json_error = first
        if CallStatus.EXTRA_TEXT not in repairs:
          repairs.append(CallStatus.EXTRA_TEXT)
    if json_error is not None:
      value = _salvage(inner, [k for t in tools for k in (t.arg_name, *t.arg_aliases)])
      if value is None:
        return _error(
          raw, CallStatus.INVALID_JSON, f"The tool call is not valid JSON: {json_error}."
        )
      json_repairs = [CallStatus.UNESCAPED_QUOTES]
  repairs.extend(json_repairs)
  return _call_from_value(raw, value, tools, by_name, repairs)


def _call_from_value(
  raw: str,
  value: Any,
  tools: Sequence[ToolSpec],
  by_name: Mapping[str, ToolSpec],
  repairs: list[CallStatus],
) -> ToolCall:
  """Validate a decoded {"name", "arguments"} object and pull the code out of it."""
  kw: dict[str, Any] = {"repairs": tuple(repairs)}
  if not isinstance(value, dict):
    return _error(raw, CallStatus.NOT_AN_OBJECT, "The tool call must be a JSON object.", **kw)
  name = value.get("name")
  if not isinstance(name, str) or not name:
    if len(tools) != 1:
      return _error(raw, CallStatus.NAME_REQUIRED, 'The tool call has no "name".', **kw)
    repairs.append(CallStatus.MISSING_NAME)
    name = tools[0].name
  spec = by_name.get(name)
  kw = {"repairs": tuple(repairs), "name": name}
  if spec is None:
    available = ", ".join(t.name for t in tools)
    return _error(
      raw, CallStatus.UNKNOWN_TOOL, f"Unknown tool {name!r}; available: {available}.", **kw
    )
  args = value.get("arguments")
  if args is None:
    return _error(raw, CallStatus.MISSING_ARGUMENTS, 'The tool call has no "arguments".', **kw)
  if isinstance(args, str):
    args, _, err = _loads_tolerant(args)
    if err is not None or not isinstance(args, dict):
      return _error(raw, CallStatus.BAD_ARGUMENTS, '"arguments" must be a JSON object.', **kw)
    repairs.append(CallStatus.ARGUMENTS_AS_STRING)
    kw["repairs"] = tuple(repairs)
  if not isinstance(args, dict):
    return _error(raw, CallStatus.BAD_ARGUMENTS, '"arguments" must be a JSON object.', **kw)
  key = next((k for k in (spec.arg_name, *spec.arg_aliases) if k in args), None)
  if key is None:
    return _error(raw, CallStatus.MISSING_CODE, f'"arguments" has no "{spec.arg_name}".', **kw)
  if not isinstance(args[key], str):
    return _error(raw, CallStatus.BAD_ARGUMENTS, f'"{spec.arg_name}" must be a string.', **kw)
  code = extract_code(args[key], spec.language)
  if not code.strip():
    return _error(raw, CallStatus.EMPTY_CODE, f'"{spec.arg_name}" is empty.', **kw)
  status = repairs[0] if repairs else CallStatus.OK
  return ToolCall(
    raw=raw,
    status=status,
    message=_repair_message(repairs),
    name=name,
    code=code,
    repairs=tuple(repairs),
  )


_REPAIR_TEXT = {
  CallStatus.RAW_CONTROL_CHARS: "raw newlines or tabs inside a JSON string (escape them as \\n)",
  CallStatus.SINGLE_QUOTES: "single-quoted strings (JSON needs double quotes)",
  CallStatus.TRAILING_COMMA: "a trailing comma",
  CallStatus.INVALID_ESCAPE: "an invalid escape sequence in a string (write \\\\ for a backslash)",
  CallStatus.PYTHON_LITERAL: "Python literals True/False/None (JSON uses true/false/null)",
  CallStatus.EXTRA_TEXT: "text around the JSON object",
  CallStatus.ARGUMENTS_AS_STRING: '"arguments" given as a string instead of an object',
  CallStatus.UNESCAPED_QUOTES: "unescaped double quotes inside the code string",
  CallStatus.CODE_FENCE: "a code block instead of the JSON tool-call format",
  CallStatus.MISSING_NAME: 'no "name" field',
  CallStatus.UNCLOSED_TAG: "a missing </tool_call> tag",
}


def _repair_message(repairs: Sequence[CallStatus]) -> str:
  """Describe the repairs applied to a call, for logs and for the tool response."""
  if not repairs:
    return ""
  return (
    "The tool call was accepted but is malformed: "
    + "; ".join(_REPAIR_TEXT[r] for r in repairs)
    + "."
  )


# --------------------------------------------------------------------------------------------------
# Turns.

_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TRAILING_SPECIAL_RE = re.compile(r"(?:\s*<\|(?:im_end|endoftext)\|>)+\s*\Z")


def _parse_answer(raw: str, closed: bool, language: str) -> Answer:
  """Parse the inside of one <answer> block."""
  code = extract_code(raw, language)
  if not code.strip():
    return Answer(raw=raw, status=AnswerStatus.EMPTY, code=None)
  return Answer(raw=raw, status=AnswerStatus.OK if closed else AnswerStatus.UNCLOSED, code=code)


def parse_turn(
  text: str, tools: Sequence[ToolSpec] | Kind = "chart", *, max_calls_per_turn: int = 1
) -> ParsedTurn:
  """Split one policy turn into think, tool calls and answer, recording every format issue."""
  specs: Sequence[ToolSpec] = (tool_for_kind(tools),) if isinstance(tools, str) else tools
  issues: list[TurnIssue] = []
  # The sampler may keep its stop token; it is not part of the policy's answer.
  text = _TRAILING_SPECIAL_RE.sub("", text)

  n_open, n_close = text.count("<think>"), text.count("</think>")
  if n_open == 0 and n_close == 0:
    issues.append(TurnIssue.MISSING_THINK)
  elif n_open != n_close:
    issues.append(TurnIssue.UNBALANCED_THINK)
  thinks = _THINK_RE.findall(text)
  think = "\n".join(t.strip() for t in thinks) if thinks else None
  # Tags inside a closed <think> are reasoning, not actions. An unclosed <think> stays searchable so
  # that a call after a forgotten </think> is still found (and reported through UNBALANCED_THINK).
  rest = _THINK_RE.sub(" ", text)

  calls: list[ToolCall] = []
  for body in _TOOL_CALL_RE.findall(rest):
    calls.append(parse_tool_call(body, specs))
  tail = _TOOL_CALL_RE.sub(" ", rest)
  n_open_calls, n_close_calls = tail.count("<tool_call>"), tail.count("</tool_call>")
  if n_open_calls:
    # A trailing <tool_call> with no closing tag (a stop token ate it, or the output was cut).
    after = tail[tail.rfind("<tool_call>") + len("<tool_call>") :]
    after = after.split("<answer>")[0]
    calls.append(parse_tool_call(after, specs, closed=False))
  if n_close_calls or n_open_calls > 1:
    issues.append(TurnIssue.UNBALANCED_TOOL_CALL)
  if len(calls) > max_calls_per_turn:
    issues.append(TurnIssue.MULTIPLE_TOOL_CALLS)
    calls = calls[:max_calls_per_turn] + [
      dataclasses.replace(
        c,
        status=CallStatus.SKIPPED,
        message=f"Only {max_calls_per_turn} tool call(s) per turn are run; this one was skipped.",
      )
      for c in calls[max_calls_per_turn:]
    ]

  language = specs[0].language
  answers = _ANSWER_RE.findall(rest)
  answer: Answer | None = None
  if len(answers) > 1:
    issues.append(TurnIssue.MULTIPLE_ANSWERS)
  if answers:
    answer = _parse_answer(answers[-1], True, language)
  else:
    leftover = _ANSWER_RE.sub(" ", rest)
    if "<answer>" in leftover:
      issues.append(TurnIssue.UNCLOSED_ANSWER)
      answer = _parse_answer(
        leftover[leftover.rfind("<answer>") + len("<answer>") :], False, language
      )
  if answer is not None and calls:
    issues.append(TurnIssue.TOOL_CALL_AND_ANSWER)
  if answer is None and not calls:
    issues.append(TurnIssue.NO_ACTION)
  return ParsedTurn(
    text=text, think=think, tool_calls=tuple(calls), answer=answer, issues=tuple(issues)
  )


# --------------------------------------------------------------------------------------------------
# Tool responses.


@dataclasses.dataclass(frozen=True)
class ToolResponse:
  """What goes back to the policy after a tool call: text, and whether the render is attached."""

  text: str
  has_image: bool
  status: Literal["ok", "render_error", "invalid_call", "skipped"]

  def to_message(self) -> dict[str, Any]:
    """The response as a chat message for processing.chat (image item first, then the text)."""
    content: list[dict[str, str]] = [{"type": "image"}] if self.has_image else []
    if self.text:
      content.append({"type": "text", "text": self.text})
    return {"role": "tool", "content": content}


def _truncate_middle(text: str, max_chars: int) -> str:
  """Shorten long text, keeping start and end (a traceback's last line is the most useful)."""
  if len(text) <= max_chars:
    return text
  head = max_chars // 3
  tail = max_chars - head - 30
  return f"{text[:head]}\n... [{len(text) - head - tail} characters cut] ...\n{text[-tail:]}"


def make_tool_response(
  call: ToolCall,
  render: Any | None = None,
  feedback: str | None = None,
  *,
  max_error_chars: int = 1500,
) -> ToolResponse:
  """Build the tool response for a call: the judge's feedback with the image, or the error text.

  `render` is duck-typed like env.types.RenderResult (`.status`, `.message`); it is required when
  the call was executable.
  """
  if call.status is CallStatus.SKIPPED:
    return ToolResponse(text=call.message, has_image=False, status="skipped")
  if not call.executable:
    text = f"Invalid tool call ({call.status.value}): {call.message}"
    return ToolResponse(
      text=_truncate_middle(text, max_error_chars), has_image=False, status="invalid_call"
    )
  if render is None:
    raise ValueError("an executable tool call needs its render result")
  status = str(getattr(render, "status", "ok"))
  note = f"Note: {call.message}\n" if call.message else ""
  if status != "ok":
    message = str(getattr(render, "message", "") or status)
    text = f"{note}Execution failed ({status}): {message}"
    return ToolResponse(
      text=_truncate_middle(text, max_error_chars), has_image=False, status="render_error"
    )
  return ToolResponse(text=f"{note}{feedback or ''}".strip(), has_image=True, status="ok")


def format_tool_response(
  response: ToolResponse, *, image_placeholder: str = IMAGE_PLACEHOLDER, suffix: str = ""
) -> str:
  """Format a ToolResponse as Qwen2.5 tool-response text; the image placeholder comes first."""
  parts = []
  if response.has_image:
    parts.append(image_placeholder)
  if response.text:
    parts.append(response.text)
  if suffix:
    parts.append(suffix)
  return "<tool_response>\n" + "\n".join(parts) + "\n</tool_response>"
