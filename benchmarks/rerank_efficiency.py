"""Re-ranking cost with the compression module vs full candidate tokens, at K = 10, 25, 50.

  python benchmarks/rerank_efficiency.py [--ks 10,25,50 --new_tokens 64 --preset tiny]

For each K, one query of the embedded benchmark is re-ranked by the same backbone twice:
with ICM (two tokens per candidate) and without (the candidates' full tokens, images
included, in the prompt; the paper's "without ICM" ablation). Re-ranking = encode the
prompt + decode `new_tokens` tokens greedily (no early stop, no inspection, so both sides
do the same decoding work). Latency is the best of a few jitted runs, compilation
excluded; peak memory is XLA's accounting of the compiled program (arguments + outputs +
temporaries), the number that decides what fits on an accelerator. Prints the ratios
full / ICM (the paper reports 7.4x faster with ICM at K = 50).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from retrv_jax.data import synthetic
from retrv_jax.data.pipeline import PipelineConfig, make_iterator, split_host_fields
from retrv_jax.data.tokenizer import load_tokenizer
from retrv_jax.models import reranker
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.config import PRESETS
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.rl import sampler

_KS = flags.DEFINE_list("ks", ["10", "25", "50"], "Candidate counts K.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Decoded tokens per re-ranking.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (best kept).")
_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset (random weights).")
_TASK = flags.DEFINE_integer("task", 0, "Embedded task: 0 (text -> image candidates) or 3 "
                             "(image -> text candidates).")
_IMAGE_SIDE = flags.DEFINE_integer("image_side", 112, "Image side after resizing, pixels "
                                   "(112: 8x8 patches = 16 LLM tokens per image).")


def measure(model_config, compression, batch, new_tokens, repeats):
  """(seconds, peak bytes) of encode + greedy decode for one batch."""
  rerank = reranker.Reranker(model_config, compression)
  params = reranker.init_params(model_config, compression, jax.random.key(0))
  backbone = Qwen25VL(model_config)
  sampling = sampler.SamplingParams(max_new_tokens=new_tokens, temperature=0.0,
                                    stop_token_ids=(-1,))

  def rerank_once(p, b):
    inputs = rerank.apply({"params": p}, b, method=rerank.encode)
    return sampler.rollout(backbone, p["backbone"], inputs, jax.random.key(0),
                           sampling=sampling).tokens

  compiled = jax.jit(rerank_once).lower(params, batch).compile()
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  jax.block_until_ready(compiled(params, batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, batch))
    times.append(time.perf_counter() - start)
  return min(times), peak


def main(argv):
  del argv
  # Per-image vision attention sized to the resized images (every image is the same size).
  vision = dataclasses.replace(PRESETS[_PRESET.value]().vision,
                               max_patches_per_image=(_IMAGE_SIDE.value // 14) ** 2)
  model_config = PRESETS[_PRESET.value]().replace(vision=vision)
  tok = load_tokenizer()
  print(f"preset={_PRESET.value} backend={jax.default_backend()} new_tokens={_NEW_TOKENS.value}"
        f" image_side={_IMAGE_SIDE.value} task={_TASK.value}")
  print(f"{'K':>3} {'prompt T icm/full':>18} {'latency icm':>12} {'full':>9} {'ratio':>6}"
        f" {'peak MB icm':>12} {'full':>9} {'ratio':>6}")
  with tempfile.TemporaryDirectory() as root:
    for k in map(int, _KS.value):
      data = f"{root}/k{k}"
      synthetic.generate(data, synthetic.BenchmarkConfig(num_train=1, num_val=1, num_test=1,
                                                         k=k, tasks=(_TASK.value,)))
      results = {}
      for enabled in (True, False):
        config = PipelineConfig(data_dir=data, source="mbeir", split="test", batch_size=1,
                                num_candidates=k, compress_candidates=enabled,
                                prompt_buckets=(256, 512, 1024, 2048, 4096),
                                max_candidate_tokens=80, min_pixels=_IMAGE_SIDE.value**2,
                                max_pixels=_IMAGE_SIDE.value**2)
        batch, _ = split_host_fields(next(make_iterator("eval", config, tok)))
        batch = {key: batch[key] for key in reranker.ENCODE_KEYS}
        # Keep only the real patch rows: both sides then encode exactly the same images.
        real = int(np.prod(batch["image_grid_thw"], axis=-1).sum())
        batch["pixel_values"] = batch["pixel_values"][:real]
        # ATT2 reads the query's tokens packed into 64 slots (queries here are shorter).
        compression = CompressionConfig(enabled=enabled, max_query_tokens=64)
        seconds, peak = measure(model_config, compression, batch, _NEW_TOKENS.value,
                                _REPEATS.value)
        results[enabled] = (batch["input_ids"].shape[1], seconds, peak)
      (t_icm, s_icm, m_icm), (t_full, s_full, m_full) = results[True], results[False]
      print(f"{k:>3} {t_icm:>8} / {t_full:<8} {s_icm:>11.3f}s {s_full:>8.3f}s "
            f"{s_full / s_icm:>5.2f}x {m_icm / 2**20:>12.1f} {m_full / 2**20:>9.1f} "
            f"{m_full / m_icm:>5.2f}x")


if __name__ == "__main__":
  app.run(main)
