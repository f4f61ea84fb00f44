"""Config presets equal the public Qwen2.5-VL sizes; bad values stop with the field's name."""

import importlib.util
import os

import jax
import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from retrv_jax import config as config_lib
from retrv_jax import parallel
from retrv_jax.hf.config import model_config_to_hf
from retrv_jax.models import qwen2_5_vl
from retrv_jax.models.config import PRESETS
from retrv_jax.stages import lists
from retrv_jax.stages.assets import TINY_PRETRAINED

# Published sizes: Qwen2.5-VL-3B-Instruct has 3.75B parameters, -7B-Instruct 8.29B.
PUBLISHED_BILLIONS = {"3b": 3.75, "7b": 8.29}


def _load_config_file(name, arg):
  path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset", ["tiny", "3b", "7b"])
def test_preset_param_count_equals_transformers(preset):
  """Our abstract params and transformers' model (meta device) have the same size."""
  config = PRESETS[preset]()
  ours = _count(qwen2_5_vl.abstract_params(config))
  with torch.device("meta"):
    theirs = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(**model_config_to_hf(config)))
  assert ours == sum(p.numel() for p in theirs.parameters())
  if preset in PUBLISHED_BILLIONS:
    assert round(ours / 1e9, 2) == PUBLISHED_BILLIONS[preset]


@pytest.mark.parametrize("preset", ["tiny", "3b", "7b"])
def test_base_config_loads_and_validates(preset):
  config = _load_config_file("base.py", preset)
  model = config_lib.model_config(config)
  assert model.vision.out_hidden_size == model.hidden_size
  # The real presets: tensor 4, fsdp the rest (retrv_jax.tpu_fit, README).
  assert config_lib.validate_mesh(config, 8) == ((1, 8, 1) if preset == "tiny" else (1, 2, 4))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_kv_heads", 3, r"config\.model\.num_kv_heads = 3: expected a divisor of num_heads"),
        ("mrope_section", (8, 8, 8), r"config\.model\.mrope_section"),
        ("dtype", "float64", r"config\.model\.dtype = 'float64': expected one of"),
        ("remat_policy", "some", r"config\.model\.remat_policy"),
        ("image_token_id", 10**9, r"config\.model\.image_token_id"),
        ("hidden_size", 0, r"config\.model\.hidden_size = 0: expected a positive integer"),
        ("lora_rank", -1, r"config\.model\.lora_rank = -1"),
        ("lora_targets", ("q_proj", "qkv"), r"config\.model\.lora_targets"),
    ],
)
def test_bad_model_values_name_the_field(field, value, message):
  config = {"model": PRESETS["tiny"]().to_dict()}
  config["model"][field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.model_config(config)


def test_bad_vision_values_and_unknown_keys_name_the_field():
  config = {"model": PRESETS["tiny"]().to_dict()}
  config["model"]["vision"]["fullatt_block_indexes"] = (0, 9)
  with pytest.raises(config_lib.ConfigError, match=r"model\.vision\.fullatt_block_indexes"):
    config_lib.model_config(config)
  config = {"model": PRESETS["tiny"]().to_dict()}
  config["model"]["num_layer"] = 3
  with pytest.raises(config_lib.ConfigError, match=r"unknown key\(s\) \['num_layer'\].*num_layers"):
    config_lib.model_config(config)


def test_pretrain_phases_chain_and_bad_phase_names_the_file():
  """configs/pretrain.py: 'relate' starts from the first phase's pretrain output, 'point'
  from the shipped model (relate's output, exported), its pieces in parallel; point's
  curriculum fills its steps."""
  first, relate, point = (_load_config_file("pretrain.py", arg)
                          for arg in ("tiny", "relate", "point"))
  assert first.stages == "vision,pretrain" and not first.init_checkpoint
  assert relate.stages == "pretrain" and relate.pretrain.tasks == "relate,template"
  assert relate.init_checkpoint == os.path.join(first.workdir, "pretrain", "output")
  assert point.stages == "pretrain" and "point" in point.pretrain.tasks.split(",")
  assert point.init_checkpoint == TINY_PRETRAINED
  assert point.pretrain.point_tag and point.pretrain.point_verdict_weight > 0
  assert point.pretrain.point_parallel
  assert point.pretrain.optim.total_steps >= point.pretrain.steps
  assert len({first.workdir, relate.workdir, point.workdir}) == 3
  rungs = lists.parse(point.pretrain.point_curriculum, num_candidates=point.data.num_candidates,
                      steps=point.pretrain.steps, field="point")
  assert rungs[-1].size == point.data.num_candidates and rungs[-1].hard
  with pytest.raises(ValueError, match=r"configs/pretrain.py:7b"):
    _load_config_file("pretrain.py", "7b")


def test_7b_sharded_plan_is_built_abstractly():
  """The full 7B plan (shapes + shardings on a 2x4 mesh) without allocating a weight."""
  config = PRESETS["7b"]()
  mesh = parallel.create_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  abstract = qwen2_5_vl.abstract_params(config)
  shardings = parallel.shardings_of(abstract, mesh, parallel.DEFAULT_RULES)
  q = shardings["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.shard_shape((28, 3584, 28, 128)) == (28, 1792, 7, 128)
  k = shardings["language_model"]["layers"]["self_attn"]["k_proj"]["kernel"]
  assert k.shard_shape((28, 3584, 4, 128)) == (28, 1792, 1, 128)
  head = shardings["lm_head"]["kernel"]
  assert head.shard_shape((3584, 152064)) == (1792, 38016)
