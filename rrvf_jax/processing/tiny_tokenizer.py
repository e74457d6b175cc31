"""A tiny Qwen2-style byte-level BPE tokenizer, built locally and deterministically.

Preset runs without a tokenizer (the demo configs) use it, and so do the tests.

It has Qwen2's text pipeline (NFC, Qwen2's pre-tokenizer regex, byte-level BPE, no prefix space), a
BPE vocabulary trained on a fixed built-in corpus, and Qwen's added tokens in Qwen's order after it
(Qwen3's four more for `family="qwen3_vl"`, with the Qwen3-VL chat template).
It is saved in the hub layout, so `transformers.AutoTokenizer.from_pretrained(path)` loads it
offline. The `tokenizers` BPE trainer is deterministic, so the files are byte-identical per version.
"""

from __future__ import annotations

import json
import os
import pathlib

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from rrvf_jax.processing import tokens
from rrvf_jax.processing.chat import QWEN2_VL_CHAT_TEMPLATE
from rrvf_jax.processing.qwen3_vl_chat import QWEN3_VL_CHAT_TEMPLATE

# Qwen2's pre-tokenizer pattern (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
  r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
DEFAULT_VOCAB_SIZE = 1536  # BPE entries (256 bytes + merges); the 22 added tokens come on top

_CORPUS = (
  # Chat format and prompts.
  "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
  "Please write Python code with matplotlib that reproduces the chart in the image.<|im_end|>\n",
  "<|im_start|>assistant\n<think>\nThe chart is a bar chart with four bars. The title is at the "
  "top, the x axis shows the months and the y axis shows the sales in thousands.\n</think>\n",
  "Generate the HTML code that renders this web page as closely as possible. Use inline CSS.\n",
  "You may call one or more functions to assist with the user query.\n\n"
  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
  "For each function call, return a json object with function name and arguments within "
  "<tool_call></tool_call> XML tags:\n",
  # English text.
  "The rendered image is close to the target, but the colors of the bars are different and the "
  "legend is missing. The font of the title is too small. Please fix the legend and the colors.\n",
  "The quick brown fox jumps over the lazy dog. A picture is worth a thousand words, and a chart "
  "is worth a thousand numbers. This is a test of the tokenizer; it should handle punctuation, "
  "numbers like 3.14159 and 2024, and contractions: don't, it's, we're, they've, I'm, you'll.\n",
  "Compare the rendered chart with the target chart. Give a score from 0 to 100 for the text, "
  "the layout, the chart type and the colors, then explain what should change.\n",
  "The line plot shows the temperature over time for three cities. The scatter plot shows the "
  "relation between height and weight. The pie chart shows the market share of each company.\n",
  # matplotlib code.
  "import matplotlib.pyplot as plt\nimport numpy as np\n\n"
  "fig, ax = plt.subplots(figsize=(8, 6))\n"
  "x = np.arange(10)\ny = np.sin(x)\n"
  "ax.plot(x, y, color='tab:blue', linewidth=2, label='sin(x)')\n"
  "ax.bar(['Jan', 'Feb', 'Mar', 'Apr'], [12, 19, 3, 5], color=['#1f77b4', '#ff7f0e', '#2ca02c', "
  "'#d62728'])\n"
  "ax.scatter(x, y, s=20, c='red', marker='o', alpha=0.5)\n"
  "ax.set_title('Monthly Sales', fontsize=14)\nax.set_xlabel('Month')\nax.set_ylabel('Sales')\n"
  "ax.legend(loc='upper right')\nax.grid(True, linestyle='--', alpha=0.3)\n"
  "plt.tight_layout()\nplt.savefig('chart.png', dpi=100)\nplt.show()\n",
  "labels = ['A', 'B', 'C', 'D']\nsizes = [15, 30, 45, 10]\n"
  "plt.pie(sizes, labels=labels, autopct='%1.1f%%', startangle=90)\nplt.axis('equal')\n"
  "for i, v in enumerate(sizes):\n    ax.text(i, v + 1, str(v), ha='center', va='bottom')\n",
  "def main():\n    data = {'x': [1, 2, 3], 'y': [4, 5, 6]}\n    return data\n\n"
  "if __name__ == '__main__':\n    main()\n",
  # HTML and CSS.
  '<!DOCTYPE html>\n<html lang="en">\n<head>\n  <meta charset="utf-8">\n'
  "  <title>Landing page</title>\n  <style>\n"
  "    body { margin: 0; font-family: Arial, sans-serif; background-color: #f5f5f5; }\n"
  "    .header { display: flex; justify-content: space-between; padding: 16px 32px; }\n"
  "    .button { color: #ffffff; background: #007bff; border-radius: 4px; padding: 8px 16px; }\n"
  "  </style>\n</head>\n<body>\n"
  '  <div class="header">\n    <h1>Welcome</h1>\n    <a class="button" href="#">Sign up</a>\n'
  "  </div>\n  <p>This is a paragraph of text with a <b>bold</b> word and a <i>link</i>.</p>\n"
  "  <ul>\n    <li>First item</li>\n    <li>Second item</li>\n  </ul>\n</body>\n</html>\n",
  # Tool calls and responses (JSON).
  '<tool_call>\n{"name": "render_chart", "arguments": {"code": "import matplotlib.pyplot as plt\\n'
  "plt.plot([1, 2, 3])\\nplt.savefig('out.png')\"}}\n</tool_call>\n",
  '<tool_call>\n{"name": "render_html", "arguments": {"html": "<div style=\\"color: red\\">'
  'Hi</div>"}}\n</tool_call>\n',
  '{"type": "function", "function": {"name": "render_chart", "description": "Render matplotlib '
  'code and return the image.", "parameters": {"type": "object", "properties": {"code": {"type": '
  '"string", "description": "Python code"}}, "required": ["code"]}}}\n',
  "<tool_response>\nThe code ran successfully. The rendered chart is shown below.\n"
  "</tool_response>\n",
  '<tool_response>\nError: Traceback (most recent call last):\n  File "<string>", line 3\n'
  "NameError: name 'np' is not defined\n</tool_response>\n",
  "<answer>\nimport matplotlib.pyplot as plt\nplt.bar([1, 2], [3, 4])\nplt.show()\n</answer>\n",
  # RRVF episodes: the task prompt, the tool schema, thoughts, tool calls, judge comments.
  "Reproduce this chart with Python matplotlib code. Think in <think></think>, call render_chart "
  "to see your code's render and how it differs from the target, revise, then give the final code "
  "in <answer></answer>.\n",
  "Reproduce this web page as one HTML document with inline CSS. Think in <think></think>, call "
  "render_html to see your page's render and how it differs from the target, revise, then give "
  "the final HTML in <answer></answer>.\n",
  '{"type": "function", "function": {"name": "render_chart", "description": "Render matplotlib '
  'code; returns the image and how it differs from the target.", "parameters": {"type": '
  '"object", "properties": {"code": {"type": "string", "description": "A complete Python script '
  'that draws the chart with matplotlib."}}, "required": ["code"]}}}\n',
  "<think>The target is a bar chart. I will render a draft to compare.</think>\n"
  "<think>The target is a line chart, a scatter plot, a pie chart, a histogram, an area chart, a "
  "grouped bar chart.</think>\n",
  "<think>The render differs: my render uses the colour tab:red where the target uses tab:blue. "
  "I will fix it.</think>\n<think>The render matches the target.</think>\n",
  "my render's title is 'Sales' where the target's is 'Votes'; my render shows the value 4 where "
  "the target shows 2; my render draws a line chart where the target has a bar chart; my render's "
  "labels are A, B, C where the target's are Mon, Tue, Wed; my render has no legend where the "
  "target has one; my render's bars are horizontal where the target's are vertical.\n",
  '<tool_call>\n{"name": "render_chart", "arguments": {"code": "import matplotlib.pyplot as '
  "plt\\nplt.bar(['A','B','C'],[3,1,2],color='tab:blue')\\nplt.plot([0,1,2],[5,2,7],"
  "color='tab:orange',marker='o')\\nplt.scatter([1,4,6],[2,8,3],color='tab:green')\\n"
  "plt.title('Sales')\\n\"}}\n</tool_call>\n",
  "<tool_response>\n---Comments:\n-**Shapes**- Shapes do not line up with the reference: "
  "positions and sizes of elements (bars, lines, boxes) differ; check the data values, axis ranges "
  "and element sizes.\n-**Colour**- The colours differ: the reference's main colours are #1f77b4 "
  "(80%); yours are #d62728.\n-**Layout**- The layout differs: the reference has content in the "
  "top-left that yours lacks.\n-**Text**- Text differs: the reference has about 3 lines of text, "
  "yours about 2 (titles, labels, legends, annotations).\n-**Overall**- The render closely "
  "matches the reference; only small details differ.\n</tool_response>\n",
  # A little non-ASCII text, so multi-byte characters get merges too.
  "Café, naïve, résumé, Zürich, 東京, 数据可视化, Привет, ½ ± ×, emoji 📊.\n",
)


