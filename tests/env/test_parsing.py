"""Tests for rrvf_jax.env.parsing: tool calls, answers, turn issues, tool responses."""

import dataclasses
import json

import pytest

from rrvf_jax.env import parsing
from rrvf_jax.env.parsing import (
  CHART_TOOL,
  WEB_TOOL,
  AnswerStatus,
  CallStatus,
  ToolResponse,
  TurnIssue,
  extract_code,
  format_tool_response,
  make_tool_response,
  parse_tool_call,
  parse_turn,
)

CODE = 'import matplotlib.pyplot as plt\nplt.plot([1, 2], [3, 4])\nplt.title("Sales")'


def good_call(code: str = CODE, name: str = "render_chart") -> str:
  """A strictly well-formed tool-call body."""
  return json.dumps({"name": name, "arguments": {"code": code}})


# One body per malformation class, each with the status it must get and whether its code survives.
MALFORMED = [
  ("ok", good_call(), CallStatus.OK, CODE),
  (
    "raw newline in string",
    '{"name": "render_chart", "arguments": {"code": "import x\nplt.plot([1])"}}',
    CallStatus.RAW_CONTROL_CHARS,
    "import x\nplt.plot([1])",
  ),
  (
    "single quotes",
    "{'name': 'render_chart', 'arguments': {'code': 'plt.title(\"a\")\\nplt.show()'}}",
    CallStatus.SINGLE_QUOTES,
    'plt.title("a")\nplt.show()',
  ),
  (
    "trailing comma",
    '{"name": "render_chart", "arguments": {"code": "plt.plot([1])",},}',
    CallStatus.TRAILING_COMMA,
    "plt.plot([1])",
  ),
  (
    "invalid escape",
    r'{"name": "render_chart", "arguments": {"code": "plt.title(r\"$\alpha\d$\")"}}',
    CallStatus.INVALID_ESCAPE,
    r'plt.title(r"$\alpha\d$")',
  ),
  (
    "python literal",
    '{"name": "render_chart", "arguments": {"code": "x = 1", "debug": True}}',
    CallStatus.PYTHON_LITERAL,
    "x = 1",
  ),
  (
    "json in a fence with prose",
    'Here it is:\n```json\n{"name": "render_chart", "arguments": {"code": "x = 1"}}\n```',
    CallStatus.EXTRA_TEXT,
    "x = 1",
  ),
  (
    "arguments as a string",
    json.dumps({"name": "render_chart", "arguments": json.dumps({"code": "x = 1"})}),
    CallStatus.ARGUMENTS_AS_STRING,
    "x = 1",
  ),
  (
    "unescaped quotes",
    '{"name": "render_chart", "arguments": {"code": "plt.title("Hi")\\nplt.show()"}}',
    CallStatus.UNESCAPED_QUOTES,
    'plt.title("Hi")\nplt.show()',
  ),
  (
    "code fence instead of json",
    "```python\nx = 1\ny = 2\n```",
    CallStatus.CODE_FENCE,
    "x = 1\ny = 2",
  ),
  ("missing name", '{"arguments": {"code": "x = 1"}}', CallStatus.MISSING_NAME, "x = 1"),
  ("empty", "  \n ", CallStatus.EMPTY, None),
  ("not json at all", "import matplotlib", CallStatus.INVALID_JSON, None),
  (
    "truncated json",
    '{"name": "render_chart", "arguments": {"code": ',
    CallStatus.INVALID_JSON,
    None,
  ),
  ("not an object", "[1, 2, 3]", CallStatus.NOT_AN_OBJECT, None),
  ("unknown tool", good_call(name="draw"), CallStatus.UNKNOWN_TOOL, None),
  ("no arguments", '{"name": "render_chart"}', CallStatus.MISSING_ARGUMENTS, None),
  (
    "arguments not an object",
    '{"name": "render_chart", "arguments": 3}',
    CallStatus.BAD_ARGUMENTS,
    None,
  ),
  (
    "no code key",
    '{"name": "render_chart", "arguments": {"src": "x"}}',
    CallStatus.MISSING_CODE,
    None,
  ),
  (
    "empty code",
    '{"name": "render_chart", "arguments": {"code": "  "}}',
    CallStatus.EMPTY_CODE,
    None,
  ),
]


