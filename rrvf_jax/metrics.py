"""Run metrics on the host: metrics.jsonl, TensorBoard events, image pairs, progress, timings.

Only process 0 writes files (every writer takes `process_index`, defaulting to
`jax.process_index()`). TensorBoard event files are written by a small built-in writer (TFRecord
framing around hand-encoded `Event` protos), so neither TensorFlow nor any TensorBoard package is
needed to log; TensorBoard reads the files as usual.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

JSONL_NAME = "metrics.jsonl"
IMAGES_DIR = "images"
TB_DIR = "tensorboard"


class NonFiniteError(FloatingPointError):
  """A logged scalar (loss, reward, grad norm, ...) is NaN or infinite."""


# --- NaN / inf guard -------------------------------------------------------------------------


def check_finite(step: int, **scalars) -> None:
  """Raises NonFiniteError naming every non-finite scalar, e.g. 'loss is nan at step 12'."""
  bad = []
  for name, value in scalars.items():
    arr = np.asarray(jax.device_get(value))
    if not jnp.issubdtype(arr.dtype, jnp.inexact):  # ints and bools are always finite
      continue
    finite = np.isfinite(arr)
    if finite.all():
      continue
    if arr.size == 1:
      bad.append(f"{name} is {_describe(float(arr.reshape(())))}")
    else:
      bad.append(f"{name} has {int((~finite).sum())} non-finite of {arr.size} values")
  if bad:
    raise NonFiniteError(f"{', '.join(bad)} at step {step}")


def _describe(x: float) -> str:
  """'nan', 'inf' or '-inf' for a non-finite float."""
  return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def to_python_scalar(value) -> int | float | str:
  """Host Python number for a JAX / NumPy / Python scalar; non-finite floats become 'nan'/'inf'."""
  arr = np.asarray(jax.device_get(value))
  if arr.size != 1:
    raise ValueError(f"metric value must be a scalar, got shape {arr.shape}")
  item = arr.reshape(()).item()
  if isinstance(item, bool):
    return int(item)
  if isinstance(item, int):
    return item
  item = float(item)
  # JSON has no NaN / Infinity; strings keep the file standard JSON and the fact visible.
  return item if math.isfinite(item) else _describe(item)


# --- metrics.jsonl -----------------------------------------------------------------------------


def truncate_jsonl(path: str | os.PathLike, resume_step: int | None) -> int:
  """Drops records with step > resume_step (all records when None); returns how many are kept.

  Called when a run restarts: steps after the restored checkpoint will be logged again, so their
  earlier records would otherwise appear twice. A torn last line (crash mid-write) is dropped too.
  The file is rewritten atomically (temporary file + rename).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return 0
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        step = int(record["step"])
      except (ValueError, KeyError, TypeError):
        logging.warning("metrics: dropping unreadable line in %s: %r", path, line[:80])
        continue
      if resume_step is not None and step <= resume_step:
        kept.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
  return len(kept)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """All records of a metrics.jsonl file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# --- TensorBoard event files -----------------------------------------------------------------


def _crc32c_table() -> list[int]:
  """Lookup table of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses."""
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (pure Python; event records are small apart from the odd PNG)."""
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 and add a constant (mod 2**32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
  length = struct.pack("<Q", len(data))
  return (
    length
    + struct.pack("<I", masked_crc32c(length))
    + data
    + struct.pack("<I", masked_crc32c(data))
  )


def _varint(n: int) -> bytes:
  """Protobuf base-128 varint of a non-negative int (negative int64s as two's complement)."""
  n &= (1 << 64) - 1
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
  return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, value: bytes) -> bytes:
  return _varint((number << 3) | 2) + _varint(len(value)) + value


def _field_double(number: int, value: float) -> bytes:
  return _varint((number << 3) | 1) + struct.pack("<d", value)


def _field_float(number: int, value: float) -> bytes:
  return _varint((number << 3) | 5) + struct.pack("<f", value)


