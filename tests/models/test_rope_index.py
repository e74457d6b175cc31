"""Host-side index arrays against transformers' own functions (rope index, vision windows)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import vision_utils  # noqa: E402

from rrvf_jax.models.qwen_vl import rope  # noqa: E402
from rrvf_jax.testing import hf_reference as ref  # noqa: E402

GRIDS = [[[1, 16, 20]], [[1, 4, 6], [1, 16, 16]], [[1, 6, 10], [2, 8, 8]], [[1, 2, 2]]]


@pytest.mark.parametrize("grids", GRIDS)
def test_window_index_matches_transformers(grids):
  g = np.asarray(grids)
  want_index, want_cu = vision_utils.get_vision_window_index(torch.from_numpy(g), 2, 112, 14)
  index, cu = rope.vision_window_index(g, 2, 112, 14)
  np.testing.assert_array_equal(index, want_index.numpy())
  np.testing.assert_array_equal(cu, want_cu.numpy())


@pytest.mark.parametrize("grids", GRIDS)
def test_vision_positions_and_cu_seqlens_match_transformers(grids):
  g = torch.as_tensor(grids)
  want = vision_utils.get_vision_position_ids(g, 2).numpy()
  got = rope.vision_position_ids(np.asarray(grids), 2)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(
    rope.vision_cu_seqlens(np.asarray(grids)), vision_utils.get_vision_cu_seqlens(g).numpy()
  )


def test_worked_example_from_the_spec():
  # [t0 t1 t2 <vs> <pad>x15 <ve> t4 t5], grid (1, 6, 10): shared/research/qwen_vl_port.md §3.3.
  ids = np.asarray([[1, 2, 3, 9] + [7] * 15 + [8, 4, 5]])
  pos, delta = rope.get_rope_index(ids, np.asarray([[1, 6, 10]]), None, image_token_id=7)
  np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, 3] + [4] * 15 + [9, 10, 11])
  np.testing.assert_array_equal(pos[1, 0], [0, 1, 2, 3] + [4] * 5 + [5] * 5 + [6] * 5 + [9, 10, 11])
  np.testing.assert_array_equal(pos[2, 0], [0, 1, 2, 3] + [4, 5, 6, 7, 8] * 3 + [9, 10, 11])
  assert delta.tolist() == [-10]


def test_rope_index_matches_transformers_on_padded_batch():
  cfg = ref.tiny_hf_config("qwen2_5_vl")
  import transformers

  model = transformers.Qwen2_5_VLModel(cfg)
  img = cfg.image_token_id
  rows = [
    [1, 2, 502] + [img] * 6 + [503, 3],
    [4, 502] + [img] * 4 + [503, 5, 502] + [img] * 2 + [503],
  ]
  grids = np.asarray([[1, 4, 6], [1, 4, 4], [1, 2, 4]])
  length = max(map(len, rows))
  ids = np.zeros((2, length), np.int64)
  mask = np.zeros_like(ids)
  for b, row in enumerate(rows):
    ids[b, length - len(row) :], mask[b, length - len(row) :] = row, 1
  t = torch.from_numpy
  want_pos, want_delta = model.get_rope_index(
    t(ids),
    mm_token_type_ids=t((ids == img).astype(np.int64)),
    image_grid_thw=t(grids),
    attention_mask=t(mask),
  )
  pos, delta = rope.get_rope_index(ids, grids, mask, image_token_id=img)
  np.testing.assert_array_equal(pos, want_pos.numpy())
  np.testing.assert_array_equal(delta, want_delta.numpy().ravel())
