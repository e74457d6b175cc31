"""The tiny test tokenizer: Qwen2 pipeline and added tokens, HF round trip, determinism."""

import hashlib
import subprocess
import sys

import pytest

from rrvf_jax.processing import tokens
from rrvf_jax.processing.chat import QWEN2_VL_CHAT_TEMPLATE
from rrvf_jax.testing import tokenizer as tiny

transformers = pytest.importorskip("transformers")
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402  (a module, not the function of the same name)

TEXTS = [
  "import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(8, 6))\nplt.savefig('a.png')\n",
  '<div class="header" style="color: #ff0000">Hello, World!</div>\n\n\n   <p>x</p>',
  '<tool_call>\n{"name": "render_chart", "arguments": {"code": "x = 1"}}\n</tool_call>',
  "<|im_start|>user\nWhat's this? It's a chart; they'll say 12345.<|im_end|>\n"
  "<|im_start|>assistant\n",
  "<think>\nThe bars are blue.\n</think>\n<answer>plt.bar([1], [2])</answer>",
  "Unicode: Café 東京 数据可视化 Привет 📊 ½, tabs\tand  double  spaces  \r\n end",
  "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Describe.<|fim_prefix|>a<|file_sep|>",
  "",
]


def test_pre_tokenizer_regex_is_qwen2s():
  from transformers.models.qwen2 import tokenization_qwen2

  assert tiny.PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX


def test_added_tokens_follow_the_base_vocabulary_in_qwen_order(tok):
  base = tok.get_vocab_size(with_added_tokens=False)
  assert 1000 <= base <= 2048
  assert [tok.token_to_id(t) for t in tokens.ADDED_TOKENS] == list(
    range(base, base + len(tokens.ADDED_TOKENS))
  )
  assert tok.get_vocab_size(with_added_tokens=True) == base + 22
  # All 256 byte symbols are in the base vocabulary, so any text encodes without unknowns.
  alphabet = bytes_to_unicode().values()
  assert all(tok.token_to_id(c) is not None and tok.token_to_id(c) < base for c in alphabet)


def test_auto_tokenizer_loads_offline_with_the_same_ids(tok, hf_tok):
  assert type(hf_tok).__name__ == "Qwen2Tokenizer"
  assert len(hf_tok) == tok.get_vocab_size(with_added_tokens=True)
  for text in TEXTS:
    want = tok.encode(text, add_special_tokens=False).ids
    assert hf_tok.encode(text, add_special_tokens=False) == want, text
    assert hf_tok(text)["input_ids"] == want  # Qwen adds no BOS/EOS
    assert tokens.encode_text(hf_tok, text) == tokens.encode_text(tok, text) == want


def test_special_tokens_and_ids(tiny_tokenizer_dir, tok, hf_tok):
  ids = tiny.tiny_special_token_ids(tiny_tokenizer_dir)
  assert ids == tokens.special_token_ids(hf_tok) == tokens.special_token_ids(tok)
  assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_token_id == ids.im_end
  assert hf_tok.pad_token == "<|endoftext|>" and hf_tok.pad_token_id == ids.pad_token_id
  assert hf_tok.bos_token is None
  assert ids.image_token_id == hf_tok.convert_tokens_to_ids("<|image_pad|>")
  assert ids.video_token_id == hf_tok.convert_tokens_to_ids("<|video_pad|>")
  assert ids.vision_start_token_id == hf_tok.convert_tokens_to_ids("<|vision_start|>")
  assert ids.vision_end_token_id == hf_tok.convert_tokens_to_ids("<|vision_end|>")
  assert ids.eos_token_ids == (ids.im_end, ids.endoftext)
  assert ids.vocab_size == len(hf_tok)
  assert set(hf_tok.all_special_tokens) == set(tokens.SPECIAL_TOKENS)
  # Each added token is one id, also when glued to text.
  assert tokens.encode_text(tok, "a<|im_end|>b<tool_call>c")[1] == ids.im_end
  assert tokens.encode_text(tok, "a<|im_end|>b<tool_call>c")[3] == ids.tool_call_start


def test_skip_special_tokens_keeps_tool_call(tok, hf_tok):
  text = '<|im_start|>assistant\n<tool_call>\n{"name": "f"}\n</tool_call><|im_end|>'
  ids = tokens.encode_text(tok, text)
  want = 'assistant\n<tool_call>\n{"name": "f"}\n</tool_call>'
  assert hf_tok.decode(ids, skip_special_tokens=True) == want
  assert tokens.decode(tok, ids) == tokens.decode(hf_tok, ids) == want
  assert tokens.decode(tok, ids, skip_special_tokens=False) == text


def test_byte_level_round_trip(tok, hf_tok):
  for text in TEXTS:
    ids = tokens.encode_text(tok, text)
    assert tokens.decode(tok, ids, skip_special_tokens=False) == text
    assert hf_tok.decode(ids, skip_special_tokens=False) == text


def test_files_and_chat_template(tiny_tokenizer_dir, hf_tok):
  names = {p.name for p in tiny_tokenizer_dir.iterdir()}
  assert names == {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
  }
  assert hf_tok.chat_template == QWEN2_VL_CHAT_TEMPLATE


def test_tokenizer_files_are_byte_identical_across_builds(tmp_path, tiny_tokenizer_dir):
  again = tiny.make_tiny_tokenizer(tmp_path / "again")
  for path in tiny_tokenizer_dir.iterdir():
    assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_build_is_deterministic_in_a_fresh_process(tmp_path, tiny_tokenizer_dir):
  # A new interpreter gets new hash seeds (Python's and Rust's), which would expose any ordering
  # that depends on hashing.
  code = (
    "import sys; from rrvf_jax.testing.tokenizer import make_tiny_tokenizer; "
    "make_tiny_tokenizer(sys.argv[1])"
  )
  subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh")], check=True)
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
    want = hashlib.sha256((tiny_tokenizer_dir / name).read_bytes()).hexdigest()
    assert hashlib.sha256((tmp_path / "fresh" / name).read_bytes()).hexdigest() == want, name
