"""Base config: the model preset, the mesh and numerics shared by every job.

  python -m retrv_jax.generate --config=configs/base.py            # tiny, any backend
  python -m retrv_jax.generate --config=configs/base.py:7b --config.hf_checkpoint=DIR

The argument after ':' picks the model preset: tiny (default), 3b or 7b (equal to the
public Qwen2.5-VL-3B/7B-Instruct configs). Any field can be overridden on the command
line, e.g. `--config.mesh.tensor=4`.
"""

import ml_collections

from retrv_jax import parallel
from retrv_jax.models.config import PRESETS


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = arg or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"configs/base.py:{preset}: unknown preset; expected one of {sorted(PRESETS)}")
  config = ml_collections.ConfigDict()
  # Which model preset `model` was built from (informational; `model` is what is used).
  config.model_preset = preset
  # Every ModelConfig field (see retrv_jax/models/config.py for meanings).
  config.model = ml_collections.ConfigDict(PRESETS[preset]().to_dict())
  if preset != "tiny":
    # Real sizes: bfloat16 compute, float32 params; remat keeps activations per layer.
    config.model.dtype = "bfloat16"
    config.model.remat_policy = "dots_with_no_batch_dims"
  # A Hugging Face Qwen2.5-VL checkpoint directory to load ('' = none).
  config.hf_checkpoint = ""
  # Device mesh sizes; -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1  # Pure data parallel (across slices).
  config.mesh.fsdp = -1  # Params and batch sharded.
  config.mesh.tensor = 1  # Heads, mlp and vocab sharded.
  # Logical axis -> mesh axes (see retrv_jax/parallel.py).
  config.mesh.rules = parallel.DEFAULT_RULES
  # Multi-process runs: leave empty on Cloud TPU (auto-detected).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator = ""  # 'host:port' of process 0.
  config.distributed.num_processes = 1
  config.distributed.process_id = 0
  # Root of the PRNG streams.
  config.seed = 0
  # Where outputs and checkpoints go.
  config.workdir = "workdir"
  return config
