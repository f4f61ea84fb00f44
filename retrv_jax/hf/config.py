"""Hugging Face `config.json` of Qwen2.5-VL <-> `ModelConfig`.

Two layouts exist on the hub: the original one (text fields at the top level,
`rope_scaling.mrope_section`, `vision_config.in_chans`) and the one transformers v5
writes (`text_config` with `rope_parameters`, `vision_config.in_channels`). Import reads
both; export writes the v5 layout, which transformers loads with `from_pretrained`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from retrv_jax.models.config import ModelConfig, VisionConfig

MODEL_TYPE = "qwen2_5_vl"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
HF_VISION_RMS_NORM_EPS = 1e-6  # Hard-coded in transformers' vision blocks and merger.


class ConfigError(ValueError):
  """A Hugging Face config this model cannot represent."""


def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """Reads `config.json` from a checkpoint directory (or the file itself)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path}: no Hugging Face config.json there") from e
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from e


def model_config_from_hf(hf: dict[str, Any] | str | os.PathLike, **overrides: Any) -> ModelConfig:
  """Builds a `ModelConfig` from a Hugging Face config dict or checkpoint directory.

  `overrides` set the fields that are not part of the checkpoint (dtype, scan_layers, ...).
  """
  where = "config.json"
  if not isinstance(hf, dict):
    where = os.fspath(hf)
    hf = load_hf_config(hf)
  if hf.get("model_type") != MODEL_TYPE:
    raise ConfigError(f"{where}: model_type is {hf.get('model_type')!r}, expected {MODEL_TYPE!r}")
  # v5 nests the decoder fields under text_config; older files keep them at the top.
  text = {**hf, **(hf.get("text_config") or {})}
  vision = dict(hf.get("vision_config") or {})
  rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})

  def need(values: dict[str, Any], key: str, prefix: str) -> Any:
    if values.get(key) is None:
      raise ConfigError(f"{where}: missing field {prefix}{key}")
    return values[key]

  _check_supported(text, vision, rope, where)
  eos = need(text, "eos_token_id", "text_config.")
  if isinstance(eos, list):
    eos = eos[0]
  bos = need(text, "bos_token_id", "text_config.")
  pad = text.get("pad_token_id")
  depth = need(vision, "depth", "vision_config.")
  vision_config = VisionConfig(
      depth=depth,
      hidden_size=need(vision, "hidden_size", "vision_config."),
      intermediate_size=need(vision, "intermediate_size", "vision_config."),
      num_heads=need(vision, "num_heads", "vision_config."),
      in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
      out_hidden_size=need(vision, "out_hidden_size", "vision_config."),
      patch_size=vision.get("patch_size", 14),
      temporal_patch_size=vision.get("temporal_patch_size", 2),
      spatial_merge_size=vision.get("spatial_merge_size", 2),
      window_size=vision.get("window_size", 112),
      fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", ())),
      tokens_per_second=vision.get("tokens_per_second", 2),
  )
  return ModelConfig(
      vocab_size=need(text, "vocab_size", "text_config."),
      hidden_size=need(text, "hidden_size", "text_config."),
      intermediate_size=need(text, "intermediate_size", "text_config."),
      num_layers=need(text, "num_hidden_layers", "text_config."),
      num_heads=need(text, "num_attention_heads", "text_config."),
      num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
      rms_norm_eps=text.get("rms_norm_eps", 1e-6),
      rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
      mrope_section=tuple(need(rope, "mrope_section", "text_config.rope_parameters.")),
      max_position_embeddings=text.get("max_position_embeddings", 128000),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
      image_token_id=need(hf, "image_token_id", ""),
      video_token_id=need(hf, "video_token_id", ""),
      vision_start_token_id=need(hf, "vision_start_token_id", ""),
      vision_end_token_id=need(hf, "vision_end_token_id", ""),
      bos_token_id=bos,
      eos_token_id=eos,
      pad_token_id=bos if pad is None else pad,
      vision=vision_config,
  ).replace(**overrides)


def _check_supported(
    text: dict[str, Any], vision: dict[str, Any], rope: dict[str, Any], where: str
) -> None:
  """Stops on the features the Flax model does not implement."""
  for prefix, values in (("text_config.", text), ("vision_config.", vision)):
    act = values.get("hidden_act", "silu")
    if act != "silu":
      raise ConfigError(f"{where}: {prefix}hidden_act is {act!r}; only 'silu' is supported")
  if text.get("use_sliding_window"):
    raise ConfigError(f"{where}: text_config.use_sliding_window is true; not supported")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "mrope"):
    raise ConfigError(
        f"{where}: rope type {rope_type!r} is not supported; expected 'default' or 'mrope'"
    )
  for key in ("patch_size", "temporal_patch_size"):
    if not isinstance(vision.get(key, 0), int):
      raise ConfigError(f"{where}: vision_config.{key} is {vision[key]!r}; expected an int")


def model_config_to_hf(config: ModelConfig, *, dtype: str | None = None) -> dict[str, Any]:
  """The `config.json` dict of `Qwen2_5_VLForConditionalGeneration`, as transformers v5 writes.

  `dtype` is the dtype the weights are stored in (default: `config.param_dtype`).
  """
  v = config.vision
  if v.rms_norm_eps != HF_VISION_RMS_NORM_EPS:
    raise ConfigError(
        f"vision.rms_norm_eps is {v.rms_norm_eps}; transformers fixes it at "
        f"{HF_VISION_RMS_NORM_EPS}, so a checkpoint cannot carry another value"
    )
  return {
      "architectures": [ARCHITECTURE],
      "model_type": MODEL_TYPE,
      "dtype": dtype or config.param_dtype,
      "image_token_id": config.image_token_id,
      "video_token_id": config.video_token_id,
      "vision_start_token_id": config.vision_start_token_id,
      "vision_end_token_id": config.vision_end_token_id,
      "tie_word_embeddings": config.tie_word_embeddings,
      "text_config": {
          "model_type": "qwen2_5_vl_text",
          "vocab_size": config.vocab_size,
          "hidden_size": config.hidden_size,
          "intermediate_size": config.intermediate_size,
          "num_hidden_layers": config.num_layers,
          "num_attention_heads": config.num_heads,
          "num_key_value_heads": config.num_kv_heads,
          "hidden_act": "silu",
          "rms_norm_eps": config.rms_norm_eps,
          "max_position_embeddings": config.max_position_embeddings,
          "rope_parameters": {
              "rope_type": "default",
              "type": "mrope",
              "rope_theta": config.rope_theta,
              "mrope_section": list(config.mrope_section),
          },
          "use_sliding_window": False,
          "sliding_window": None,
          "max_window_layers": config.num_layers,
          "attention_dropout": 0.0,
          "bos_token_id": config.bos_token_id,
          "eos_token_id": config.eos_token_id,
          "pad_token_id": config.pad_token_id,
          "tie_word_embeddings": config.tie_word_embeddings,
      },
      "vision_config": {
          "model_type": "qwen2_5_vl_vision",
          "depth": v.depth,
          "hidden_size": v.hidden_size,
          "intermediate_size": v.intermediate_size,
          "num_heads": v.num_heads,
          "hidden_act": "silu",
          "in_channels": v.in_channels,
          "out_hidden_size": v.out_hidden_size,
          "patch_size": v.patch_size,
          "temporal_patch_size": v.temporal_patch_size,
          "spatial_merge_size": v.spatial_merge_size,
          "window_size": v.window_size,
          "fullatt_block_indexes": list(v.fullatt_block_indexes),
          "tokens_per_second": v.tokens_per_second,
      },
  }
