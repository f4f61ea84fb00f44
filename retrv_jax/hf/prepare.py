"""Prepare a public Qwen2.5-VL checkpoint for Retrv-R1 training.

  python -m retrv_jax.hf.prepare --src=/data/Qwen2.5-VL-7B-Instruct \
      --out=/data/Qwen2.5-VL-7B-Instruct-retrv

Adds the Retrv-R1 special tokens a Qwen vocabulary lacks (`<think>`, `<answer>`, the
inspection and candidate markers; `tokenizer.add_retrv_tokens`), gives their embedding
rows the mean of the trained rows (`tokenizer.resize_token_embeddings`; Qwen pads its
matrix, so the vocabulary size usually stays), and writes a new Hugging Face directory:
weights, config.json and tokenizer.json. Train with `--config.init_checkpoint=OUT
--config.tokenizer=OUT`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import app, flags

from retrv_jax.data.tokenizer import add_retrv_tokens, resize_token_embeddings
from retrv_jax.hf.io import load_pretrained, save_pretrained


def prepare(src: str, out: str, *, dtype: str = "bfloat16", seed: int = 0) -> int:
  """Writes the prepared checkpoint; returns how many tokens were added."""
  tokenizer, added = add_retrv_tokens(src)
  config, params = load_pretrained(src, dtype="float32")
  vocab = max(config.vocab_size, tokenizer.vocab_size)
  if added:
    params = resize_token_embeddings(params, vocab, key=jax.random.key(seed),
                                     num_old_tokens=tokenizer.vocab_size - added)
  save_pretrained(config.replace(vocab_size=vocab), params, out, dtype=dtype, overwrite=True)
  tokenizer.save(out)
  return added


def _define_flags() -> None:
  """Flags of the command line (defined only when run as a program)."""
  flags.DEFINE_string("src", None, "Hugging Face Qwen2.5-VL directory.", required=True)
  flags.DEFINE_string("out", None, "Directory to write.", required=True)
  flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Stored dtype.")


def main(argv: Sequence[str]) -> None:
  del argv
  added = prepare(flags.FLAGS.src, flags.FLAGS.out, dtype=flags.FLAGS.dtype)
  print(f"wrote {flags.FLAGS.out} ({added} tokens added)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
