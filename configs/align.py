"""One stage alone: `align`, from `--config.init_checkpoint` (a stage output or a Hugging
Face directory).

  python -m retrv_jax.train --config=configs/align.py --config.init_checkpoint=DIR
"""

from retrv_jax.config import sibling_config

base = sibling_config(__file__)


def get_config(arg: str = "tiny"):
  config = base.get_config(arg)
  config.stages = "align"
  return config
