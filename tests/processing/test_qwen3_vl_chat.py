"""Qwen3-VL chat format: the hub's Instruct and Thinking templates, token ids and loss masks."""

import numpy as np
import pytest

from rrvf_jax.processing import chat, tokens
from rrvf_jax.processing import qwen3_vl_chat as q3
from rrvf_jax.testing.tokenizer import make_tiny_tokenizer

transformers = pytest.importorskip("transformers")

TOOLS = [
  {
    "type": "function",
    "function": {
      "name": "render_chart",
      "description": "Render matplotlib code and return the image.",
      "parameters": {
        "type": "object",
        "properties": {"code": {"type": "string"}},
        "required": ["code"],
      },
    },
  }
]
CODE = "import matplotlib.pyplot as plt\nplt.bar([1, 2], [3, 4])"
SYSTEM = "You are a helpful assistant."

# An RRVF episode: target image, think + render call, rendered image back, final answer.
EPISODE = [
  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Reproduce it."}]},
  {
    "role": "assistant",
    "content": "<think>\nBars first.\n</think>",
    "tool_calls": [{"function": {"name": "render_chart", "arguments": {"code": CODE}}}],
  },
  {
    "role": "tool",
    "content": [
      {"type": "text", "text": "Rendered:"},
      {"type": "image"},
      {"type": "text", "text": "The colors differ."},
    ],
  },
  {
    "role": "assistant",
    "content": "<think>\nMake them red.\n</think>\n<answer>plt.bar([1], [2])</answer>",
  },
]
EPISODE_GRIDS = [(1, 4, 6), (1, 4, 4)]

# Thinking: an earlier query whose reasoning is dropped, string arguments, parallel calls,
# consecutive tool results and reasoning given as reasoning_content.
THINKING = [
  {"role": "system", "content": "Think first."},
  {"role": "user", "content": "Draw one bar."},
  {"role": "assistant", "content": "<think>\nOne bar.\n</think>\n\nplt.bar([1], [1])"},
  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Now this one."}]},
  {
    "role": "assistant",
    "content": "<think>\nTwo renders.\n</think>\n\nTrying both.",
    "tool_calls": [
      {"function": {"name": "render_chart", "arguments": '{"code": "plt.plot()"}'}},
      {"name": "render_chart", "arguments": {"code": "print('é')"}},
    ],
  },
  {"role": "tool", "content": "Score: 90."},
  {"role": "tool", "content": "Error: NameError"},
  {
    "role": "assistant",
    "content": "<answer>plt.bar([1], [2])</answer>",
    "reasoning_content": "Done.",
  },
]
THINKING_GRIDS = [(1, 2, 4)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return make_tiny_tokenizer(tmp_path_factory.mktemp("qwen3_tok"), family="qwen3_vl")


@pytest.fixture(scope="module")
def tok(tok_dir):
  return tokens.load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
  return transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


def _expand(text, grids):
  """Replaces the i-th `<|image_pad|>` by t*h*w/4 pads, as the HF processor does."""
  pieces = text.split(tokens.IMAGE_PAD)
  assert len(pieces) == len(grids) + 1
  out = pieces[0]
  for grid, piece in zip(grids, pieces[1:], strict=True):
    out += tokens.IMAGE_PAD * (int(np.prod(grid)) // 4) + piece
  return out


def _hf(hf_tok, messages, template, grids, **kw):
  """(rendered text, token ids) of transformers' apply_chat_template with the hub template."""
  text = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)
  return text, hf_tok.encode(_expand(text, grids), add_special_tokens=False)


def _trained_text(tok, enc):
  """The loss-masked tokens decoded, one string per contiguous run."""
  m = np.concatenate([[0], enc.loss_mask, [0]])
  d = np.diff(m)
  runs = zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True)
  return [tokens.decode(tok, enc.input_ids[a:b], skip_special_tokens=False) for a, b in runs]


def test_qwen3_tokens_are_single_added_tokens(tok, hf_tok):
  for t in tokens.QWEN3_ADDED_TOKENS:
    assert len(tokens.encode_text(tok, t)) == 1
    assert tokens.decode(tok, tokens.encode_text(tok, t)) == t  # Not special: kept by decode.
  assert hf_tok.convert_tokens_to_ids("<think>") == tokens.token_id(tok, "<think>")


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_episode_matches_instruct_template(tok, hf_tok, add_generation_prompt):
  messages = [{"role": "system", "content": SYSTEM}, *EPISODE]
  kw = {"tools": TOOLS, "add_generation_prompt": add_generation_prompt}
  text, ids = _hf(hf_tok, messages, q3.QWEN3_VL_CHAT_TEMPLATE, EPISODE_GRIDS, **kw)
  assert q3.render_conversation(messages, **kw) == text
  enc = q3.encode_conversation(tok, messages, image_grids=EPISODE_GRIDS, **kw)
  assert enc.input_ids.tolist() == ids
  assert [e - s for s, e in enc.image_spans] == [6, 4]
  trained = _trained_text(tok, enc)
  assert trained[0].startswith("<think>\nBars first.\n</think>\n<tool_call>\n")
  assert trained[-1] == EPISODE[-1]["content"] + "<|im_end|>"


