"""Qwen2-VL image preprocessing (smart_resize, normalise, patchify) in NumPy and Pillow.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL share this processor (transformers maps all three to
`Qwen2VLImageProcessor`); they differ in settings only (`ImageProcessorConfig.for_model_type`).

Matches transformers' PIL-backend `Qwen2VLImageProcessorPil` (5.x; the slow `Qwen2VLImageProcessor`
of 4.x): RGB conversion with transparency composited onto white, bicubic resize of the uint8 image
to a multiple of `patch_size * merge_size`, rescale by 1/255 (float64, then float32), per-channel
normalisation, the frame repeated `temporal_patch_size` times, patches in merge-block-major order.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # Qwen3-VL's mean and std
MAX_ASPECT_RATIO = 200
# transformers' PILImageResampling.BICUBIC; the only filter implemented here.
_BICUBIC = 3

ImageLike = PIL.Image.Image | np.ndarray


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """Settings of the Qwen2-VL image processor (defaults are transformers' class defaults)."""

  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  std: tuple[float, float, float] = OPENAI_CLIP_STD

  @property
  def factor(self) -> int:
    """Side lengths of resized images are multiples of this."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: channels x temporal x patch x patch."""
    return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

  @classmethod
  def for_model_type(cls, model_type: str) -> ImageProcessorConfig:
    """The hub `preprocessor_config.json` settings of a model family (HF `model_type`).

    Qwen2-VL and Qwen2.5-VL keep the class defaults (patch 14, CLIP statistics); Qwen3-VL has
    patch 16 (a 32-pixel factor), mean = std = 0.5 and 64K..16M pixels.
    """
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
      return cls()
    if model_type == "qwen3_vl":
      return cls(patch_size=16, min_pixels=65536, max_pixels=16777216, mean=HALF, std=HALF)
    raise ValueError(f"no image processor settings for model_type {model_type!r}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessorConfig:
    """Reads a HF `preprocessor_config.json` dict (v4 `min_pixels` or v5 `size` spelling)."""
    _check_supported(d)
    size = d.get("size") or {}
    defaults = cls()
    # As in transformers, explicit min_pixels/max_pixels override `size`; 4.45 spelled `size` with
    # min_pixels/max_pixels keys, later versions with shortest_edge/longest_edge.
    min_pixels = _first_set(
      d.get("min_pixels"), size.get("shortest_edge"), size.get("min_pixels"), defaults.min_pixels
    )
    max_pixels = _first_set(
      d.get("max_pixels"), size.get("longest_edge"), size.get("max_pixels"), defaults.max_pixels
    )
    return cls(
      patch_size=int(d.get("patch_size", defaults.patch_size)),
      temporal_patch_size=int(d.get("temporal_patch_size", defaults.temporal_patch_size)),
      merge_size=int(d.get("merge_size", defaults.merge_size)),
      min_pixels=int(min_pixels),
      max_pixels=int(max_pixels),
      mean=tuple(float(x) for x in d.get("image_mean", defaults.mean)),
      std=tuple(float(x) for x in d.get("image_std", defaults.std)),
    )

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> ImageProcessorConfig:
    """Reads `preprocessor_config.json` from a model directory or a file path."""
    file = os.fspath(path)
    if os.path.isdir(file):
      file = os.path.join(file, "preprocessor_config.json")
    with open(file, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))

  def to_dict(self) -> dict[str, Any]:
    """The HF `preprocessor_config.json` dict, bounds in both the v4 and the v5 spelling."""
    return {
      "do_convert_rgb": True,
      "do_normalize": True,
      "do_rescale": True,
      "do_resize": True,
      "image_mean": list(self.mean),
      "image_processor_type": "Qwen2VLImageProcessor",
      "image_std": list(self.std),
      "max_pixels": self.max_pixels,
      "merge_size": self.merge_size,
      "min_pixels": self.min_pixels,
      "patch_size": self.patch_size,
      "resample": _BICUBIC,
      "rescale_factor": 1 / 255,
      "size": {"longest_edge": self.max_pixels, "shortest_edge": self.min_pixels},
      "temporal_patch_size": self.temporal_patch_size,
    }


def _first_set(*values: Any) -> Any:
  """The first value that is not None."""
  return next(v for v in values if v is not None)


def _check_supported(d: Mapping[str, Any]) -> None:
  """Rejects preprocessor settings this pipeline does not implement, rather than ignoring them."""
  unsupported = {
    "do_resize": d.get("do_resize", True) is not True,
    "do_rescale": d.get("do_rescale", True) is not True,
    "do_normalize": d.get("do_normalize", True) is not True,
    "do_convert_rgb": d.get("do_convert_rgb", True) is not True,
    "resample": d.get("resample", _BICUBIC) != _BICUBIC,
    "rescale_factor": not math.isclose(d.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-9),
  }
  bad = sorted(k for k, v in unsupported.items() if v)
  if bad:
    raise ValueError(f"unsupported image processor settings: { {k: d[k] for k in bad} }")


@dataclasses.dataclass(frozen=True)
class ProcessedImages:
  """Model inputs for a list of images."""

  pixel_values: np.ndarray  # float32 (sum of patches, 3 * temporal_patch_size * patch_size**2)
  image_grid_thw: np.ndarray  # int64 (n_images, 3)


def smart_resize(
  height: int,
  width: int,
  factor: int = 28,
  min_pixels: int = 56 * 56,
  max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
  """Target (height, width): multiples of `factor`, area within bounds, aspect ratio kept."""
  if height <= 0 or width <= 0:
    raise ValueError(f"image must be non-empty, got height={height}, width={width}")
  ratio = max(height, width) / min(height, width)
  if ratio > MAX_ASPECT_RATIO:
    raise ValueError(
      f"image aspect ratio {ratio:.1f} ({width}x{height}) exceeds the maximum of {MAX_ASPECT_RATIO}"
    )
  # Python's round() rounds halves to even, as the reference does.
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def image_grid_thw(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int, int]:
  """The (t, h, w) patch grid an image of this size gets, without touching pixels."""
  h, w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
  return 1, h // config.patch_size, w // config.patch_size


def num_image_tokens(grid_thw: Sequence[int] | np.ndarray, merge_size: int = 2) -> int:
  """Number of `<|image_pad|>` tokens for one image grid (t, h, w)."""
  t, h, w = (int(x) for x in grid_thw)
  if h % merge_size or w % merge_size:
    raise ValueError(f"grid {(t, h, w)} is not divisible by merge_size={merge_size}")
  return t * h * w // (merge_size * merge_size)


def load_image(source: str | os.PathLike | bytes) -> PIL.Image.Image:
  """Decodes an image file or encoded bytes; raises ValueError naming the source if it cannot."""
  if isinstance(source, bytes):
    name, data = f"<{len(source)} bytes>", source
  else:
    name, data = (
      os.fspath(source),
      pathlib.Path(source).read_bytes(),
    )  # a missing file stays an OSError
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      image.load()
      # EXIF orientation is applied as transformers' load_image does; the mode is kept so that
      # transparency is composited later exactly as the image processor does it.
      return PIL.ImageOps.exif_transpose(image)
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise ValueError(f"cannot decode image {name}: {e}") from e


def to_rgb_array(image: ImageLike) -> np.ndarray:
  """Converts a PIL image or a uint8 HxW / HxWx{1,3,4} array to a uint8 HxWx3 array."""
  if isinstance(image, PIL.Image.Image):
    return _pil_to_rgb(image)
  if isinstance(image, np.ndarray):
    return _array_to_rgb(image)
  raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
  """PIL to RGB, compositing any transparency onto white (transformers' convert_to_rgb)."""
  has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
  if has_alpha:
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
  return np.asarray(image.convert("RGB"))


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 array to RGB; alpha blended onto white and rounded as transformers does for arrays."""
  if image.dtype != np.uint8:
    raise ValueError(f"image arrays must be uint8, got {image.dtype}")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image arrays must be HxW or HxWxC with C in (1, 3, 4), got {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if image.shape[-1] == 4:
    alpha = image[..., 3:4] / 255
    return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return image


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize of a uint8 HxWx3 array with Pillow."""
  if rgb.shape[:2] == (height, width):
    return rgb
  resized = PIL.Image.fromarray(rgb).resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
  return np.asarray(resized)


def normalize(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 HxWx3 to float32 3xHxW: x/255 (in float64, then float32), minus mean, over std."""
  # The float64 product then float32 cast reproduces transformers' rescale bit for bit.
  x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return np.ascontiguousarray(x.transpose(2, 0, 1))


def patchify(
  chw: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
  """3xHxW float32 to (gh*gw, 3*T*P*P) patches, merge-block-major, and the grid (1, gh, gw)."""
  c, height, width = chw.shape
  gh, gw = height // patch_size, width // patch_size
  m, p = merge_size, patch_size
  x = chw.reshape(c, gh // m, m, p, gw // m, m, p)
  # -> (gh/m, gw/m, m, m, C, P, P): the 2x2 blocks that the merger fuses are contiguous rows.
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)
  # A still image is one frame repeated over the temporal patch.
  x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
  return x.reshape(gh * gw, c * temporal_patch_size * p * p), (1, gh, gw)


def preprocess_image(
  image: ImageLike, config: ImageProcessorConfig
) -> tuple[np.ndarray, tuple[int, int, int]]:
  """One image to its flattened patches and grid (t, h, w)."""
  rgb = to_rgb_array(image)
  height, width = smart_resize(
    rgb.shape[0], rgb.shape[1], config.factor, config.min_pixels, config.max_pixels
  )
  chw = normalize(resize_rgb(rgb, height, width), config.mean, config.std)
  return patchify(chw, config.patch_size, config.temporal_patch_size, config.merge_size)


def preprocess_images(
  images: Sequence[ImageLike], config: ImageProcessorConfig | None = None
) -> ProcessedImages:
  """Images to `pixel_values` and `image_grid_thw`, as the HF image processor returns them."""
  config = config or ImageProcessorConfig()
  patches, grids = [], []
  for image in images:
    p, grid = preprocess_image(image, config)
    patches.append(p)
    grids.append(grid)
  if not patches:
    return ProcessedImages(np.zeros((0, config.patch_dim), np.float32), np.zeros((0, 3), np.int64))
  return ProcessedImages(
    np.concatenate(patches, axis=0).astype(np.float32, copy=False), np.asarray(grids, np.int64)
  )
