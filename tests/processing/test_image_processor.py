"""Image preprocessing equals transformers' PIL-backend Qwen2-VL image processor."""

import dataclasses
import importlib
import io
import json

import numpy as np
import PIL.Image
import pytest

from rrvf_jax.processing import image as image_lib

transformers = pytest.importorskip("transformers")

MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 256


def _hf_processor_class():
  """`Qwen2VLImageProcessorPil` in transformers 5; the slow (NumPy/PIL) class in 4.x."""
  try:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
      Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil
  except ImportError:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor


def _hf(images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
  """pixel_values and image_grid_thw from a locally constructed transformers processor."""
  proc = _hf_processor_class()(min_pixels=min_pixels, max_pixels=max_pixels)
  out = proc(images=images, return_tensors="np")
  return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def _ours(images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
  config = image_lib.ImageProcessorConfig(min_pixels=min_pixels, max_pixels=max_pixels)
  return image_lib.preprocess_images(images, config)


def _noise(h, w, c=3, seed=0):
  """Random pixels: the hardest case for a resampling filter to match."""
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _assert_same(images, **bounds):
  want_pixels, want_grid = _hf(images, **bounds)
  got = _ours(images, **bounds)
  assert got.pixel_values.dtype == np.float32
  assert got.pixel_values.shape == want_pixels.shape
  np.testing.assert_array_equal(got.image_grid_thw, want_grid)
  np.testing.assert_allclose(got.pixel_values, want_pixels, rtol=0, atol=1e-6)
  return got


@pytest.mark.parametrize(
  "height,width",
  [
    (224, 224),  # already a multiple of 28: no resampling
    (333, 517),  # odd sizes, rounded
    (30, 1200),  # extreme aspect ratio (40)
    (1200, 30),
    (20, 20),  # below min_pixels: upscaled
    (1000, 1500),  # above max_pixels: downscaled
    (42, 70),  # 1.5 and 2.5 patches: banker's rounding of both sides
  ],
)
def test_pixel_values_match_transformers_pil_rgb(height, width):
  got = _assert_same([PIL.Image.fromarray(_noise(height, width))])
  h, w = image_lib.smart_resize(height, width, 28, MIN_PIXELS, MAX_PIXELS)
  assert tuple(got.image_grid_thw[0]) == (1, h // 14, w // 14)
  assert MIN_PIXELS <= h * w <= MAX_PIXELS


def test_numpy_rgb_input_matches():
  _assert_same([_noise(77, 130)])


def test_rgba_pil_is_composited_on_white_like_transformers():
  rgba = _noise(100, 150, c=4, seed=1)
  rgba[:10, :, 3] = 0  # fully transparent rows must come out white
  _assert_same([PIL.Image.fromarray(rgba, mode="RGBA")])


def test_rgba_numpy_matches():
  _assert_same([_noise(50, 90, c=4, seed=2)])


def test_grayscale_and_palette_images_match():
  gray = PIL.Image.fromarray(_noise(90, 60, seed=3)[:, :, 0], mode="L")
  palette = PIL.Image.fromarray(_noise(64, 80, seed=4)).convert("P")
  palette.info["transparency"] = 0  # palette index 0 transparent
  _assert_same([gray])
  _assert_same([palette])


def test_several_images_concatenate_in_order():
  images = [_noise(56, 56, seed=5), _noise(30, 1200, seed=6), _noise(400, 300, seed=7)]
  got = _assert_same(images)
  counts = [int(np.prod(g)) for g in got.image_grid_thw]
  assert sum(counts) == got.pixel_values.shape[0]


def test_hub_bounds_and_qwen3_patch_size():
  # Qwen2.5-VL's hub max_pixels, and Qwen3-VL's 16-pixel patches with 0.5 mean/std.
  _assert_same([_noise(300, 400, seed=8)], min_pixels=3136, max_pixels=12845056)
  img = PIL.Image.fromarray(_noise(200, 330, seed=9))
  proc = _hf_processor_class()(
    min_pixels=MIN_PIXELS,
    max_pixels=MAX_PIXELS,
    patch_size=16,
    image_mean=[0.5] * 3,
    image_std=[0.5] * 3,
  )
  want = proc(images=[img], return_tensors="np")
  config = image_lib.ImageProcessorConfig(
    patch_size=16, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, mean=(0.5,) * 3, std=(0.5,) * 3
  )
  got = image_lib.preprocess_images([img], config)
  np.testing.assert_array_equal(got.image_grid_thw, want["image_grid_thw"])
  np.testing.assert_allclose(got.pixel_values, want["pixel_values"], rtol=0, atol=1e-6)


def test_patch_layout_is_merge_block_major():
  # A 28x56 image is two 2x2 merge blocks side by side. Row order: block (0,0) patches
  # (0,0) (0,1) (1,0) (1,1), then block (0,1) patches (0,2) (0,3) (1,2) (1,3).
  rgb = np.zeros((28, 56, 3), np.uint8)
  rgb[:14, 14:28] = 255  # patch (0, 1): row 1
  rgb[14:, 28:42] = 255  # patch (1, 2): row 6
  config = image_lib.ImageProcessorConfig(min_pixels=1, max_pixels=10**8)
  got = image_lib.preprocess_images([rgb], config)
  assert got.pixel_values.shape == (8, 3 * 2 * 14 * 14)
  assert tuple(got.image_grid_thw[0]) == (1, 2, 4)
  white = (1 - np.asarray(config.mean)) / np.asarray(config.std)
  patches = got.pixel_values.reshape(8, 3, 2, 14, 14)
  for row in (1, 6):
    np.testing.assert_allclose(patches[row, :, 0, 0, 0], white, atol=1e-6)
    assert (patches[row] > 0).all()
  assert (patches[[0, 2, 3, 4, 5, 7]] < 0).all()
  # The two temporal copies are the same frame.
  np.testing.assert_array_equal(patches[:, :, 0], patches[:, :, 1])


def test_smart_resize_matches_transformers_on_many_sizes():
  hf_smart_resize = importlib.import_module(_hf_processor_class().__module__).smart_resize
  rng = np.random.default_rng(0)
  sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, (300, 2))]
  sizes += [(14, 14), (42, 42), (70, 70), (98, 98), (1, 200), (10, 2000)]
  for h, w in sizes:
    if max(h, w) / min(h, w) > 200:
      continue
    for lo, hi in [(MIN_PIXELS, MAX_PIXELS), (3136, 12845056), (MIN_PIXELS, 28 * 28 * 1280)]:
      assert image_lib.smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w)


