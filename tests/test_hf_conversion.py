"""Hugging Face checkpoint conversion, climbing the ladder: config round trip, key sets,
HF -> Flax -> HF and Flax -> HF -> Flax round trips (scanned and unscanned), sharded and
bfloat16 files, and the errors a bad checkpoint must raise."""

import json
import os

import flax.linen as nn
import hf_models
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from retrv_jax import parallel
from retrv_jax.hf import config as hf_config
from retrv_jax.hf import io, keys
from retrv_jax.models import config as model_config
from retrv_jax.models import qwen2_5_vl

UNTIED = hf_models.tiny_config()
TIED = hf_models.tiny_config(tie_word_embeddings=True)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("untied") / "ckpt"
  hf_models.save_hf_model(path, UNTIED, seed=1)
  return path


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tied") / "ckpt"
  hf_models.save_hf_model(path, TIED, seed=2)
  return path


def _hf_tensors(path) -> dict[str, torch.Tensor]:
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
  return {keys.hub_key(k): v for k, v in model.state_dict().items()}


def _file_tensors(path) -> dict[str, np.ndarray]:
  """Every tensor of a saved checkpoint, keyed as stored."""
  out = {}
  for name in sorted(os.listdir(path)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(path, name), framework="numpy") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def _flat(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _random_params(config, *, scan_layers=True, seed=0):
  rng = np.random.default_rng(seed)
  shapes = keys.param_shapes(config, scan_layers=scan_layers)
  flat = {p: rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def _unstack(flat: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
  """Scanned flat params -> the unscanned layout."""
  out = {}
  for spec in keys.key_table(config):
    if spec.num_layers:
      for i in range(spec.num_layers):
        out[spec.flax_path(i, scan_layers=False)] = flat[spec.flax][i]
    else:
      out[spec.flax] = flat[spec.flax]
  return out


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "config",
    [UNTIED, TIED, model_config.tiny(), model_config.qwen2_5_vl_3b(), model_config.qwen2_5_vl_7b()],
    ids=["untied", "tied", "tiny", "3b", "7b"],
)
def test_config_round_trip(config):
  exported = hf_config.model_config_to_hf(config)
  assert hf_config.model_config_from_hf(exported) == config
  # Through transformers' own parsing and serialisation as well.
  reserialised = Qwen2_5_VLConfig.from_dict(exported).to_dict()
  assert hf_config.model_config_from_hf(reserialised) == config


def test_config_reads_the_original_hub_layout():
  """The Qwen2.5-VL-7B-Instruct config.json as first published (text fields at the top)."""
  legacy = {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
      "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
      "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
      "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
      "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
      "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
      "use_sliding_window": False, "vocab_size": 152064,
      "vision_config": {
          "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
          "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
          "temporal_patch_size": 2,
      },
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
  }
  assert hf_config.model_config_from_hf(legacy) == model_config.qwen2_5_vl_7b()


def test_config_from_saved_directory_and_overrides(untied_dir):
  config = hf_config.model_config_from_hf(untied_dir, scan_layers=False, param_dtype="bfloat16")
  assert config == UNTIED.replace(scan_layers=False, param_dtype="bfloat16")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(model_type="llama"), "model_type is 'llama'"),
        (lambda d: d["text_config"].update(hidden_act="gelu"), "text_config.hidden_act"),
        (lambda d: d["text_config"].pop("hidden_size"), "missing field text_config.hidden_size"),
        (lambda d: d["text_config"].update(use_sliding_window=True), "use_sliding_window"),
        (lambda d: d["text_config"]["rope_parameters"].update(rope_type="yarn", type="yarn"),
         "rope type 'yarn'"),
    ],
)
def test_config_errors_name_the_field(change, message):
  exported = hf_config.model_config_to_hf(UNTIED)
  change(exported)
  with pytest.raises(hf_config.ConfigError, match=message):
    hf_config.model_config_from_hf(exported)


# ------------------------------------------------------------------------------ key table


