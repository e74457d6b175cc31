"""Chat format: parity with the Qwen2-VL and Qwen2.5 templates, loss masks, per-turn appends."""

import numpy as np
import pytest

from rrvf_jax.processing import chat, tokens

transformers = pytest.importorskip("transformers")

# Qwen2.5-Instruct's chat template (tokenizer_config.json), verbatim: the tool-calling reference.
QWEN2_5_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""  # noqa: E501
QWEN2_5_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

TOOLS = [
  {
    "type": "function",
    "function": {
      "name": "render_chart",
      "description": "Render matplotlib code and return the image.",
      "parameters": {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "Python code"}},
        "required": ["code"],
      },
    },
  }
]

TEXT_MESSAGES = [
  {"role": "user", "content": "Write matplotlib code for a bar chart."},
  {"role": "assistant", "content": "<think>\nFour bars.\n</think>\n<answer>plt.bar(x, y)</answer>"},
  {"role": "user", "content": "Now make the bars red, please!"},
]

IMAGE_MESSAGES = [
  {"role": "system", "content": "You turn charts into code."},
  {
    "role": "user",
    "content": [{"type": "image"}, {"type": "text", "text": "Reproduce this chart."}],
  },
  {"role": "assistant", "content": "<think>\nA line plot.\n</think>\n<answer>plt.plot(x)</answer>"},
  {
    "role": "user",
    "content": [
      {"type": "text", "text": "Compare "},
      {"type": "image", "image": "a.png"},
      {"type": "text", "text": " with "},
      {"type": "image_url", "image_url": "b.png"},
      {"type": "text", "text": ". Which is closer?"},
    ],
  },
]
IMAGE_GRIDS = [(1, 4, 6), (1, 2, 2), (1, 8, 4)]

CODE_1 = "import matplotlib.pyplot as plt\nplt.bar([1, 2], [3, 4])"
TOOL_MESSAGES = [
  {"role": "system", "content": "You are a chart-to-code assistant."},
  {"role": "user", "content": "Reproduce the chart."},
  {
    "role": "assistant",
    "content": "<think>\nBars first.\n</think>",
    "tool_calls": [
      {"type": "function", "function": {"name": "render_chart", "arguments": {"code": CODE_1}}}
    ],
  },
  {"role": "tool", "content": "Rendered. The colors differ: use red."},
  {
    "role": "assistant",
    "content": "",
    "tool_calls": [
      {"function": {"name": "render_chart", "arguments": {"code": "plt.bar([1], [2], color='r')"}}},
      {"name": "render_chart", "arguments": {"code": "print('é')"}},
    ],
  },
  {"role": "tool", "content": "Score: 90."},
  {"role": "tool", "content": "Error: NameError: name 'plt' is not defined"},
  {"role": "assistant", "content": "<answer>plt.bar([1], [2], color='r')</answer>"},
]
# The assistant turns of TOOL_MESSAGES as they must appear in the token stream, written out by hand.
TOOL_ASSISTANT_TEXTS = [
  "<think>\nBars first.\n</think>\n<tool_call>\n"
  '{"name": "render_chart", "arguments": {"code": "import matplotlib.pyplot as plt\\n'
  'plt.bar([1, 2], [3, 4])"}}\n</tool_call><|im_end|>',
  '<tool_call>\n{"name": "render_chart", "arguments": {"code": "plt.bar([1], [2], '
  "color='r')\"}}\n</tool_call>\n<tool_call>\n"
  '{"name": "render_chart", "arguments": {"code": "print(\'é\')"}}\n</tool_call><|im_end|>',
  "<answer>plt.bar([1], [2], color='r')</answer><|im_end|>",
]


