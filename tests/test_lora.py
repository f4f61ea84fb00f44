"""LoRA adapters: tree layout, zero-init identity, LoRA-off reference, merge/unmerge, export."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open

from retrv_jax import hf, parallel
from retrv_jax.hf import keys as keys_lib
from retrv_jax.models import lora
from retrv_jax.models.config import LORA_TARGETS, ModelConfig, VisionConfig
from retrv_jax.models.qwen2_5_vl import Qwen25VL, abstract_params, init_params

BASE = ModelConfig(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, mrope_section=(1, 1, 2), tie_word_embeddings=False, image_token_id=120,
    video_token_id=121, vision_start_token_id=122, vision_end_token_id=123, bos_token_id=1,
    eos_token_id=2, pad_token_id=0,
    vision=VisionConfig(depth=1, hidden_size=16, intermediate_size=24, num_heads=2,
                        out_hidden_size=32, window_size=56, fullatt_block_indexes=(0,)),
)
RANK = 4
IDS = np.array([[1, 5, 9, 17, 33, 65, 3, 7], [4, 8, 15, 16, 23, 42, 0, 0]], np.int32)
MASK = np.array([[1] * 8, [1] * 6 + [0] * 2], np.int32)


def _flat(tree):
  return traverse_util.flatten_dict(nn.meta.unbox(tree), sep="/")


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params):
  return Qwen25VL(config).apply({"params": params}, IDS, attention_mask=MASK)


@functools.partial(jax.jit, static_argnums=0)
def _init(config, rng):
  return init_params(config, rng)


def _with_random_b(params, rng):
  """Adapters with non-zero B, so LoRA changes the output."""
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(rng, len(flat))
  for key, path in zip(keys, sorted(flat), strict=True):
    if path[-1] == "lora_b":
      flat[path] = 0.1 * jax.random.normal(key, flat[path].shape, flat[path].dtype)
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module", params=[True, False], ids=["scanned", "unscanned"])
def setup(request):
  config = BASE.replace(scan_layers=request.param, lora_rank=RANK)
  params = _init(config, jax.random.key(0))
  return config, params


@pytest.mark.parametrize("scan_layers", [True, False])
def test_rank_zero_tree_is_the_hf_tree(scan_layers):
  config = BASE.replace(scan_layers=scan_layers)
  shapes = {p: tuple(v.shape) for p, v in _flat(abstract_params(config)).items()}
  assert config.lora_rank == 0
  assert shapes == keys_lib.param_shapes(config, scan_layers=scan_layers)
  assert not any("lora" in p for p in shapes)


def test_lora_adds_only_adapters_with_logical_axes():
  base = abstract_params(BASE)
  with_lora = abstract_params(BASE.replace(lora_rank=RANK))
  flat = traverse_util.flatten_dict(with_lora, sep="/")
  base_flat = traverse_util.flatten_dict(base, sep="/")
  adapters = {p: v for p, v in flat.items() if "lora" in p}
  assert {p: v for p, v in flat.items() if "lora" not in p} == base_flat
  assert len(adapters) == 2 * len(LORA_TARGETS)
  assert not any(p.startswith("visual") for p in adapters)
  q_a = flat["language_model/layers/self_attn/q_proj/lora_a"]
  q_b = flat["language_model/layers/self_attn/q_proj/lora_b"]
  o_a = flat["language_model/layers/self_attn/o_proj/lora_a"]
  assert q_a.value.shape == (2, 32, RANK) and q_a.names == ("layers", "embed", None)
  assert q_b.value.shape == (2, RANK, 4, 8) and q_b.names == ("layers", None, "heads", "head_dim")
  assert o_a.value.shape == (2, 4, 8, RANK) and o_a.names == ("layers", "heads", "head_dim", None)


def test_targets_select_projections():
  config = BASE.replace(lora_rank=RANK, lora_targets=("q_proj", "down_proj"))
  paths = [p for p in _flat(abstract_params(config)) if p.endswith("lora_a")]
  assert sorted(paths) == ["language_model/layers/mlp/down_proj/lora_a",
                           "language_model/layers/self_attn/q_proj/lora_a"]


def test_base_weights_keep_their_layout(setup):
  config, params = setup
  base = _init(config.replace(lora_rank=0), jax.random.key(0))
  _, rest = lora.partition(params, lora.is_lora)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(rest) == shapes(base)
  if not config.scan_layers:  # nn.scan draws per-layer rngs differently with more params.
    assert jax.tree.all(jax.tree.map(np.array_equal, rest, base))
  b = [v for p, v in _flat(params).items() if p.endswith("lora_b")]
  a = [v for p, v in _flat(params).items() if p.endswith("lora_a")]
  assert all(not np.any(x) for x in b) and all(np.std(x) > 0 for x in a)


def test_fresh_adapters_leave_the_output_unchanged(setup):
  config, params = setup
  _, rest = lora.partition(params, lora.is_lora)
  np.testing.assert_array_equal(_logits(config, params), _logits(config.replace(lora_rank=0), rest))


def test_lora_off_is_the_base_model(setup):
  config, params = setup
  params = _with_random_b(params, jax.random.key(1))
  _, rest = lora.partition(params, lora.is_lora)
  off = config.replace(lora_rank=0)
  base = _logits(off, rest)
  np.testing.assert_array_equal(_logits(off, params), base)  # Adapter entries ignored.
  assert np.max(np.abs(_logits(config, params) - base)) > 1e-2


def test_merge_equals_lora_forward_and_unmerge_inverts(setup):
  config, params = setup
  params = _with_random_b(params, jax.random.key(2))
  merged = lora.merge(params, config)
  assert not any("lora" in p for p in _flat(merged))
  np.testing.assert_allclose(
      _logits(config.replace(lora_rank=0), merged), _logits(config, params), atol=1e-5, rtol=0
  )
  adapters, _ = lora.partition(params, lora.is_lora)
  restored = lora.unmerge(merged, adapters, config)
  assert set(_flat(restored)) == set(_flat(params))
  for path, value in _flat(params).items():
    np.testing.assert_allclose(_flat(restored)[path], value, atol=1e-6, rtol=0, err_msg=path)


def test_merged_params_export_to_hf(setup, tmp_path):
  config, params = setup
  params = _with_random_b(params, jax.random.key(3))
  with pytest.raises(hf.CheckpointError, match="unexpected param .*lora_a"):
    hf.save_pretrained(config, params, tmp_path / "unmerged")
  merged = lora.merge(params, config)
  hf.save_pretrained(config.replace(lora_rank=0), merged, tmp_path / "out")
  with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="numpy") as f:
    names = list(f.keys())
  assert names and not any("lora" in n for n in names)
  loaded_config, loaded = hf.load_pretrained(tmp_path / "out", scan_layers=config.scan_layers)
  assert loaded_config.lora_rank == 0
  for path, value in _flat(merged).items():
    np.testing.assert_array_equal(_flat(loaded)[path], value, err_msg=path)


def test_init_params_adds_adapters_to_loaded_params(setup):
  config, params = setup
  adapters = lora.init_params(config, jax.random.key(0))
  expected, rest = lora.partition(params, lora.is_lora)
  assert jax.tree.all(jax.tree.map(np.array_equal, adapters, expected))
  combined = lora.combine(adapters, rest)
  assert jax.tree.structure(combined) == jax.tree.structure(params)


def test_init_params_on_a_mesh_are_sharded():
  config = BASE.replace(lora_rank=RANK)
  mesh = parallel.create_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  adapters = lora.init_params(config, jax.random.key(0), mesh=mesh,
                              rules=parallel.DEFAULT_RULES)
  q_a = adapters["language_model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
  q_b = adapters["language_model"]["layers"]["self_attn"]["q_proj"]["lora_b"]
  assert q_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert q_b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
  plain = lora.init_params(config, jax.random.key(0))
  assert jax.tree.all(jax.tree.map(np.array_equal, adapters, plain))


def test_gradients_flow_to_the_selected_subset_only(setup):
  config, params = setup
  trainable, frozen = lora.partition(params, lora.is_lora)

  def loss(t):
    return jnp.mean(_logits(config, lora.combine(t, frozen)) ** 2)

  grads = jax.grad(loss)(trainable)
  flat = _flat(grads)
  assert set(flat) == {p for p in _flat(params) if "lora" in p}
  assert all(np.any(v) for p, v in flat.items() if p.endswith("lora_b"))
  assert all(not np.any(v) for p, v in flat.items() if p.endswith("lora_a"))  # B = 0 at init.


def test_partition_combine_and_masks():
  tree = {"backbone": {"q": {"kernel": 1, "lora_a": 2, "lora_b": 3}, "norm": {"scale": 4}},
          "icm": {"summarize": {"kernel": 5}, "output_scale": 6}}
  selected, rest = lora.partition(tree, lora.path_regex(*lora.TRAINABLE))
  assert selected == {"backbone": {"q": {"lora_a": 2, "lora_b": 3}},
                      "icm": {"summarize": {"kernel": 5}, "output_scale": 6}}
  assert rest == {"backbone": {"q": {"kernel": 1}, "norm": {"scale": 4}}}
  assert lora.combine(selected, rest) == tree
  assert lora.lora_mask(tree)["backbone"] == {
      "q": {"kernel": False, "lora_a": True, "lora_b": True}, "norm": {"scale": False}}
  with pytest.raises(ValueError, match="in both trees.*backbone/q/kernel"):
    lora.combine(tree, rest)


def test_merge_errors_name_the_problem(setup):
  config, params = setup
  with pytest.raises(ValueError, match="lora_rank = 0"):
    lora.merge(params, config.replace(lora_rank=0))
  _, rest = lora.partition(params, lora.is_lora)
  with pytest.raises(ValueError, match="no lora_a"):
    lora.merge(rest, config)
  flat = traverse_util.flatten_dict(params, sep="/")
  del flat["language_model/layers/mlp/up_proj/lora_b" if config.scan_layers
           else "language_model/layers_0/mlp/up_proj/lora_b"]
  with pytest.raises(ValueError, match="up_proj: an adapter needs kernel, lora_a and lora_b"):
    lora.merge(traverse_util.unflatten_dict(flat, sep="/"), config)
