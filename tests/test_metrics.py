"""Run metrics: metrics.jsonl (truncated on resume), TensorBoard events, images, progress."""

import io
import json
import logging
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from PIL import Image

from rrvf_jax import metrics

# --- an independent decoder for event files: protobuf's runtime with TensorFlow's field numbers ---

_F = descriptor_pb2.FieldDescriptorProto


def _event_classes():
  """Message classes for tensorflow.Event / Summary / SessionLog (subset of the real protos)."""
  fd = descriptor_pb2.FileDescriptorProto(
    name="ckpt_test_event.proto", package="tfx", syntax="proto3"
  )

  def msg(name, fields, nested=()):
    m = descriptor_pb2.DescriptorProto(name=name)
    for fname, number, ftype, type_name, label in fields:
      field = m.field.add(name=fname, number=number, type=ftype, label=label or _F.LABEL_OPTIONAL)
      if type_name:
        field.type_name = type_name
    m.nested_type.extend(nested)
    return m

  image = msg(
    "Image",
    [
      ("height", 1, _F.TYPE_INT32, None, None),
      ("width", 2, _F.TYPE_INT32, None, None),
      ("colorspace", 3, _F.TYPE_INT32, None, None),
      ("encoded_image_string", 4, _F.TYPE_BYTES, None, None),
    ],
  )
  value = msg(
    "Value",
    [
      ("tag", 1, _F.TYPE_STRING, None, None),
      ("simple_value", 2, _F.TYPE_FLOAT, None, None),
      ("image", 4, _F.TYPE_MESSAGE, ".tfx.Summary.Image", None),
    ],
  )
  summary = msg(
    "Summary",
    [("value", 1, _F.TYPE_MESSAGE, ".tfx.Summary.Value", _F.LABEL_REPEATED)],
    nested=(image, value),
  )
  session_log = msg("SessionLog", [("status", 1, _F.TYPE_INT32, None, None)])
  event = msg(
    "Event",
    [
      ("wall_time", 1, _F.TYPE_DOUBLE, None, None),
      ("step", 2, _F.TYPE_INT64, None, None),
      ("file_version", 3, _F.TYPE_STRING, None, None),
      ("summary", 5, _F.TYPE_MESSAGE, ".tfx.Summary", None),
      ("session_log", 7, _F.TYPE_MESSAGE, ".tfx.SessionLog", None),
    ],
  )
  fd.message_type.extend([summary, session_log, event])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fd)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tfx.Event"))


Event = _event_classes()


