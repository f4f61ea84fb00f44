"""The embedded tiny model's own pretraining from random init, whose output is shipped as
the tiny default's start (retrv_jax/stages/pretrain.py): the vision tower first learns
scene attributes from rendered images (retrv_jax/stages/vision.py), then the whole VLM
learns to caption a candidate and say how it relates to the query, then (a second run from
that output) to say how it relates alone (the shipped model):

  python -m retrv_jax.train --config=configs/pretrain.py          # into workdir_pretrain
  python -m retrv_jax.train --config=configs/pretrain.py:relate   # from it, into workdir_relate
  python -m retrv_jax.export_hf --init_checkpoint=workdir_relate/pretrain/output \\
      --out=retrv_jax/data/assets/tiny_pretrained --dtype=bfloat16

A third phase, 'point', teaches list choice from the shipped model (the relate output,
exported): judge each candidate of a numbered list on its own, write the verdicts, name
the match, on lists that grow (README: the tiny pretrained model, list choice):

  python -m retrv_jax.train --config=configs/pretrain.py:point    # into workdir_point
  python -m retrv_jax.evaluate_lists --config=configs/pretrain.py:point \\
      --config.init_checkpoint=workdir_point/pretrain/output --config.workdir=workdir_point
"""

import os

from retrv_jax.config import sibling_config
from retrv_jax.stages.assets import TINY_PRETRAINED

base = sibling_config(__file__)
FIRST_WORKDIR = "workdir_pretrain"  # The first phase's; the 'relate' phase starts from it.
RELATE_WORKDIR = "workdir_relate"  # The 'relate' phase's, exported as the shipped model.
PHASES = ("tiny", "relate", "point")


def get_config(arg: str = "tiny"):
  """'tiny': vision, then caption-and-compare pretraining from random init; 'relate': the
  relation rows alone, from that output; 'point': list choice, from the 'relate' output."""
  phase = arg or "tiny"
  if phase not in PHASES:
    raise ValueError(f"configs/pretrain.py:{phase}: expected one of {PHASES}; only the tiny "
                     "model is pretrained here, the 3b and 7b presets start from the public "
                     "Qwen2.5-VL checkpoints")
  config = base.get_config("tiny")
  config.stages = "vision,pretrain"
  config.workdir = FIRST_WORKDIR
  config.init_checkpoint = ""  # Random init.
  config.compression.enabled = False  # The backbone alone.
  config.model.lora_rank = 0
  config.eval.after_each_stage = False
  config.pretrain.log_every = 20
  if phase == "relate":
    # Once the captions are learned, the relation rows alone teach the comparison: 300
    # steps of 16 examples x 4 candidates (about 22 minutes on 2 CPU cores).
    config.stages = "pretrain"
    config.workdir = RELATE_WORKDIR
    config.init_checkpoint = os.path.join(FIRST_WORKDIR, "pretrain", "output")
    config.pretrain.tasks = "relate,template"
    config.pretrain.batch_size = 16
    config.pretrain.steps = 300
    config.pretrain.optim.warmup_steps = 20
    return config
  if phase == "point":
    # List choice: name the positive of a numbered list of full-token candidates, each
    # followed by the relation question, on lists that grow from 3 candidates to the
    # K = 10 of stage I; the relation rows go on beside it. The tower stays as pretrained,
    # the learning rate low (1e-3 wrecks the relation features in the first Adam steps).
    config.stages = "pretrain"
    config.workdir = "workdir_point"
    config.init_checkpoint = TINY_PRETRAINED
    config.pretrain.tasks = "relate,point"
    config.pretrain.candidates_per_example = 2
    config.pretrain.train_vision = False
    config.pretrain.point_workspace = True
    # Each candidate's piece (block, workspace, tag) is judged on its own, in parallel with
    # the others; the verdicts are written in order after the pieces and the answer copies
    # the label of the " match" (stages/pointing.py). The verdicts are trained directly.
    config.pretrain.point_tag = True
    config.pretrain.point_parallel = True
    config.pretrain.point_verdict_weight = 1.0
    config.pretrain.point_curriculum = "3:all:40,5:all:40,10:all"
    config.pretrain.batch_size = 16
    # A cosine over 600 steps (about 90 minutes on 2 CPU cores). Run to step 301 on
    # 2026-12-06: held-out Recall@1 0.635 at K = 10 (README, list choice); not shipped.
    config.pretrain.steps = 600
    config.pretrain.optim.total_steps = 600
    config.pretrain.log_every = 10
    config.pretrain.checkpoint.save_every_steps = 50
    config.pretrain.optim.learning_rate = 3e-4
    config.pretrain.optim.warmup_steps = 20
    config.pretrain.optim.end_lr_ratio = 0.1
    return config
  # The vision stage: 1000 steps of 128 scenes (about 4 minutes on 2 CPU cores). Then 400
  # steps of a cosine schedule laid out over 1000 (about 22 minutes; the content loss is
  # still falling there).
  config.pretrain.steps = 400
  config.pretrain.optim.total_steps = 1000
  config.pretrain.optim.warmup_steps = 50
  return config
