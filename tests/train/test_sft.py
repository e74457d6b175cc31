"""SFT batches and loss: answer format, assistant-only mask, padding, length errors, stacking."""

import jax
import numpy as np
import pytest
from flax import nnx
from train_sizes import MAX_LENGTH

from rrvf_jax.env import parsing
from rrvf_jax.models.qwen_vl import QwenVL
from rrvf_jax.processing import tokens
from rrvf_jax.train import sft

CODE = "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 4])\nplt.title(\"x\")"


def test_answer_parses_back_to_the_code():
  turn = parsing.parse_turn(sft.answer_text(CODE) + "<|im_end|>", "chart")
  assert turn.action == "answer"
  assert turn.answer.ok and turn.answer.code == CODE
  assert not turn.tool_calls
  # Surrounding newlines are not part of the code.
  assert sft.answer_text("\n" + CODE + "\n\n") == sft.answer_text(CODE)


def test_batch_layout(tok, cfg, sft_batch, examples):
  ids = np.asarray(sft_batch.inputs.input_ids)
  mask = np.asarray(sft_batch.inputs.attention_mask)
  targets, loss_mask = np.asarray(sft_batch.targets), np.asarray(sft_batch.loss_mask)
  special = tokens.special_token_ids(tok)
  assert ids.shape == targets.shape == loss_mask.shape == (8, MAX_LENGTH)
  for row, example in enumerate(examples):
    n = int(mask[row].sum())
    assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
    assert (ids[row, n:] == special.pad_token_id).all()
    np.testing.assert_array_equal(targets[row, : n - 1], ids[row, 1:n])
    # The trained targets are exactly the assistant's answer and its <|im_end|>.
    trained = targets[row][loss_mask[row] > 0]
    assert trained[-1] == special.im_end
    assert tok.decode(trained.tolist(), skip_special_tokens=False) == (
      sft.answer_text(example["code"]) + "<|im_end|>"
    )
    # One image per row: 56x56 pixels -> 4 merged tokens.
    assert (ids[row] == cfg.image_token_id).sum() == 4
    assert not loss_mask[row, n - 1 :].any()
  assert sft_batch.inputs.pixel_values.shape == (8 * 16, cfg.vision.patch_dim)


def test_system_prompt_and_tools_are_in_the_prompt(tok, cfg, ipc, examples):
  tools = parsing.tool_schemas("chart")
  encoded, _ = sft.encode_sft_example(
    tok, cfg, examples[0], image_processor_cfg=ipc, system_prompt="Be brief.", tools=tools
  )
  text = tok.decode(encoded.input_ids.tolist(), skip_special_tokens=False)
  assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
  assert '"name": "render_chart"' in text
  assert text.endswith(
    "<|im_start|>assistant\n" + sft.answer_text(examples[0]["code"]) + "<|im_end|>\n"
  )


def test_too_long_example_is_an_error(tok, cfg, ipc, examples):
  n0, n1 = (sft.sft_example_length(tok, cfg, e, image_processor_cfg=ipc) for e in examples[:2])
  assert n0 < n1  # example 0 fits, example 1 is reported
  with pytest.raises(
    ValueError, match=rf"SFT example 1 has {n1} tokens, more than max_length={n0}"
  ):
    sft.make_sft_batch(tok, cfg, examples[:2], max_length=n0, image_processor_cfg=ipc)


def test_missing_key_is_an_error(tok, cfg, ipc):
  with pytest.raises(ValueError, match=r"missing keys \['code'\]"):
    sft.make_sft_batch(tok, cfg, [{"image": np.zeros((56, 56, 3), np.uint8)}], max_length=64,
                       image_processor_cfg=ipc)  # fmt: skip