def _read_events(logdir):
  """Every event in the (single) event file of `logdir`, framing and CRCs checked here."""
  files = sorted(logdir.glob("events.out.tfevents.*"))
  events = []
  for path in files:
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      header = data[pos : pos + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == metrics.masked_crc32c(header)
      body = data[pos + 12 : pos + 12 + length]
      crc = data[pos + 12 + length : pos + 16 + length]
      assert struct.unpack("<I", crc)[0] == metrics.masked_crc32c(body)
      event = Event()
      event.ParseFromString(body)
      events.append(event)
      pos += 16 + length
  return events


def _scalars(events):
  return [
    (e.step, v.tag, v.simple_value)
    for e in events
    for v in e.summary.value
    if v.tag and not v.HasField("image")
  ]


def test_crc32c_matches_the_standard_check_value():
  # CRC-32C check value from the iSCSI spec (RFC 3720) and every CRC catalogue.
  assert metrics.crc32c(b"123456789") == 0xE3069283
  assert metrics.crc32c(b"") == 0


def test_jsonl_and_tensorboard_scalars(tmp_path):
  with metrics.MetricWriter(tmp_path, process_index=0) as w:
    w.write_scalars(1, {"loss": jnp.float32(0.5), "reward/mean": np.float64(0.25), "n": 3})
    w.write_scalars(2, {"loss": 0.125, "kl": float("nan"), "ok": np.bool_(True)})
  records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert records == [
    {"step": 1, "loss": 0.5, "reward/mean": 0.25, "n": 3},
    {"step": 2, "loss": 0.125, "kl": "nan", "ok": 1},
  ]
  events = _read_events(tmp_path / "tensorboard")
  assert events[0].file_version == "brain.Event:2"
  got = _scalars(events)
  assert got[:3] == [(1, "loss", 0.5), (1, "reward/mean", 0.25), (1, "n", 3.0)]
  assert got[3] == (2, "loss", 0.125)
  assert got[4][:2] == (2, "kl") and np.isnan(got[4][2])
  # The module's own reader agrees, and notices a flipped byte.
  (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  assert len(metrics.read_event_records(path)) == len(events) == 4  # version, purge, 2 steps
  data = bytearray(path.read_bytes())
  data[-6] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="bad data CRC"):
    metrics.read_event_records(path)


def test_resume_truncates_jsonl_and_purges_tensorboard(tmp_path):
  with metrics.MetricWriter(tmp_path, process_index=0) as w:
    for step in range(1, 6):
      w.write_scalars(step, {"loss": float(step)})
  # A crash mid-write leaves a torn last line.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')
  with metrics.MetricWriter(tmp_path, resume_step=3, process_index=0) as w:
    for step in (4, 5):
      w.write_scalars(step, {"loss": 10.0 * step})
  records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]
  # The new event file asks TensorBoard to drop the old run's steps >= 4 (SessionLog START).
  events = _read_events(tmp_path / "tensorboard")
  starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
  assert 4 in starts
  # A fresh run (nothing restored) in the same workdir starts the file over.
  metrics.MetricWriter(tmp_path, resume_step=None, process_index=0).close()
  assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == []


def test_truncate_jsonl_counts_kept_records(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3, 7)))
  assert metrics.truncate_jsonl(path, 2) == 2
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2]
  assert metrics.truncate_jsonl(tmp_path / "absent.jsonl", 2) == 0


def test_only_process_zero_writes(tmp_path):
  with metrics.MetricWriter(tmp_path / "w", process_index=1) as w:
    w.write_scalars(1, {"loss": 1.0})
    w.write_image_pairs(1, [(np.zeros((4, 4, 3), np.uint8), None)])
  assert not (tmp_path / "w").exists()
  assert metrics.ProgressLogger(10, process_index=1).update(10, {"loss": 1.0}) is None


def _png(path):
  return np.asarray(Image.open(path))


def test_image_pairs_go_to_png_files_and_tensorboard(tmp_path):
  rng = np.random.default_rng(0)
  target = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
  render = rng.integers(0, 256, (8, 14, 4), dtype=np.uint8)  # RGBA, other size
  grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
  with metrics.MetricWriter(tmp_path, process_index=0) as w:
    w.write_image_pairs(12, [(target, render), (grey, None), (target, target)], max_pairs=2)
  folder = tmp_path / "images" / "step_000012"
  assert sorted(p.name for p in folder.iterdir()) == [
    "rollout_0_pair.png",
    "rollout_0_render.png",
    "rollout_0_target.png",
    "rollout_1_pair.png",
    "rollout_1_target.png",
  ]
  np.testing.assert_array_equal(_png(folder / "rollout_0_target.png"), target)
  np.testing.assert_array_equal(_png(folder / "rollout_0_render.png"), render[:, :, :3])
  pair = _png(folder / "rollout_0_pair.png")
  assert pair.shape == (12, 10 + 4 + 14, 3)
  np.testing.assert_array_equal(pair[:12, :10], target)
  np.testing.assert_array_equal(pair[:8, 14:], render[:, :, :3])
  assert (pair[8:, 14:] == 255).all()
  pair1 = _png(folder / "rollout_1_pair.png")
  np.testing.assert_array_equal(pair1[:, :10], np.repeat(grey[:, :, None], 3, axis=2))
  assert (pair1[:, 14:] == 128).all()  # the failed render
  images = [
    (e.step, v.tag, v.image)
    for e in _read_events(tmp_path / "tensorboard")
    for v in e.summary.value
    if v.HasField("image")
  ]
  assert [(s, t) for s, t, _ in images] == [(12, "rollout/0"), (12, "rollout/1")]
  img = images[0][2]
  assert (img.height, img.width, img.colorspace) == (12, 28, 3)
  decoded = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)))
  np.testing.assert_array_equal(decoded, pair)


