"""Stage outputs (`retrv_jax.stages.outputs`): exact round trip, LoRA merging on load,
structure checks naming the field, Hugging Face and random starts, and bad directories."""

import functools
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding

from retrv_jax import hf, parallel
from retrv_jax.models import lora, reranker
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.config import ModelConfig, VisionConfig
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.stages import outputs

CONFIG = ModelConfig(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
    num_kv_heads=2, mrope_section=(1, 1, 2), tie_word_embeddings=False, image_token_id=120,
    video_token_id=121, vision_start_token_id=122, vision_end_token_id=123, bos_token_id=1,
    eos_token_id=2, pad_token_id=0, lora_rank=4, lora_alpha=8.0,
    vision=VisionConfig(depth=1, hidden_size=16, intermediate_size=24, num_heads=2,
                        out_hidden_size=32, window_size=56, fullatt_block_indexes=(0,)),
)
ICM = CompressionConfig()
IDS = np.array([[1, 5, 9, 17, 33, 65, 3, 7], [4, 8, 15, 16, 23, 42, 0, 0]], np.int32)
MASK = np.array([[1] * 8, [1] * 6 + [0] * 2], np.int32)


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(nn.meta.unbox(tree), sep="/")


def _assert_trees_equal(actual, expected):
  a, b = _flat(actual), _flat(expected)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@functools.partial(jax.jit, static_argnums=0)
def _logits(config: ModelConfig, backbone) -> jax.Array:
  return Qwen25VL(config).apply({"params": backbone}, IDS, attention_mask=MASK)


def _without_lora(backbone) -> dict:
  return lora.partition(backbone, lambda p: not lora.is_lora(p))[0]


def _lora_b(tree) -> dict:
  return {k: v for k, v in _flat(tree).items() if k.endswith("lora_b")}


@jax.jit
def _random(key: jax.Array) -> dict:
  """`load_params('')`, jitted once (eager Flax init is many times slower)."""
  return outputs.load_params("", CONFIG, ICM, key)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A random SFT-like output (LoRA with non-zero B, an ICM) saved as stage 'sft', step 7."""
  params = _random(jax.random.key(0))
  flat = traverse_util.flatten_dict(params)
  for i, path in enumerate(sorted(flat)):
    if path[-1] == "lora_b":
      flat[path] = 0.2 * jax.random.normal(jax.random.key(100 + i), flat[path].shape)
  params = traverse_util.unflatten_dict(flat)
  path = str(tmp_path_factory.mktemp("out") / "sft" / "output")
  outputs.save(path, params, stage="sft", step=7, model_config=CONFIG, compression=ICM)
  return path, params


def test_random_init_has_backbone_icm_and_zero_adapters(saved):
  params = _random(jax.random.key(1))
  abstract = _flat(reranker.abstract_params(CONFIG, ICM))
  assert {k: v.shape for k, v in _flat(params).items()} == {k: v.shape for k, v in abstract.items()}
  assert _lora_b(params) and all(not np.any(v) for v in _lora_b(params).values())
  embedding = "backbone/language_model/embed_tokens/embedding"
  assert not np.array_equal(_flat(params)[embedding], _flat(saved[1])[embedding])  # Key 0.


def test_save_then_load_is_exact(saved):
  path, params = saved
  assert outputs.is_stage_output(path)
  info = outputs.read_info(path)
  assert info["stage"] == "sft" and info["step"] == 7
  assert ModelConfig.from_dict(info["model"]) == CONFIG
  assert CompressionConfig(**info["compression"]) == ICM
  loaded = outputs.load_params(path, CONFIG, ICM, jax.random.key(5))
  _assert_trees_equal(loaded, params)  # LoRA leaves included, none re-initialised.


def test_load_onto_a_mesh_places_shards(saved):
  path, params = saved
  mesh = parallel.create_mesh({"data": 1, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:2])
  loaded = outputs.load_params(path, CONFIG, ICM, jax.random.key(5), mesh=mesh)
  _assert_trees_equal(loaded, params)
  embedding = loaded["backbone"]["language_model"]["embed_tokens"]["embedding"]
  assert isinstance(embedding.sharding, NamedSharding) and embedding.sharding.mesh == mesh
  assert "fsdp" in str(embedding.sharding.spec)


def test_merge_lora_folds_adapters_and_adds_fresh_ones(saved):
  path, params = saved
  loaded = outputs.load_params(path, CONFIG, ICM, jax.random.key(5), merge_lora=True)
  merged = lora.merge(params["backbone"], CONFIG)
  base = _without_lora(loaded["backbone"])
  np.testing.assert_equal(sorted(_flat(base)), sorted(_flat(merged)))
  for key, value in _flat(merged).items():
    np.testing.assert_allclose(_flat(base)[key], value, atol=1e-6, err_msg=key)
  assert all(not np.any(v) for v in _lora_b(loaded).values())  # Fresh: B = 0.
  assert sorted(_lora_b(loaded)) == sorted(_lora_b(params))
  _assert_trees_equal(loaded["icm"], params["icm"])
  # The policy is unchanged, and LoRA off is now the saved (SFT) policy too.
  expected = _logits(CONFIG, params["backbone"])
  assert np.abs(expected - _logits(CONFIG.replace(lora_rank=0), params["backbone"])).max() > 1e-3
  np.testing.assert_allclose(_logits(CONFIG, loaded["backbone"]), expected, atol=1e-5)
  np.testing.assert_allclose(_logits(CONFIG.replace(lora_rank=0), loaded["backbone"]), expected,
                             atol=1e-5)


@pytest.mark.parametrize("rank", [8, 0])
def test_another_lora_rank_merges_the_saved_adapters(saved, rank):
  path, params = saved
  config = CONFIG.replace(lora_rank=rank)
  loaded = outputs.load_params(path, config, ICM, jax.random.key(5))
  shapes = {k: v.shape[-1] for k, v in _flat(loaded).items() if k.endswith("lora_a")}
  assert (set(shapes.values()) == {rank}) if rank else not shapes
  np.testing.assert_allclose(_logits(config, loaded["backbone"]),
                             _logits(CONFIG, params["backbone"]), atol=1e-5)


def test_another_layer_layout_is_refused_by_name(saved):
  """Stage outputs keep their scan layout (a structural field), unlike HF checkpoints."""
  path, _ = saved
  with pytest.raises(outputs.StageOutputError, match=r"\['scan_layers'\]"):
    outputs.load_params(path, CONFIG.replace(scan_layers=False), ICM, jax.random.key(5))


def test_run_param_dtype_applies(saved):
  """param_dtype is the run's (a RUN_FIELD), as for a Hugging Face start."""
  path, _ = saved
  loaded = outputs.load_params(path, CONFIG.replace(param_dtype="bfloat16"), ICM,
                               jax.random.key(5))
  dtypes = {k: str(v.dtype) for k, v in _flat(loaded["backbone"]).items()}
  assert set(dtypes.values()) == {"bfloat16"}, dtypes


