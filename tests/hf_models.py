"""Tiny random Hugging Face `Qwen2_5_VLForConditionalGeneration` models, built locally.

The oracle of conversion and parity tests: nothing comes from a hub. Every weight is
redrawn with a sizeable standard deviation (norm scales around 1), so a wrong mapping of
any tensor moves the logits well beyond float tolerance.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from retrv_jax.hf.config import model_config_to_hf
from retrv_jax.models.config import ModelConfig, VisionConfig


def tiny_config(*, vision: dict[str, Any] | None = None, **overrides: Any) -> ModelConfig:
  """A 2-layer decoder (d=64, 4 heads, 2 kv heads) and a 2-block ViT (d=32, 2 heads).

  `vision` overrides `VisionConfig` fields, the other keywords `ModelConfig` fields.
  Window size 56 px = 2x2 merged tokens, so an 8x8-patch image spans several windows.
  """
  vision_config = VisionConfig(
      depth=2,
      hidden_size=32,
      intermediate_size=48,
      num_heads=2,
      out_hidden_size=overrides.get("hidden_size", 64),
      window_size=56,
      fullatt_block_indexes=(1,),
  )
  base = ModelConfig(
      vocab_size=256,
      hidden_size=64,
      intermediate_size=96,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      mrope_section=(2, 3, 3),
      max_position_embeddings=1024,
      tie_word_embeddings=False,
      image_token_id=250,
      video_token_id=251,
      vision_start_token_id=252,
      vision_end_token_id=253,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=0,
      vision=dataclasses.replace(vision_config, **(vision or {})),
  )
  return base.replace(**overrides)


def hf_config(config: ModelConfig) -> Qwen2_5_VLConfig:
  """The transformers config equal to `config` (through our config.json export)."""
  return Qwen2_5_VLConfig.from_dict(model_config_to_hf(config, dtype="float32"))


def randomize_(model: torch.nn.Module, *, seed: int, std: float) -> None:
  """Redraws every parameter in place: norm scales ~ 1 + N(0, std), the rest ~ N(0, std)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
      is_norm = param.ndim == 1 and ("norm" in name or "ln_q" in name)
      param.copy_((1.0 + noise if is_norm else noise).to(param.dtype))


def hf_model(
    config: ModelConfig | None = None, *, seed: int = 0, std: float = 0.1
) -> Qwen2_5_VLForConditionalGeneration:
  """A float32 HF model in eval mode with random weights (default: `tiny_config()`)."""
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(hf_config(config or tiny_config()))
  randomize_(model, seed=seed, std=std)
  return model.eval()


def save_hf_model(
    path: str | os.PathLike,
    config: ModelConfig | None = None,
    *,
    seed: int = 0,
    std: float = 0.1,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "2GB",
) -> Qwen2_5_VLForConditionalGeneration:
  """Builds `hf_model(config)`, casts it to `dtype`, and `save_pretrained`s it to `path`.

  Returns the saved model (in `dtype`).
  """
  model = hf_model(config, seed=seed, std=std).to(dtype)
  model.save_pretrained(os.fspath(path), max_shard_size=max_shard_size)
  return model


def save_word_tokenizer(path: str | os.PathLike, config: ModelConfig) -> None:
  """Saves a whitespace word-level tokenizer: `w{i}` is id i, special tokens at their ids.

  Enough for code that tokenizes a prompt from a checkpoint directory (AutoTokenizer).
  """
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  specials = {
      "<|image_pad|>": config.image_token_id,
      "<|video_pad|>": config.video_token_id,
      "<|vision_start|>": config.vision_start_token_id,
      "<|vision_end|>": config.vision_end_token_id,
  }
  vocab = {f"w{i}": i for i in range(config.vocab_size) if i not in specials.values()}
  vocab.update(specials)
  backend = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token="w1", additional_special_tokens=list(specials)
  )
  tokenizer.save_pretrained(os.fspath(path))
