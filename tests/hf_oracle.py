"""Tiny random Hugging Face Qwen2.5-VL models, built locally: the oracle of parity tests.

Nothing comes from a hub. Weights are redrawn with a large standard deviation so that
every layer moves the output and a wrong mapping cannot pass a tolerance test.
"""

from __future__ import annotations

import numpy as np
import torch
from hf_models import randomize_
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
  Qwen2_5_VisionTransformerPretrainedModel,
)

from retrv_jax.models.config import VisionConfig


def hf_vision_config(vision: VisionConfig) -> Qwen2_5_VLVisionConfig:
  """The Hugging Face vision config equal to `vision`."""
  return Qwen2_5_VLVisionConfig(
      depth=vision.depth,
      hidden_size=vision.hidden_size,
      hidden_act="silu",
      intermediate_size=vision.intermediate_size,
      num_heads=vision.num_heads,
      in_channels=vision.in_channels,
      patch_size=vision.patch_size,
      spatial_merge_size=vision.spatial_merge_size,
      temporal_patch_size=vision.temporal_patch_size,
      tokens_per_second=vision.tokens_per_second,
      window_size=vision.window_size,
      out_hidden_size=vision.out_hidden_size,
      fullatt_block_indexes=list(vision.fullatt_block_indexes),
  )


def hf_vision_model(
    vision: VisionConfig, *, seed: int = 0, std: float = 0.15
) -> Qwen2_5_VisionTransformerPretrainedModel:
  """A float32 HF vision tower in eval mode with random weights."""
  torch.manual_seed(seed)
  model = Qwen2_5_VisionTransformerPretrainedModel(hf_vision_config(vision))
  randomize_(model, seed=seed, std=std)
  return model.eval()


def random_pixel_values(grid_thw: np.ndarray, vision: VisionConfig, *, seed: int) -> np.ndarray:
  """`[sum t*h*w, C*T*P*P]` float32 standard-normal patches for the grids in `grid_thw`."""
  num_patches = int(np.prod(np.asarray(grid_thw), axis=1).sum())
  rng = np.random.default_rng(seed)
  return rng.standard_normal((num_patches, vision.patch_dim), dtype=np.float32)


def hf_vision_forward(
    model: Qwen2_5_VisionTransformerPretrainedModel,
    pixel_values: np.ndarray,
    grid_thw: np.ndarray,
) -> np.ndarray:
  """The merged features (`pooler_output`) `[N / m^2, out_hidden_size]` as numpy."""
  with torch.no_grad():
    out = model(torch.from_numpy(pixel_values), grid_thw=torch.as_tensor(grid_thw))
  return out.pooler_output.numpy()