@pytest.mark.parametrize(
  "body, status, code", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_each_call_class_gets_its_status(body, status, code):
  call = parse_tool_call(body, (CHART_TOOL,))
  assert call.status is status, call.message
  assert call.code == code
  assert call.executable == (code is not None)
  assert call.ok == (status is CallStatus.OK)
  # A bad call always explains itself.
  if status is not CallStatus.OK:
    assert call.message


def test_malformation_statuses_are_distinct():
  statuses = [m[2] for m in MALFORMED if m[2] is not CallStatus.INVALID_JSON]
  assert len(statuses) == len(set(statuses))


def test_repairs_accumulate_and_status_is_the_first():
  body = "{'name': 'render_chart', 'arguments': {'code': 'x = 1',},}"
  call = parse_tool_call(body)
  assert call.repairs == (CallStatus.SINGLE_QUOTES, CallStatus.TRAILING_COMMA)
  assert call.status is CallStatus.SINGLE_QUOTES
  assert call.code == "x = 1"
  assert "single-quoted" in call.message and "trailing comma" in call.message


def test_fenced_code_inside_arguments_is_unwrapped_and_ok():
  call = parse_tool_call(good_call("```python\nimport numpy as np\n```"))
  assert call.status is CallStatus.OK
  assert call.code == "import numpy as np"


def test_code_argument_aliases_and_web_tool():
  call = parse_tool_call(
    json.dumps({"name": "render_html", "arguments": {"html_code": "<html></html>"}}), (WEB_TOOL,)
  )
  assert call.ok and call.code == "<html></html>" and call.name == "render_html"


def test_the_papers_tool_names_are_accepted():
  # Regression: the paper's `html_render_and_compare_tool` (argument `html_code`) was rejected as
  # an unknown tool, so a policy trained on the paper's format got no render.
  body = json.dumps(
    {"name": "html_render_and_compare_tool", "arguments": {"html_code": "<p>Hi</p>"}}
  )
  turn = parse_turn(f"<think>a page</think>\n<tool_call>\n{body}\n</tool_call>", "web")
  (call,) = turn.tool_calls
  assert call.ok and call.executable and call.code == "<p>Hi</p>"
  chart = json.dumps({"name": "chart_render_and_compare_tool", "arguments": {"python_code": "x"}})
  assert parse_tool_call(chart).ok
  unknown = parse_tool_call(json.dumps({"name": "draw", "arguments": {"code": "x"}}))
  assert unknown.status is CallStatus.UNKNOWN_TOOL and "render_chart" in unknown.message
  assert "chart_render_and_compare_tool" not in unknown.message  # aliases stay unadvertised


def test_html_with_unescaped_attribute_quotes_is_salvaged():
  body = '{"name": "render_html", "arguments": {"code": "<div class="card">Hi {x}</div>"}}'
  call = parse_tool_call(body, (WEB_TOOL,))
  assert call.status is CallStatus.UNESCAPED_QUOTES
  assert call.code == '<div class="card">Hi {x}</div>' and call.name == "render_html"


def test_two_objects_in_one_call_take_the_first():
  body = good_call("x = 1") + "\n" + good_call("y = 2")
  call = parse_tool_call(body)
  assert call.status is CallStatus.EXTRA_TEXT and call.code == "x = 1"


def test_missing_name_with_several_tools_is_an_error():
  call = parse_tool_call('{"arguments": {"code": "x"}}', (CHART_TOOL, WEB_TOOL))
  assert call.status is CallStatus.NAME_REQUIRED and not call.executable


def test_unicode_escape_and_real_escapes_survive():
  call = parse_tool_call(good_call('plt.title("caf\u00e9 \\\\ end")\n'))
  assert call.ok
  assert call.code == 'plt.title("café \\\\ end")'


def test_extract_code_prefers_the_language_and_handles_unclosed_fences():
  text = "```text\nnot this\n```\nthen\n```python\nthis = 1\n```"
  assert extract_code(text, "python") == "this = 1"
  assert extract_code("```py\nprint(1)\n```", "python") == "print(1)"
  assert extract_code("no fence here  ") == "no fence here"
  assert extract_code("```python\nx = 1\ny = 2", "python") == "x = 1\ny = 2"
  assert extract_code("```html\n<p>a</p>\n```", "html") == "<p>a</p>"


# ------------------------------------------------------------------------------------------------
# Turns.


def test_well_formed_tool_turn():
  text = f"<think>I see a line chart.</think>\n<tool_call>\n{good_call()}\n</tool_call>"
  turn = parse_turn(text, "chart")
  assert turn.issues == ()
  assert turn.action == "tool_call"
  assert turn.think == "I see a line chart."
  assert len(turn.tool_calls) == 1 and turn.tool_calls[0].ok
  assert turn.answer is None


def test_well_formed_answer_turn():
  turn = parse_turn(f"<think>done</think>\n<answer>\n```python\n{CODE}\n```\n</answer>")
  assert turn.issues == ()
  assert turn.action == "answer"
  assert turn.answer.status is AnswerStatus.OK
  assert turn.answer.code == CODE


def test_tags_inside_think_are_not_actions():
  text = (
    "<think>maybe <tool_call>{}</tool_call> or <answer>x</answer></think>"
    f"<tool_call>{good_call()}</tool_call>"
  )
  turn = parse_turn(text)
  assert turn.issues == ()
  assert [c.status for c in turn.tool_calls] == [CallStatus.OK]


@pytest.mark.parametrize(
  "text, issue",
  [
    (f"<tool_call>{good_call()}</tool_call>", TurnIssue.MISSING_THINK),
    (f"<think>a<tool_call>{good_call()}</tool_call>", TurnIssue.UNBALANCED_THINK),
    (
      f"<think>a</think></tool_call><tool_call>{good_call()}</tool_call>",
      TurnIssue.UNBALANCED_TOOL_CALL,
    ),
    (
      f"<think>a</think><tool_call>{good_call()}</tool_call><tool_call>{good_call()}</tool_call>",
      TurnIssue.MULTIPLE_TOOL_CALLS,
    ),
    ("<think>a</think><answer>x = 1</answer><answer>y = 2</answer>", TurnIssue.MULTIPLE_ANSWERS),
    ("<think>a</think><answer>x = 1", TurnIssue.UNCLOSED_ANSWER),
    (
      f"<think>a</think><tool_call>{good_call()}</tool_call><answer>x = 1</answer>",
      TurnIssue.TOOL_CALL_AND_ANSWER,
    ),
    ("<think>a</think> I am not sure what to do.", TurnIssue.NO_ACTION),
  ],
  ids=lambda v: v.value if isinstance(v, TurnIssue) else "",
)
def test_turn_issues(text, issue):
  assert issue in parse_turn(text).issues


def test_unbalanced_think_still_finds_the_call():
  turn = parse_turn(f"<think>forgot to close <tool_call>{good_call()}</tool_call>")
  assert TurnIssue.UNBALANCED_THINK in turn.issues
  assert turn.tool_calls[0].ok


def test_unclosed_tool_call_is_recovered_and_reported():
  turn = parse_turn(f"<think>a</think>\n<tool_call>\n{good_call()}\n")
  (call,) = turn.tool_calls
  assert call.status is CallStatus.UNCLOSED_TAG
  assert call.executable and call.code == CODE
  cut = parse_turn('<think>a</think><tool_call>{"name": "render_chart", "arguments": {"code": "x')
  assert not cut.tool_calls[0].executable


def test_extra_calls_are_marked_skipped_not_dropped():
  text = "<think>a</think>" + "".join(
    f"<tool_call>{good_call(f'x={i}')}</tool_call>" for i in range(3)
  )
  turn = parse_turn(text)
  assert [c.status for c in turn.tool_calls] == [
    CallStatus.OK,
    CallStatus.SKIPPED,
    CallStatus.SKIPPED,
  ]
  assert turn.tool_calls[2].code == "x=2"
  assert not turn.tool_calls[1].executable
  assert len(parse_turn(text, max_calls_per_turn=3).tool_calls) == 3


def test_trailing_stop_tokens_are_ignored():
  turn = parse_turn("<think>a</think><answer>```python\nx = 1\n```<|im_end|>\n")
  assert TurnIssue.UNCLOSED_ANSWER in turn.issues and turn.answer.code == "x = 1"
  turn = parse_turn("<think>a</think><answer>x = 1</answer><|im_end|>")
  assert turn.issues == () and turn.answer.code == "x = 1"


def test_multiple_answers_keep_the_last_and_unclosed_answer_recovers_code():
  turn = parse_turn("<think>a</think><answer>x = 1</answer><answer>y = 2</answer>")
  assert turn.answer.code == "y = 2"
  turn = parse_turn("<think>a</think><answer>```python\nx = 1\n")
  assert turn.answer.status is AnswerStatus.UNCLOSED and turn.answer.code == "x = 1"
  assert parse_turn("<think>a</think><answer> </answer>").answer.status is AnswerStatus.EMPTY


def test_web_answer_takes_html_fence():
  turn = parse_turn("<think>a</think><answer>Here:\n```html\n<p>hi</p>\n```</answer>", "web")
  assert turn.answer.code == "<p>hi</p>"


# ------------------------------------------------------------------------------------------------
# Tool responses and schema.


@dataclasses.dataclass
class FakeRender:
  status: str
  message: str = ""


def test_tool_response_success_has_image_and_feedback():
  call = parse_tool_call(good_call())
  resp = make_tool_response(call, FakeRender("ok"), "---Comments:\n-**Layout**- fine")
  assert resp == ToolResponse(text="---Comments:\n-**Layout**- fine", has_image=True, status="ok")
  text = format_tool_response(resp)
  assert text == (
    "<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>\n"
    "---Comments:\n-**Layout**- fine\n</tool_response>"
  )
  assert format_tool_response(resp, image_placeholder="<IMG>").startswith(
    "<tool_response>\n<IMG>\n"
  )


def test_tool_response_render_error_has_no_image_and_the_message():
  call = parse_tool_call(good_call())
  resp = make_tool_response(call, FakeRender("runtime_error", "NameError: name 'x' is not defined"))
  assert not resp.has_image and resp.status == "render_error"
  assert resp.text == "Execution failed (runtime_error): NameError: name 'x' is not defined"
  assert "<|image_pad|>" not in format_tool_response(resp)


def test_tool_response_long_errors_keep_the_last_line():
  call = parse_tool_call(good_call())
  message = "Traceback:\n" + "  frame\n" * 1000 + "ValueError: the real reason"
  resp = make_tool_response(call, FakeRender("runtime_error", message), max_error_chars=300)
  assert len(resp.text) < 400 and resp.text.endswith("ValueError: the real reason")


def test_tool_response_invalid_call_and_repaired_note():
  bad = parse_tool_call('{"name": "render_chart"}')
  resp = make_tool_response(bad)
  assert resp.status == "invalid_call" and not resp.has_image
  assert "missing_arguments" in resp.text
  repaired = parse_tool_call("{'name': 'render_chart', 'arguments': {'code': 'x = 1'}}")
  resp = make_tool_response(repaired, FakeRender("ok"), "---Comments: ok")
  assert resp.has_image and resp.text.startswith("Note: ") and "single-quoted" in resp.text
  with pytest.raises(ValueError):
    make_tool_response(parse_tool_call(good_call()))


def test_tool_response_message_form():
  resp = ToolResponse(text="fb", has_image=True, status="ok")
  assert resp.to_message() == {
    "role": "tool",
    "content": [{"type": "image"}, {"type": "text", "text": "fb"}],
  }
  no_image = ToolResponse(text="err", has_image=False, status="render_error")
  assert no_image.to_message()["content"] == [{"type": "text", "text": "err"}]


def test_tool_schema_is_json_serialisable_data():
  (schema,) = parsing.tool_schemas("chart")
  assert schema["function"]["name"] == "render_chart"
  assert schema["function"]["parameters"]["required"] == ["code"]
  json.dumps(parsing.tool_schemas("web"))
  with pytest.raises(ValueError):
    parsing.tool_for_kind("video")


def test_round_trip_with_the_chat_formatter():
  # What the processing side writes for a tool call must parse back to the same code.
  from rrvf_jax.processing.chat import format_tool_call

  text = "<think>a</think>\n" + format_tool_call("render_chart", {"code": CODE})
  turn = parse_turn(text)
  assert turn.issues == () and turn.tool_calls[0].code == CODE