def test_pipeline_conversations_equal_the_instruct_template(tok):
  """What `processing.chat` builds for RRVF (system prompt + tools) is Qwen3-VL's rendering."""
  kw = {"image_grids": EPISODE_GRIDS, "tools": TOOLS, "add_generation_prompt": True}
  ours = chat.encode_conversation(tok, EPISODE, system_prompt=SYSTEM, **kw)
  qwen3 = q3.encode_conversation(tok, EPISODE, system_prompt=SYSTEM, **kw)
  np.testing.assert_array_equal(ours.input_ids, qwen3.input_ids)
  np.testing.assert_array_equal(ours.loss_mask, qwen3.loss_mask)


def test_instruct_differences_from_qwen2_5(tok, hf_tok):
  """No default system prompt, tools without one, JSON-string arguments, a later system dropped."""
  messages = [
    {"role": "user", "content": "Hi."},
    {
      "role": "assistant",
      "content": "",
      "tool_calls": [{"name": "render_chart", "arguments": '{"code": "x"}'}],
    },
    {"role": "system", "content": "Ignored by the Instruct template."},
    {"role": "tool", "content": "ok"},
  ]
  for kw in ({"tools": TOOLS}, {}):
    text, ids = _hf(
      hf_tok, messages, q3.QWEN3_VL_CHAT_TEMPLATE, [], add_generation_prompt=True, **kw
    )
    assert q3.render_conversation(messages, add_generation_prompt=True, **kw) == text
    enc = q3.build_prompt_ids(tok, messages, **kw)
    assert enc.input_ids.tolist() == ids
  assert text.startswith("<|im_start|>user\nHi.")  # No system block at all.


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_thinking_template(tok, hf_tok, add_generation_prompt):
  kw = {"tools": TOOLS, "add_generation_prompt": add_generation_prompt}
  template = q3.QWEN3_VL_THINKING_CHAT_TEMPLATE
  text, ids = _hf(hf_tok, THINKING, template, THINKING_GRIDS, **kw)
  assert q3.render_conversation(THINKING, thinking=True, **kw) == text
  enc = q3.encode_conversation(tok, THINKING, image_grids=THINKING_GRIDS, thinking=True, **kw)
  assert enc.input_ids.tolist() == ids
  assert "One bar." not in text and "<think>\nDone.\n</think>\n\n<answer>" in text
  # `<think>\n` after a header is the prompt's: untrained, and the turn's body starts after it.
  trained = _trained_text(tok, enc)
  assert trained[1].startswith("Two renders.\n</think>\n\nTrying both.\n<tool_call>")
  assert trained[-1] == "Done.\n</think>\n\n<answer>plt.bar([1], [2])</answer><|im_end|>"
  body = enc.turns[-2 if add_generation_prompt else -1]
  assert tokens.decode(tok, enc.input_ids[body.start : body.body_start], False).endswith(
    "assistant\n<think>\n"
  )


def test_thinking_turns_concatenate_to_the_whole_conversation(tok):
  """Prompt + sampled replies + appended tool turns == the conversation, ids and masks."""
  messages, grids = THINKING, THINKING_GRIDS
  kw = {"tools": TOOLS, "thinking": True}
  prompt = q3.build_prompt_ids(tok, messages[:4], image_grids=grids, **kw)
  assert tokens.decode(tok, prompt.input_ids[-6:], False).endswith("assistant\n<think>\n")
  pieces = [
    prompt,
    q3.encode_assistant_reply(tok, messages[4], thinking=True),
    q3.append_turn_ids(tok, messages[5:7], thinking=True),
    q3.encode_assistant_reply(tok, messages[7], thinking=True),
  ]
  joined = chat.concatenate(pieces)
  whole = q3.encode_conversation(tok, messages, image_grids=grids, **kw)
  # The whole conversation ends with the newline after `<|im_end|>`, which the next turn brings.
  assert tokens.decode(tok, whole.input_ids[-1:], False) == "\n"
  np.testing.assert_array_equal(joined.input_ids, whole.input_ids[:-1])
  np.testing.assert_array_equal(joined.loss_mask, whole.loss_mask[:-1])
  np.testing.assert_array_equal(joined.mm_token_type_ids, whole.mm_token_type_ids[:-1])
  assert joined.image_spans == whole.image_spans
