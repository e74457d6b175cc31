r"""Qwen2-VL chat format with Qwen2.5 tool calling, encoded token-exactly with loss masks.

A conversation (the Qwen2-VL template plus the Qwen2.5 function-calling convention) renders as

  <|im_start|>system\n{system}[tools block]<|im_end|>\n
  <|im_start|>user\n{text, <|vision_start|><|image_pad|>*n<|vision_end|>}<|im_end|>\n
  <|im_start|>assistant\n{content}[\n<tool_call>\n{"name": .., "arguments": ..}\n</tool_call>]
    <|im_end|>\n
  <|im_start|>user\n<tool_response>\n{result, maybe an image}\n</tool_response><|im_end|>\n
  <|im_start|>assistant\n

Ids are built block by block, never by tokenising a whole conversation string. Text is encoded in
runs that end at special tokens; the tokenizer splits there too, so this equals HF's tokenisation of
the rendered string, with one exception: an assistant's `assistant\n` header is encoded apart from
its body. That is how the sampler sees it (the prompt ends with the header, the model writes the
body), so prompt + sampled tokens + appended turns concatenate to exactly the ids built here. The
two differ only for an assistant body that starts with whitespace, which would merge with the
header's newline in a whole-string tokenisation.

Loss mask: 1 on the assistant body and its closing `<|im_end|>` (the model must learn to stop); 0 on
the `<|im_start|>assistant\n` header, on all other blocks, on image tokens, and on the newline after
`<|im_end|>`. That newline is never generated (sampling stops at `<|im_end|>`); the next appended
turn starts with it, so it is an environment token like the rest of the template glue. Assistant
content may mark text items `{"type": "text", "text": ..., "loss": False}` (a deliberately wrong
draft's defect, `data.revisions`): the body is still tokenised as one run, and every token that
touches such text gets mask 0.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rrvf_jax.processing import tokens
from rrvf_jax.processing.image import num_image_tokens

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The Qwen2-VL / Qwen2.5-VL hub template (chat_template.json), verbatim. It has no tool support.
QWEN2_VL_CHAT_TEMPLATE = (
  "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
  "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
  "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
  "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
  "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
  "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
  "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
  "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
  "{% elif content['type'] == 'video' or 'video' in content %}"
  "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
  "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
  "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
  "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5 function-calling system block, around one JSON schema per line.
TOOLS_HEADER = (
  "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
  "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
  "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
  '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
ROLES = ("system", "user", "assistant", "tool")

Message = Mapping[str, Any]
Grid = Sequence[int]


@dataclasses.dataclass(frozen=True)
class Turn:
  """One rendered `<|im_start|>{role}\\n ... <|im_end|>` block, in token indices."""

  role: str  # rendered role; tool results render as "user"
  messages: tuple[int, ...]  # indices into the messages given (several for merged tool results)
  start: int  # index of `<|im_start|>`
  body_start: int  # first token after the `{role}\n` header
  end: int | None  # one past `<|im_end|>` (its trailing newline excluded); None for an open header


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
  """Token ids of a conversation or of a piece of one, with what training and the model need."""

  input_ids: np.ndarray  # int32 (L,)
  loss_mask: np.ndarray  # int32 (L,), 1 on tokens the policy generated
  mm_token_type_ids: np.ndarray  # int32 (L,), 1 on `<|image_pad|>`
  image_spans: tuple[tuple[int, int], ...]  # [start, end) of each image's pad run, in image order
  turns: tuple[Turn, ...]

  def __len__(self) -> int:
    """Number of tokens."""
    return int(self.input_ids.shape[0])


@dataclasses.dataclass(frozen=True)
class _Part:
  """A rendered piece: text, a special token, or an image placeholder."""

  kind: str  # "text" | "special" | "image", or a marker: "break" | "turn" | "body" | "end" | "open"
  value: str = ""
  train: bool = False
  messages: tuple[int, ...] = ()  # for "turn" markers
  untrained: bool = False  # text of a trained block whose tokens must not be learned


@dataclasses.dataclass(frozen=True)
class _Block:
  """A rendered message block before tokenisation."""

  role: str
  messages: tuple[int, ...]
  body: tuple[_Part, ...]


def tojson(value: Any) -> str:
  """JSON exactly as transformers' chat-template `tojson` filter writes it."""
  return json.dumps(value, ensure_ascii=False)