def test_smart_resize_rounds_halves_to_even():
  # 70/28 = 2.5 -> 2 and 98/28 = 3.5 -> 4 (Python's round), not 3 and 4.
  assert image_lib.smart_resize(70, 98, 28, min_pixels=1, max_pixels=10**8) == (56, 112)


def test_aspect_ratio_above_200_is_rejected():
  with pytest.raises(ValueError, match="aspect ratio"):
    image_lib.smart_resize(10, 2010)
  with pytest.raises(ValueError, match="aspect ratio"):
    image_lib.preprocess_images([_noise(5, 1100)])
  image_lib.smart_resize(10, 2000)  # exactly 200 is allowed


def test_num_image_tokens_and_grid_without_pixels():
  config = image_lib.ImageProcessorConfig()
  assert image_lib.num_image_tokens((1, 16, 24)) == 96
  for h, w in [(480, 640), (600, 800), (30, 1200)]:
    grid = image_lib.image_grid_thw(h, w, config)
    got = image_lib.preprocess_images([_noise(h, w)], config)
    assert tuple(got.image_grid_thw[0]) == grid
    assert image_lib.num_image_tokens(grid) * 4 == got.pixel_values.shape[0]
  with pytest.raises(ValueError):
    image_lib.num_image_tokens((1, 3, 4))


def test_empty_list_and_bad_inputs():
  got = image_lib.preprocess_images([])
  assert got.pixel_values.shape == (0, 1176) and got.image_grid_thw.shape == (0, 3)
  with pytest.raises(ValueError, match="uint8"):
    image_lib.preprocess_images([np.zeros((28, 28, 3), np.float32)])
  with pytest.raises(ValueError, match="HxW"):
    image_lib.preprocess_images([np.zeros((28, 28, 2), np.uint8)])
  with pytest.raises(TypeError):
    image_lib.preprocess_images(["not an image"])


def test_config_from_v4_and_v5_preprocessor_configs(tmp_path):
  v4 = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": list(image_lib.OPENAI_CLIP_MEAN),
    "image_std": list(image_lib.OPENAI_CLIP_STD),
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
  }
  v5 = {k: v for k, v in v4.items() if "pixels" not in k}
  v5["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
  want = image_lib.ImageProcessorConfig(min_pixels=3136, max_pixels=12845056)
  assert image_lib.ImageProcessorConfig.from_dict(v4) == want
  assert image_lib.ImageProcessorConfig.from_dict(v5) == want
  # Both spellings present: min_pixels/max_pixels win, as in transformers.
  both = {**v5, "min_pixels": 100, "max_pixels": 200000}
  got = image_lib.ImageProcessorConfig.from_dict(both)
  assert (got.min_pixels, got.max_pixels) == (100, 200000)
  # Null fields (as some saved configs have) fall through to the other spelling.
  nulls = {**v5, "min_pixels": None, "max_pixels": None}
  assert image_lib.ImageProcessorConfig.from_dict(nulls) == want
  legacy = {**v5, "size": {"min_pixels": 3136, "max_pixels": 12845056}}  # transformers 4.45
  assert image_lib.ImageProcessorConfig.from_dict(legacy) == want
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(v4))
  assert image_lib.ImageProcessorConfig.from_pretrained(tmp_path) == want
  with pytest.raises(ValueError, match="resample"):
    image_lib.ImageProcessorConfig.from_dict({**v4, "resample": 2})
  with pytest.raises(ValueError, match="do_resize"):
    image_lib.ImageProcessorConfig.from_dict({**v4, "do_resize": False})


