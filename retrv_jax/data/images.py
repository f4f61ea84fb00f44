"""Qwen2.5-VL image preprocessing in numpy: resize, normalise, cut into merge-ordered patches.

The output equals Hugging Face's `Qwen2VLImageProcessorPil` on the same RGB image:

  image [H, W, 3] uint8
    -> smart_resize to (h, w), both multiples of patch * merge, h * w in [min, max] pixels
    -> PIL bicubic resize, x / 255 (float64, then float32), (x - CLIP mean) / CLIP std
    -> pixel_values [gh * gw, C * T * P * P] float32 with gh = h / P, gw = w / P

Patch rows are merge-block-major: the merge x merge patches that the vision tower's merger
fuses into one LLM token are consecutive rows, blocks in raster order. Each row holds one
patch as (C, T, P, P); a still image is repeated T = temporal_patch_size times. One image
becomes gh * gw / merge**2 LLM tokens (`<|image_pad|>` in the prompt).

Inputs that would make a worker decode or allocate something absurd (decompression bombs,
zero-size images, extreme aspect ratios) are refused before any pixel is decoded, with an
error that names the image.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray  # bytes: an encoded file.


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """Preprocessing hyperparameters; defaults are the Qwen2-VL/Qwen2.5-VL processor's."""

  min_pixels: int = 56 * 56  # Fewest pixels after resizing (HF `size.shortest_edge`).
  max_pixels: int = 28 * 28 * 1280  # Most pixels after resizing: at most 1280 LLM tokens.
  patch_size: int = 14  # Side of one ViT patch, in pixels.
  merge_size: int = 2  # The merger fuses merge x merge patches into one LLM token.
  temporal_patch_size: int = 2  # Frames per patch; a still image is repeated this often.
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  # Refuse inputs with more pixels than this *before* decoding them (decompression bombs).
  max_input_pixels: int = 64 * 28 * 28 * 1280
  max_aspect_ratio: float = 200.0  # HF's smart_resize refuses anything longer than this.

  def __post_init__(self):
    for name in ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ImageConfig.{name} must be positive, got {getattr(self, name)}")
    if self.min_pixels > self.max_pixels:
      raise ValueError(
          f"ImageConfig.min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})"
      )

  @property
  def factor(self) -> int:
    """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Length of one pixel_values row: C * T * P * P."""
    return len(self.image_mean) * self.temporal_patch_size * self.patch_size**2

  def replace(self, **changes) -> ImageConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_preprocessor_config(cls, path: str | os.PathLike) -> ImageConfig:
    """Reads a checkpoint's `preprocessor_config.json` (a file or the directory holding it).

    The published Qwen2.5-VL checkpoints set max_pixels = 12845056, far above the class
    default; read their file to reproduce their processor exactly.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "preprocessor_config.json")
    with open(path) as f:
      values = json.load(f)
    size = values.get("size") or {}
    changes = {
        "min_pixels": values.get("min_pixels", size.get("shortest_edge")),
        "max_pixels": values.get("max_pixels", size.get("longest_edge")),
        "patch_size": values.get("patch_size"),
        "merge_size": values.get("merge_size"),
        "temporal_patch_size": values.get("temporal_patch_size"),
        "image_mean": tuple(values["image_mean"]) if "image_mean" in values else None,
        "image_std": tuple(values["image_std"]) if "image_std" in values else None,
    }
    return cls(**{k: v for k, v in changes.items() if v is not None})


class ProcessedImages(NamedTuple):
  """Several images preprocessed for the vision tower, concatenated along patches."""

  pixel_values: np.ndarray  # [num_patches, C * T * P * P] float32
  image_grid_thw: np.ndarray  # [num_images, 3] int64: (t, h, w) patches before merging.
  num_tokens: tuple[int, ...]  # LLM image tokens per image: t * h * w / merge**2.


def smart_resize(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
  """Target (height, width): multiples of `factor`, area within [min, max], aspect kept.

  Sides are first rounded to the nearest multiple; if the area then leaves the allowed
  range, both sides are scaled by the same factor and rounded down (too large) or up (too
  small). Identical to the Hugging Face Qwen2-VL rule, including its rounding.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got height={height} width={width}")
  ratio = max(height, width) / min(height, width)
  if ratio > 200:
    raise ValueError(f"aspect ratio must be at most 200, got {ratio:.1f} ({height}x{width})")
  new_h = round(height / factor) * factor
  new_w = round(width / factor) * factor
  if new_h * new_w > max_pixels:
    scale = math.sqrt(height * width / max_pixels)
    new_h = max(factor, math.floor(height / scale / factor) * factor)
    new_w = max(factor, math.floor(width / scale / factor) * factor)
  elif new_h * new_w < min_pixels:
    scale = math.sqrt(min_pixels / (height * width))
    new_h = math.ceil(height * scale / factor) * factor
    new_w = math.ceil(width * scale / factor) * factor
  return new_h, new_w


def check_image_size(height: int, width: int, config: ImageConfig, *, name: str) -> None:
  """Refuses sizes a worker should never decode or resize; `name` says which image."""
  if height <= 0 or width <= 0:
    raise ValueError(f"image {name}: zero-size image ({height}x{width})")
  if height * width > config.max_input_pixels:
    raise ValueError(
        f"image {name}: {height}x{width} = {height * width} pixels exceeds "
        f"max_input_pixels={config.max_input_pixels} (possible decompression bomb)"
    )
  ratio = max(height, width) / min(height, width)
  if ratio > config.max_aspect_ratio:
    raise ValueError(
        f"image {name}: aspect ratio {ratio:.1f} ({height}x{width}) exceeds "
        f"{config.max_aspect_ratio:g}"
    )


