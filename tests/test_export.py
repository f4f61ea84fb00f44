"""Hugging Face export of a stage output (LoRA merged, ICM beside it) and the preparation
of a public Qwen2.5-VL checkpoint (Retrv-R1 tokens added)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import save_hf_model, tiny_config
from test_tokenizer import build_qwen_like_tokenizer
from transformers import Qwen2_5_VLForConditionalGeneration

from retrv_jax import export_hf
from retrv_jax.data.tokenizer import load_tokenizer
from retrv_jax.hf import prepare
from retrv_jax.models import lora
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.stages import outputs

CONFIG = tiny_config().replace(lora_rank=4, lora_alpha=8.0)
ICM = CompressionConfig()


@pytest.fixture(scope="module")
def stage_output(tmp_path_factory):
  """A stage output whose LoRA adapters are non-zero."""
  path = str(tmp_path_factory.mktemp("stage") / "output")
  params = outputs.load_params("", CONFIG, ICM, jax.random.key(0))
  params["backbone"] = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if lora.is_lora(tuple(k.key for k in p)) else x, params["backbone"])
  outputs.save(path, params, stage="sft", step=3, model_config=CONFIG, compression=ICM)
  return path, params


def _logits(config, params):
  ids = jnp.arange(1, 13, dtype=jnp.int32)[None] % config.vocab_size
  return np.asarray(Qwen25VL(config).apply({"params": params}, ids))


def test_export_merges_lora_and_keeps_the_icm(stage_output, tmp_path):
  path, params = stage_output
  out = str(tmp_path / "exported")
  export_hf.export(path, out)
  assert {"config.json", "model.safetensors", outputs.ICM_FILE,
          outputs.RETRV_CONFIG} <= set(os.listdir(out))
  plain = CONFIG.replace(lora_rank=0)
  loaded = outputs.load_params(out, plain, ICM, jax.random.key(1))
  np.testing.assert_allclose(_logits(plain, loaded["backbone"]),
                             _logits(CONFIG, params["backbone"]), atol=1e-4)
  for a, b in zip(jax.tree.leaves(loaded["icm"]), jax.tree.leaves(params["icm"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)  # transformers reads it.
  assert hf.config.text_config.num_hidden_layers == CONFIG.num_layers


def test_an_icm_of_other_shape_is_refused(stage_output, tmp_path):
  path, _ = stage_output
  out = str(tmp_path / "exported")
  export_hf.export(path, out)
  with pytest.raises(outputs.StageOutputError, match=outputs.ICM_FILE):
    outputs.load_params(out, CONFIG.replace(lora_rank=0), ICM.replace(mlp_dim=8),
                        jax.random.key(1))


def test_prepare_adds_the_retrv_tokens(tmp_path):
  src = tmp_path / "qwen"
  build_qwen_like_tokenizer(src)
  before = load_tokenizer(src)
  save_hf_model(src, tiny_config(vocab_size=before.vocab_size))
  out = str(tmp_path / "prepared")
  added = prepare.prepare(str(src), out, dtype="float32")
  after = load_tokenizer(out)
  assert added > 0 and after.vocab_size == before.vocab_size + added
  assert after.inspect_start >= before.vocab_size and after.answer_end >= before.vocab_size
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
  table = model.get_input_embeddings().weight.detach().numpy()
  assert table.shape[0] == after.vocab_size
  new_rows = table[before.vocab_size:]
  mean = table[: before.vocab_size].mean(axis=0)
  np.testing.assert_allclose(new_rows.mean(axis=0), mean, atol=0.05)
  assert np.std(new_rows, axis=0).max() > 0  # Not identical rows.
