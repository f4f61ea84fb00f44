"""The main job: ICM self-alignment, SFT activation, then GRPO (PAPER.md §5).

  python -m retrv_jax.train --config=configs/grpo.py                  # tiny, embedded data
  python -m retrv_jax.train --config=configs/grpo.py:7b \\
      --config.init_checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct-retrv \\
      --config.tokenizer=gs://BUCKET/Qwen2.5-VL-7B-Instruct-retrv \\
      --config.data.data_dir=gs://BUCKET/mbeir_tfds --config.workdir=gs://BUCKET/run

Ablations (one switch each): --config.compression.enabled=False (no ICM),
--config.compression.use_relation=False (no t_rel), --config.inspection=False (no
inspection), --config.stages=align,sft (no RL), --config.grpo.curriculum_schedule=fixed
(fixed lambda = grpo.curriculum_value).
"""

from retrv_jax.config import sibling_config

base = sibling_config(__file__)


def get_config(arg: str = "tiny"):
  config = base.get_config(arg)
  config.stages = "align,sft,grpo"
  return config