def _base_tokenizer() -> tokenizers.Tokenizer:
  """An empty BPE with Qwen2's normalizer, pre-tokenizer, decoder and post-processor."""
  tok = tokenizers.Tokenizer(
    models.BPE(
      dropout=None,
      unk_token=None,
      continuing_subword_prefix="",
      end_of_word_suffix="",
      fuse_unk=False,
      byte_fallback=False,
    )
  )
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(tokenizers.Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ]
  )
  tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  tok.post_processor = processors.ByteLevel(
    add_prefix_space=False, trim_offsets=False, use_regex=False
  )
  return tok


def _added_tokens(family: str) -> tuple[str, ...]:
  """Qwen's added tokens of a model family's vocabulary, in id order."""
  if family in ("qwen2_vl", "qwen2_5_vl"):
    return tokens.ADDED_TOKENS
  if family == "qwen3_vl":
    return tokens.ADDED_TOKENS + tokens.QWEN3_ADDED_TOKENS
  raise ValueError(f"no tiny tokenizer for model family {family!r}")


def build_tiny_tokenizer(
  vocab_size: int = DEFAULT_VOCAB_SIZE, *, family: str = "qwen2_5_vl"
) -> tokenizers.Tokenizer:
  """Trains the tiny BPE on the built-in corpus and appends Qwen's added tokens, in Qwen's order."""
  tok = _base_tokenizer()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=1,
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    special_tokens=[],
  )
  # The chat markup is in the corpus for realistic text around it, but must not become BPE entries.
  added = _added_tokens(family)
  tok.train_from_iterator([_strip_added(t, added) for t in _CORPUS], trainer=trainer)
  base = tok.get_vocab_size(with_added_tokens=False)
  tok.add_special_tokens(
    [tokenizers.AddedToken(t, special=True, normalized=False) for t in tokens.SPECIAL_TOKENS]
  )
  tok.add_tokens(
    [
      tokenizers.AddedToken(t, special=False, normalized=False)
      for t in added[len(tokens.SPECIAL_TOKENS) :]
    ]
  )
  for offset, t in enumerate(added):
    assert tok.token_to_id(t) == base + offset, (t, tok.token_to_id(t), base + offset)
  return tok