@pytest.mark.parametrize("change, field", [
    ({"num_layers": 2}, "num_layers"),
    ({"intermediate_size": 64}, "intermediate_size"),
    ({"vision": VisionConfig(depth=2, hidden_size=16, intermediate_size=24, num_heads=2,
                             out_hidden_size=32, window_size=56, fullatt_block_indexes=(0,))},
     "vision"),
])
def test_a_structural_difference_names_the_field(saved, change, field):
  path, _ = saved
  with pytest.raises(outputs.StageOutputError, match=rf"{path}.*\['{field}'\]"):
    outputs.load_params(path, CONFIG.replace(**change), ICM, jax.random.key(5))


def test_another_icm_is_refused(saved):
  path, _ = saved
  with pytest.raises(outputs.StageOutputError, match="ICM"):
    outputs.load_params(path, CONFIG, ICM.replace(num_layers=2), jax.random.key(5))


def test_output_without_icm_gets_a_fresh_one(saved, tmp_path):
  """pretrain (no ICM) -> align: the backbone is kept, the ICM starts fresh."""
  plain, no_icm = CONFIG.replace(lora_rank=0), ICM.replace(enabled=False)
  backbone = _without_lora(saved[1]["backbone"])
  path = str(tmp_path / "pretrain")
  outputs.save(path, {"backbone": backbone}, stage="pretrain", step=3, model_config=plain,
               compression=no_icm)
  assert set(outputs.load_params(path, plain, no_icm, jax.random.key(4))) == {"backbone"}
  loaded = outputs.load_params(path, plain, ICM, jax.random.key(4))
  _assert_trees_equal(loaded["backbone"], backbone)
  expected = _flat(reranker.abstract_params(CONFIG, ICM)["icm"])
  assert {k: v.shape for k, v in _flat(loaded["icm"]).items()} == {
      k: v.shape for k, v in expected.items()}


def test_hugging_face_directory_gets_fresh_icm_and_lora(saved, tmp_path):
  plain = CONFIG.replace(lora_rank=0)
  backbone = _without_lora(saved[1]["backbone"])
  path = str(tmp_path / "hf")
  hf.save_pretrained(plain, backbone, path)
  loaded = outputs.load_params(path, CONFIG, ICM, jax.random.key(7))
  base, adapters = lora.partition(loaded["backbone"], lambda p: not lora.is_lora(p))
  _assert_trees_equal(base, backbone)
  assert _lora_b(adapters) and all(not np.any(v) for v in _lora_b(adapters).values())
  assert set(_flat(loaded["icm"])) == set(_flat(reranker.abstract_params(CONFIG, ICM)["icm"]))
  with pytest.raises(outputs.StageOutputError, match=r"\['num_layers'\]"):
    outputs.load_params(path, CONFIG.replace(num_layers=2), ICM, jax.random.key(7))


def test_a_directory_that_is_neither_is_refused(saved, tmp_path):
  with pytest.raises(outputs.StageOutputError, match="expected a stage output"):
    outputs.load_params(str(tmp_path), CONFIG, ICM, jax.random.key(0))
  # Params without stage.json: an interrupted save, never read.
  path, params = saved
  partial = str(tmp_path / "partial")
  outputs.save(partial, params, stage="sft", step=7, model_config=CONFIG, compression=ICM)
  os.remove(os.path.join(partial, outputs.STAGE_FILE))
  assert not outputs.is_stage_output(partial)
  with pytest.raises(outputs.StageOutputError, match="partial"):
    outputs.load_params(partial, CONFIG, ICM, jax.random.key(0))
  with pytest.raises(outputs.StageOutputError, match="not a readable stage output"):
    outputs.read_info(partial)


def test_saving_again_replaces_the_output(saved, tmp_path):
  _, params = saved
  path = str(tmp_path / "again")
  outputs.save(path, params, stage="sft", step=1, model_config=CONFIG, compression=ICM)
  doubled = jax.tree.map(lambda x: 2 * x, params)
  outputs.save(path, doubled, stage="sft", step=2, model_config=CONFIG, compression=ICM)
  assert outputs.read_info(path)["step"] == 2
  _assert_trees_equal(outputs.load_params(path, CONFIG, ICM, jax.random.key(0)), doubled)
