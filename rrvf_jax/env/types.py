"""Result type shared by the chart and HTML renderers, and the closed set of render outcomes."""

from __future__ import annotations

import dataclasses
import enum
import io

import numpy as np


class Status(enum.StrEnum):
  """Outcome of one render; a `str`, so `result.status == "ok"` works."""

  OK = "ok"
  SYNTAX_ERROR = "syntax_error"
  RUNTIME_ERROR = "runtime_error"
  TIMEOUT = "timeout"
  MEMORY = "memory"
  NO_FIGURE = "no_figure"
  BLANK_IMAGE = "blank_image"
  OVERSIZE_OUTPUT = "oversize_output"
  FORBIDDEN = "forbidden"


STATUSES: tuple[str, ...] = tuple(s.value for s in Status)


@dataclasses.dataclass(eq=False)
class RenderResult:
  """What a renderer returns: a status, the image (HxWx3 uint8) when it rendered, and a message.

  `message` is written for the policy: the error text (traceback lines relative to the user code)
  or a one-line reason; empty on success. `timings` holds seconds per stage (e.g. `total`).
  """

  status: Status
  image: np.ndarray | None = None
  message: str = ""
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  _png: bytes | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self) -> None:
    self.status = Status(self.status)
    if self.image is not None and (self.image.dtype != np.uint8 or self.image.ndim != 3):
      raise ValueError(f"image must be HxWx3 uint8, got {self.image.dtype} {self.image.shape}")

  @property
  def ok(self) -> bool:
    """Whether the render succeeded and `image` is set."""
    return self.status == Status.OK

  @property
  def png(self) -> bytes | None:
    """The image as PNG bytes (encoded once, deterministically, without metadata)."""
    if self._png is None and self.image is not None:
      self._png = encode_png(self.image)
    return self._png


def encode_png(image: np.ndarray) -> bytes:
  """Encodes an HxWx3 uint8 array as PNG with no metadata, so equal pixels give equal bytes."""
  from PIL import Image  # Pillow is only needed when PNG bytes are asked for.

  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=6)
  return buf.getvalue()


def is_blank(image: np.ndarray) -> bool:
  """Whether every pixel of the image has the same colour."""
  flat = image.reshape(-1, image.shape[-1])
  return bool((flat == flat[0]).all())
