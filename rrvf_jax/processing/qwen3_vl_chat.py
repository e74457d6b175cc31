r"""Qwen3-VL chat format (the hub's Instruct and Thinking templates), token-exact, with loss masks.

The same API and result (`EncodedConversation`) as `processing.chat`, built with its encoder; what
differs is what the Qwen3-VL templates render:

- no default system prompt: a system block comes only from a system message or `system_prompt`,
  and tools without either make a system block that starts at "# Tools";
- a tool call's arguments given as a JSON string are pasted as they are;
- a later system message is dropped (Instruct) or rendered as its own block (Thinking);
- Thinking: the generation prompt is `<|im_start|>assistant\n<think>\n`, and assistant turns after
  the last user query are rendered `<think>\n{reasoning}\n</think>\n\n{content}` (reasoning from
  `reasoning_content`, or split off the content at `</think>`); earlier turns lose their reasoning.

The `<think>\n` after an assistant header belongs to the prompt, as the sampler sees it: it is not
trained and the turn's body starts after it. For the conversations the RRVF pipeline builds (a
system prompt, tools with JSON-object arguments) the Instruct rendering equals `processing.chat`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rrvf_jax.processing import chat, tokens
from rrvf_jax.processing.chat import _Block, _Part

THINK_OPEN = tokens.THINK_START + "\n"

# Qwen3-VL-*-Instruct's chat template (chat_template.json), verbatim.
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501

# Qwen3-VL-*-Thinking's chat template (chat_template.json), verbatim.
QWEN3_VL_THINKING_CHAT_TEMPLATE = r"""{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                <|vision_start|><|image_pad|><|vision_end|>
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                <|vision_start|><|video_pad|><|vision_end|>
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content, false) + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + render_content(messages[0].content, false) + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false) %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = render_content(message.content, True) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n<think>\n' }}
{%- endif %}
"""  # noqa: E501

Message = chat.Message
Grid = chat.Grid


def _text(content: Any, where: str) -> str:
  """A system or assistant message's text (a string or text items; images are not allowed)."""
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  out = []
  for item in content:
    if not isinstance(item, Mapping):
      raise ValueError(f"{where}: content items must be dicts, got {type(item).__name__}")
    if item.get("type") in ("image", "video") or "image" in item or "image_url" in item:
      raise ValueError(f"{where}: images are supported in user and tool messages only")
    out.append(item.get("text", ""))
  return "".join(out)


def _tools_text(system: str | None, tools: Sequence[Mapping[str, Any]]) -> str:
  """The system block's text with tools: the system text (if any), then the tools list."""
  head = "" if system is None else system + "\n\n"
  return head + chat.format_tools_system_prompt("", tools).removeprefix("\n\n")


def format_tool_call(call: Mapping[str, Any]) -> str:
  """One `<tool_call>` block; JSON-string arguments are pasted as they are (the template's rule)."""
  fn = call.get("function") or call
  args = fn.get("arguments", {})
  args = args if isinstance(args, str) else chat.tojson(args)
  return '<tool_call>\n{"name": "' + fn["name"] + '", "arguments": ' + args + "}\n</tool_call>"


def _split_reasoning(message: Message, content: str) -> tuple[str, str]:
  """(reasoning, content) of an assistant message, as the Thinking template splits them."""
  if isinstance(message.get("reasoning_content"), str):
    return message["reasoning_content"], content
  if tokens.THINK_END not in content:
    return "", content
  reasoning = content.split(tokens.THINK_END)[0].rstrip("\n").split(tokens.THINK_START)[-1]
  return reasoning.lstrip("\n"), content.split(tokens.THINK_END)[-1].lstrip("\n")


def _assistant_body(
  message: Message, where: str, *, thinking: bool, show_reasoning: bool
) -> list[_Part]:
  """Assistant content (with the Thinking template's reasoning block) and its tool calls.

  With a reasoning block the body opens with an untrained `<think>\\n` (the prompt's part).
  """
  content = _text(message.get("content"), where)
  newline_before_calls = bool(message.get("content"))
  parts = []
  if thinking:
    reasoning, content = _split_reasoning(message, content)
    newline_before_calls = bool(content)
    if show_reasoning:
      parts.append(_Part("text", THINK_OPEN))
      content = reasoning.strip("\n") + "\n" + tokens.THINK_END + "\n\n" + content.lstrip("\n")
  if content:
    parts.append(_Part("text", content, True))
  for k, call in enumerate(message.get("tool_calls") or ()):
    if k or newline_before_calls:
      parts.append(_Part("text", "\n", True))
    parts.append(_Part("text", format_tool_call(call), True))
  return parts


