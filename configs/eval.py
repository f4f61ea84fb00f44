"""Evaluate a re-ranker on the held-out split: Recall@1/5, inspections, format errors.

  python -m retrv_jax.evaluate --config=configs/eval.py \\
      --config.init_checkpoint=workdir/grpo/output --name=grpo
  python -m retrv_jax.evaluate --config=configs/eval.py:7b --config.init_checkpoint=DIR \\
      --config.tokenizer=DIR --config.data.data_dir=DIR --config.workdir=DIR

Metrics are merged into `<workdir>/results.json` under `--name`; `config.eval` sets the
split, batch size, number of examples and the generation budget.
"""

from retrv_jax.config import sibling_config

base = sibling_config(__file__)


def get_config(arg: str = "tiny"):
  config = base.get_config(arg)
  # config.init_checkpoint names what to evaluate: a stage output (<workdir>/<stage>/output),
  # a Hugging Face Qwen2.5-VL directory, or '' (random init).
  return config
