"""Greedy rollouts agree with full forwards and, token for token, with HF `generate`."""

import jax
import numpy as np
import torch
from hf_models import save_hf_model, tiny_config
from test_kv_cache import CONFIG

from retrv_jax.hf import load_pretrained
from retrv_jax.models import qwen2_5_vl
from retrv_jax.models.reranker import RerankInputs
from retrv_jax.rl import sampler


def _right_padded(rows, length):
  ids = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    ids[i, : len(row)] = row
  return ids, (ids != 0).astype(np.int32)


def test_greedy_tokens_are_the_argmax_of_a_full_forward():
  model = qwen2_5_vl.Qwen25VL(CONFIG)
  params = qwen2_5_vl.init_params(CONFIG, jax.random.key(3))
  grid = np.array([[1, 4, 4]], np.int32)
  pixels = np.random.default_rng(0).normal(size=(16, CONFIG.vision.patch_dim)).astype(np.float32)
  ids, mask = _right_padded([[5, 6, 60] + [63] * 4 + [61, 7, 8], [9, 10, 11, 12]], 10)
  sampling = sampler.SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=(2,))
  inputs = RerankInputs.from_token_ids(model, params, ids, mask, pixels, grid)
  out = sampler.rollout(model, params, inputs, jax.random.key(0), sampling=sampling)
  gen, lengths = np.asarray(out.tokens), np.asarray(out.lengths)

  # Re-run prompt + generated tokens in one cache-free forward.
  prompt_lengths = mask.sum(-1)
  full_ids, full_mask = _right_padded(
      [list(ids[i, : prompt_lengths[i]]) + list(gen[i, : lengths[i]]) for i in range(2)], 16)
  logits = model.apply({"params": params}, full_ids, pixels, grid, full_mask)
  logp = np.asarray(jax.nn.log_softmax(
      sampler.policy_logits(logits, sampler.banned_mask(CONFIG), 0.0)))
  for i in range(2):
    scored = slice(prompt_lengths[i] - 1, prompt_lengths[i] - 1 + lengths[i])
    np.testing.assert_array_equal(logp[i, scored].argmax(-1), gen[i, : lengths[i]])
    np.testing.assert_allclose(logp[i, scored][np.arange(lengths[i]), gen[i, : lengths[i]]],
                               np.asarray(out.logprobs)[i, : lengths[i]], atol=1e-4)


def test_greedy_equals_transformers_generate(tmp_path):
  """No compression, no inspection: the engine is plain greedy decoding."""
  config = tiny_config()
  hf = save_hf_model(tmp_path, config, seed=2)
  config, params = load_pretrained(tmp_path)
  model = qwen2_5_vl.Qwen25VL(config)
  rng = np.random.default_rng(0)
  span = [config.vision_start_token_id] + [config.image_token_id] * 30 + [
      config.vision_end_token_id]
  ids = np.array([[5, 6] + span + list(rng.integers(3, 240, 6))], np.int32)
  grid = np.array([[1, 10, 12]], np.int32)
  pixels = rng.normal(size=(120, config.vision.patch_dim)).astype(np.float32)
  banned = list(sampler.never_sampled(config))
  with torch.no_grad():
    expected = hf.generate(
        input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.ones(ids.shape),
        pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
        mm_token_type_ids=torch.tensor(ids == config.image_token_id, dtype=torch.long),
        do_sample=False, max_new_tokens=12, min_new_tokens=12, suppress_tokens=banned,
        eos_token_id=None, pad_token_id=config.pad_token_id,
    )[0, ids.shape[1]:].numpy()
  inputs = RerankInputs.from_token_ids(model, params, ids, np.ones_like(ids), pixels,
                                               grid)
  sampling = sampler.SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(-1,))
  out = sampler.rollout(model, params, inputs, jax.random.key(0), sampling=sampling)
  np.testing.assert_array_equal(np.asarray(out.tokens)[0], expected)