def _expand(text, grids):
  """Replaces the i-th `<|image_pad|>` by t*h*w/4 pads, as the HF processor does."""
  pieces = text.split(tokens.IMAGE_PAD)
  assert len(pieces) == len(grids) + 1
  out = pieces[0]
  for grid, piece in zip(grids, pieces[1:], strict=True):
    out += tokens.IMAGE_PAD * (int(np.prod(grid)) // 4) + piece
  return out


def _hf_ids(hf_tok, text):
  return hf_tok.encode(text, add_special_tokens=False)


def _masked_runs(enc):
  """Contiguous runs of loss_mask == 1, as (start, end)."""
  m = np.concatenate([[0], enc.loss_mask, [0]])
  d = np.diff(m)
  return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True))


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("with_system", [False, True])
def test_text_conversation_matches_qwen2_vl_template(
  tok, hf_tok, add_generation_prompt, with_system
):
  messages = TEXT_MESSAGES
  if with_system:
    messages = [{"role": "system", "content": "Be brief."}, *messages]
  want = hf_tok.apply_chat_template(
    messages, tokenize=False, add_generation_prompt=add_generation_prompt
  )
  assert chat.render_conversation(messages, add_generation_prompt=add_generation_prompt) == want
  enc = chat.encode_conversation(tok, messages, add_generation_prompt=add_generation_prompt)
  assert enc.input_ids.dtype == np.int32
  assert enc.input_ids.tolist() == _hf_ids(hf_tok, want)
  assert not enc.mm_token_type_ids.any() and enc.image_spans == ()


@pytest.mark.parametrize("add_vision_id", [False, True])
def test_image_conversation_matches_template_and_processor_expansion(tok, hf_tok, add_vision_id):
  want = hf_tok.apply_chat_template(
    IMAGE_MESSAGES, tokenize=False, add_generation_prompt=True, add_vision_id=add_vision_id
  )
  got = chat.render_conversation(
    IMAGE_MESSAGES, add_generation_prompt=True, add_vision_id=add_vision_id
  )
  assert got == want
  assert ("Picture 3: " in want) == add_vision_id
  expanded = _expand(want, IMAGE_GRIDS)
  assert (
    chat.render_conversation(
      IMAGE_MESSAGES,
      image_grids=IMAGE_GRIDS,
      add_generation_prompt=True,
      add_vision_id=add_vision_id,
    )
    == expanded
  )
  enc = chat.build_prompt_ids(
    tok, IMAGE_MESSAGES, image_grids=IMAGE_GRIDS, add_vision_id=add_vision_id
  )
  assert enc.input_ids.tolist() == _hf_ids(hf_tok, expanded)


def test_image_tokens_spans_and_token_types(tok):
  ids = tokens.special_token_ids(tok)
  enc = chat.build_prompt_ids(tok, IMAGE_MESSAGES, image_grids=np.asarray(IMAGE_GRIDS))
  is_pad = enc.input_ids == ids.image_pad
  np.testing.assert_array_equal(enc.mm_token_type_ids, is_pad.astype(np.int32))
  assert [e - s for s, e in enc.image_spans] == [6, 1, 8]
  for s, e in enc.image_spans:
    assert is_pad[s:e].all()
    assert enc.input_ids[s - 1] == ids.vision_start and enc.input_ids[e] == ids.vision_end
  assert is_pad.sum() == 15
  assert not enc.loss_mask[is_pad].any()


def test_tool_conversation_matches_qwen2_5_template(tok, hf_tok):
  want = hf_tok.apply_chat_template(
    TOOL_MESSAGES, tools=TOOLS, chat_template=QWEN2_5_TEMPLATE, tokenize=False
  )
  assert chat.render_conversation(TOOL_MESSAGES, tools=TOOLS) == want
  # Consecutive tool results share one user turn.
  assert "</tool_response>\n<tool_response>\nError" in want
  enc = chat.encode_conversation(tok, TOOL_MESSAGES, tools=TOOLS)
  assert enc.input_ids.tolist() == _hf_ids(hf_tok, want)
  # Without a system message, a default one carries the tools block.
  want = hf_tok.apply_chat_template(
    TOOL_MESSAGES[1:],
    tools=TOOLS,
    chat_template=QWEN2_5_TEMPLATE,
    tokenize=False,
    add_generation_prompt=True,
  )
  got = chat.render_conversation(
    TOOL_MESSAGES[1:],
    tools=TOOLS,
    system_prompt=QWEN2_5_DEFAULT_SYSTEM,
    add_generation_prompt=True,
  )
  assert got == want


def test_tools_system_prompt_text():
  got = chat.format_tools_system_prompt("SYS", TOOLS)
  assert got == (
    "SYS\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "render_chart", "description": "Render matplotlib '
    'code and return the image.", "parameters": {"type": "object", "properties": {"code": '
    '{"type": "string", "description": "Python code"}}, "required": ["code"]}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
  )