def format_tools_system_prompt(system: str, tools: Sequence[Mapping[str, Any]]) -> str:
  """System text followed by the Qwen2.5 tools block (one JSON schema per line)."""
  return system + TOOLS_HEADER + "".join("\n" + tojson(t) for t in tools) + TOOLS_FOOTER


def format_tool_call(name: str, arguments: Any) -> str:
  """A `<tool_call>` block with name and JSON arguments, as the Qwen2.5 template writes it."""
  # The template pastes the name unescaped and JSON-encodes only the arguments.
  return (
    '<tool_call>\n{"name": "' + name + '", "arguments": ' + tojson(arguments) + "}\n</tool_call>"
  )


def _content_parts(content: Any, train: bool, where: str) -> list[_Part]:
  """Message content (a string, None, or a list of text/image items) as parts."""
  if content is None:
    return []
  if isinstance(content, str):
    return [_Part("text", content, train)] if content else []
  parts = []
  for item in content:
    if not isinstance(item, Mapping):
      raise ValueError(f"{where}: content items must be dicts, got {type(item).__name__}")
    kind = item.get("type")
    # The same tests, in the same order, as the Qwen2-VL template.
    if kind == "image" or "image" in item or "image_url" in item:
      parts.append(_Part("image"))
    elif kind == "video" or "video" in item:
      raise ValueError(f"{where}: video items are not supported")
    elif "text" in item:
      if item["text"]:
        untrained = train and item.get("loss", True) is False
        parts.append(_Part("text", item["text"], train, untrained=untrained))
    else:
      raise ValueError(f"{where}: content item has neither text nor image: {dict(item)}")
  return parts


def _tool_call_text(call: Mapping[str, Any]) -> str:
  """One tool call given as {"name", "arguments"} or OpenAI-style {"function": {...}}."""
  fn = call.get("function", call)
  return format_tool_call(fn["name"], fn.get("arguments", {}))


def _assistant_body(message: Message, where: str) -> list[_Part]:
  """Assistant content, then each structured tool call on its own line (Qwen2.5 convention)."""
  parts = _content_parts(message.get("content"), True, where)
  for call in message.get("tool_calls") or ():
    if parts:
      parts.append(_Part("text", "\n", True))
    parts.append(_Part("text", _tool_call_text(call), True))
  return parts


def _tool_results_body(messages: Sequence[Message], first: int) -> list[_Part]:
  """Consecutive tool results, each wrapped in `<tool_response>` tags, for one user block."""
  parts: list[_Part] = []
  for i, message in enumerate(messages):
    parts.append(_Part("text", ("\n" if i else "") + "<tool_response>\n"))
    parts += _content_parts(message.get("content"), False, f"message {first + i}")
    parts.append(_Part("text", "\n</tool_response>"))
  return parts


def _system_block(
  messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None, system_prompt: str
) -> tuple[_Block, int]:
  """The leading system block (given or default) and how many messages it consumed."""
  has_system = bool(messages) and messages[0].get("role") == "system"
  if has_system:
    body = _content_parts(messages[0].get("content"), False, "message 0")
  else:
    body = [_Part("text", system_prompt)] if system_prompt else []
  if tools:
    body.append(_Part("text", format_tools_system_prompt("", tools)))
  return _Block("system", (0,) if has_system else (), tuple(body)), int(has_system)


