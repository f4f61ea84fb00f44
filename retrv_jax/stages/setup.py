"""From a run config to the objects every stage and the evaluator build: the ICM config,
the data, pipeline configs, sampling rules and the starting params."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from retrv_jax import config as config_lib
from retrv_jax import parallel
from retrv_jax.config import ConfigError
from retrv_jax.data import synthetic
from retrv_jax.data.pipeline import PipelineConfig
from retrv_jax.data.tokenizer import Tokenizer, load_tokenizer
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.config import ModelConfig
from retrv_jax.models.reranker import Reranker
from retrv_jax.rl.rewards import FormatTokens
from retrv_jax.rl.sampler import SamplingParams
from retrv_jax.stages import outputs

STAGES = ("vision", "pretrain", "align", "sft", "grpo")


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
  """`config.stages` ('align,sft,grpo') as a list, checked."""
  names = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown or not names or len(set(names)) != len(names):
    raise ConfigError(f"config.stages = {config.stages!r}: expected distinct names among "
                      f"{STAGES}, comma-separated")
  if [s for s in STAGES if s in names] != names:
    raise ConfigError(f"config.stages = {config.stages!r}: stages run in the order {STAGES}")
  return names


def tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  return load_tokenizer(config.tokenizer or None)


def compression_config(config: ml_collections.ConfigDict) -> CompressionConfig:
  try:
    return CompressionConfig(**config.compression.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.compression: {e}") from e


def data_dir(config: ml_collections.ConfigDict) -> str:
  """`config.data.data_dir`, or the embedded benchmark (generated once into workdir/data)."""
  if config.data.data_dir:
    return config.data.data_dir
  root = os.path.join(os.path.abspath(config.workdir), "data")
  if not os.path.isdir(root):
    bench = synthetic.BenchmarkConfig(
        **config.benchmark.to_dict(),
        max_inspections=config.data.max_inspections if config.inspection else 0)
    logging.info("Generating the embedded benchmark into %s", root)
    synthetic.generate(root, bench)
  return root


def pipeline_config(config: ml_collections.ConfigDict, *, batch_size: int, split: str = "train",
                    seed_offset: int = 0, **overrides: Any) -> PipelineConfig:
  """The `PipelineConfig` of a stage: `config.data` plus the layout the ICM config implies.

  `batch_size` is per process (the stage's global batch divided by the process count).
  """
  icm = compression_config(config)
  values = dict(config.data.to_dict(), data_dir=data_dir(config), batch_size=batch_size,
                split=split, seed=config.seed + seed_offset,
                compress_candidates=icm.enabled,
                candidate_slots=icm.candidate_slots if icm.enabled else ("con", "rel"),
                max_inspections=config.data.max_inspections if config.inspection else 0)
  values.update(overrides)
  try:
    return PipelineConfig.from_config(values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.data: {e}") from e


def per_process(global_batch: int, name: str) -> int:
  count = jax.process_count()
  if global_batch % count:
    raise ConfigError(f"config.{name} = {global_batch}: expected a multiple of the "
                      f"{count} processes")
  return global_batch // count


def micro_batch_size(config: ml_collections.ConfigDict, stage: str, mesh) -> int:
  """`stage`'s examples per forward pass (`micro_batch_size` 0: the whole batch), checked:
  the batch splits into whole micro-batches, and each shards over mesh data x fsdp."""
  section = config[stage]
  micro = int(section.micro_batch_size) or int(section.batch_size)
  if int(section.batch_size) % micro:
    raise ConfigError(f"config.{stage}.batch_size = {section.batch_size}: expected a multiple "
                      f"of micro_batch_size = {micro}")
  shards = parallel.batch_shards(mesh)
  if micro % shards:
    raise ConfigError(f"config.{stage}.micro_batch_size = {micro} examples (0: the batch): "
                      f"expected a multiple of mesh data x fsdp = {shards}, over which each "
                      "micro-batch is sharded")
  return micro


def sampling_params(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                    temperature: float, max_new_tokens: int, top_k: int = 0,
                    top_p: float = 1.0) -> SamplingParams:
  """Decoding rules with the tokenizer's stop, inspection and digit tokens."""
  digits = FormatTokens.from_tokenizer(tokenizer)
  inspect = config.inspection and config.data.max_inspections > 0
  return SamplingParams(
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      stop_token_ids=(tokenizer.eos,),
      inspect_start_id=tokenizer.inspect_start if inspect else -1,
      inspect_end_id=tokenizer.inspect_end if inspect else -1,
      digit_ids=digits.digit_ids, digit_values=digits.digit_values,
      digit_lengths=digits.digit_lengths,
      max_inspections=config.data.max_inspections if inspect else 0)


def reranker_and_params(config: ml_collections.ConfigDict, init_checkpoint: str, *, mesh=None,
                        merge_lora: bool = False, lora: bool = True
                        ) -> tuple[Reranker, dict]:
  """The re-ranker of the run's configs and its starting params from `init_checkpoint`.

  lora=False builds the model without adapters (pretrain, align).
  """
  model = config_lib.model_config(config)
  if not lora:
    model = model.replace(lora_rank=0)
  icm = compression_config(config)
  rng = jax.random.key(config.seed)
  params = outputs.load_params(init_checkpoint, model, icm, rng, mesh=mesh,
                               rules=tuple(config.mesh.rules), merge_lora=merge_lora)
  return Reranker(model, icm), params


def with_vision_blocks(model: ModelConfig, data: PipelineConfig) -> ModelConfig:
  """Vision attention per image, padded to the largest image the data can hold."""
  largest = data.max_pixels // data.patch_size**2
  return model.replace(vision=dataclasses.replace(model.vision, max_patches_per_image=largest))