def test_tool_response_with_image_renders_inside_the_block(tok):
  messages = [
    {"role": "user", "content": "Draw it."},
    {"role": "assistant", "content": "<tool_call>\n{}\n</tool_call>"},
    {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Score 60."}]},
  ]
  got = chat.render_conversation(messages, image_grids=[(1, 2, 4)], add_generation_prompt=True)
  assert got.endswith(
    "<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
    "Score 60.\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
  )
  enc = chat.build_prompt_ids(tok, messages, image_grids=[(1, 2, 4)])
  assert enc.turns[-2].role == "user" and enc.turns[-2].messages == (2,)
  assert len(enc.image_spans) == 1 and enc.turns[-2].start < enc.image_spans[0][0]


def test_loss_mask_is_one_exactly_on_assistant_replies(tok):
  enc = chat.encode_conversation(tok, TOOL_MESSAGES, tools=TOOLS)
  runs = _masked_runs(enc)
  texts = [tokens.decode(tok, enc.input_ids[s:e], skip_special_tokens=False) for s, e in runs]
  assert texts == TOOL_ASSISTANT_TEXTS
  im_end = tokens.special_token_ids(tok).im_end
  for _, e in runs:
    assert enc.input_ids[e - 1] == im_end  # the reply's stop token is trained on
    assert enc.input_ids[e] == tokens.encode_text(tok, "\n")[0]  # the newline after it is not
  # Everything outside the replies (system, tools block, user, tool results, headers) is 0.
  outside = tokens.decode(tok, enc.input_ids[enc.loss_mask == 0], skip_special_tokens=False)
  assert "<tool_response>" in outside and "<|im_start|>assistant\n" in outside
  assert "Bars first" not in outside


def test_loss_mask_with_images_and_turns(tok):
  enc = chat.encode_conversation(tok, IMAGE_MESSAGES, image_grids=IMAGE_GRIDS)
  texts = [
    tokens.decode(tok, enc.input_ids[s:e], skip_special_tokens=False) for s, e in _masked_runs(enc)
  ]
  assert texts == [IMAGE_MESSAGES[2]["content"] + "<|im_end|>"]
  assert [(t.role, t.messages) for t in enc.turns] == [
    ("system", (0,)),
    ("user", (1,)),
    ("assistant", (2,)),
    ("user", (3,)),
  ]
  im_start = tokens.special_token_ids(tok).im_start
  for t in enc.turns:
    assert enc.input_ids[t.start] == im_start
    header = tokens.decode(tok, enc.input_ids[t.start : t.body_start], skip_special_tokens=False)
    assert header == f"<|im_start|>{t.role}\n"
  assistant = enc.turns[2]
  assert enc.loss_mask[assistant.body_start : assistant.end].all()
  assert not enc.loss_mask[: assistant.body_start].any()
  assert not enc.loss_mask[assistant.end :].any()


def test_tool_turns_group_merged_messages(tok):
  enc = chat.build_prompt_ids(tok, TOOL_MESSAGES[:-1], tools=TOOLS)
  assert [(t.role, t.messages, t.end is None) for t in enc.turns] == [
    ("system", (0,), False),
    ("user", (1,), False),
    ("assistant", (2,), False),
    ("user", (3,), False),
    ("assistant", (4,), False),
    ("user", (5, 6), False),
    ("assistant", (), True),  # the open generation header
  ]
  assert enc.turns[-1].body_start == len(enc)


def _rrvf_episode():
  """A multi-turn RRVF-style episode: target image, tool calls, rendered images in tool results."""
  call = '<tool_call>\n{"name": "render_chart", "arguments": {"code": "plt.bar([1], [2])"}}\n'
  messages = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Reproduce it."}]},
    {"role": "assistant", "content": "<think>\nbars\n</think>\n" + call + "</tool_call>"},
    {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Score 60. Red."}]},
    {"role": "assistant", "content": call + "</tool_call>"},
    {"role": "tool", "content": "Error: NameError"},
    {"role": "tool", "content": [{"type": "image"}]},
    {"role": "assistant", "content": "<answer>plt.bar([1], [2], color='r')</answer>"},
  ]
  return messages, [(1, 4, 4), (1, 2, 6), (1, 4, 2)]


def test_per_turn_pieces_concatenate_to_the_whole_conversation(tok):
  messages, grids = _rrvf_episode()
  whole = chat.encode_conversation(tok, messages, image_grids=grids, tools=TOOLS)
  pieces = [
    chat.build_prompt_ids(tok, messages[:1], image_grids=grids[:1], tools=TOOLS),
    chat.encode_assistant_reply(tok, messages[1]),
    chat.append_turn_ids(tok, messages[2:3], image_grids=grids[1:2]),
    chat.encode_assistant_reply(tok, messages[3]),
    chat.append_turn_ids(tok, messages[4:6], image_grids=grids[2:3]),
    chat.encode_assistant_reply(tok, messages[6]),
    chat.append_turn_ids(tok, [], add_generation_prompt=False),  # the final newline
  ]
  joined = chat.concatenate(pieces)
  np.testing.assert_array_equal(joined.input_ids, whole.input_ids)
  np.testing.assert_array_equal(joined.loss_mask, whole.loss_mask)
  np.testing.assert_array_equal(joined.mm_token_type_ids, whole.mm_token_type_ids)
  assert joined.image_spans == whole.image_spans
  assert [(t.role, t.start, t.body_start) for t in joined.turns] == [
    (t.role, t.start, t.body_start) for t in whole.turns
  ]
  # Only the replies are trained on, and each appended piece is untrained.
  assert all(p.loss_mask.all() for p in pieces[1::2])
  assert not any(p.loss_mask.any() for p in pieces[0::2])
  # An appended turn ends with the next assistant header, ready for sampling.
  header = tokens.decode(tok, pieces[2].input_ids[-3:], skip_special_tokens=False)
  assert header.endswith("<|im_start|>assistant\n")
  assert tokens.decode(tok, pieces[2].input_ids[:1], skip_special_tokens=False) == "\n"


def test_reply_with_leading_whitespace_keeps_sampler_boundaries(tok):
  # The body is encoded apart from the `assistant\n` header, exactly as a sampler produces it.
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\n  hello"}]
  whole = chat.encode_conversation(tok, messages)
  prompt = chat.build_prompt_ids(tok, messages[:1])
  reply = [*tokens.encode_text(tok, "\n\n  hello"), tokens.special_token_ids(tok).im_end]
  n = len(prompt)
  assert whole.input_ids[:n].tolist() == prompt.input_ids.tolist()
  assert whole.input_ids[n : n + len(reply)].tolist() == reply
  assert whole.loss_mask[n : n + len(reply)].all()
  # The documented exception: a whole-string tokenisation would merge the header's newline with
  # the body's leading newlines, so it differs here.
  assert whole.input_ids.tolist() != tokens.encode_text(tok, chat.render_conversation(messages))


def test_user_text_with_leading_newlines_matches_hf(tok, hf_tok):
  messages = [{"role": "user", "content": "\n\n  indented"}]
  want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  enc = chat.build_prompt_ids(tok, messages)
  assert enc.input_ids.tolist() == _hf_ids(hf_tok, want)
  user = enc.turns[1]
  assert user.start < user.body_start < user.end


def test_close_open_turn_for_a_truncated_reply(tok):
  piece = chat.append_turn_ids(tok, [{"role": "tool", "content": "timeout"}], close_open_turn=True)
  text = tokens.decode(tok, piece.input_ids, skip_special_tokens=False)
  assert text == (
    "<|im_end|>\n<|im_start|>user\n<tool_response>\ntimeout\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
  )
  assert not piece.loss_mask.any()


def test_decode_skips_special_tokens_but_keeps_tool_calls(tok):
  enc = chat.encode_conversation(tok, TOOL_MESSAGES, tools=TOOLS)
  s, e = _masked_runs(enc)[0]
  assert chat.decode(tok, enc.input_ids[s:e]) == TOOL_ASSISTANT_TEXTS[0].removesuffix("<|im_end|>")


def test_errors(tok):
  one_image = [{"role": "user", "content": [{"type": "image"}]}]
  with pytest.raises(ValueError, match="grids"):
    chat.encode_conversation(tok, one_image)
  with pytest.raises(ValueError, match="grids"):
    chat.encode_conversation(tok, one_image, image_grids=[(1, 2, 2), (1, 2, 2)])
  with pytest.raises(ValueError, match="role"):
    chat.encode_conversation(tok, [{"role": "robot", "content": "x"}])
  with pytest.raises(ValueError, match="video"):
    chat.encode_conversation(tok, [{"role": "user", "content": [{"type": "video"}]}])
  with pytest.raises(ValueError, match="system"):
    chat.encode_conversation(tok, TEXT_MESSAGES, tools=TOOLS, system_prompt=None)
  with pytest.raises(ValueError, match="assistant"):
    chat.encode_assistant_reply(tok, {"role": "user", "content": "x"})


def test_no_system_block_when_asked(tok):
  got = chat.render_conversation(TEXT_MESSAGES[:1], system_prompt=None)
  assert got == "<|im_start|>user\nWrite matplotlib code for a bar chart.<|im_end|>\n"


def test_untrained_text_keeps_the_ids_and_masks_the_tokens_touching_it(tok):
  # A draft whose defect ('tab:red') must not be learned: the body is tokenised as one run, so
  # the ids equal the plain conversation's; only tokens touching the marked text get mask 0.
  draft = '<think>try</think>\n<tool_call>\n{"name": "render_chart", "arguments": {"code": '
  bad, rest = "\"plt.bar([1], [2], color='tab:red')", '"}}\n</tool_call>'
  plain = [
    {"role": "user", "content": "Draw it."},
    {"role": "assistant", "content": draft + bad + rest},
  ]
  marked = [
    plain[0],
    {
      "role": "assistant",
      "content": [
        {"type": "text", "text": draft + bad[:-9]},
        {"type": "text", "text": "tab:red", "loss": False},
        {"type": "text", "text": bad[-2:] + rest},
      ],
    },
  ]
  a = chat.encode_conversation(tok, plain, tools=TOOLS)
  b = chat.encode_conversation(tok, marked, tools=TOOLS)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  dropped = np.flatnonzero(a.loss_mask != b.loss_mask)
  assert len(dropped) and np.all(a.loss_mask[dropped] == 1) and np.all(b.loss_mask[dropped] == 0)
  text = tokens.decode(tok, a.input_ids[dropped], skip_special_tokens=False)
  assert "red" in text and "bar" not in text and "think" not in text
  # The tokens around the defect are still learned, and so is the closing <|im_end|>.
  kept = tokens.decode(tok, b.input_ids[b.loss_mask == 1], skip_special_tokens=False)
  assert "plt.bar" in kept and kept.endswith("</tool_call><|im_end|>")
  assert chat.render_conversation(marked, tools=TOOLS) == chat.render_conversation(
    plain, tools=TOOLS
  )


def test_untrained_marks_only_apply_to_trained_turns(tok):
  user = [{"role": "user", "content": [{"type": "text", "text": "hi", "loss": False}]}]
  enc = chat.encode_conversation(tok, user)
  assert enc.loss_mask.sum() == 0


def test_fit_appended_turn_cuts_text_until_the_piece_fits(tok):
  text = "Comments: " + " ".join(f"item {i} differs in colour" for i in range(60))
  messages = [{"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
  grids = [(1, 4, 4)]
  whole = chat.append_turn_ids(tok, messages, image_grids=grids)
  same, piece = chat.fit_appended_turn(tok, messages, max_tokens=len(whole), image_grids=grids)
  assert same == messages and len(piece) == len(whole)
  fitted, piece = chat.fit_appended_turn(tok, messages, max_tokens=40, image_grids=grids)
  assert len(piece) <= 40 and len(piece) >= 30  # as long as fits, not much shorter
  kept = fitted[0]["content"][1]["text"]
  assert kept.startswith("Comments:") and "[...]" in kept and kept.endswith("colour")
  again, _ = chat.fit_appended_turn(tok, messages, max_tokens=40, image_grids=grids)
  assert again == fitted  # deterministic
  with pytest.raises(ValueError, match="images and template alone"):
    chat.fit_appended_turn(tok, messages, max_tokens=5, image_grids=grids)