def image_grid_thw(
    height: int, width: int, config: ImageConfig = ImageConfig(), *, name: str = "?"
) -> tuple[int, int, int]:
  """(t, h, w) patch grid of an image of this size, before merging; no pixels needed."""
  check_image_size(height, width, config, name=name)
  new_h, new_w = smart_resize(
      height,
      width,
      factor=config.factor,
      min_pixels=config.min_pixels,
      max_pixels=config.max_pixels,
  )
  return 1, new_h // config.patch_size, new_w // config.patch_size


def num_image_tokens(
    height: int, width: int, config: ImageConfig = ImageConfig(), *, name: str = "?"
) -> int:
  """LLM tokens (`<|image_pad|>` count) of an image of this size."""
  t, h, w = image_grid_thw(height, width, config, name=name)
  return t * h * w // config.merge_size**2


def load_image(
    source: ImageSource, config: ImageConfig = ImageConfig(), *, name: str | None = None
) -> np.ndarray:
  """Opens a path, encoded bytes, PIL image or array as RGB `[H, W, 3]` uint8, refusing
  absurd sizes.

  Files (and bytes) are size-checked from their header before decoding and turned upright
  by their EXIF orientation (as HF `load_image`). Transparency is composited onto white (as
  the HF processor's RGB conversion). Arrays must be `[H, W]` or `[H, W, 3]` uint8.
  """
  if isinstance(source, (str, os.PathLike, bytes)):
    encoded = isinstance(source, bytes)
    name = name or ("<encoded image>" if encoded else os.fspath(source))
    try:
      with Image.open(io.BytesIO(source) if encoded else source) as image:
        check_image_size(image.height, image.width, config, name=name)
        image = ImageOps.exif_transpose(image)
        return _pil_to_rgb(image)
    except (OSError, Image.DecompressionBombError) as e:
      raise ValueError(f"image {name}: cannot read it as an image: {e}") from e
  name = name or "<in-memory image>"
  if isinstance(source, Image.Image):
    check_image_size(source.height, source.width, config, name=name)
    return _pil_to_rgb(source)
  if isinstance(source, np.ndarray):
    if source.dtype != np.uint8 or source.ndim not in (2, 3) or (
        source.ndim == 3 and source.shape[-1] != 3
    ):
      raise ValueError(
          f"image {name}: expected a [H, W] or [H, W, 3] uint8 array, got "
          f"{list(source.shape)} {source.dtype}"
      )
    check_image_size(source.shape[0], source.shape[1], config, name=name)
    return np.ascontiguousarray(np.broadcast_to(source[..., None], (*source.shape[:2], 3))
                                if source.ndim == 2 else source)
  raise TypeError(f"image {name}: expected a path, PIL image or numpy array, got {type(source)}")


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
  """RGB uint8 array; transparent pixels are composited onto a white background."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba)
  return np.asarray(image.convert("RGB"))


def preprocess_image(
    image: np.ndarray, config: ImageConfig = ImageConfig(), *, name: str = "?"
) -> tuple[np.ndarray, tuple[int, int, int]]:
  """One RGB `[H, W, 3]` uint8 image -> (`[h * w, C * T * P * P]` float32 patches, (t, h, w))."""
  t, grid_h, grid_w = image_grid_thw(image.shape[0], image.shape[1], config, name=name)
  p = config.patch_size
  resized = Image.fromarray(image).resize((grid_w * p, grid_h * p), resample=Image.BICUBIC)
  # Same arithmetic as HF: rescale in float64 then cast, normalise in float32.
  pixels = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
  mean = np.asarray(config.image_mean, np.float32)
  std = np.asarray(config.image_std, np.float32)
  pixels = (pixels - mean) / std  # [H, W, C]
  return _patchify(pixels, config), (t, grid_h, grid_w)


def _patchify(pixels: np.ndarray, config: ImageConfig) -> np.ndarray:
  """[H, W, C] -> [num_patches, C * T * P * P], merge blocks consecutive, rows (C, T, P, P)."""
  p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
  height, width, channels = pixels.shape
  bh, bw = height // (p * m), width // (p * m)  # Merge blocks along each side.
  # Axes: (block_y, merge_y, pixel_y, block_x, merge_x, pixel_x, channel).
  blocks = pixels.reshape(bh, m, p, bw, m, p, channels)
  # -> (block_y, block_x, merge_y, merge_x, channel, pixel_y, pixel_x).
  blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
  blocks = np.repeat(blocks[:, :, :, :, :, None], t, axis=5)  # Add time after channel.
  return np.ascontiguousarray(blocks).reshape(bh * bw * m * m, channels * t * p * p)


def preprocess_images(
    images: Sequence[ImageSource],
    config: ImageConfig = ImageConfig(),
    *,
    names: Sequence[str] | None = None,
) -> ProcessedImages:
  """Loads and preprocesses several images; their patches are concatenated in order.

  Returns pixel_values `[sum of h * w, C * T * P * P]`, image_grid_thw `[len(images), 3]`
  and the LLM token count of each image. `names` label images in errors (paths by default).
  """
  if names is not None and len(names) != len(images):
    raise ValueError(f"got {len(names)} names for {len(images)} images")
  if not images:
    raise ValueError("preprocess_images needs at least one image")
  patches, grids = [], []
  for i, source in enumerate(images):
    name = names[i] if names is not None else None
    if name is None and not isinstance(source, (str, os.PathLike)):
      name = f"#{i}"
    rgb = load_image(source, config, name=name)
    row, grid = preprocess_image(rgb, config, name=name or os.fspath(source))
    patches.append(row)
    grids.append(grid)
  grid_array = np.asarray(grids, dtype=np.int64)
  tokens = tuple(int(np.prod(g)) // config.merge_size**2 for g in grids)
  return ProcessedImages(np.concatenate(patches, axis=0), grid_array, tokens)
