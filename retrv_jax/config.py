"""Config schema checks: an invalid value stops the run before any compile.

Configs are `ml_collections.ConfigDict`s built by `configs/*.py:get_config(arg)`. The
functions here turn their `model` section into a validated `ModelConfig` and check the
mesh, each with a message that names the field, the value received and what is allowed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import ml_collections

from retrv_jax import parallel
from retrv_jax.models.config import DTYPES, LORA_TARGETS, REMAT_POLICIES, ModelConfig


class ConfigError(ValueError):
  """A config field holds a value the run cannot use."""


def _fail(field: str, value: Any, expected: str) -> None:
  raise ConfigError(f"config.{field} = {value!r}: expected {expected}")


def _positive(field: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    _fail(field, value, "a positive integer")


def validate_model(model: ModelConfig, prefix: str = "model") -> ModelConfig:
  """Checks the structural constraints of a Qwen2.5-VL config; returns it unchanged."""
  for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads"):
    _positive(f"{prefix}.{name}", getattr(model, name))
  if model.hidden_size % model.num_heads:
    _fail(f"{prefix}.num_heads", model.num_heads, f"a divisor of hidden_size={model.hidden_size}")
  if model.num_heads % model.num_kv_heads:
    _fail(f"{prefix}.num_kv_heads", model.num_kv_heads, f"a divisor of num_heads={model.num_heads}")
  if model.head_dim % 2:
    _fail(f"{prefix}.hidden_size", model.hidden_size, "hidden_size / num_heads to be even (rotary)")
  if len(model.mrope_section) != 3 or sum(model.mrope_section) != model.head_dim // 2:
    _fail(f"{prefix}.mrope_section", model.mrope_section,
          f"three sizes summing to head_dim/2 = {model.head_dim // 2}")
  for name in ("dtype", "param_dtype"):
    if getattr(model, name) not in DTYPES:
      _fail(f"{prefix}.{name}", getattr(model, name), f"one of {DTYPES}")
  if model.remat_policy not in REMAT_POLICIES:
    _fail(f"{prefix}.remat_policy", model.remat_policy, f"one of {REMAT_POLICIES}")
  if not 0 < model.rms_norm_eps < 1:
    _fail(f"{prefix}.rms_norm_eps", model.rms_norm_eps, "a small positive float")
  ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
         "bos_token_id", "eos_token_id", "pad_token_id")
  for name in ids:
    value = getattr(model, name)
    if not 0 <= value < model.vocab_size:
      _fail(f"{prefix}.{name}", value, f"a token id in [0, vocab_size={model.vocab_size})")
  if model.lora_rank < 0:
    _fail(f"{prefix}.lora_rank", model.lora_rank, "0 (no LoRA) or a positive rank")
  if model.lora_alpha <= 0:
    _fail(f"{prefix}.lora_alpha", model.lora_alpha, "a positive float")
  unknown = sorted(set(model.lora_targets) - set(LORA_TARGETS))
  if unknown:
    _fail(f"{prefix}.lora_targets", model.lora_targets, f"names among {LORA_TARGETS}")
  vision = model.vision
  for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
               "out_hidden_size", "patch_size", "temporal_patch_size", "spatial_merge_size",
               "window_size"):
    _positive(f"{prefix}.vision.{name}", getattr(vision, name))
  if vision.hidden_size % vision.num_heads or vision.head_dim % 4:
    _fail(f"{prefix}.vision.num_heads", vision.num_heads,
          f"a divisor of vision.hidden_size={vision.hidden_size} leaving head_dim % 4 == 0")
  if vision.out_hidden_size != model.hidden_size:
    _fail(f"{prefix}.vision.out_hidden_size", vision.out_hidden_size,
          f"the LM hidden_size {model.hidden_size}")
  unit = vision.patch_size * vision.spatial_merge_size
  if vision.window_size % unit:
    _fail(f"{prefix}.vision.window_size", vision.window_size,
          f"a multiple of patch_size * spatial_merge_size = {unit}")
  if type(vision.max_patches_per_image) is not int or vision.max_patches_per_image < 0:
    _fail(f"{prefix}.vision.max_patches_per_image", vision.max_patches_per_image,
          "0 (attention over the whole patch sequence) or the largest image's t*h*w")
  bad = [i for i in vision.fullatt_block_indexes if not 0 <= i < vision.depth]
  if bad:
    _fail(f"{prefix}.vision.fullatt_block_indexes", vision.fullatt_block_indexes,
          f"block indexes in [0, depth={vision.depth})")
  return model


def model_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ModelConfig:
  """The validated `ModelConfig` of a run config's `model` section."""
  section = config["model"]
  values = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
  try:
    model = ModelConfig.from_dict(values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from e
  return validate_model(model)


def validate_mesh(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the mesh sizes against the device count, naming `config.mesh` on error."""
  sizes = {name: config.mesh[name] for name in parallel.MESH_AXES}
  try:
    return parallel.mesh_shape(sizes, num_devices)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from e


def sibling_config(file: str, name: str = "base") -> ModuleType:
  """The config file `name`.py beside `file`, loaded by path (stage configs build on
  configs/base.py wherever the repository is, with no `configs` package on sys.path)."""
  path = os.path.join(os.path.dirname(os.path.abspath(file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"retrv_jax_config_{name}", path)
  if spec is None or spec.loader is None or not os.path.isfile(path):
    raise ConfigError(f"{file}: cannot load its base config {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
