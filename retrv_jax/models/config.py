"""Hyperparameters of the Qwen2.5-VL backbone, one frozen dataclass per tower.

Every module receives the same `ModelConfig`; variants are derived with
`dataclasses.replace`. Presets mirror the public Hugging Face configs of
Qwen2.5-VL-3B/7B-Instruct; `tiny` is the embedded model this project trains itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "attention_out")
# The decoder projections LoRA can adapt (attention, then MLP), by module name.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower: ViT with 2D rotary, window attention and a 2x2 patch merger."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  out_hidden_size: int = 2048  # = LM hidden size; the merger projects into it.
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112  # In pixels; windows hold (window_size / patch / merge)^2 merged tokens.
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  rms_norm_eps: float = 1e-6
  tokens_per_second: int = 2  # Video only; kept for config round trips.
  # Not part of the checkpoint. 0: attention over the whole patch sequence of a call with
  # [N, N] masks; > 0: per image, each padded to this many patches (num_images x P^2 cost).
  max_patches_per_image: int = 0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch, ordered (C, T, P, P) as the HF processor emits."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The Qwen2.5-VL model: language decoder hyperparameters plus a `VisionConfig`."""

  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_layers: int = 36
  num_heads: int = 16
  num_kv_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)  # Rotary pairs given to (t, h, w) positions.
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = True
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int = 151643
  eos_token_id: int = 151645
  pad_token_id: int = 151643
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  # Numerics and memory: not part of the checkpoint.
  dtype: str = "float32"  # Activation/compute dtype.
  param_dtype: str = "float32"  # Storage dtype of the params.
  scan_layers: bool = True  # Stack layers on a `layers` axis under nn.scan.
  remat_policy: str = "none"  # One of REMAT_POLICIES; applied per scanned layer.
  # LoRA on the language decoder: not part of the Hugging Face checkpoint (merge to export).
  lora_rank: int = 0  # Rank r of every adapter; 0: no LoRA params at all.
  lora_alpha: float = 16.0  # Adapters add (lora_alpha / r) * x·A·B.
  lora_targets: tuple[str, ...] = LORA_TARGETS  # Projections of each layer that get one.

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
    """Builds a config from a (possibly partial) dict, naming any unknown key."""
    values = dict(values)
    vision = dict(values.pop("vision", {}) or {})
    _check_keys(cls, values, "model")
    _check_keys(VisionConfig, vision, "model.vision")
    for key in ("mrope_section", "lora_targets"):
      if key in values:
        values[key] = tuple(values[key])
    if "fullatt_block_indexes" in vision:
      vision["fullatt_block_indexes"] = tuple(vision["fullatt_block_indexes"])
    return cls(vision=VisionConfig(**vision), **values)


def _check_keys(cls: type, values: dict[str, Any], where: str) -> None:
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(
        f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}"
    )


def qwen2_5_vl_3b() -> ModelConfig:
  """Qwen2.5-VL-3B-Instruct (tied embeddings)."""
  return ModelConfig()


def qwen2_5_vl_7b() -> ModelConfig:
  """Qwen2.5-VL-7B-Instruct (untied embeddings)."""
  return ModelConfig(
      vocab_size=152064,
      hidden_size=3584,
      intermediate_size=18944,
      num_layers=28,
      num_heads=28,
      num_kv_heads=4,
      tie_word_embeddings=False,
      vision=VisionConfig(out_hidden_size=3584),
  )


def tiny(vocab_size: int = 4096) -> ModelConfig:
  """The embedded model: same architecture, small enough to train on a laptop CPU.

  Its tokenizer (`retrv_jax.data.tokenizer`) keeps the last `TINY_NUM_RESERVED` ids for
  special tokens in the order of `TINY_SPECIAL_TOKENS`; the ids below follow that layout.
  """
  base = vocab_size - TINY_NUM_RESERVED
  ids = {name: base + i for i, name in enumerate(TINY_SPECIAL_TOKENS)}
  return ModelConfig(
      vocab_size=vocab_size,
      hidden_size=256,
      intermediate_size=704,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      mrope_section=(8, 12, 12),
      max_position_embeddings=8192,
      tie_word_embeddings=True,
      image_token_id=ids["<|image_pad|>"],
      video_token_id=ids["<|video_pad|>"],
      vision_start_token_id=ids["<|vision_start|>"],
      vision_end_token_id=ids["<|vision_end|>"],
      bos_token_id=2,
      eos_token_id=ids["<|im_end|>"],
      pad_token_id=0,
      vision=VisionConfig(
          depth=4,
          hidden_size=128,
          intermediate_size=352,
          num_heads=4,
          out_hidden_size=256,
          patch_size=14,
          window_size=56,
          fullatt_block_indexes=(1, 3),
      ),
  )


# The special tokens of every retrv_jax tokenizer, in the order the tiny vocabulary
# appends them (a real Qwen tokenizer already has the first six and gets the rest added).
TINY_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<inspection-index-start>",
    "<inspection-index-end>",
    "<|cand_start|>",
    "<|cand_end|>",
    "<|cand_con|>",
    "<|cand_rel|>",
)
TINY_NUM_RESERVED = 32  # Ids reserved at the top of the tiny vocabulary (room to grow).


PRESETS = {"tiny": tiny, "3b": qwen2_5_vl_3b, "7b": qwen2_5_vl_7b}