def _message_blocks(messages: Sequence[Message], offset: int = 0) -> list[_Block]:
  """Blocks for messages (no system insertion); consecutive tool messages share one user block."""
  blocks, i = [], 0
  while i < len(messages):
    message, index = messages[i], offset + i
    role = message.get("role")
    if role not in ROLES:
      raise ValueError(f"message {index}: unknown role {role!r}; expected one of {ROLES}")
    if role == "tool":
      j = i
      while j < len(messages) and messages[j].get("role") == "tool":
        j += 1
      body = _tool_results_body(messages[i:j], index)
      blocks.append(_Block("user", tuple(range(index, offset + j)), tuple(body)))
      i = j
      continue
    if role == "assistant":
      body = _assistant_body(message, f"message {index}")
    else:
      if message.get("tool_calls"):
        raise ValueError(f"message {index}: only assistant messages may carry tool_calls")
      body = _content_parts(message.get("content"), False, f"message {index}")
    blocks.append(_Block(role, (index,), tuple(body)))
    i += 1
  return blocks


def _flatten(
  blocks: Sequence[_Block],
  *,
  add_vision_id: bool,
  num_previous_images: int = 0,
  generation_prompt: bool = False,
  lead: Sequence[_Part] = (),
) -> list[_Part]:
  """Blocks as one part stream, with turn markers, newline glue and optional generation header."""
  parts = list(lead)
  images = num_previous_images

  def body(items: Sequence[_Part]) -> None:
    nonlocal images
    for p in items:
      if p.kind == "image":
        images += 1
        if add_vision_id:
          parts.append(_Part("text", f"Picture {images}: ", p.train))
      parts.append(p)

  for b in blocks:
    parts += [_Part("turn", b.role, messages=b.messages), _Part("special", tokens.IM_START)]
    parts.append(_Part("text", b.role + "\n"))
    if b.role == "assistant":
      parts.append(_Part("break"))  # the sampler's prompt ends after this header
    parts.append(_Part("body"))
    body(b.body)
    parts.append(_Part("special", tokens.IM_END, b.role == "assistant"))
    parts += [_Part("end"), _Part("text", "\n")]
  if generation_prompt:
    parts += [_Part("turn", "assistant"), _Part("special", tokens.IM_START)]
    parts += [_Part("text", "assistant\n"), _Part("break"), _Part("body"), _Part("open")]
  return parts


def _image_counts(
  image_grids: Sequence[Grid] | np.ndarray | None, merge_size: int
) -> list[int] | None:
  """`<|image_pad|>` count per image, or None when placeholders stay single (template output)."""
  if image_grids is None:
    return None
  return [num_image_tokens(g, merge_size) for g in image_grids]


def _render(parts: Sequence[_Part], counts: Sequence[int] | None) -> str:
  """The text of a part stream; image placeholders expanded to `counts` pads (or one each)."""
  out, k = [], 0
  for p in parts:
    if p.kind in ("text", "special"):
      out.append(p.value)
    elif p.kind == "image":
      n = 1 if counts is None else counts[k]
      out.append(tokens.VISION_START + tokens.IMAGE_PAD * n + tokens.VISION_END)
      k += 1
  return "".join(out)