def last_query_index(messages: Sequence[Message]) -> int:
  """Index of the last user message that is not a `<tool_response>` (Thinking template's rule)."""
  for index in range(len(messages) - 1, -1, -1):
    m = messages[index]
    if m.get("role") != "user":
      continue
    content = m.get("content")
    text = chat._render(chat._content_parts(content, False, f"message {index}"), None)
    if not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
      return index
  return len(messages) - 1


def _message_blocks(
  messages: Sequence[Message], offset: int, *, thinking: bool, query_index: int
) -> list[_Block]:
  """Blocks of messages after the system block; consecutive tool messages share one user block.

  `query_index` is the last user query's index (in `offset`-based numbering): assistant turns
  after it keep their reasoning under the Thinking template.
  """
  blocks, i = [], 0
  last = offset + len(messages) - 1
  while i < len(messages):
    message, index = messages[i], offset + i
    role = message.get("role")
    where = f"message {index}"
    if role not in chat.ROLES:
      raise ValueError(f"{where}: unknown role {role!r}; expected one of {chat.ROLES}")
    if role != "assistant" and message.get("tool_calls"):
      raise ValueError(f"{where}: only assistant messages may carry tool_calls")
    if role == "tool":
      j = i
      while j < len(messages) and messages[j].get("role") == "tool":
        j += 1
      body = chat._tool_results_body(messages[i:j], index)
      blocks.append(_Block("user", tuple(range(index, offset + j)), tuple(body)))
      i = j
      continue
    if role == "assistant":
      reasoning = thinking and index > query_index
      if reasoning:
        reasoning = index == last or bool(
          _split_reasoning(message, _text(message.get("content"), where))[0]
        )
      body = _assistant_body(message, where, thinking=thinking, show_reasoning=reasoning)
    elif role == "system":
      if not thinking:  # Instruct renders only a leading system message.
        i += 1
        continue
      body = [_Part("text", _text(message.get("content"), where))]
    else:
      body = chat._content_parts(message.get("content"), False, where)
    blocks.append(_Block(role, (index,), tuple(body)))
    i += 1
  return blocks


def _leading_blocks(
  messages: Sequence[Message],
  tools: Sequence[Mapping[str, Any]] | None,
  system_prompt: str | None,
  thinking: bool,
) -> list[_Block]:
  """The system block (from a system message, `system_prompt` or tools) and the message blocks."""
  if not messages:
    raise ValueError("a conversation needs at least one message")
  has_system = messages[0].get("role") == "system"
  system = _text(messages[0].get("content"), "message 0") if has_system else system_prompt
  used = int(has_system)
  blocks = []
  if tools or system is not None:
    text = _tools_text(system, tools) if tools else system
    body = (_Part("text", text),) if text else ()
    blocks.append(_Block("system", (0,) if has_system else (), body))
  query = last_query_index(messages)
  rest = _message_blocks(messages[used:], used, thinking=thinking, query_index=query)
  return blocks + rest


def _generation_prompt(thinking: bool) -> list[_Part]:
  """`<|im_start|>assistant\\n` (and `<think>\\n` under the Thinking template), left open."""
  parts = [_Part("turn", "assistant"), _Part("special", tokens.IM_START)]
  parts += [_Part("text", "assistant\n"), _Part("break")]
  if thinking:
    parts.append(_Part("text", THINK_OPEN))
  return [*parts, _Part("body"), _Part("open")]


def _parts(
  blocks: Sequence[_Block],
  *,
  add_vision_id: bool,
  generation_prompt: bool,
  thinking: bool,
  num_previous_images: int = 0,
  lead: Sequence[_Part] = (),
) -> list[_Part]:
  """The part stream of blocks; a reasoning block's `<think>\\n` moves into its turn's header."""
  parts = chat._flatten(
    blocks, add_vision_id=add_vision_id, num_previous_images=num_previous_images, lead=lead
  )
  for i in range(len(parts) - 1):
    if parts[i].kind == "body" and parts[i + 1] == _Part("text", THINK_OPEN):
      parts[i], parts[i + 1] = parts[i + 1], parts[i]
  if generation_prompt:
    parts += _generation_prompt(thinking)
  return parts


