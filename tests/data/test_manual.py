"""Builders of downloaded datasets, on small fixtures laid out as each builder documents: fields,
splits, PNG normalisation, and one clear error for a missing, empty or mislaid manual_dir."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from rrvf_jax import data
from rrvf_jax.data import ManualDataError
from rrvf_jax.train import sft, sft_loop


def _load(name, split, tmp_path, manual_dir, **kwargs):
  """Builds (into tmp_path/out) and loads one split."""
  return data.load(name, split, data_dir=tmp_path / "out", manual_dir=manual_dir, **kwargs)


def test_chartmimic_splits_per_directory(tmp_path, make_png):
  root = tmp_path / "manual" / "dataset"
  for split, stems in {"direct_600": ["bar_43", "line_7"], "direct_1800": ["HR_2"]}.items():
    (root / split).mkdir(parents=True)
    for i, stem in enumerate(stems):
      (root / split / f"{stem}.py").write_text(
        f"import matplotlib.pyplot as plt\nplt.plot([{i}])\n"
      )
      (root / split / f"{stem}.png").write_bytes(make_png(value=i, mode="RGBA"))
  (root / "direct_600" / "pie_1.py").write_text("# only a pdf exists for this one\n")
  source = _load("chartmimic", "direct_600", tmp_path, tmp_path / "manual")
  assert [e["id"] for e in source] == ["bar_43", "line_7"]  # pie_1 has no png: skipped
  example = source[1]
  assert example["code"] == "import matplotlib.pyplot as plt\nplt.plot([1])\n"
  assert example["chart_type"] == "line"
  assert example["image"] == make_png(value=1, mode="RGBA")  # PNG kept bit for bit
  assert data.decode_image(example["image"], "line_7").shape == (4, 6, 3)
  other = _load("chartmimic", "direct_1800", tmp_path, tmp_path / "manual")
  assert [(e["id"], e["chart_type"]) for e in other] == [("HR_2", "HR")]


def test_plot2code_metadata_and_default_file_names(tmp_path, make_png):
  manual = tmp_path / "manual"
  manual.mkdir()
  lines = [
    {"file_name": "ground_truth_image_0.png", "code": "plt.plot([1])", "instruction": "A line."},
    {"ground_truth_code": "plt.bar([1], [2])"},  # image by its default name, no instruction
  ]
  (manual / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  (manual / "ground_truth_image_0.png").write_bytes(make_png(value=0))
  (manual / "ground_truth_image_1.png").write_bytes(make_png(value=9, fmt="JPEG"))
  source = _load("plot2code", "test", tmp_path, manual)
  assert [(e["id"], e["code"], e["instruction"]) for e in source] == [
    ("ground_truth_image_0", "plt.plot([1])", "A line."),
    ("ground_truth_image_1", "plt.bar([1], [2])", ""),
  ]
  jpeg_as_png = source[1]["image"]
  assert jpeg_as_png[:4] == b"\x89PNG"  # other formats are re-encoded as PNG
  assert data.decode_image(jpeg_as_png, "ground_truth_image_1").shape == (4, 6, 3)


def test_websight_parquet_and_pairs_split_by_hash(tmp_path, make_png):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  manual = tmp_path / "manual"
  (manual / "pages").mkdir(parents=True)
  rows = [{"bytes": make_png(value=i), "path": None} for i in range(4)]
  table = pa.table({"image": rows, "text": [f"<p>row {i}</p>" for i in range(4)]})
  pq.write_table(table, manual / "shard0.parquet", row_group_size=3)
  (manual / "pages" / "about.html").write_text("<h1>About</h1>")
  (manual / "pages" / "about.png").write_bytes(make_png(value=50))
  (manual / "pages" / "lonely.html").write_text("<h1>no screenshot</h1>")  # not a pair: ignored
  train = _load("websight", "train", tmp_path, manual, num_test=2, seed=0)
  test = _load("websight", "test", tmp_path, manual, num_test=2, seed=0)
  all_ids = {f"shard0-{i:07d}" for i in range(4)} | {"pages/about"}
  assert len(test) == 2 and len(train) == 3
  assert {e["id"] for e in train} | {e["id"] for e in test} == all_ids
  by_id = {e["id"]: e for e in [*train, *test]}
  assert by_id["shard0-0000003"]["code"] == "<p>row 3</p>"
  assert by_id["shard0-0000003"]["image"] == make_png(value=3)
  assert by_id["pages/about"]["code"] == "<h1>About</h1>"
  for seed in (0, 1, 2):  # test = the num_test ids with the smallest sha256(f"{seed}:{id}")
    ranked = sorted(all_ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    held_out = _load("websight", "test", tmp_path, manual, num_test=2, seed=seed)
    assert {e["id"] for e in held_out} == set(ranked[:2])
  with pytest.raises(ValueError, match=r"5 examples found .* not more than num_test=5"):
    _load("websight", "train", tmp_path, manual, num_test=5)
  assert len(_load("websight", "train", tmp_path, manual, num_test=0)) == 5
  with pytest.raises(ValueError, match="no split 'test'; available: train"):
    _load("websight", "test", tmp_path, manual, num_test=0)


def test_coldstart_jsonl_splits(tmp_path, make_png):
  manual = tmp_path / "manual"
  (manual / "images").mkdir(parents=True)
  (manual / "images" / "a.png").write_bytes(make_png(value=1))
  (manual / "images" / "b.png").write_bytes(make_png(value=2))
  messages = [{"role": "user", "content": "Draw it"}, {"role": "assistant", "content": "ok"}]
  train = [
    {"image": "images/a.png", "code": "plt.plot([1])", "messages": messages},
    {"id": "custom", "image": "images/b.png", "code": "plt.bar([1], [1])"},
  ]
  (manual / "train.jsonl").write_text("\n".join(json.dumps(x) for x in train))
  (manual / "test.jsonl").write_text(json.dumps({"image": "images/b.png", "code": "x"}))
  source = _load("rrvf_coldstart", "train", tmp_path, manual)
  first, second = source[0], source[1]
  assert (first["id"], first["code"]) == ("train-000001", "plt.plot([1])")
  assert json.loads(first["conversation"]) == messages
  assert (second["id"], second["conversation"]) == ("custom", "")
  np.testing.assert_array_equal(
    data.decode_image(second["image"], "custom"), data.decode_image(make_png(value=2), "x")
  )
  assert len(_load("rrvf_coldstart", "test", tmp_path, manual)) == 1


def test_coldstart_conversation_images_become_turn_images(tmp_path, make_png):
  manual = tmp_path / "manual"
  (manual / "images").mkdir(parents=True)
  for name, value in (("t", 1), ("r1", 2), ("r2", 3)):
    (manual / "images" / f"{name}.png").write_bytes(make_png(value=value))
  call = '<tool_call>\n{"name": "render_chart", "arguments": {"code": "x"}}\n</tool_call>'

  def tool(name):
    return {"role": "tool", "content": [{"type": "image", "image": f"images/{name}.png"}]}

  prompt = [{"type": "image", "image": "images/t.png"}, {"type": "text", "text": "Draw"}]
  messages = [
    {"role": "user", "content": prompt},
    {"role": "assistant", "content": call},
    tool("r1"),
    {"role": "assistant", "content": call},
    tool("r2"),
    {"role": "assistant", "content": "<answer>x</answer>"},
  ]
  line = {"image": "images/t.png", "code": "x", "messages": messages}
  (manual / "train.jsonl").write_text(json.dumps(line))
  (record,) = list(_load("rrvf_coldstart", "train", tmp_path, manual))
  stored = json.loads(record["conversation"])
  assert stored[0] == messages[0]  # the prompt's image stays (the target is `image`)
  assert stored[2]["content"] == [{"type": "image"}] == stored[4]["content"]
  assert [data.decode_image(p, "r")[0, 0, 0] for p in record["turn_images"]] == [
    data.decode_image(make_png(value=v), "v")[0, 0, 0] for v in (2, 3)
  ]
  # SFT reads it as a whole conversation: two renders after the target.
  (example,) = sft_loop.decoded_examples([record], conversations=True)
  assert len(example["turn_images"]) == 2 and len(sft.conversation_turns(example)) == 5
  (manual / "images" / "r2.png").unlink()
  with pytest.raises(ValueError, match=r"train.jsonl:1 \(message 4\): image file .*r2.png"):
    _load("rrvf_coldstart", "train", tmp_path / "again", manual)


@pytest.mark.parametrize("name", ["chartmimic", "plot2code", "websight", "rrvf_coldstart"])
def test_missing_or_empty_manual_dir_is_one_clear_error(tmp_path, name):
  missing = tmp_path / "not_downloaded"
  split = {"chartmimic": "direct_600", "plot2code": "test"}.get(name, "train")
  with pytest.raises(ManualDataError) as error:
    _load(name, split, tmp_path, missing)
  message = str(error.value)
  assert f"{name}: manual_dir {missing} does not exist. Expected layout:\nmanual_dir/" in message
  missing.mkdir()
  with pytest.raises(ManualDataError, match=f"manual_dir {missing} is empty. Expected layout"):
    _load(name, split, tmp_path, missing)
  (missing / "README.txt").write_text("wrong files")
  with pytest.raises(ManualDataError, match=f"{name}: manual_dir {missing} holds no"):
    _load(name, split, tmp_path, missing)


def test_default_manual_dir_is_named(tmp_path):
  with pytest.raises(ManualDataError, match=r"downloads/manual does not exist"):
    data.load("plot2code", "test", data_dir=tmp_path)


def test_corrupt_or_missing_image_names_the_file(tmp_path, make_png):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "train.jsonl").write_text(json.dumps({"image": "x.png", "code": "c"}) + "\n")
  (manual / "x.png").write_bytes(make_png()[:40])  # truncated
  with pytest.raises(ValueError, match=r"train.jsonl:1 \(.*x.png\): cannot decode the image"):
    _load("rrvf_coldstart", "train", tmp_path, manual)
  (manual / "train.jsonl").write_text(json.dumps({"image": "gone.png", "code": "c"}) + "\n")
  with pytest.raises(ValueError, match=r"train.jsonl:1: image file .*gone.png not found"):
    _load("rrvf_coldstart", "train", tmp_path, manual)
  (manual / "train.jsonl").write_text('{"image": "x.png"}\n')
  with pytest.raises(ValueError, match=r"train.jsonl:1: each line needs 'image' and 'code'"):
    _load("rrvf_coldstart", "train", tmp_path, manual)
  (manual / "train.jsonl").write_text("{not json\n")
  with pytest.raises(ValueError, match=r"train.jsonl:1: not valid JSON"):
    _load("rrvf_coldstart", "train", tmp_path, manual)