class _Encoder:
  """Encodes a part stream; a text run is tokenised whole and ends at special tokens and breaks."""

  def __init__(self, tokenizer: tokens.Tokenizer, counts: Sequence[int]):
    self.tok = tokenizer
    self.counts = list(counts)
    self.ids: list[int] = []
    self.mask: list[int] = []
    self.mm: list[int] = []
    self.spans: list[tuple[int, int]] = []
    self.turns: list[Turn] = []
    self.run: list[str] = []
    self.run_untrained: list[tuple[int, int]] = []  # character spans of `run` not to learn
    self.run_train = False
    self.turn: tuple[str, tuple[int, ...], int] | None = None
    self.header: str | None = None  # header text sharing a run with its body
    self.body_start = 0

  def emit(self, ids: Sequence[int], train: bool, mm: int = 0) -> None:
    """Appends ids with one mask value and one token type."""
    self.ids += ids
    self.mask += [int(train)] * len(ids)
    self.mm += [mm] * len(ids)

  def flush(self) -> None:
    """Encodes the pending text run."""
    if not self.run:
      return
    text, start = "".join(self.run), len(self.ids)
    if self.run_untrained:
      ids, offsets = tokens.encode_text_with_offsets(self.tok, text)
      self.ids += ids
      self.mask += [int(self.run_train and not self._touches(o)) for o in offsets]
      self.mm += [0] * len(ids)
    else:
      ids = tokens.encode_text(self.tok, text)
      self.emit(ids, self.run_train)
    if self.header is not None:
      self.body_start = start + _header_length(self.tok, self.header, ids)
      self.header = None
    self.run, self.run_untrained = [], []

  def _touches(self, offset: tuple[int, int]) -> bool:
    """Whether a token's character span overlaps untrained text (a token straddling it too)."""
    start, end = offset
    return any(start < e and s < max(end, start + 1) for s, e in self.run_untrained)

  def special(self, token: str, train: bool = False, mm: int = 0) -> None:
    """Appends one special token, ending the pending text run."""
    self.flush()
    self.emit([tokens.token_id(self.tok, token)], train, mm)

  def add(self, p: _Part) -> None:
    """Consumes one part."""
    if p.kind == "text":
      if self.run and self.run_train != p.train:
        self.flush()
      if p.untrained:
        at = sum(len(r) for r in self.run)
        self.run_untrained.append((at, at + len(p.value)))
      self.run.append(p.value)
      self.run_train = p.train
    elif p.kind == "special":
      self.special(p.value, p.train)
    elif p.kind == "image":
      self.image()
    elif p.kind == "break":
      self.flush()
    elif p.kind == "turn":
      self.flush()  # the glue newline before it; `<|im_start|>` would end the run anyway
      self.turn = (p.value, p.messages, len(self.ids))
    elif p.kind == "body":
      # Pending text here is the header; where it ends in tokens is known once its run is encoded.
      self.header = "".join(self.run) if self.run else None
      self.body_start = len(self.ids)
    elif p.kind in ("end", "open"):
      self.flush()
      role, messages, start = self.turn
      end = len(self.ids) if p.kind == "end" else None
      self.turns.append(Turn(role, messages, start, self.body_start, end))

  def image(self) -> None:
    """`<|vision_start|><|image_pad|>*n<|vision_end|>` for the next image."""
    k = len(self.spans)
    if k >= len(self.counts):
      raise ValueError(f"the messages hold more images than the {len(self.counts)} grids given")
    self.special(tokens.VISION_START)
    start = len(self.ids)
    self.emit([tokens.token_id(self.tok, tokens.IMAGE_PAD)] * self.counts[k], False, mm=1)
    self.spans.append((start, len(self.ids)))
    self.special(tokens.VISION_END)

  def result(self) -> EncodedConversation:
    """The encoded piece; checks that every image grid was used."""
    self.flush()
    if len(self.spans) != len(self.counts):
      raise ValueError(
        f"{len(self.counts)} image grids given but the messages hold {len(self.spans)} images"
      )
    return EncodedConversation(
      input_ids=np.asarray(self.ids, np.int32),
      loss_mask=np.asarray(self.mask, np.int32),
      mm_token_type_ids=np.asarray(self.mm, np.int32),
      image_spans=tuple(self.spans),
      turns=tuple(self.turns),
    )


def _header_length(tokenizer: tokens.Tokenizer, header: str, run_ids: Sequence[int]) -> int:
  """Tokens of `{role}\\n` at the start of a run that also holds the body."""
  ids = tokens.encode_text(tokenizer, header)
  if list(run_ids[: len(ids)]) == ids:
    return len(ids)
  # The header's newline merged with whitespace opening the body; the role word never merges.
  return len(tokens.encode_text(tokenizer, header.rstrip("\n")))


def _encode(
  tokenizer: tokens.Tokenizer, parts: Sequence[_Part], counts: Sequence[int]
) -> EncodedConversation:
  """Runs the encoder over a part stream."""
  encoder = _Encoder(tokenizer, counts)
  for p in parts:
    encoder.add(p)
  return encoder.result()


