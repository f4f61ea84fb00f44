"""Examples per second of the GRPO and SFT input pipelines, in-process and with workers.

  python benchmarks/pipeline_throughput.py                      # embedded benchmark, tmp dir
  python benchmarks/pipeline_throughput.py --data_dir DIR       # an M-BEIR root instead

Generates the embedded benchmark (unless --data_dir), builds its tfds ArrayRecord files,
then times `--batches` batches of each (stage, worker count) after `--warmup` batches
(worker start-up excluded) and prints examples/s and the ratio to the in-process run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

from retrv_jax.data import pipeline, synthetic, tfds_mbeir
from retrv_jax.data.tokenizer import load_tokenizer


def measure(stage: str, config: pipeline.PipelineConfig, *, warmup: int, batches: int) -> float:
  """Examples per second over `batches` batches after `warmup` ones."""
  it = pipeline.make_iterator(stage, config, load_tokenizer(), process_index=0,
                              process_count=1)
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
      del batch  # Frees worker shared memory promptly.
    return batches * config.batch_size / (time.perf_counter() - start)
  finally:
    it.close()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="", help="M-BEIR root; default: generate one.")
  parser.add_argument("--num_train", type=int, default=100, help="Generated queries per task.")
  parser.add_argument("--k", type=int, default=10, help="Candidates per query (K).")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    root = args.data_dir
    if not root:
      root = os.path.join(tmp, "synth")
      synthetic.generate(root, synthetic.BenchmarkConfig(num_train=args.num_train, num_val=1,
                                                         num_test=1, k=args.k))
    start = time.perf_counter()
    tfds_dir = tfds_mbeir.build(root, os.path.join(tmp, "tfds"))
    print(f"tfds build: {time.perf_counter() - start:.1f} s -> {tfds_dir}")
    base = pipeline.PipelineConfig(data_dir=os.path.join(tmp, "tfds"), num_candidates=args.k,
                                   batch_size=args.batch_size)
    print(f"{'stage':6} {'workers':>7} {'examples/s':>11} {'vs 0':>6}")
    for stage in ("grpo", "sft"):
      rates = {}
      for workers in args.workers:
        config = dataclasses.replace(base, worker_count=workers)
        rates[workers] = measure(stage, config, warmup=args.warmup, batches=args.batches)
        ratio = rates[workers] / rates[args.workers[0]]
        print(f"{stage:6} {workers:7d} {rates[workers]:11.1f} {ratio:6.2f}", flush=True)


if __name__ == "__main__":
  main()