def test_write_images_and_bad_images_are_named(tmp_path):
  with metrics.MetricWriter(tmp_path, process_index=0) as w:
    w.write_images(3, {"eval/best": np.full((5, 6, 3), 7, np.uint8)})
    with pytest.raises(ValueError, match=r"render: expected uint8 pixels, got float32"):
      w.write_image_pairs(3, [(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32))])
    with pytest.raises(ValueError, match=r"target: expected an HWC image .* got \(4, 4, 2\)"):
      w.write_image_pairs(3, [(np.zeros((4, 4, 2), np.uint8), None)])
    with pytest.raises(ValueError, match="must be a scalar, got shape"):
      w.write_scalars(3, {"loss": np.zeros(3)})
  assert (_png(tmp_path / "images" / "step_000003" / "eval_best.png") == 7).all()


def test_check_finite_names_the_scalar_and_step():
  metrics.check_finite(3, loss=1.0, reward=jnp.float32(0.5), count=7)
  with pytest.raises(metrics.NonFiniteError, match=r"^loss is nan at step 12$"):
    metrics.check_finite(12, loss=float("nan"), reward=0.1)
  with pytest.raises(metrics.NonFiniteError, match=r"^loss is nan at step 2$"):
    metrics.check_finite(2, loss=jnp.asarray(jnp.nan, jnp.bfloat16))
  with pytest.raises(metrics.NonFiniteError, match=r"^loss is inf, grad_norm is -inf at step 4$"):
    metrics.check_finite(4, loss=jnp.inf, grad_norm=np.float32(-np.inf))
  with pytest.raises(
    metrics.NonFiniteError, match=r"^logp has 2 non-finite of 3 values at step 1$"
  ):
    metrics.check_finite(1, logp=jnp.asarray([0.0, jnp.nan, jnp.inf]))


class _Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_progress_line_has_rate_eta_and_chosen_scalars(caplog):
  clock = _Clock()
  progress = metrics.ProgressLogger(
    100, every_n=10, keys=("loss", "reward"), process_index=0, clock=clock
  )
  progress.start(0)
  clock.t += 20.0
  assert progress.update(5, {"loss": 1.0}) is None  # not a multiple of every_n
  with caplog.at_level(logging.INFO):
    line = progress.update(10, {"loss": jnp.float32(0.25), "reward": 0.5, "other": 9})
  assert line == "step 10/100 (10%) | 0.5 steps/s | ETA 3m00s | loss=0.25 reward=0.5"
  assert line in caplog.text
  clock.t += 10.0
  # Rates use the window since the last logged line: 10 steps in 10 s.
  assert progress.update(20, {}) == "step 20/100 (20%) | 1 steps/s | ETA 1m20s"
  clock.t += 1.0
  assert progress.update(100, {}).startswith("step 100/100 (100%) | 80 steps/s | ETA 0s")


def test_format_duration():
  assert metrics.format_duration(6.4) == "6s"
  assert metrics.format_duration(245) == "4m05s"
  assert metrics.format_duration(3723) == "1h02m03s"


def test_stage_timer_accumulates_and_resets():
  clock = _Clock()
  timer = metrics.StageTimer(clock=clock)
  with timer("render"):
    clock.t += 1.5
  with timer("judge"):
    clock.t += 0.25
  with pytest.raises(RuntimeError), timer("render"):
    clock.t += 0.5
    raise RuntimeError("boom")
  assert timer.scalars() == {"time/render": 2.0, "time/judge": 0.25}
  assert timer.scalars() == {}