def test_micro_batches_stack_equal_halves(tok, cfg, ipc, examples, sft_batch):
  stacked = sft.make_sft_batch(
    tok, cfg, examples, max_length=MAX_LENGTH, image_processor_cfg=ipc, micro_batches=2
  )
  assert stacked.inputs.input_ids.shape == (2, 4, MAX_LENGTH)
  assert stacked.inputs.positions.shape == (2, 3, 4, MAX_LENGTH)
  assert stacked.inputs.pixel_values.shape == (2, 4 * 16, cfg.vision.patch_dim)
  np.testing.assert_array_equal(
    stacked.targets.reshape(8, MAX_LENGTH), np.asarray(sft_batch.targets)
  )
  with pytest.raises(ValueError, match="do not split into 3 micro-batches"):
    sft.make_sft_batch(tok, cfg, examples, max_length=MAX_LENGTH, image_processor_cfg=ipc,
                       micro_batches=3)  # fmt: skip


def test_micro_batches_need_one_image_size(tok, cfg, ipc, examples):
  odd = [*examples[:3], {**examples[3], "image": np.zeros((112, 56, 3), np.uint8)}]
  with pytest.raises(ValueError, match=r"micro-batch 1: .*pixel_values has shape"):
    sft.make_sft_batch(tok, cfg, odd, max_length=MAX_LENGTH, image_processor_cfg=ipc,
                       micro_batches=2)  # fmt: skip


@pytest.fixture(scope="module")
def loss_fn(cfg):
  """The SFT loss of a tiny random model, compiled once."""
  graphdef, params = nnx.split(QwenVL(cfg, rngs=nnx.Rngs(1)))
  fn = jax.jit(lambda p, b: sft.sft_loss(nnx.merge(graphdef, p), b, chunk_size=32)[:2])
  return lambda b: fn(params, b)


def _with_target(batch, row, col, value):
  targets = np.array(batch.targets)
  targets[row, col] = value
  return sft.SFTBatch(batch.inputs, targets, batch.loss_mask)


def test_loss_counts_assistant_tokens_only(loss_fn, sft_batch):
  loss, weight = loss_fn(sft_batch)
  assert float(weight) == float(np.sum(sft_batch.loss_mask))
  assert np.isfinite(float(loss)) and float(loss) > 0
  loss_mask = np.asarray(sft_batch.loss_mask)
  targets = np.asarray(sft_batch.targets)
  prompt_col = int(np.flatnonzero(loss_mask[0] == 0)[5])
  answer_col = int(np.flatnonzero(loss_mask[0] > 0)[3])
  pad_col = int(np.flatnonzero(np.asarray(sft_batch.inputs.attention_mask)[0] == 0)[0])
  for col in (prompt_col, pad_col):
    changed = _with_target(sft_batch, 0, col, (targets[0, col] + 7) % 512)
    np.testing.assert_array_equal(loss_fn(changed)[0], loss)
  changed = _with_target(sft_batch, 0, answer_col, (targets[0, answer_col] + 7) % 512)
  assert float(loss_fn(changed)[0]) != float(loss)