def _leading_blocks(
  messages: Sequence[Message],
  tools: Sequence[Mapping[str, Any]] | None,
  system_prompt: str | None,
) -> list[_Block]:
  """Blocks of a conversation from its start: a system block (given or default), the messages."""
  if not messages:
    raise ValueError("a conversation needs at least one message")
  if messages[0].get("role") == "system" or system_prompt is not None:
    system, used = _system_block(messages, tools, system_prompt or "")
    return [system, *_message_blocks(messages[used:], offset=used)]
  if tools:
    raise ValueError("tools need a system block: pass a system message or a system_prompt")
  return _message_blocks(messages)


def render_conversation(
  messages: Sequence[Message],
  *,
  image_grids: Sequence[Grid] | np.ndarray | None = None,
  merge_size: int = 2,
  tools: Sequence[Mapping[str, Any]] | None = None,
  system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
  add_generation_prompt: bool = False,
  add_vision_id: bool = False,
) -> str:
  """The conversation as text; one `<|image_pad|>` per image unless `image_grids` expands them."""
  blocks = _leading_blocks(messages, tools, system_prompt)
  parts = _flatten(blocks, add_vision_id=add_vision_id, generation_prompt=add_generation_prompt)
  return _render(parts, _image_counts(image_grids, merge_size))


def encode_conversation(
  tokenizer: tokens.Tokenizer,
  messages: Sequence[Message],
  *,
  image_grids: Sequence[Grid] | np.ndarray = (),
  merge_size: int = 2,
  tools: Sequence[Mapping[str, Any]] | None = None,
  system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
  add_generation_prompt: bool = False,
  add_vision_id: bool = False,
) -> EncodedConversation:
  """Token ids and loss mask of a whole conversation; `image_grids` lists each image's (t, h, w).

  `system_prompt` is used when the first message is not a system message (None: no system block).
  """
  blocks = _leading_blocks(messages, tools, system_prompt)
  parts = _flatten(blocks, add_vision_id=add_vision_id, generation_prompt=add_generation_prompt)
  return _encode(tokenizer, parts, _image_counts(image_grids, merge_size))


def build_prompt_ids(
  tokenizer: tokens.Tokenizer,
  messages: Sequence[Message],
  *,
  image_grids: Sequence[Grid] | np.ndarray = (),
  merge_size: int = 2,
  tools: Sequence[Mapping[str, Any]] | None = None,
  system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
  add_vision_id: bool = False,
) -> EncodedConversation:
  """The prompt for generation: the conversation so far, then `<|im_start|>assistant\\n`."""
  return encode_conversation(
    tokenizer,
    messages,
    image_grids=image_grids,
    merge_size=merge_size,
    tools=tools,
    system_prompt=system_prompt,
    add_generation_prompt=True,
    add_vision_id=add_vision_id,
  )


def encode_assistant_reply(
  tokenizer: tokens.Tokenizer,
  message: Message,
  *,
  image_grids: Sequence[Grid] | np.ndarray = (),
  merge_size: int = 2,
) -> EncodedConversation:
  """What the policy writes after `<|im_start|>assistant\\n`: body and `<|im_end|>`, all trained."""
  if message.get("role", "assistant") != "assistant":
    raise ValueError(f"expected an assistant message, got role {message.get('role')!r}")
  parts = [*_assistant_body(message, "assistant reply"), _Part("special", tokens.IM_END, True)]
  return _encode(tokenizer, parts, _image_counts(image_grids, merge_size))


