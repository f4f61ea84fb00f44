"""What a training stage hands to the next one, and how a run gets its starting params.

A stage output is a directory:

    <dir>/params/      orbax checkpoint of the full re-ranker params
                       ({"backbone": ..., "icm": ...}, LoRA entries included)
    <dir>/stage.json   {"stage", "step", "model": ModelConfig, "compression": ...}

`stage.json` is written last (atomically), so a directory without it is incomplete and is
never read. `load_params` starts a run from a stage output, a Hugging Face Qwen2.5-VL
directory (the backbone; the ICM and LoRA start fresh) or nothing (random, tiny model).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from safetensors import safe_open

from retrv_jax import hf, parallel
from retrv_jax.models import compression as compression_lib
from retrv_jax.models import lora, qwen2_5_vl, reranker
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.config import ModelConfig

STAGE_FILE = "stage.json"
PARAMS_DIR = "params"
HF_CONFIG = "config.json"
ICM_FILE = "icm.safetensors"  # Beside an exported Hugging Face checkpoint (export_hf).
RETRV_CONFIG = "retrv_jax.json"
# ModelConfig fields that may differ between a checkpoint and the run that loads it.
RUN_FIELDS = ("dtype", "param_dtype", "remat_policy", "lora_rank", "lora_alpha",
              "lora_targets")


class StageOutputError(ValueError):
  """A stage output or init checkpoint that the run cannot start from."""


def write_json(path: str, value: Any) -> None:
  """Writes JSON atomically (a temporary file renamed into place)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def save(path: str, params: Any, *, stage: str, step: int, model_config: ModelConfig,
         compression: CompressionConfig) -> None:
  """Writes a stage output (every process calls it; orbax writes the shards)."""
  path = os.path.abspath(path)
  if jax.process_index() == 0 and os.path.exists(os.path.join(path, STAGE_FILE)):
    os.remove(os.path.join(path, STAGE_FILE))  # Incomplete until the new one is written.
  params_dir = os.path.join(path, PARAMS_DIR)
  if jax.process_index() == 0 and os.path.exists(params_dir):
    shutil.rmtree(params_dir)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_dir, parallel.unbox(params))
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    write_json(os.path.join(path, STAGE_FILE), {
        "stage": stage,
        "step": int(step),
        "model": model_config.to_dict(),
        "compression": dataclasses.asdict(compression),
    })


def is_stage_output(path: str) -> bool:
  return os.path.isfile(os.path.join(path, STAGE_FILE))


def read_info(path: str) -> dict[str, Any]:
  """The `stage.json` of a stage output."""
  file = os.path.join(path, STAGE_FILE)
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise StageOutputError(f"{file}: not a readable stage output ({e})") from e


def _check_same_structure(saved: ModelConfig, run: ModelConfig, where: str) -> None:
  strip = {name: getattr(ModelConfig(), name) for name in RUN_FIELDS}
  same_vision = lambda m: dataclasses.replace(m.vision, max_patches_per_image=0)  # Runtime.
  a = saved.replace(vision=same_vision(saved), **strip).to_dict()
  b = run.replace(vision=same_vision(run), **strip).to_dict()
  if a != b:
    diff = sorted(k for k in a if a[k] != b[k])
    raise StageOutputError(f"{where}: the checkpoint's model differs from config.model in "
                           f"{diff}; set config.model to the checkpoint's values")


def _fresh_icm(model_config: ModelConfig, compression: CompressionConfig, rng: jax.Array,
               embedding: jax.Array, mesh, rules) -> dict:
  """A new ICM calibrated to the LM's embeddings, created in its shards."""
  init = lambda key, table: compression_lib.init_params(model_config, compression, key, table)
  if mesh is None:
    return init(rng, embedding)
  shardings = parallel.shardings_of(compression_lib.abstract_params(model_config, compression),
                                    mesh, rules)
  return jax.jit(init, out_shardings=shardings)(rng, embedding)