# Field numbers of tensorflow/core/util/event.proto and tensorflow/core/framework/summary.proto.
_EVENT_WALL_TIME, _EVENT_STEP, _EVENT_FILE_VERSION, _EVENT_SUMMARY, _EVENT_SESSION_LOG = (
  1,
  2,
  3,
  5,
  7,
)
_VALUE_TAG, _VALUE_SIMPLE, _VALUE_IMAGE = 1, 2, 4
_SESSION_LOG_START = 1


def _event(step: int, wall_time: float, field: bytes) -> bytes:
  """Serialized `Event` with one payload field."""
  return _field_double(_EVENT_WALL_TIME, wall_time) + _field_varint(_EVENT_STEP, step) + field


def scalar_event(step: int, scalars: Mapping[str, float], wall_time: float) -> bytes:
  """Serialized `Event` whose `Summary` holds one `simple_value` per tag."""
  summary = b"".join(
    _field_bytes(
      1, _field_bytes(_VALUE_TAG, tag.encode()) + _field_float(_VALUE_SIMPLE, float(value))
    )
    for tag, value in scalars.items()
  )
  return _event(step, wall_time, _field_bytes(_EVENT_SUMMARY, summary))


def image_event(step: int, tag: str, image: np.ndarray, wall_time: float) -> bytes:
  """Serialized `Event` with one PNG-encoded `Summary.Image` (uint8 HWC, RGB or RGBA)."""
  h, w, c = image.shape
  proto = (
    _field_varint(1, h)
    + _field_varint(2, w)
    + _field_varint(3, c)
    + _field_bytes(4, encode_png(image))
  )
  value = _field_bytes(_VALUE_TAG, tag.encode()) + _field_bytes(_VALUE_IMAGE, proto)
  return _event(step, wall_time, _field_bytes(_EVENT_SUMMARY, _field_bytes(1, value)))


class EventFileWriter:
  """Appends TensorBoard events to a new `events.out.tfevents.*` file in `logdir`."""

  def __init__(self, logdir: str | os.PathLike, *, purge_from_step: int | None = None):
    """Opens a new event file; `purge_from_step` tells TensorBoard to drop older events >= it."""
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(os.fspath(logdir), name)
    self._file = open(self.path, "ab")  # noqa: SIM115 (held open for the run; closed by close())
    self._write(_event(0, now, _field_bytes(_EVENT_FILE_VERSION, b"brain.Event:2")))
    if purge_from_step is not None:
      # SessionLog START at step s makes TensorBoard discard events at steps >= s from earlier
      # files: the steps a resumed run logs again.
      status = _field_varint(1, _SESSION_LOG_START)
      self._write(_event(purge_from_step, now, _field_bytes(_EVENT_SESSION_LOG, status)))
    self.flush()

  def _write(self, event: bytes) -> None:
    self._file.write(tfrecord_frame(event))

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes one event holding all `scalars` at `step`."""
    self._write(scalar_event(step, scalars, time.time()))

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """Writes one image (uint8 HWC) at `step`."""
    self._write(image_event(step, tag, image, time.time()))

  def flush(self) -> None:
    """Pushes buffered events to the OS."""
    self._file.flush()

  def close(self) -> None:
    """Flushes and closes the file."""
    if not self._file.closed:
      self._file.close()


def read_event_records(path: str | os.PathLike) -> list[bytes]:
  """Serialized events of one event file, with both CRCs of every record checked."""
  records = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    if len(data) - pos < 12:
      raise ValueError(f"{path}: truncated record header at byte {pos}")
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    if length_crc != masked_crc32c(header):
      raise ValueError(f"{path}: bad length CRC at byte {pos}")
    body = data[pos + 12 : pos + 12 + length]
    end = pos + 12 + length + 4
    if end > len(data):
      raise ValueError(f"{path}: truncated record at byte {pos}")
    (body_crc,) = struct.unpack("<I", data[end - 4 : end])
    if body_crc != masked_crc32c(body):
      raise ValueError(f"{path}: bad data CRC at byte {pos}")
    records.append(body)
    pos = end
  return records


# --- images ------------------------------------------------------------------------------------


def as_rgb_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
  """uint8 HWC RGB from HW (grey), HW1, HW3 or HW4 (alpha dropped); other input is a ValueError."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{what}: expected uint8 pixels, got {image.dtype}")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or 0 in image.shape:
    raise ValueError(f"{what}: expected an HWC image with 1, 3 or 4 channels, got {image.shape}")
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  return np.ascontiguousarray(image[:, :, :3])


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 HWC image."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def side_by_side(target: np.ndarray, render: np.ndarray | None, gap: int = 4) -> np.ndarray:
  """Target | render on one white canvas (tops aligned); a missing render is a grey box."""
  target = as_rgb_uint8(target, "target")
  if render is None:
    render = np.full_like(target, 128)
  render = as_rgb_uint8(render, "render")
  h = max(target.shape[0], render.shape[0])
  w = target.shape[1] + gap + render.shape[1]
  canvas = np.full((h, w, 3), 255, np.uint8)
  canvas[: target.shape[0], : target.shape[1]] = target
  canvas[: render.shape[0], target.shape[1] + gap :] = render
  return canvas


