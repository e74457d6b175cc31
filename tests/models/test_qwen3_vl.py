"""Qwen3-VL against transformers (float32, tiny random checkpoint): logits, layers, indices, I/O.

One checkpoint (module scope) serves every test; shapes are tiny so the module runs in seconds.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from rrvf_jax import models, sharding  # noqa: E402
from rrvf_jax.models import qwen_vl  # noqa: E402
from rrvf_jax.models.qwen_vl import params, rope  # noqa: E402
from rrvf_jax.testing import hf_reference as ref  # noqa: E402

IMG, VS, VE = (
  ref.TINY_TOKEN_IDS[k] for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id")
)
REL_TOL = 1e-4
PATCH_DIM = 3 * 2 * 16 * 16
BIG = [1, 12, 16]  # Larger than the 6 x 6 position table on both sides: upsampled.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("qwen3_vl")
  return path, ref.make_tiny_checkpoint(path, "qwen3_vl")


@pytest.fixture(scope="module")
def ours(checkpoint):
  return models.from_hf(checkpoint[0])


def _text(rng, n):
  return rng.integers(0, 400, n).tolist()


def _image_tokens(grid):
  return [VS] + [IMG] * (int(np.prod(grid)) // 4) + [VE]


def _pixels(rng, grids):
  n = int(sum(np.prod(g) for g in grids))
  return rng.normal(size=(n, PATCH_DIM)).astype(np.float32)


def _relative_error(want, got, mask=None):
  got = np.asarray(got)
  assert want.shape == got.shape
  if mask is not None:  # Outputs at padded positions are don't-care.
    keep = np.asarray(mask, bool)
    want, got = want[keep], got[keep]
  return np.abs(want - got).max() / np.abs(want).max()


def _assert_close(want, got, mask=None):
  rel = _relative_error(want, got, mask)
  assert rel <= REL_TOL, f"max abs err / max abs logit = {rel:.2e}"


def _padded_batch(rng, side):
  """3 rows: images in rows 0 and 2 (of different grids), text only in row 1; `side` padding."""
  g0, g1 = [1, 4, 6], [1, 8, 4]
  rows = [
    _text(rng, 4) + _image_tokens(g0) + _text(rng, 6),
    _text(rng, 9),
    _text(rng, 2) + _image_tokens(g1) + _text(rng, 3),
  ]
  length = max(map(len, rows))
  ids = np.zeros((3, length), np.int64)
  mask = np.zeros((3, length), np.int64)
  for b, row in enumerate(rows):
    sl = slice(length - len(row), length) if side == "left" else slice(0, len(row))
    ids[b, sl], mask[b, sl] = row, 1
  kw = {
    "attention_mask": mask,
    "pixel_values": _pixels(rng, [g0, g1]),
    "image_grid_thw": np.asarray([g0, g1]),
  }
  return ids, kw


def test_family_is_chosen_by_model_type(ours):
  assert type(ours).__name__ == "Qwen3VL"
  assert ours.config.model_type == "qwen3_vl"
  assert ours.config.text.head_dim == 32  # Explicit, unlike hidden_size / num_heads = 16.
  assert qwen_vl.from_hf is models.from_hf  # The Qwen2.5-VL entry point loads every family.


def test_text_only(checkpoint, ours):
  ids = np.asarray([_text(np.random.default_rng(0), 23)])
  _assert_close(ref.hf_logits(checkpoint[1], ids), ours(ids))


def test_one_image_resampling_the_position_table(checkpoint, ours):
  rng = np.random.default_rng(1)
  ids = np.asarray([_text(rng, 5) + _image_tokens(BIG) + _text(rng, 7)])
  kw = {"pixel_values": _pixels(rng, [BIG]), "image_grid_thw": np.asarray([BIG])}
  _assert_close(ref.hf_logits(checkpoint[1], ids, **kw), ours(ids, **kw))


def test_two_images_of_different_sizes(checkpoint, ours):
  rng = np.random.default_rng(2)
  grids = [[1, 6, 10], [1, 4, 4]]
  ids = np.asarray(
    [
      _text(rng, 3)
      + _image_tokens(grids[0])
      + _text(rng, 4)
      + _image_tokens(grids[1])
      + _text(rng, 2)
    ]
  )
  kw = {"pixel_values": _pixels(rng, grids), "image_grid_thw": np.asarray(grids)}
  _assert_close(ref.hf_logits(checkpoint[1], ids, **kw), ours(ids, **kw))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_with_images_in_different_rows(checkpoint, ours, side):
  ids, kw = _padded_batch(np.random.default_rng(3), side)
  _assert_close(ref.hf_logits(checkpoint[1], ids, **kw), ours(ids, **kw), kw["attention_mask"])


def test_vision_tower_and_deepstack_features(checkpoint, ours):
  hf = checkpoint[1]
  rng = np.random.default_rng(4)
  grids = np.asarray([BIG, [1, 6, 10]])
  pv = _pixels(rng, grids)
  with torch.no_grad():
    out = hf.model.visual(torch.from_numpy(pv), grid_thw=torch.from_numpy(grids))
  got = ours.visual(pv, rope.make_vision_index(grids, ours.config.vision))
  _assert_close(out.pooler_output.numpy(), got.merged)
  assert got.deepstack.shape[1] == len(out.deepstack_features) == 2
  for level, want in enumerate(out.deepstack_features):
    _assert_close(want.numpy(), got.deepstack[:, level])


def test_rope_index_matches_transformers(checkpoint):
  ids, kw = _padded_batch(np.random.default_rng(5), "left")
  ids_t = torch.from_numpy(ids)
  want_pos, want_delta = checkpoint[1].model.get_rope_index(
    ids_t,
    (ids_t == IMG).long(),
    image_grid_thw=torch.from_numpy(kw["image_grid_thw"]),
    attention_mask=torch.from_numpy(kw["attention_mask"]),
  )
  pos, delta = rope.get_rope_index(
    ids, kw["image_grid_thw"], kw["attention_mask"], image_token_id=IMG
  )
  np.testing.assert_array_equal(pos, want_pos.numpy())
  np.testing.assert_array_equal(delta, want_delta.numpy()[:, 0])


def test_interleaved_mrope_and_first_decoder_layer(checkpoint, ours):
  lm = checkpoint[1].model.language_model
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 9, 64)).astype(np.float32)
  pos = rng.integers(0, 50, (3, 2, 9))  # Distinct t/h/w positions: the interleaving matters.
  with torch.no_grad():
    cos_t, sin_t = lm.rotary_emb(torch.from_numpy(x), torch.from_numpy(pos))
    causal = (
      torch.full((9, 9), torch.finfo(torch.float32).min).triu(1)[None, None].expand(2, 1, 9, 9)
    )
    want = lm.layers[0](
      torch.from_numpy(x), attention_mask=causal, position_embeddings=(cos_t, sin_t)
    )
    want = (want[0] if isinstance(want, tuple) else want).numpy()
  cos, sin = ours.text.cos_sin(pos)
  np.testing.assert_allclose(np.asarray(cos), cos_t.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(sin), sin_t.numpy(), atol=1e-6)
  valid = np.ones((2, 9), np.int32)  # every token real: the layer's mask is the causal one
  _assert_close(want, ours.text.layers[0](x, cos, sin, valid))


def _flat_params(model):
  return {
    ".".join(map(str, p)): np.asarray(v.get_value())
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def test_export_loads_in_transformers_with_same_logits(checkpoint, ours, tmp_path):
  models.to_hf(ours, tmp_path)
  reloaded, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
    tmp_path, dtype=torch.float32, output_loading_info=True
  )
  assert not any(info.values()), info
  ids, kw = _padded_batch(np.random.default_rng(7), "right")
  want = ref.hf_logits(checkpoint[1], ids, **kw)
  # The reloaded model runs transformers' default (sdpa) attention, the reference eager.
  _assert_close(want, ref.hf_logits(reloaded.eval(), ids, **kw), kw["attention_mask"])


def test_from_hf_of_to_hf_is_identical(ours, tmp_path):
  models.to_hf(ours, tmp_path, max_shard_bytes=100_000)  # Forces several shards and an index.
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  again = models.from_hf(tmp_path)
  a, b = _flat_params(ours), _flat_params(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert again.config == ours.config


def test_tied_embeddings_export_without_lm_head(tmp_path):
  cfg = models.get_preset("tiny-qwen3-vl")
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=True))
  model = models.build_model(cfg, dtype=np.float32, rngs=nnx.Rngs(0))
  models.to_hf(model, tmp_path)
  keys, _ = params.read_safetensors_header(str(tmp_path / "model.safetensors"))
  assert "lm_head.weight" not in keys and "model.language_model.embed_tokens.weight" in keys
  reloaded, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
    tmp_path, dtype=torch.float32, output_loading_info=True
  )
  assert not any(info.values()), info
  ids = np.asarray([_text(np.random.default_rng(8), 11)])
  _assert_close(ref.hf_logits(reloaded.eval(), ids), model(ids))


def test_sharded_load_gives_the_same_logits(checkpoint, ours):
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  sharded = models.from_hf(checkpoint[0], mesh=mesh)
  table = sharded.visual.pos_embed.get_value()
  assert table.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  rng = np.random.default_rng(9)
  ids = np.asarray([_text(rng, 3) + _image_tokens([1, 4, 8]) + _text(rng, 2)])
  kw = {"pixel_values": _pixels(rng, [[1, 4, 8]]), "image_grid_thw": np.asarray([[1, 4, 8]])}
  np.testing.assert_allclose(np.asarray(sharded(ids, **kw)), np.asarray(ours(ids, **kw)), atol=1e-5)


def _bad_copy(checkpoint, tmp_path, edit):
  shutil.copytree(checkpoint[0], tmp_path, dirs_exist_ok=True)
  cfg = json.loads((tmp_path / "config.json").read_text())
  edit(cfg)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  return tmp_path


def _one_line_error(exc_info) -> str:
  message = str(exc_info.value)
  assert "\n" not in message, message
  return message


def test_wrong_model_type_is_one_clear_line(checkpoint, tmp_path):
  path = _bad_copy(checkpoint, tmp_path, lambda c: c.update(model_type="qwen3_vl_moe"))
  with pytest.raises(ValueError) as e:
    models.from_hf(path)
  assert "'qwen3_vl_moe'" in _one_line_error(e) and "qwen3_vl" in str(e.value)


def test_missing_shard_is_one_clear_line(ours, tmp_path):
  models.to_hf(ours, tmp_path, max_shard_bytes=100_000)
  shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
  os.remove(tmp_path / shard)
  with pytest.raises(FileNotFoundError) as e:
    models.from_hf(tmp_path)
  assert shard in _one_line_error(e)


def test_image_token_mismatch_is_one_clear_line(ours):
  rng = np.random.default_rng(10)
  ids = np.asarray([_text(rng, 3) + _image_tokens([1, 4, 4])])
  kw = {"pixel_values": _pixels(rng, [[1, 4, 4]]), "image_grid_thw": np.asarray([[1, 4, 4]])}
  with pytest.raises(ValueError) as e:
    ours(np.delete(ids, 4, axis=1), **kw)
  assert "image token count mismatch" in _one_line_error(e)
