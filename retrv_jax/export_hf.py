"""Export a trained re-ranker (a stage output) in Hugging Face format.

  python -m retrv_jax.export_hf --init_checkpoint=workdir/grpo/output --out=DIR \
      [--dtype=bfloat16]

DIR then holds `config.json` + `model.safetensors` (Qwen2.5-VL with the LoRA adapters
merged into the kernels: transformers' `Qwen2_5_VLForConditionalGeneration` loads it),
`icm.safetensors` (the compression module, '/'-joined param paths) and `retrv_jax.json`
(its config). `--config.init_checkpoint=DIR` restores the whole re-ranker from it.
Every file is written to a temporary name first and renamed into place.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from safetensors.numpy import save_file

from retrv_jax import hf
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.config import ModelConfig
from retrv_jax.stages import outputs


def export(stage_output: str, out: str, *, dtype: str = "float32") -> None:
  """Writes the Hugging Face files of a stage output to `out` (replacing it)."""
  info = outputs.read_info(stage_output)
  model = ModelConfig.from_dict(info["model"])
  compression = CompressionConfig(**info["compression"])
  params = outputs.load_params(stage_output, model.replace(lora_rank=0), compression,
                               jax.random.key(0))
  hf.save_pretrained(model.replace(lora_rank=0), params["backbone"], out, dtype=dtype,
                     overwrite=True)
  if "icm" in params:
    flat = traverse_util.flatten_dict(jax.device_get(params["icm"]), sep="/")
    tensors = {k: np.asarray(v, np.dtype(jax.numpy.dtype(dtype))) for k, v in flat.items()}
    path = os.path.join(out, outputs.ICM_FILE)
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
  outputs.write_json(os.path.join(out, outputs.RETRV_CONFIG),
                     {"compression": dataclasses.asdict(compression), "stage": info["stage"],
                      "lora_merged": bool(model.lora_rank)})
  logging.info("exported %s (%s) to %s", stage_output, info["stage"], out)


def _define_flags() -> None:
  """Flags of the command line (defined only when run as a program)."""
  flags.DEFINE_string("init_checkpoint", None, "A stage output directory.", required=True)
  flags.DEFINE_string("out", None, "Hugging Face directory to write.", required=True)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                    "Storage dtype of the exported tensors.")


def main(argv: Sequence[str]) -> None:
  del argv
  export(flags.FLAGS.init_checkpoint, flags.FLAGS.out, dtype=flags.FLAGS.dtype)
  print(f"wrote {flags.FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