def _strip_added(text: str, added: tuple[str, ...]) -> str:
  """Removes the vocabulary's added tokens from corpus text."""
  for t in added:
    text = text.replace(t, "\n")
  return text


def _tokenizer_config(tok: tokenizers.Tokenizer, family: str, template: str) -> dict:
  """`tokenizer_config.json` as the family's hub repository has it, for this vocabulary."""
  added = {
    str(tok.token_to_id(t)): {
      "content": t,
      "lstrip": False,
      "normalized": False,
      "rstrip": False,
      "single_word": False,
      "special": t in tokens.SPECIAL_TOKENS,
    }
    for t in _added_tokens(family)
  }
  return {
    "add_bos_token": False,
    "add_prefix_space": False,
    "added_tokens_decoder": added,
    "additional_special_tokens": list(tokens.SPECIAL_TOKENS[1:]),
    "bos_token": None,
    "chat_template": template,
    "clean_up_tokenization_spaces": False,
    "eos_token": tokens.IM_END,
    "errors": "replace",
    "model_max_length": 32768,
    "pad_token": tokens.ENDOFTEXT,
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2Tokenizer",
    "unk_token": None,
  }


def _special_tokens_map() -> dict:
  """`special_tokens_map.json` as the hub repository has it."""

  def entry(t: str) -> dict:
    return {
      "content": t,
      "lstrip": False,
      "normalized": False,
      "rstrip": False,
      "single_word": False,
    }

  return {
    "additional_special_tokens": list(tokens.SPECIAL_TOKENS[1:]),
    "eos_token": entry(tokens.IM_END),
    "pad_token": entry(tokens.ENDOFTEXT),
  }


def _vocab_and_merges(tok: tokenizers.Tokenizer) -> tuple[dict[str, int], list[str]]:
  """The BPE vocabulary (by id) and merges (as "a b" lines), added tokens excluded."""
  model = json.loads(tok.to_str())["model"]
  vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return vocab, merges


def _write(path: pathlib.Path, text: str) -> None:
  """Writes UTF-8 text with \n line ends on every platform."""
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.write(text)


def _dump(value: object) -> str:
  """Indented JSON, as save_pretrained writes it."""
  return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def make_tiny_tokenizer(
  path: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE, *, family: str = "qwen2_5_vl"
) -> pathlib.Path:
  """Builds the tiny tokenizer of a model family into directory `path` (hub layout)."""
  out = pathlib.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  tok = build_tiny_tokenizer(vocab_size, family=family)
  template = QWEN3_VL_CHAT_TEMPLATE if family == "qwen3_vl" else QWEN2_VL_CHAT_TEMPLATE
  vocab, merges = _vocab_and_merges(tok)
  _write(out / "tokenizer.json", tok.to_str(pretty=True) + "\n")
  _write(out / "vocab.json", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
  _write(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
  _write(out / "tokenizer_config.json", _dump(_tokenizer_config(tok, family, template)))
  _write(out / "special_tokens_map.json", _dump(_special_tokens_map()))
  # transformers 5 reads the template from here first; 4.x reads tokenizer_config.json.
  _write(out / "chat_template.jinja", template)
  return out


def tiny_special_token_ids(path: str | os.PathLike) -> tokens.SpecialTokenIds:
  """Special token ids (and vocabulary size) of a tokenizer saved by `make_tiny_tokenizer`."""
  return tokens.special_token_ids(tokens.load_tokenizer(path))