def append_turn_ids(
  tokenizer: tokens.Tokenizer,
  messages: Sequence[Message],
  *,
  image_grids: Sequence[Grid] | np.ndarray = (),
  merge_size: int = 2,
  add_generation_prompt: bool = True,
  close_open_turn: bool = False,
  add_vision_id: bool = False,
  num_previous_images: int = 0,
) -> EncodedConversation:
  """Tokens to append after an assistant's `<|im_end|>`: the newline, new turns, the next header.

  Tool results (consecutive ones merged) render as a user turn. `close_open_turn` first emits an
  untrained `<|im_end|>` for a reply cut off before it stopped. Indices in the result (image spans,
  turns, message numbers) are relative to this piece and to `messages`.
  """
  lead = [_Part("special", tokens.IM_END)] if close_open_turn else []
  lead.append(_Part("text", "\n"))
  parts = _flatten(
    _message_blocks(messages),
    add_vision_id=add_vision_id,
    num_previous_images=num_previous_images,
    generation_prompt=add_generation_prompt,
    lead=lead,
  )
  return _encode(tokenizer, parts, _image_counts(image_grids, merge_size))


def cut_middle(text: str, keep: int) -> str:
  """`text` shortened to about `keep` characters, its start and end kept around a marker."""
  if len(text) <= keep:
    return text
  head = keep // 2
  return f"{text[:head]} [...] {text[len(text) - (keep - head) :]}"


def _shortened(messages: Sequence[Message], ratio: float) -> list[Message]:
  """The messages with each text cut to `ratio` of its length (images kept)."""

  def cut(text: str) -> str:
    return cut_middle(text, int(len(text) * ratio))

  out = []
  for m in messages:
    content = m.get("content")
    if isinstance(content, str):
      content = cut(content)
    elif content is not None:
      content = [dict(i, text=cut(i["text"])) if "text" in i else dict(i) for i in content]
    out.append({**m, "content": content})
  return out


def fit_appended_turn(
  tokenizer: tokens.Tokenizer,
  messages: Sequence[Message],
  *,
  max_tokens: int,
  image_grids: Sequence[Grid] | np.ndarray = (),
  merge_size: int = 2,
  close_open_turn: bool = False,
) -> tuple[list[Message], EncodedConversation]:
  """Messages to append after a reply, their text cut in the middle until the piece fits.

  The piece is `append_turn_ids(messages, ...)` (tool responses, the next header). Images stay
  whole; the longest text kept is found by bisection, so the result is deterministic. A ValueError
  says when even the images and the template alone exceed `max_tokens`.
  """

  def encode(candidate):
    return append_turn_ids(
      tokenizer,
      candidate,
      image_grids=image_grids,
      merge_size=merge_size,
      close_open_turn=close_open_turn,
    )

  piece = encode(messages)
  if len(piece) <= max_tokens:
    return list(messages), piece
  bare = encode(_shortened(messages, 0.0))
  if len(bare) > max_tokens:
    raise ValueError(
      f"an appended turn needs {len(bare)} tokens for its images and template alone, more than "
      f"the limit of {max_tokens} (raise grpo.max_response_tokens)"
    )
  lo, hi = 0, 1000  # kept share of the text, in thousandths
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if len(encode(_shortened(messages, mid / 1000))) <= max_tokens:
      lo = mid
    else:
      hi = mid - 1
  fitted = _shortened(messages, lo / 1000)
  return fitted, encode(fitted)


def concatenate(pieces: Sequence[EncodedConversation]) -> EncodedConversation:
  """Joins pieces (prompt, replies, appended turns) into one sequence, shifting spans and turns."""
  spans: list[tuple[int, int]] = []
  turns: list[Turn] = []
  offset = 0
  for piece in pieces:
    spans += [(s + offset, e + offset) for s, e in piece.image_spans]
    for t in piece.turns:
      end = None if t.end is None else t.end + offset
      turns.append(
        dataclasses.replace(t, start=t.start + offset, body_start=t.body_start + offset, end=end)
      )
    offset += len(piece)

  def cat(name: str) -> np.ndarray:
    arrays = [getattr(p, name) for p in pieces]
    return np.concatenate(arrays) if arrays else np.zeros((0,), np.int32)

  return EncodedConversation(
    input_ids=cat("input_ids"),
    loss_mask=cat("loss_mask"),
    mm_token_type_ids=cat("mm_token_type_ids"),
    image_spans=tuple(spans),
    turns=tuple(turns),
  )


decode = tokens.decode
