"""Input pipeline: epochs cover the data, hosts get disjoint slices of each global batch, order is
seeded, resuming from a saved state gives exactly the remaining batches; image decoding errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from rrvf_jax.data import BatchIterator, decode_image


def _source(n: int) -> list[dict]:
  """n example dicts whose `id` is their index."""
  return [{"id": f"ex{i}", "value": i} for i in range(n)]


def _ids(batch: list[dict]) -> list[int]:
  return [e["value"] for e in batch]


def test_each_epoch_covers_every_example_once():
  it = BatchIterator(_source(10), 4, seed=1, num_epochs=2, drop_remainder=False)
  batches = [_ids(b) for b in it]
  assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
  first = [i for b in batches[:3] for i in b]
  second = [i for b in batches[3:] for i in b]
  assert sorted(first) == sorted(second) == list(range(10))
  assert first != second  # each epoch has its own order


def test_drop_remainder_keeps_batches_full():
  it = BatchIterator(_source(10), 4, seed=0, num_epochs=3)
  batches = [_ids(b) for b in it]
  assert it.batches_per_epoch == 2 and len(batches) == 6
  assert all(len(b) == 4 and len(set(b)) == 4 for b in batches)


def test_order_is_seeded_and_unshuffled_order_is_dataset_order():
  a = [_ids(b) for b in BatchIterator(_source(12), 3, seed=7, num_epochs=1)]
  b = [_ids(b) for b in BatchIterator(_source(12), 3, seed=7, num_epochs=1)]
  c = [_ids(b) for b in BatchIterator(_source(12), 3, seed=8, num_epochs=1)]
  assert a == b and a != c
  plain = [_ids(b) for b in BatchIterator(_source(6), 3, shuffle=False, num_epochs=1)]
  assert plain == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_hosts_get_disjoint_slices_of_each_global_batch(drop_remainder):
  n, global_batch, hosts = 22, 8, 4
  single = list(BatchIterator(_source(n), global_batch, seed=3, num_epochs=2,
                              drop_remainder=drop_remainder))  # fmt: skip
  per_host = [
    list(
      BatchIterator(
        _source(n),
        global_batch,
        seed=3,
        num_epochs=2,
        drop_remainder=drop_remainder,
        process_index=p,
        process_count=hosts,
      )
    )
    for p in range(hosts)
  ]
  assert all(len(h) == len(single) for h in per_host)
  for step, whole in enumerate(single):
    parts = [_ids(h[step]) for h in per_host]
    assert [i for p in parts for i in p] == _ids(whole)  # host p holds the p-th contiguous slice
    if len(whole) == global_batch:
      assert all(len(p) == global_batch // hosts for p in parts)
  if not drop_remainder:  # the partial last batch (6 examples) is spread as evenly as possible
    assert [len(h[2]) for h in per_host] == [2, 2, 1, 1]


@pytest.mark.parametrize("stop_after", [0, 1, 2, 5, 6])
def test_resume_yields_exactly_the_remaining_batches(stop_after):
  def make():
    return BatchIterator(_source(11), 4, seed=5, num_epochs=3, drop_remainder=False)

  full = [_ids(b) for b in make()]
  first = make()
  head = [_ids(next(first)) for _ in range(stop_after)]
  state = json.loads(json.dumps(first.get_state()))  # it round-trips through JSON
  resumed = make()
  resumed.set_state(state)
  assert head + [_ids(b) for b in resumed] == full


def test_resume_on_another_host_count_continues_the_same_global_stream():
  one = BatchIterator(_source(16), 4, seed=2)
  for _ in range(5):
    next(one)
  host = BatchIterator(_source(16), 4, seed=2, process_index=1, process_count=2)
  host.set_state(one.get_state())
  assert _ids(next(host)) == _ids(next(one))[2:]


def test_state_that_does_not_fit_is_rejected():
  it = BatchIterator(_source(10), 2, seed=0)
  state = it.get_state()
  with pytest.raises(ValueError, match="has seed=1 but this iterator has seed=0"):
    it.set_state({**state, "seed": 1})
  with pytest.raises(ValueError, match="has num_records=11 but this iterator has num_records=10"):
    it.set_state({**state, "num_records": 11})
  with pytest.raises(ValueError, match="lacks key\\(s\\) batch_in_epoch"):
    it.set_state({k: v for k, v in state.items() if k != "batch_in_epoch"})
  with pytest.raises(ValueError, match="batch_in_epoch=5 is out of range"):
    it.set_state({**state, "batch_in_epoch": 5})


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="the dataset list is empty"):
    BatchIterator([], 2)
  with pytest.raises(ValueError, match="has 3 examples, fewer than one global batch of 4"):
    BatchIterator(_source(3), 4)
  with pytest.raises(ValueError, match="global_batch_size 6 is not divisible by process_count 4"):
    BatchIterator(_source(10), 6, process_count=4)
  with pytest.raises(ValueError, match="need 0 <= process_index < process_count, got 2 and 2"):
    BatchIterator(_source(10), 2, process_index=2, process_count=2)


def test_iterates_a_built_dataset(charts_train):
  it = BatchIterator(charts_train, 4, seed=0, num_epochs=1, process_index=1, process_count=2)
  batches = list(it)
  assert len(batches) == 2 and all(len(b) == 2 for b in batches)
  assert all(
    e["id"].startswith("train-") and e["image"][:4] == b"\x89PNG" for b in batches for e in b
  )


def _encode(array: np.ndarray, mode: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, format="PNG")
  return buf.getvalue()


def test_decode_image_modes():
  rgba = np.zeros((2, 3, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent
  out = decode_image(_encode(rgba, "RGBA"), "ex")
  assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
  assert out[0, 0].tolist() == [200, 0, 0] and out[1, 2].tolist() == [255, 255, 255]
  gray = decode_image(_encode(np.full((4, 5), 9, np.uint8), "L"), "ex")
  assert gray.shape == (4, 5, 3) and (gray == 9).all()


@pytest.mark.parametrize("payload", [b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 30, b""])
def test_corrupt_image_is_one_error_naming_the_example(payload):
  with pytest.raises(ValueError, match="example 'chart-17'"):
    decode_image(payload, "chart-17")


def test_truncated_png_is_an_error():
  data = _encode(np.arange(300, dtype=np.uint8).reshape(10, 10, 3), "RGB")
  with pytest.raises(ValueError, match="example 'x': corrupt image"):
    decode_image(data[: len(data) // 2], "x")
