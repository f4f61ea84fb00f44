"""Image preprocessing equals Hugging Face's Qwen2-VL PIL processor, and absurd inputs are refused.

Tolerance: exact (`assert_array_equal`), the arithmetic is the same float32/float64 sequence.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_lib

from retrv_jax.data import images

# (height, width): square, landscape, portrait, below min_pixels, thin, above max_pixels, odd.
SIZES = [(224, 224), (100, 300), (300, 100), (20, 30), (17, 1000), (1200, 1600), (57, 83)]


def _random_image(rng, height, width, channels=3):
  shape = (height, width, channels) if channels > 1 else (height, width)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _hf(pil_images, **kwargs):
  out = hf_lib.Qwen2VLImageProcessorPil(**kwargs)(images=pil_images, return_tensors="np")
  return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def test_equals_hf_processor_on_several_sizes_in_one_call():
  rng = np.random.default_rng(0)
  arrays = [_random_image(rng, h, w) for h, w in SIZES]
  ours = images.preprocess_images(arrays)
  want_pixels, want_grid = _hf([Image.fromarray(a) for a in arrays])
  np.testing.assert_array_equal(ours.image_grid_thw, want_grid)
  assert ours.pixel_values.dtype == np.float32
  assert ours.pixel_values.shape == want_pixels.shape
  np.testing.assert_array_equal(ours.pixel_values, want_pixels)
  assert ours.num_tokens == tuple(int(np.prod(g)) // 4 for g in want_grid)
  for (h, w), n in zip(SIZES, ours.num_tokens, strict=True):
    assert images.num_image_tokens(h, w) == n


def test_equals_hf_processor_with_custom_pixel_limits():
  config = images.ImageConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
  rng = np.random.default_rng(1)
  arrays = [_random_image(rng, h, w) for h, w in [(640, 480), (30, 30), (90, 200)]]
  ours = images.preprocess_images(arrays, config)
  want_pixels, want_grid = _hf(
      [Image.fromarray(a) for a in arrays], min_pixels=config.min_pixels,
      max_pixels=config.max_pixels)
  np.testing.assert_array_equal(ours.image_grid_thw, want_grid)
  np.testing.assert_array_equal(ours.pixel_values, want_pixels)
  assert max(ours.num_tokens) <= 16


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_equals_hf_processor_on_other_pil_modes(mode):
  rng = np.random.default_rng(2)
  rgba = Image.fromarray(_random_image(rng, 70, 50, 4), "RGBA")
  pil = rgba if mode == "RGBA" else rgba.convert(mode)
  ours = images.preprocess_images([pil])
  want_pixels, _ = _hf([pil])
  np.testing.assert_array_equal(ours.pixel_values, want_pixels)


def test_paths_load_like_pil_images(tmp_path):
  rng = np.random.default_rng(3)
  path = tmp_path / "a.png"
  Image.fromarray(_random_image(rng, 90, 130)).save(path)
  ours = images.preprocess_images([str(path), path])
  want_pixels, want_grid = _hf([Image.open(path), Image.open(path)])
  np.testing.assert_array_equal(ours.pixel_values, want_pixels)
  np.testing.assert_array_equal(ours.image_grid_thw, want_grid)


def test_patch_rows_are_merge_block_major_and_repeated_in_time():
  """Row r of block (by, bx) and sub-position (my, mx) holds pixels of patch (2by+my, 2bx+mx)."""
  config = images.ImageConfig(min_pixels=56 * 56, max_pixels=56 * 84)
  rng = np.random.default_rng(4)
  image = _random_image(rng, 56, 84)
  pixels, grid = images.preprocess_image(image, config)
  assert grid == (1, 4, 6)
  rows = pixels.reshape(2, 3, 2, 2, 3, 2, 14, 14)  # (by, bx, my, mx, C, T, P, P)
  np.testing.assert_array_equal(rows[:, :, :, :, :, 0], rows[:, :, :, :, :, 1])
  normalised = (image.astype(np.float64) / 255).astype(np.float32)
  normalised = (normalised - np.float32(images.CLIP_MEAN)) / np.float32(images.CLIP_STD)
  # Patch at grid row 3, column 5 = block (1, 2), sub-position (1, 1): pixels [42:56, 70:84].
  np.testing.assert_array_equal(rows[1, 2, 1, 1, :, 0], normalised[42:56, 70:84].transpose(2, 0, 1))


def test_smart_resize_equals_hf():
  for h in (1, 13, 28, 55, 300, 999, 4000):
    for w in (1, 29, 200, 1001, 3000):
      if max(h, w) / min(h, w) > 200:
        continue
      got = images.smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=1003520)
      assert got == hf_lib.smart_resize(h, w, 28, 3136, 1003520), (h, w)


def test_refuses_zero_size():
  with pytest.raises(ValueError, match=r"image #0: zero-size"):
    images.preprocess_images([np.zeros((0, 10, 3), np.uint8)])


def test_refuses_extreme_aspect_ratio_naming_image():
  with pytest.raises(ValueError, match=r"image cat\.jpg: aspect ratio 201"):
    images.preprocess_images([np.zeros((10, 2010, 3), np.uint8)], names=["cat.jpg"])


def test_refuses_decompression_bomb_before_decoding(tmp_path, monkeypatch):
  path = tmp_path / "bomb.png"
  Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(path)
  config = images.ImageConfig(max_input_pixels=200 * 200)

  def no_decoding(*args, **kwargs):
    raise AssertionError("pixels were decoded")

  monkeypatch.setattr(Image.Image, "load", no_decoding)
  with pytest.raises(ValueError, match=f"image {path}: 300x300 = 90000 pixels exceeds"):
    images.preprocess_images([path], config)


def test_refuses_unreadable_file_naming_it(tmp_path):
  path = tmp_path / "notes.png"
  path.write_text("not an image")
  with pytest.raises(ValueError, match=f"image {path}: cannot read"):
    images.load_image(path)


def test_refuses_wrong_array_dtype():
  with pytest.raises(ValueError, match=r"image q1: expected a \[H, W\] or \[H, W, 3\] uint8"):
    images.load_image(np.zeros((20, 20, 3), np.float32), name="q1")


def test_config_from_preprocessor_config(tmp_path):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({
      "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
      "temporal_patch_size": 2, "image_mean": list(images.CLIP_MEAN),
      "image_std": list(images.CLIP_STD)}))
  config = images.ImageConfig.from_preprocessor_config(tmp_path)
  assert config.max_pixels == 12845056 and config.factor == 28 and config.patch_dim == 1176
