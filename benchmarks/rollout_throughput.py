"""Rollout throughput: our jitted engine vs Hugging Face `generate` (PyTorch), same weights.

  python benchmarks/rollout_throughput.py [--batch 4 --prompt_len 64 --new_tokens 64]

A ~100M-parameter Qwen2.5-VL text config is built with random weights in transformers,
exported to disk, loaded by `retrv_jax.hf.load_pretrained`, and both sides decode the
same prompts greedily for exactly `new_tokens` tokens (no early stop). Compilation is
excluded (one warm-up call each side). Prints generated tokens/s and the ratio.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import numpy as np
import torch
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from hf_models import save_hf_model, tiny_config  # noqa: E402

from retrv_jax.hf import load_pretrained  # noqa: E402
from retrv_jax.models.qwen2_5_vl import Qwen25VL  # noqa: E402
from retrv_jax.models.reranker import RerankInputs
from retrv_jax.rl import sampler  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 4, "Prompts decoded together.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Generated tokens per prompt.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per side (best is kept).")


def config_100m():
  """Qwen2.5-style decoder, ~100M params: d=768, 12 layers, 12 heads, 2 kv heads."""
  return tiny_config(
      vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
      num_kv_heads=2, mrope_section=(8, 12, 12), image_token_id=31999, video_token_id=31998,
      vision_start_token_id=31997, vision_end_token_id=31996,
      vision={"depth": 1, "out_hidden_size": 768},
  )


def best_of(fn, repeats):
  fn()  # Warm-up / compile.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  del argv
  batch, prompt_len, new = _BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value
  config = config_100m()
  with tempfile.TemporaryDirectory() as tmp:
    hf = save_hf_model(tmp, config, seed=0, std=0.02)
    config, params = load_pretrained(tmp)
  num_params = sum(x.size for x in jax.tree.leaves(params["language_model"]))
  ids = np.random.default_rng(0).integers(3, 31000, size=(batch, prompt_len)).astype(np.int32)
  banned = list(sampler.never_sampled(config))

  def run_hf():
    with torch.no_grad():
      hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.ones(ids.shape, dtype=torch.long), do_sample=False,
                  max_new_tokens=new, min_new_tokens=new, suppress_tokens=banned,
                  eos_token_id=None, pad_token_id=config.pad_token_id)

  model = Qwen25VL(config)
  sampling = sampler.SamplingParams(max_new_tokens=new, temperature=0.0, stop_token_ids=(-1,))
  inputs = RerankInputs.from_token_ids(model, params, ids, np.ones_like(ids))

  def run_ours():
    out = sampler.rollout(model, params, inputs, jax.random.key(0), sampling=sampling)
    jax.block_until_ready(out.tokens)

  ours = best_of(run_ours, _REPEATS.value)
  theirs = best_of(run_hf, _REPEATS.value)
  tokens = batch * new
  print(f"decoder params: {num_params / 1e6:.1f}M  batch={batch} prompt={prompt_len} new={new}"
        f"  backend={jax.default_backend()} torch_threads={torch.get_num_threads()}")
  print(f"retrv_jax rollout : {tokens / ours:8.1f} tokens/s ({ours:.3f} s)")
  print(f"HF generate       : {tokens / theirs:8.1f} tokens/s ({theirs:.3f} s)")
  print(f"ratio (ours / HF) : {theirs / ours:.2f}x")


if __name__ == "__main__":
  app.run(main)