def render_conversation(
  messages: Sequence[Message],
  *,
  image_grids: Sequence[Grid] | None = None,
  merge_size: int = 2,
  tools: Sequence[Mapping[str, Any]] | None = None,
  system_prompt: str | None = None,
  add_generation_prompt: bool = False,
  add_vision_id: bool = False,
  thinking: bool = False,
) -> str:
  """The conversation as text; one `<|image_pad|>` per image unless `image_grids` expands them."""
  blocks = _leading_blocks(messages, tools, system_prompt, thinking)
  parts = _parts(
    blocks, add_vision_id=add_vision_id, generation_prompt=add_generation_prompt, thinking=thinking
  )
  return chat._render(parts, chat._image_counts(image_grids, merge_size))


def encode_conversation(
  tokenizer: tokens.Tokenizer,
  messages: Sequence[Message],
  *,
  image_grids: Sequence[Grid] = (),
  merge_size: int = 2,
  tools: Sequence[Mapping[str, Any]] | None = None,
  system_prompt: str | None = None,
  add_generation_prompt: bool = False,
  add_vision_id: bool = False,
  thinking: bool = False,
) -> chat.EncodedConversation:
  """Token ids and loss mask of a whole conversation; `image_grids` lists each image's (t, h, w).

  `system_prompt` stands in for a missing system message (None: no system block unless tools).
  """
  blocks = _leading_blocks(messages, tools, system_prompt, thinking)
  parts = _parts(
    blocks, add_vision_id=add_vision_id, generation_prompt=add_generation_prompt, thinking=thinking
  )
  return chat._encode(tokenizer, parts, chat._image_counts(image_grids, merge_size))


def build_prompt_ids(
  tokenizer: tokens.Tokenizer, messages: Sequence[Message], **kwargs
) -> chat.EncodedConversation:
  """The prompt for generation: the conversation so far, then the assistant header."""
  return encode_conversation(tokenizer, messages, add_generation_prompt=True, **kwargs)


def encode_assistant_reply(
  tokenizer: tokens.Tokenizer,
  message: Message,
  *,
  image_grids: Sequence[Grid] = (),
  merge_size: int = 2,
  thinking: bool = False,
) -> chat.EncodedConversation:
  """What the policy writes after the generation prompt: body and `<|im_end|>`, all trained."""
  if message.get("role", "assistant") != "assistant":
    raise ValueError(f"expected an assistant message, got role {message.get('role')!r}")
  body = _assistant_body(message, "assistant reply", thinking=thinking, show_reasoning=thinking)
  body = [p for p in body if p != _Part("text", THINK_OPEN)]  # The prompt already holds it.
  parts = [*body, _Part("special", tokens.IM_END, True)]
  return chat._encode(tokenizer, parts, chat._image_counts(image_grids, merge_size))


def append_turn_ids(
  tokenizer: tokens.Tokenizer,
  messages: Sequence[Message],
  *,
  image_grids: Sequence[Grid] = (),
  merge_size: int = 2,
  add_generation_prompt: bool = True,
  close_open_turn: bool = False,
  add_vision_id: bool = False,
  num_previous_images: int = 0,
  thinking: bool = False,
) -> chat.EncodedConversation:
  """Tokens to append after an assistant's `<|im_end|>`: the newline, new turns, the next header.

  Assistant messages here count as after the last user query unless a user query comes before
  them in `messages` (the appended turns continue the episode's tool loop).
  """
  lead = [_Part("special", tokens.IM_END)] if close_open_turn else []
  lead.append(_Part("text", "\n"))
  queries = [i for i, m in enumerate(messages) if m.get("role") == "user"]
  query = last_query_index(messages) if queries else -1
  blocks = _message_blocks(messages, 0, thinking=thinking, query_index=query)
  parts = _parts(
    blocks,
    add_vision_id=add_vision_id,
    generation_prompt=add_generation_prompt,
    thinking=thinking,
    num_previous_images=num_previous_images,
    lead=lead,
  )
  return chat._encode(tokenizer, parts, chat._image_counts(image_grids, merge_size))
