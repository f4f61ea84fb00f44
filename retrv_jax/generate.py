"""Load a Qwen2.5-VL model, run it sharded, write it back, and generate from a prompt.

  python -m retrv_jax.generate --config=configs/base.py --prompt="Describe the scene."
  python -m retrv_jax.generate --config=configs/base.py:7b \
      --config.hf_checkpoint=/path/to/Qwen2.5-VL-7B-Instruct --image=cat.png

Without `config.hf_checkpoint` the embedded tiny model is used with freshly initialised
weights (the training pipeline that produces its trained weights is `retrv_jax.train`);
this then checks the Hugging Face round trip: save -> load gives identical params.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from retrv_jax import config as config_lib
from retrv_jax import hf, parallel
from retrv_jax.data import images as images_lib
from retrv_jax.data import prompts
from retrv_jax.data.tokenizer import Tokenizer, load_tokenizer
from retrv_jax.models import qwen2_5_vl
from retrv_jax.models.reranker import RerankInputs
from retrv_jax.rl import sampler

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Run config.")
_PROMPT = flags.DEFINE_string("prompt", "Describe the picture.", "User message.")
_IMAGES = flags.DEFINE_multi_string("image", [], "Image file(s) to show the model.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Generation budget.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")


def chat_prompt(tokenizer: Tokenizer, text: str, grids: Sequence[Sequence[int]],
                merge_size: int) -> list[int]:
  """Qwen chat layout: one user turn (images first, then text), then the assistant turn."""
  ids = tokenizer.encode("<|im_start|>user\n")
  for grid in grids:
    ids += prompts.image_span_ids(grid, tokenizer, merge_size)
  ids += tokenizer.encode(f"{text}<|im_end|>\n<|im_start|>assistant\n", allow_special=True)
  return ids


def load_model(config, mesh):
  """(ModelConfig, params, tokenizer) from `config.hf_checkpoint` or the tiny preset."""
  rules = tuple(config.mesh.rules)
  if config.hf_checkpoint:
    model_config, params = hf.load_pretrained(
        config.hf_checkpoint, dtype=config.model.param_dtype, mesh=mesh, rules=rules
    )
    model_config = model_config.replace(dtype=config.model.dtype)
    return model_config, params, load_tokenizer(config.hf_checkpoint)
  model_config = config_lib.model_config(config).replace(lora_rank=0)  # Plain Qwen2.5-VL.
  params = qwen2_5_vl.init_params(model_config, jax.random.key(config.seed), mesh=mesh,
                                  rules=rules)
  # Round trip through the Hugging Face format, as a user exporting the model would.
  export_dir = os.path.join(config.workdir, "hf_export")
  hf.save_pretrained(model_config, params, export_dir)
  _, reloaded = hf.load_pretrained(export_dir, dtype=model_config.param_dtype, mesh=mesh,
                                   rules=rules)
  same = jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, reloaded))
  logging.info("Exported to %s; reloaded params identical: %s", export_dir, same)
  if not same:
    raise RuntimeError(f"{export_dir}: params changed in the Hugging Face round trip")
  return model_config, reloaded, load_tokenizer()


def main(argv: Sequence[str]) -> None:
  del argv
  config = _CONFIG.value
  parallel.maybe_initialize_distributed(**config.distributed)
  config_lib.validate_mesh(config, jax.device_count())
  mesh = parallel.create_mesh({name: config.mesh[name] for name in parallel.MESH_AXES})
  model_config, params, tokenizer = load_model(config, mesh)

  pixel_values = image_grid_thw = None
  grids = []
  if _IMAGES.value:
    processed = images_lib.preprocess_images(_IMAGES.value)
    pixel_values, image_grid_thw = processed.pixel_values, processed.image_grid_thw
    grids = image_grid_thw.tolist()
    # Vision attention per image, sized to the largest image of this call.
    largest = int(np.prod(image_grid_thw, axis=-1).max())
    model_config = model_config.replace(vision=dataclasses.replace(
        model_config.vision, max_patches_per_image=largest))
  model = qwen2_5_vl.Qwen25VL(model_config)
  ids = np.array([chat_prompt(tokenizer, _PROMPT.value, grids,
                              model_config.vision.spatial_merge_size)], np.int32)
  sampling = sampler.SamplingParams(
      max_new_tokens=_MAX_NEW_TOKENS.value,
      temperature=_TEMPERATURE.value,
      stop_token_ids=(tokenizer.eos,),
  )
  rng = jax.random.key(config.seed)
  with jax.set_mesh(mesh), parallel.with_rules(tuple(config.mesh.rules)):
    inputs = RerankInputs.from_token_ids(model, params, ids, np.ones_like(ids),
                                                 pixel_values, image_grid_thw)
    run = lambda: sampler.rollout(model, params, inputs, rng, sampling=sampling)
    jax.block_until_ready(run())  # Compile.
    start = time.perf_counter()
    out = jax.block_until_ready(run())
    seconds = time.perf_counter() - start
  n = int(out.lengths[0])
  text = tokenizer.decode(np.asarray(out.tokens[0, :n]).tolist())
  print(f"prompt tokens: {ids.shape[1]}  generated: {n}  ({n / seconds:.1f} tokens/s)")
  print(f"response: {text!r}")


if __name__ == "__main__":
  app.run(main)