def test_to_dict_round_trips_through_auto_image_processor(tmp_path):
  config = image_lib.ImageProcessorConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(config.to_dict()))
  assert image_lib.ImageProcessorConfig.from_pretrained(tmp_path) == config
  proc = transformers.AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
  img = _noise(300, 200, seed=11)
  want = proc(images=[PIL.Image.fromarray(img)], return_tensors="np")
  got = image_lib.preprocess_images([img], config)
  np.testing.assert_array_equal(got.image_grid_thw, want["image_grid_thw"])
  np.testing.assert_allclose(got.pixel_values, want["pixel_values"], rtol=0, atol=1e-6)


def test_load_image_decodes_files_and_bytes(tmp_path):
  rgba = _noise(40, 60, c=4, seed=12)
  buf = io.BytesIO()
  PIL.Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
  path = tmp_path / "chart.png"
  path.write_bytes(buf.getvalue())
  for source in (path, str(path), buf.getvalue()):
    img = image_lib.load_image(source)
    assert img.mode == "RGBA"  # alpha kept for the processor to composite
    np.testing.assert_array_equal(np.asarray(img), rgba)


def test_load_image_names_the_corrupt_source(tmp_path):
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
  with pytest.raises(ValueError, match=r"broken\.png"):
    image_lib.load_image(bad)
  buf = io.BytesIO()
  PIL.Image.fromarray(_noise(64, 64)).save(buf, format="PNG")
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(buf.getvalue()[:200])
  with pytest.raises(ValueError, match=r"truncated\.png"):
    image_lib.load_image(truncated)
  with pytest.raises(ValueError, match="bytes"):
    image_lib.load_image(b"garbage")
  with pytest.raises(FileNotFoundError):
    image_lib.load_image(tmp_path / "missing.png")


# Qwen3-VL: the same transformers class with the Qwen3-VL hub settings (patch 16, factor 32).
QWEN3 = image_lib.ImageProcessorConfig.for_model_type("qwen3_vl")


def _hf_qwen3(images, min_pixels, max_pixels):
  proc = _hf_processor_class()(
    patch_size=16,
    merge_size=2,
    temporal_patch_size=2,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
  )
  out = proc(images=images, return_tensors="np")
  return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


@pytest.mark.parametrize(
  "height,width,min_pixels,max_pixels",
  [
    (224, 224, QWEN3.min_pixels, QWEN3.max_pixels),  # below the hub min_pixels: upscaled
    (672, 480, QWEN3.min_pixels, QWEN3.max_pixels),  # multiples of 32 within bounds: unchanged
    (333, 517, QWEN3.min_pixels, QWEN3.max_pixels),  # rounded to multiples of 32
    (40, 1300, 32 * 32, 200_000),  # extreme aspect ratio
    (900, 1100, 32 * 32, 200_000),  # above max_pixels: downscaled
    (48, 80, 32 * 32, 200_000),  # 1.5 and 2.5 factors: banker's rounding of both sides
  ],
)
def test_qwen3_vl_settings_match_transformers(height, width, min_pixels, max_pixels):
  images = [PIL.Image.fromarray(_noise(height, width, seed=height))]
  want_pixels, want_grid = _hf_qwen3(images, min_pixels, max_pixels)
  config = dataclasses.replace(QWEN3, min_pixels=min_pixels, max_pixels=max_pixels)
  got = image_lib.preprocess_images(images, config)
  np.testing.assert_array_equal(got.image_grid_thw, want_grid)
  np.testing.assert_allclose(got.pixel_values, want_pixels, rtol=0, atol=1e-6)
  assert got.pixel_values.shape[1] == 3 * 2 * 16 * 16
  h, w = (int(x) * 16 for x in got.image_grid_thw[0, 1:])
  assert h % 32 == 0 and w % 32 == 0 and min_pixels <= h * w <= max_pixels


def test_qwen3_vl_hub_preprocessor_config_round_trips():
  hub = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
  }
  assert image_lib.ImageProcessorConfig.from_dict(hub) == QWEN3
  assert image_lib.ImageProcessorConfig.from_dict(QWEN3.to_dict()) == QWEN3
  with pytest.raises(ValueError, match="llava"):
    image_lib.ImageProcessorConfig.for_model_type("llava")
