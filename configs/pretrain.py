"""The embedded tiny model's own pretraining from random init, whose output is shipped as
the tiny default's start: caption-and-compare pretraining of the whole VLM
(retrv_jax/stages/pretrain.py). With `--config.stages=vision,pretrain
--config.pretrain.train_vision=False` the vision tower first learns scene attributes from
rendered images (retrv_jax/stages/vision.py) and pretraining keeps it (see the README for
what that gives).

  python -m retrv_jax.train --config=configs/pretrain.py
"""

from retrv_jax.config import sibling_config

base = sibling_config(__file__)


def get_config(arg: str = "tiny"):
  if (arg or "tiny") != "tiny":
    raise ValueError("configs/pretrain.py: only the tiny model is pretrained here; the 3b and "
                     "7b presets start from the public Qwen2.5-VL checkpoints")
  config = base.get_config("tiny")
  config.stages = "pretrain"
  config.init_checkpoint = ""  # Random init.
  config.compression.enabled = False  # The backbone alone.
  config.model.lora_rank = 0
  config.eval.after_each_stage = False
  # The shipped model: 400 steps of a cosine schedule laid out over 1000 (about 25 minutes
  # on 2 CPU cores; the loss is still falling slowly there, longer runs give a better tiny
  # model). The vision stage, when named: 1000 steps of 128 scenes, about 4 minutes.
  config.pretrain.steps = 400
  config.pretrain.optim.total_steps = 1000
  config.pretrain.optim.warmup_steps = 50
  config.pretrain.log_every = 20
  return config