# --- the writer --------------------------------------------------------------------------------


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard, images to TensorBoard and PNGs.

  Only process 0 writes; on other processes every method is a no-op. Every write is flushed, so a
  crash loses nothing already written.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    resume_step: int | None = None,
    tensorboard: bool = True,
    process_index: int | None = None,
  ):
    """Opens the writer.

    Args:
      workdir: run directory (created).
      resume_step: the step restored from a checkpoint, or None for a run starting from scratch.
        Records with step > resume_step (all records when None) are dropped from metrics.jsonl and
        TensorBoard is told to drop them too, since the run will log those steps again.
      tensorboard: also write TensorBoard event files under `workdir/tensorboard`.
      process_index: this process (default `jax.process_index()`); only process 0 writes.
    """
    self.workdir = os.fspath(workdir)
    self.active = (jax.process_index() if process_index is None else process_index) == 0
    self.jsonl_path = os.path.join(self.workdir, JSONL_NAME)
    self._jsonl = None
    self._tb = None
    if not self.active:
      return
    os.makedirs(self.workdir, exist_ok=True)
    truncate_jsonl(self.jsonl_path, resume_step)
    self._jsonl = open(self.jsonl_path, "a")  # noqa: SIM115 (held open for the run)
    if tensorboard:
      purge = 0 if resume_step is None else resume_step + 1
      self._tb = EventFileWriter(os.path.join(self.workdir, TB_DIR), purge_from_step=purge)

  def write_scalars(self, step: int, scalars: Mapping[str, object]) -> None:
    """Appends {"step": step, **scalars} to metrics.jsonl and the scalars to TensorBoard."""
    if not self.active:
      return
    values = {str(k): to_python_scalar(v) for k, v in scalars.items()}
    if "step" in values:
      raise ValueError("metric name 'step' is reserved for the step number")
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      numeric = {k: float(v) for k, v in values.items()}  # 'nan' / 'inf' parse back
      self._tb.scalars(int(step), numeric)
      self._tb.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Writes each uint8 HWC image to TensorBoard (tag = key) and as images/step_XXXXXX/key.png."""
    if not self.active:
      return
    folder = os.path.join(self.workdir, IMAGES_DIR, f"step_{int(step):06d}")
    os.makedirs(folder, exist_ok=True)
    for tag, image in images.items():
      image = as_rgb_uint8(image, tag)
      with open(os.path.join(folder, tag.replace("/", "_") + ".png"), "wb") as f:
        f.write(encode_png(image))
      if self._tb is not None:
        self._tb.image(int(step), tag, image)
    if self._tb is not None:
      self._tb.flush()

  def write_image_pairs(
    self,
    step: int,
    pairs: Sequence[tuple[np.ndarray, np.ndarray | None]],
    *,
    tag: str = "rollout",
    max_pairs: int = 4,
  ) -> None:
    """Target-vs-render pairs (render None = failed): side by side in TensorBoard, PNGs on disk.

    PNGs: images/step_XXXXXX/{tag}_{i}_target.png, {tag}_{i}_render.png (when rendered) and
    {tag}_{i}_pair.png; TensorBoard gets the pair image under tag `{tag}/{i}`.
    """
    if not self.active:
      return
    folder = os.path.join(self.workdir, IMAGES_DIR, f"step_{int(step):06d}")
    os.makedirs(folder, exist_ok=True)
    for i, (target, render) in enumerate(pairs[:max_pairs]):
      pair = side_by_side(target, render)
      files = {"target": as_rgb_uint8(target, "target"), "pair": pair}
      if render is not None:
        files["render"] = as_rgb_uint8(render, "render")
      for kind, image in files.items():
        with open(os.path.join(folder, f"{tag}_{i}_{kind}.png"), "wb") as f:
          f.write(encode_png(image))
      if self._tb is not None:
        self._tb.image(int(step), f"{tag}/{i}", pair)
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Closes the files (idempotent)."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --- progress and timings ----------------------------------------------------------------------


def format_duration(seconds: float) -> str:
  """'1h02m03s', '4m05s' or '6s'."""
  seconds = max(0, round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  if h:
    return f"{h}h{m:02d}m{s:02d}s"
  return f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressLogger:
  """Logs 'step 40/100 (40%) | 0.52 steps/s | ETA 1m55s | loss=0.123' every `every_n` steps."""

  def __init__(
    self,
    total_steps: int,
    every_n: int = 1,
    *,
    keys: Sequence[str] | None = None,
    process_index: int | None = None,
    clock=time.monotonic,
  ):
    """`keys` picks which scalars appear on the line (all when None)."""
    if every_n < 1:
      raise ValueError(f"every_n must be >= 1, got {every_n}")
    self.total_steps = int(total_steps)
    self.every_n = int(every_n)
    self.keys = None if keys is None else tuple(keys)
    self.active = (jax.process_index() if process_index is None else process_index) == 0
    self._clock = clock
    self._last: tuple[int, float] | None = None

  def start(self, step: int) -> None:
    """Marks the step the run starts (or resumes) from; rates are measured from here."""
    self._last = (int(step), self._clock())

  def line(self, step: int, scalars: Mapping[str, object] | None = None) -> str:
    """The progress line for `step` (also moves the rate window to `step`)."""
    now = self._clock()
    if self._last is None:
      self._last = (0, now)
    last_step, last_time = self._last
    self._last = (int(step), now)
    pct = 100.0 * step / self.total_steps if self.total_steps else 100.0
    parts = [f"step {step}/{self.total_steps} ({pct:.0f}%)"]
    elapsed = now - last_time
    if step > last_step and elapsed > 0:
      rate = (step - last_step) / elapsed
      parts.append(f"{rate:.3g} steps/s")
      parts.append(f"ETA {format_duration(max(0, self.total_steps - step) / rate)}")
    scalars = dict(scalars or {})
    keys = self.keys if self.keys is not None else tuple(scalars)
    shown = [f"{k}={_fmt(scalars[k])}" for k in keys if k in scalars]
    if shown:
      parts.append(" ".join(shown))
    return " | ".join(parts)

  def update(self, step: int, scalars: Mapping[str, object] | None = None) -> str | None:
    """Logs the line (absl INFO) when `step` is a multiple of every_n or the last; returns it."""
    if not self.active or (step % self.every_n and step != self.total_steps):
      return None
    text = self.line(step, scalars)
    logging.info("%s", text)
    return text


def _fmt(value) -> str:
  """Compact number for the progress line."""
  v = to_python_scalar(value)
  return f"{v:.4g}" if isinstance(v, float) else str(v)


class StageTimer:
  """Accumulates wall seconds per stage: `with timer('render'): ...`, then `timer.scalars()`.

  JAX dispatches asynchronously: block on a stage's outputs inside its `with` for honest numbers.
  """

  def __init__(self, prefix: str = "time/", clock=time.perf_counter):
    self.prefix = prefix
    self._clock = clock
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, stage: str) -> Iterator[None]:
    """Times the body and adds it to `stage` (also when the body raises)."""
    start = self._clock()
    try:
      yield
    finally:
      self.seconds[stage] = self.seconds.get(stage, 0.0) + (self._clock() - start)

  def scalars(self, reset: bool = True) -> dict[str, float]:
    """{'time/<stage>': seconds} accumulated since the last reset."""
    out = {self.prefix + k: v for k, v in self.seconds.items()}
    if reset:
      self.seconds = {}
    return out