def _read_icm(file: str, model_config: ModelConfig, compression: CompressionConfig, mesh,
              rules) -> dict:
  """The ICM written by `retrv_jax.export_hf`, checked against `compression`."""
  abstract = parallel.unbox(compression_lib.abstract_params(model_config, compression))
  expected = traverse_util.flatten_dict(abstract, sep="/")
  with safe_open(file, framework="numpy") as f:
    found = {k: f.get_tensor(k) for k in f.keys()}
  if set(found) != set(expected) or any(found[k].shape != v.shape for k, v in expected.items()):
    raise StageOutputError(f"{file}: ICM params {sorted((k, v.shape) for k, v in found.items())}"
                           f" do not fit config.compression {compression}")
  flat = {k: found[k].astype(v.dtype) for k, v in expected.items()}
  if mesh is not None:
    shardings = traverse_util.flatten_dict(parallel.shardings_of(
        compression_lib.abstract_params(model_config, compression), mesh, rules), sep="/")
    flat = {k: jax.device_put(v, shardings[k]) for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def _restore(path: str, model_config: ModelConfig, compression: CompressionConfig, mesh, rules):
  abstract = reranker.abstract_params(model_config, compression)
  if mesh is not None:
    shardings = parallel.shardings_of(abstract, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            parallel.unbox(abstract), shardings)
  else:
    abstract = parallel.unbox(abstract)
  try:
    return ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR), abstract)
  except (ValueError, KeyError, TypeError) as e:
    raise StageOutputError(f"{path}: params do not fit model {model_config} / compression "
                           f"{compression}: {e}") from e


def load_params(path: str, model_config: ModelConfig, compression: CompressionConfig,
                rng: jax.Array, *, mesh=None, rules=None, merge_lora: bool = False) -> dict:
  """The run's starting params `{"backbone", "icm"}` for `model_config` and `compression`.

  Args:
    path: a stage output, a Hugging Face Qwen2.5-VL directory, or '' (random init).
    model_config: the run's model (structure must match the checkpoint's; LoRA rank and
      numerics are the run's).
    compression: the run's ICM; a stage output's must equal it when both have an ICM.
    rng: for what the checkpoint lacks (a fresh ICM, fresh LoRA adapters).
    mesh, rules: place params in their shards.
    merge_lora: fold a stage output's adapters into the kernels before fresh ones are
      added (GRPO: the reference policy, LoRA off, is then the SFT policy).
  """
  rules = parallel.DEFAULT_RULES if rules is None else rules
  icm_rng, lora_rng, init_rng = jax.random.split(rng, 3)
  params: dict[str, Any]
  if path and is_stage_output(path):
    info = read_info(path)
    saved_model = ModelConfig.from_dict(info["model"])
    saved_icm = CompressionConfig(**info["compression"])
    _check_same_structure(saved_model, model_config, path)
    if compression.enabled and saved_icm.enabled and saved_icm != compression:
      same = dataclasses.replace(saved_icm, max_query_tokens=compression.max_query_tokens)
      if same != compression:
        raise StageOutputError(f"{path}: its ICM {saved_icm} differs from config.compression "
                               f"{compression}")
    params = _restore(path, saved_model.replace(dtype=model_config.dtype), saved_icm, mesh, rules)
    dtype = jax.numpy.dtype(model_config.param_dtype)
    params = jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x, params)
    if saved_model.lora_rank and (merge_lora or not model_config.lora_rank
                                  or saved_model.lora_rank != model_config.lora_rank):
      params["backbone"] = lora.merge(params["backbone"], saved_model)
  elif path and os.path.isfile(os.path.join(path, HF_CONFIG)):
    hf_model, backbone = hf.load_pretrained(path, dtype=model_config.param_dtype, mesh=mesh,
                                            rules=rules)
    _check_same_structure(hf_model, model_config, path)
    params = {"backbone": backbone}
    if compression.enabled and os.path.isfile(os.path.join(path, ICM_FILE)):
      params["icm"] = _read_icm(os.path.join(path, ICM_FILE), model_config, compression,
                                mesh, rules)
  elif path:
    raise StageOutputError(f"init checkpoint {path!r}: expected a stage output (with "
                           f"{STAGE_FILE}) or a Hugging Face directory (with {HF_CONFIG})")
  elif mesh is None:
    plain = model_config.replace(lora_rank=0)
    params = {"backbone": jax.jit(lambda key: qwen2_5_vl.init_params(plain, key))(init_rng)}
  else:
    params = {"backbone": qwen2_5_vl.init_params(model_config.replace(lora_rank=0), init_rng,
                                                 mesh=mesh, rules=rules)}
  has_lora = any(lora.is_lora(p) for p in _paths(params["backbone"]))
  if model_config.lora_rank and not has_lora:
    params["backbone"] = lora.combine(
        lora.init_params(model_config, lora_rng, mesh=mesh, rules=rules), params["backbone"])
  if not compression.enabled:
    params.pop("icm", None)
  elif "icm" not in params:
    embedding = params["backbone"]["language_model"]["embed_tokens"]["embedding"]
    params["icm"] = _fresh_icm(model_config, compression, icm_rng, embedding, mesh, rules)
  return params


def _paths(tree: Any) -> list[tuple[str, ...]]:
  return list(traverse_util.flatten_dict(parallel.unbox(tree)).keys())
