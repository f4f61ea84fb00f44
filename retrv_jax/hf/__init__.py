"""Hugging Face Qwen2.5-VL checkpoints: import into Flax params, export back, check parity.

  config, params = hf.load_pretrained(checkpoint_dir, mesh=mesh)   # scanned, sharded
  hf.save_pretrained(config, params, out_dir)                       # loadable by transformers

One key table (`keys.key_table`) drives both directions. The parity tool,
`python -m retrv_jax.hf.check_parity`, imports torch and is not loaded here.
"""

from retrv_jax.hf.config import ConfigError, model_config_from_hf, model_config_to_hf
from retrv_jax.hf.io import CheckpointError, is_scanned, load_pretrained, save_pretrained
from retrv_jax.hf.keys import KeySpec, hf_shapes, hub_key, key_table, param_shapes

__all__ = [
    "CheckpointError",
    "ConfigError",
    "KeySpec",
    "hf_shapes",
    "hub_key",
    "is_scanned",
    "key_table",
    "load_pretrained",
    "model_config_from_hf",
    "model_config_to_hf",
    "param_shapes",
    "save_pretrained",
]
