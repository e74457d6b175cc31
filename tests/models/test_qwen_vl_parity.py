"""Parity of the Flax Qwen-VL port with transformers' PyTorch model (float32, tiny weights)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from rrvf_jax.models import qwen_vl  # noqa: E402
from rrvf_jax.models.qwen_vl import rope, vision  # noqa: E402
from rrvf_jax.testing import hf_reference as ref  # noqa: E402

IMG, VS, VE = (
  ref.TINY_TOKEN_IDS[k] for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id")
)
REL_TOL = 1e-4


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def models(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  hf = ref.make_tiny_checkpoint(path, request.param)
  return hf, qwen_vl.from_hf(path)


def _text(rng, n):
  return rng.integers(0, 400, n).tolist()


def _image_tokens(grid):
  return [VS] + [IMG] * (int(np.prod(grid)) // 4) + [VE]


def _pixels(rng, grids):
  n = int(sum(np.prod(g) for g in grids))
  return rng.normal(size=(n, 3 * 2 * 14 * 14)).astype(np.float32)


def _assert_close(hf_out, ours, mask=None):
  ours = np.asarray(ours)
  assert hf_out.shape == ours.shape
  if mask is not None:  # Outputs at padded positions are don't-care.
    keep = np.asarray(mask, bool)
    hf_out, ours = hf_out[keep], ours[keep]
  rel = np.abs(hf_out - ours).max() / np.abs(hf_out).max()
  assert rel <= REL_TOL, f"max abs err / max abs logit = {rel:.2e}"


def test_text_only(models):
  hf, ours = models
  ids = np.asarray([_text(np.random.default_rng(0), 23)])
  _assert_close(ref.hf_logits(hf, ids), ours(ids))


def test_one_image_with_several_windows(models):
  hf, ours = models
  rng = np.random.default_rng(1)
  grid = [1, 16, 20]  # 8x10 merged tokens: 3x3 windows of 4x4, one row empty (HF padding quirk).
  ids = np.asarray([_text(rng, 5) + _image_tokens(grid) + _text(rng, 7)])
  kw = {"pixel_values": _pixels(rng, [grid]), "image_grid_thw": np.asarray([grid])}
  _assert_close(ref.hf_logits(hf, ids, **kw), ours(ids, **kw))


def test_two_images_of_different_sizes(models):
  hf, ours = models
  rng = np.random.default_rng(2)
  grids = [[1, 6, 10], [1, 16, 16]]  # The second divides exactly by the window: empty windows.
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
  _assert_close(ref.hf_logits(hf, ids, **kw), ours(ids, **kw))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_with_images_in_different_rows(models, side):
  hf, ours = models
  rng = np.random.default_rng(3)
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
  _assert_close(ref.hf_logits(hf, ids, **kw), ours(ids, **kw), mask)


def _vision_tower_outputs(models, seed):
  """(transformers' pooler output, ours) for two frames of 16 x 20 and 6 x 10 patches."""
  hf, ours = models
  rng = np.random.default_rng(seed)
  grids = np.asarray([[1, 16, 20], [1, 6, 10]])
  pv = _pixels(rng, grids)
  with torch.no_grad():
    want = hf.model.visual(
      torch.from_numpy(pv), grid_thw=torch.from_numpy(grids)
    ).pooler_output.numpy()
  return want, ours.visual(pv, rope.make_vision_index(grids, ours.config.vision))


def test_vision_tower_matches_pooler_output(models):
  _assert_close(*_vision_tower_outputs(models, 4))


def test_vision_tower_in_flash_tiles_matches_pooler_output(models, monkeypatch):
  # Large frames attend in flash tiles (vision.VISION_FLASH_MIN); lowered here so that the frames
  # (320 and 60 patches, padded to 320) and the windows take tiles of 16.
  monkeypatch.setattr(vision, "VISION_FLASH_MIN", 32)
  monkeypatch.setattr(vision, "VISION_FLASH_BLOCKS", (16,))
  calls = []
  tiled = vision.flash.flash_attention
  monkeypatch.setattr(
    vision.flash, "flash_attention", lambda *a, **kw: calls.append(a[0].shape) or tiled(*a, **kw)
  )
  want, got = _vision_tower_outputs(models, 5)
  assert (2, 320) in [shape[:2] for shape in calls]  # the full-attention frames took the tiles
  _assert_close(want, got)


def test_first_decoder_layer_matches(models):
  hf, ours = models
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 9, 64)).astype(np.float32)
  pos = np.broadcast_to(np.arange(9), (3, 2, 9)).astype(np.int64)
  layer = hf.model.language_model.layers[0]
  with torch.no_grad():
    rot = hf.model.language_model.rotary_emb(torch.from_numpy(x), torch.from_numpy(pos))
    causal = (
      torch.full((9, 9), torch.finfo(torch.float32).min).triu(1)[None, None].expand(2, 1, 9, 9)
    )
    want = layer(torch.from_numpy(x), attention_mask=causal, position_embeddings=rot)
    want = (want[0] if isinstance(want, tuple) else want).numpy()
  cos, sin = rope.mrope_cos_sin(pos, head_dim=16, theta=10000.0, mrope_section=(2, 3, 3))
  valid = np.ones((2, 9), np.int32)  # every token real: the layer's mask is the causal one
  _assert_close(want, ours.text.layers[0](x, cos, sin, valid))
