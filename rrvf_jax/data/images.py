"""Image helpers for datasets: PNG bytes in the records, uint8 RGB arrays out."""

from __future__ import annotations

import numpy as np

from rrvf_jax.env.types import encode_png
from rrvf_jax.processing.image import load_image, to_rgb_array

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_image(png_bytes: bytes, example_id: str) -> np.ndarray:
  """Decodes an example's image to uint8 [H, W, 3]; one ValueError naming the example if corrupt.

  Transparency is composited onto white, as the Qwen-VL image processor does.
  """
  if not isinstance(png_bytes, bytes | bytearray | memoryview) or len(png_bytes) == 0:
    raise ValueError(f"example {example_id!r}: the image is empty or not bytes")
  try:
    return to_rgb_array(load_image(bytes(png_bytes)))
  except ValueError as e:
    raise ValueError(f"example {example_id!r}: corrupt image ({e})") from e


def to_png(data: bytes, where: str) -> bytes:
  """Validates an encoded image and returns it as PNG bytes (non-PNG input is re-encoded as RGB).

  `where` names the source (a file, a row) in the error raised when the image cannot be decoded.
  """
  try:
    image = load_image(bytes(data))
  except ValueError as e:
    raise ValueError(f"{where}: cannot decode the image ({e})") from e
  if bytes(data[:8]) == PNG_SIGNATURE:
    return bytes(data)  # already PNG and fully decodable: keep it bit for bit
  return encode_png(to_rgb_array(image))