def _conversation_example(rng_seed: int, rounds: int) -> dict:
  """A self-correction example (data.revisions): `rounds` drafts, each with a 56x56 render."""
  import random

  from rrvf_jax import env
  from rrvf_jax.data import revisions

  code = "import matplotlib.pyplot as plt\nplt.bar(['A','B','C'],[3,1,2],color='tab:blue')\n"
  rng = random.Random(rng_seed)
  drafts = [
    revisions.Draft(code.replace("tab:blue", "tab:red"), None),
    revisions.Draft(code.replace("[3,1,2]", "[3,1,4]"), None),
  ][:rounds]
  drafts = [
    revisions.Draft(d.code, revisions.Defect("color", d.code, "red, not blue")) for d in drafts
  ]
  tool = {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Colours."}]}
  messages = revisions.conversation(
    code, drafts, [tool] * rounds, tool_name=env.CHART_TOOL.name, description="a bar chart"
  )
  images = np.random.default_rng(rng.randrange(100)).integers(0, 256, (rounds + 1, 56, 56, 3))
  return {
    "id": f"conv-{rounds}",
    "image": images[0].astype(np.uint8),
    "code": code,
    "conversation": messages,
    "turn_images": [i.astype(np.uint8) for i in images[1:]],
  }


def test_conversation_trains_assistant_turns_and_masks_tool_responses_and_defects(tok, cfg, ipc):
  example = _conversation_example(0, rounds=2)
  encoded, pixels = sft.encode_sft_example(tok, cfg, example, image_processor_cfg=ipc)
  assert pixels.image_grid_thw.shape == (3, 3)  # the target and two renders
  text = tok.decode(encoded.input_ids.tolist(), skip_special_tokens=False)
  assert text.count("<tool_response>") == 2 and text.count("<|vision_start|>") == 3
  trained_ids = encoded.input_ids[encoded.loss_mask == 1].tolist()
  trained = tok.decode(trained_ids, skip_special_tokens=False)
  # The thoughts, the calls' correct parts and the final answer are learned ...
  assert trained.startswith("<think>The target is a bar chart. I will render a draft")
  assert "The render differs: red, not blue. I will fix it." in trained
  assert trained.endswith("</answer><|im_end|>") and trained.count("<tool_call>") == 2
  # ... the tool responses, their images and the drafts' defects are not.
  assert "Colours." not in trained and "<|image_pad|>" not in trained
  assert "tab:red" not in trained and "3,1,4" not in trained and "tab:blue" in trained
  # Answer-only encoding of the same example when conversations are off.
  plain, plain_pixels = sft.encode_sft_example(
    tok, cfg, example, image_processor_cfg=ipc, use_conversation=False
  )
  assert plain_pixels.image_grid_thw.shape == (1, 3) and len(plain) < len(encoded)


def test_conversation_errors_name_the_example(tok, cfg, ipc):
  example = _conversation_example(0, rounds=1)
  with pytest.raises(ValueError, match=r"conv-1: its conversation shows 1 images .* 0 turn_images"):
    sft.encode_sft_example(tok, cfg, {**example, "turn_images": []}, image_processor_cfg=ipc)
  ends_with_tool = {**example, "conversation": example["conversation"][:2]}
  with pytest.raises(ValueError, match="conv-1: its conversation must end with an assistant"):
    sft.encode_sft_example(tok, cfg, ends_with_tool, image_processor_cfg=ipc)


def test_tool_responses_are_cut_like_the_episode_driver_cuts_them(tok, cfg, ipc):
  example = _conversation_example(0, rounds=1)
  long = {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "x y " * 300}]}
  example["conversation"] = [example["conversation"][0], long, example["conversation"][2]]
  full, _ = sft.encode_sft_example(tok, cfg, example, image_processor_cfg=ipc)
  cut, _ = sft.encode_sft_example(
    tok, cfg, example, image_processor_cfg=ipc, max_response_tokens=40
  )
  assert len(full) - len(cut) > 200
  text = tok.decode(cut.input_ids.tolist(), skip_special_tokens=False)
  assert "[...]" in text


def test_row_slots_give_the_concatenated_layouts_loss(tok, cfg, ipc, examples, loss_fn):
  mixed = [
    examples[0],
    _conversation_example(1, rounds=2),
    examples[1],
    _conversation_example(2, rounds=1),
  ]
  kw = dict(max_length=416, image_processor_cfg=ipc)
  slots = sft.make_sft_batch(tok, cfg, mixed, max_images=3, **kw)
  concatenated = sft.make_sft_batch(tok, cfg, mixed, **kw)
  assert slots.inputs.pixel_values.shape == (4 * 3, 16, cfg.vision.patch_dim)
  assert concatenated.inputs.pixel_values.shape == ((1 + 3 + 1 + 2) * 16, cfg.vision.patch_dim)
  np.testing.assert_array_equal(slots.inputs.positions, concatenated.inputs.positions)
  a, b = loss_fn(slots), loss_fn(concatenated)
  assert float(a[1]) == float(b[1])
  np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-5)
  with pytest.raises(ValueError, match=r"conv-2 shows 3 images, more than sft\.max_images=2"):
    sft.make_sft_batch(tok, cfg, mixed, max_images=2, **kw)