@pytest.mark.parametrize("config", [UNTIED, TIED], ids=["untied", "tied"])
def test_key_table_equals_hf_state_dict(config, untied_dir, tied_dir):
  model = hf_models.hf_model(config)
  state = {keys.hub_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
  if config.tie_word_embeddings:
    assert state.pop(keys.TIED_LM_HEAD) == state[keys.TIED_EMBEDDING]
  assert keys.hf_shapes(config) == state
  # And the hub names are exactly what transformers writes.
  saved = _file_tensors(tied_dir if config.tie_word_embeddings else untied_dir)
  assert set(saved) == set(keys.hf_shapes(config))


def test_hub_key_maps_in_memory_names():
  assert keys.hub_key("model.visual.blocks.0.norm1.weight") == "visual.blocks.0.norm1.weight"
  assert keys.hub_key("model.language_model.norm.weight") == "model.norm.weight"
  assert keys.hub_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
  assert keys.hub_key("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("transform_name", ["linear", "patch_conv", "reshape"])
def test_transforms_are_inverse(transform_name):
  spec = next(s for s in keys.key_table(UNTIED) if s.transform.name == transform_name)
  x = np.random.default_rng(0).standard_normal(spec.hf_shape).astype(np.float32)
  flax_value = spec.transform.to_flax(x, spec.flax_shape)
  assert flax_value.shape == spec.flax_shape
  np.testing.assert_array_equal(spec.transform.to_hf(flax_value, spec.hf_shape), x)


def test_linear_transform_splits_heads_in_hf_order():
  """q_proj output row h*E + e is Flax kernel [:, h, e]."""
  spec = next(s for s in keys.key_table(UNTIED) if s.hf.endswith("q_proj.weight"))
  x = np.random.default_rng(0).standard_normal(spec.hf_shape).astype(np.float32)
  kernel = spec.transform.to_flax(x, spec.flax_shape)
  e = UNTIED.head_dim
  np.testing.assert_array_equal(kernel[:, 3, 5], x[3 * e + 5, :])


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_to_flax_to_hf_is_exact(tied, scan_layers, untied_dir, tied_dir, tmp_path):
  src = tied_dir if tied else untied_dir
  config, params = io.load_pretrained(src, scan_layers=scan_layers)
  assert config.scan_layers == scan_layers and config.tie_word_embeddings == tied
  has_stack = any(p.startswith("language_model/layers/") for p in _flat(params))
  assert has_stack == scan_layers
  io.save_pretrained(config, params, tmp_path / "out")
  assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
  original, reloaded = _hf_tensors(src), _hf_tensors(tmp_path / "out")
  assert set(original) == set(reloaded)
  for key, value in original.items():
    assert torch.equal(value, reloaded[key]), key


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unscanned"])
def test_flax_to_hf_to_flax_is_exact(scan_layers, tmp_path):
  params = _random_params(UNTIED, scan_layers=scan_layers)
  io.save_pretrained(UNTIED.replace(scan_layers=scan_layers), params, tmp_path / "ckpt")
  config, loaded = io.load_pretrained(tmp_path / "ckpt", scan_layers=scan_layers)
  assert config == UNTIED.replace(scan_layers=scan_layers)
  expected, got = _flat(params), _flat(loaded)
  assert set(expected) == set(got)
  for path, value in expected.items():
    np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_scanned_and_unscanned_layouts_hold_the_same_weights(untied_dir):
  _, scanned = io.load_pretrained(untied_dir, scan_layers=True)
  _, unscanned = io.load_pretrained(untied_dir, scan_layers=False)
  expected, got = _unstack(_flat(scanned), UNTIED), _flat(unscanned)
  assert set(expected) == set(got)
  for path, value in expected.items():
    np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_in_memory_key_names_are_accepted(untied_dir, tmp_path):
  """A file keyed `model.visual.*` / `model.language_model.*` loads like the hub layout."""
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(untied_dir, dtype=torch.float32)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert any(k.startswith("model.language_model.") for k in state)
  os.makedirs(tmp_path / "v5")
  save_file(state, str(tmp_path / "v5" / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "v5" / "config.json").write_text((untied_dir / "config.json").read_text())
  _, expected = io.load_pretrained(untied_dir)
  _, got = io.load_pretrained(tmp_path / "v5")
  for path, value in _flat(expected).items():
    np.testing.assert_array_equal(_flat(got)[path], value, err_msg=path)


# ------------------------------------------------------------------------------ shards, dtypes


def test_sharded_save_writes_an_index_and_loads_everywhere(untied_dir, tmp_path):
  config, params = io.load_pretrained(untied_dir)
  io.save_pretrained(config, params, tmp_path / "sharded", max_shard_size="40KB")
  names = sorted(os.listdir(tmp_path / "sharded"))
  shards = [n for n in names if n.endswith(".safetensors")]
  assert len(shards) > 2 and io.INDEX_FILE in names and io.SINGLE_FILE not in names
  index = json.loads((tmp_path / "sharded" / io.INDEX_FILE).read_text())
  assert set(index["weight_map"]) == set(keys.hf_shapes(config))
  assert set(index["weight_map"].values()) == set(shards)
  for name in shards:  # Only a tensor bigger than the limit may exceed it alone.
    with safe_open(str(tmp_path / "sharded" / name), framework="numpy") as f:
      sizes = [f.get_tensor(k).nbytes for k in f.keys()]
    assert sum(sizes) <= 40_000 or len(sizes) == 1
  original, reloaded = _hf_tensors(untied_dir), _hf_tensors(tmp_path / "sharded")
  for key, value in original.items():
    assert torch.equal(value, reloaded[key]), key
  _, again = io.load_pretrained(tmp_path / "sharded")
  for path, value in _flat(params).items():
    np.testing.assert_array_equal(_flat(again)[path], value, err_msg=path)


def test_hf_sharded_checkpoint_loads(tmp_path):
  hf_models.save_hf_model(tmp_path / "hf", UNTIED, seed=3, max_shard_size="50KB")
  assert (tmp_path / "hf" / io.INDEX_FILE).exists()
  _, params = io.load_pretrained(tmp_path / "hf")
  state = _hf_tensors(tmp_path / "hf")
  kernel = _flat(params)["language_model/layers/mlp/down_proj/kernel"]
  np.testing.assert_array_equal(kernel[1], state["model.layers.1.mlp.down_proj.weight"].numpy().T)


def test_bfloat16_checkpoint_import_and_export(tmp_path):
  model = hf_models.save_hf_model(tmp_path / "bf16", UNTIED, seed=4, dtype=torch.bfloat16)
  state = {keys.hub_key(k): v.float().numpy() for k, v in model.state_dict().items()}
  _, params32 = io.load_pretrained(tmp_path / "bf16", dtype="float32")
  config, params16 = io.load_pretrained(tmp_path / "bf16", dtype="bfloat16")
  flat32, flat16 = _flat(params32), _flat(params16)
  assert flat32["language_model/norm/scale"].dtype == np.float32
  assert flat16["language_model/norm/scale"].dtype == ml_dtypes.bfloat16
  qkv = state["visual.blocks.1.attn.qkv.weight"]
  np.testing.assert_array_equal(flat32["visual/blocks/attn/qkv/kernel"][1].reshape(qkv.T.shape),
                                qkv.T)
  np.testing.assert_array_equal(flat16["visual/blocks/attn/qkv/kernel"].astype(np.float32),
                                flat32["visual/blocks/attn/qkv/kernel"])
  io.save_pretrained(config, params16, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
  reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out")
  assert reloaded.dtype == torch.bfloat16
  for key, value in model.state_dict().items():
    assert torch.equal(value, reloaded.state_dict()[key]), key


def test_save_casts_to_the_requested_dtype(untied_dir, tmp_path):
  config, params = io.load_pretrained(untied_dir)
  io.save_pretrained(config, params, tmp_path / "bf16", dtype="bfloat16")
  tensors = _file_tensors(tmp_path / "bf16")
  assert {v.dtype for v in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
  original = _file_tensors(untied_dir)
  np.testing.assert_array_equal(
      tensors["model.norm.weight"], original["model.norm.weight"].astype(ml_dtypes.bfloat16)
  )


def test_load_places_params_on_given_shardings(untied_dir):
  mesh = jax.make_mesh((8,), ("fsdp",))
  by_embed = NamedSharding(mesh, PartitionSpec(None, "fsdp"))  # [V, D]: shard D=64 over 8.
  stacked = NamedSharding(mesh, PartitionSpec(None, "fsdp"))  # [L, D, F]: shard D.
  shardings = {p: None for p in keys.param_shapes(UNTIED)}
  for name in ("gate_proj", "up_proj"):
    shardings[f"language_model/layers/mlp/{name}/kernel"] = stacked
  shardings["language_model/embed_tokens/embedding"] = by_embed
  _, params = io.load_pretrained(
      untied_dir, shardings=traverse_util.unflatten_dict(shardings, sep="/")
  )
  flat = traverse_util.flatten_dict(params, sep="/")
  embedding = flat["language_model/embed_tokens/embedding"]
  assert embedding.sharding == by_embed
  assert embedding.addressable_shards[0].data.shape == (UNTIED.vocab_size, UNTIED.hidden_size // 8)
  assert flat["language_model/layers/mlp/up_proj/kernel"].sharding == stacked
  _, plain = io.load_pretrained(untied_dir)
  np.testing.assert_array_equal(
      np.asarray(embedding), np.asarray(plain["language_model"]["embed_tokens"]["embedding"])
  )


# ------------------------------------------------------------------------------ errors


def _rewrite(src, dst, edit) -> None:
  """Copies checkpoint `src` to `dst` after `edit(tensors)` mutates its tensor dict."""
  tensors = _file_tensors(src)
  edit(tensors)
  os.makedirs(dst)
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  (dst / "config.json").write_text((src / "config.json").read_text())


def test_missing_key_is_named(untied_dir, tmp_path):
  _rewrite(untied_dir, tmp_path / "bad", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(io.CheckpointError, match=r"missing key model\.layers\.1\.mlp\.up_proj"
                     r"\.weight \(expected shape \[96, 64\]\)"):
    io.load_pretrained(tmp_path / "bad")


def test_unexpected_key_is_named(untied_dir, tmp_path):
  _rewrite(untied_dir, tmp_path / "bad",
           lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((96, 64), "f4")}))
  with pytest.raises(io.CheckpointError,
                     match=r"unexpected key model\.layers\.2\.mlp\.up_proj\.weight \(shape"):
    io.load_pretrained(tmp_path / "bad")


def test_wrong_shape_names_key_and_both_shapes(untied_dir, tmp_path):
  _rewrite(untied_dir, tmp_path / "bad",
           lambda t: t.update({"visual.merger.mlp.2.bias": np.zeros((65,), "f4")}))
  with pytest.raises(io.CheckpointError,
                     match=r"key visual\.merger\.mlp\.2\.bias: checkpoint shape \[65\], "
                     r"expected \[64\]"):
    io.load_pretrained(tmp_path / "bad")


def test_tied_checkpoint_with_equal_lm_head_loads(tied_dir, tmp_path):
  _rewrite(tied_dir, tmp_path / "ok",
           lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  config, params = io.load_pretrained(tmp_path / "ok")
  assert config.tie_word_embeddings and "lm_head" not in params


def test_tied_checkpoint_with_different_lm_head_is_refused(tied_dir, tmp_path):
  _rewrite(tied_dir, tmp_path / "bad",
           lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1.0}))
  with pytest.raises(io.CheckpointError, match="tie_word_embeddings=true but lm_head.weight"):
    io.load_pretrained(tmp_path / "bad")


def test_pickled_checkpoint_is_refused(untied_dir, tmp_path):
  os.makedirs(tmp_path / "bin")
  (tmp_path / "bin" / "config.json").write_text((untied_dir / "config.json").read_text())
  (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(io.CheckpointError, match="pickled checkpoints are never loaded"):
    io.load_pretrained(tmp_path / "bin")


def test_save_refuses_mismatched_params(tmp_path):
  flat = _flat(_random_params(UNTIED))
  flat["language_model/norm/scale"] = np.zeros((63,), np.float32)
  with pytest.raises(io.CheckpointError, match=r"param language_model/norm/scale: shape \[63\], "
                     r"expected \[64\]"):
    io.save_pretrained(UNTIED, traverse_util.unflatten_dict(flat, sep="/"), tmp_path / "x")
  assert not os.listdir(tmp_path)


def test_save_is_atomic(untied_dir, tmp_path, monkeypatch):
  config, params = io.load_pretrained(untied_dir)
  io.save_pretrained(config, params, tmp_path / "ckpt")
  before = _file_tensors(tmp_path / "ckpt")
  with pytest.raises(FileExistsError):
    io.save_pretrained(config, params, tmp_path / "ckpt")

  calls = []

  def failing_save_file(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk full")
    return save_file(*args, **kwargs)

  monkeypatch.setattr(io, "save_file", failing_save_file)
  other = _random_params(UNTIED, seed=5)
  with pytest.raises(OSError, match="disk full"):
    io.save_pretrained(config, other, tmp_path / "ckpt", max_shard_size="40KB", overwrite=True)
  assert os.listdir(tmp_path) == ["ckpt"]  # No temporary directory is left behind...
  after = _file_tensors(tmp_path / "ckpt")  # ...and the old checkpoint is intact.
  assert set(after) == set(before)
  assert all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("size, expected", [(123, 123), ("2GB", 2 * 10**9),
                                            ("500MiB", 500 * 2**20), ("40KB", 40_000)])
def test_parse_size(size, expected):
  assert io.parse_size(size) == expected


# ------------------------------------------------------------------------------ the Flax model


@pytest.mark.parametrize(
    "config",
    [
        UNTIED,
        TIED,
        UNTIED.replace(scan_layers=False),
        TIED.replace(scan_layers=False),
        model_config.qwen2_5_vl_3b(),
        model_config.qwen2_5_vl_7b(),
    ],
    ids=["untied", "tied", "untied-unscanned", "tied-unscanned", "3b", "7b"],
)
def test_key_table_equals_model_params(config):
  """Paths and shapes of `jax.eval_shape(Qwen25VL(config).init)` are the table's."""
  abstract = qwen2_5_vl.abstract_params(config)
  model = {p: tuple(x.shape)
           for p, x in traverse_util.flatten_dict(nn.meta.unbox(abstract), sep="/").items()}
  assert model == keys.param_shapes(config)


def test_load_onto_a_mesh_uses_the_model_logical_axes(untied_dir):
  mesh = parallel.create_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  _, params = io.load_pretrained(untied_dir, mesh=mesh)
  expected = traverse_util.flatten_dict(
      parallel.shardings_of(qwen2_5_vl.abstract_params(UNTIED), mesh, parallel.DEFAULT_RULES),
      sep="/",
  )
  flat = traverse_util.flatten_dict(params, sep="/")
  assert set(flat) == set(expected)
  for path, value in flat.items():
    assert value.sharding == expected[path], path
  q = flat["language_model/layers/self_attn/q_proj/kernel"]  # [L, D, H, E]
  assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
  _, plain = io.load_pretrained(untied_dir)
  for path, value in _flat(plain).items():
    np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg=path)


def test_missing_shard_file_is_named(untied_dir, tmp_path):
  config, params = io.load_pretrained(untied_dir)
  io.save_pretrained(config, params, tmp_path / "sharded", max_shard_size="40KB")
  shard = sorted(n for n in os.listdir(tmp_path / "sharded") if n.endswith(".safetensors"))[1]
  os.remove(tmp_path / "sharded" / shard)
  with pytest.raises(io.CheckpointError, match=rf"missing: \['{shard}'\]"):
    io.load_pretrained(tmp_path / "sharded")
