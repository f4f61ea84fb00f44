"""The cached path (prefill, then one or more tokens per step) gives full-forward logits."""

import jax
import jax.numpy as jnp
import numpy as np

from retrv_jax.models import qwen2_5_vl
from retrv_jax.models.config import ModelConfig, VisionConfig
from retrv_jax.models.decoder import KVCache
from retrv_jax.models.rope import get_rope_index

# The small model of the cache, sampler, rollout and sharding tests: 2 vision blocks, one
# windowed and one with full attention; 2x2-pixel patches so 4x4-patch images are cheap.
CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, mrope_section=(1, 1, 2), image_token_id=63, video_token_id=62,
    vision_start_token_id=60, vision_end_token_id=61, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
    vision=VisionConfig(depth=2, hidden_size=16, intermediate_size=24, num_heads=2,
                        out_hidden_size=32, patch_size=2, window_size=8,
                        fullatt_block_indexes=(1,)),
)


def _inputs():
  """Two rows of different lengths (right padded); row 0 holds a 1x4x4 image."""
  rng = np.random.default_rng(0)
  row0 = [5, 6, 60] + [63] * 4 + [61] + list(rng.integers(3, 59, 8))
  row1 = list(rng.integers(3, 59, 10))
  length = 16
  ids = np.zeros((2, length), np.int32)
  mask = np.zeros((2, length), np.int32)
  for i, row in enumerate([row0, row1]):
    ids[i, : len(row)], mask[i, : len(row)] = row, 1
  grid = np.array([[1, 4, 4]], np.int32)
  pixels = rng.normal(size=(16, CONFIG.vision.patch_dim)).astype(np.float32)
  return ids, mask, pixels, grid


def test_prefill_then_decode_equals_full_forward():
  model = qwen2_5_vl.Qwen25VL(CONFIG)
  params = qwen2_5_vl.init_params(CONFIG, jax.random.key(1))
  ids, mask, pixels, grid = _inputs()
  full = model.apply({"params": params}, ids, pixels, grid, mask)
  positions, _ = get_rope_index(ids, mask, grid, config=CONFIG)
  embeds = model.apply({"params": params}, ids, pixels, grid, method=model.embed)
  decode = jax.jit(lambda p, e, pos, m, c, w: model.apply(
      {"params": p}, e, pos, m, c, w, method=model.decode))

  # Prefill 9 slots (row 1 only 6 real), then steps of 1 and 3 tokens at per-row offsets;
  # a 3-token chunk of row 1 has one padding token, overwritten by the next write.
  cache = KVCache.init(CONFIG, batch=2, max_length=24)
  prefill_mask = np.zeros((2, 9), bool)
  prefill_mask[0], prefill_mask[1, :6] = True, True
  logits, cache = decode(params, embeds[:, :9], positions[:, :, :9], prefill_mask, cache,
                         jnp.zeros(2, jnp.int32))
  np.testing.assert_allclose(logits[prefill_mask], full[:, :9][prefill_mask], atol=1e-5)
  # (chunk width, real tokens per row): rows advance by different amounts per step.
  schedule = [(1, (1, 1)), (3, (3, 2)), (1, (1, 1)), (3, (2, 0))]
  length = np.array([9, 6])
  rows = np.arange(2)[:, None]
  errors = []
  for chunk, take in schedule:
    real = np.arange(chunk)[None] < np.array(take)[:, None]
    idx = np.minimum(length[:, None] + np.arange(chunk)[None], ids.shape[1] - 1)
    logits, cache = decode(params, embeds[rows, idx], positions[:, rows, idx], real, cache,
                           jnp.asarray(length, jnp.int32))
    errors.append(np.abs(np.asarray(logits)[real] - np.asarray(full)[rows, idx][real]).max())
    length = length + np.array(take)
  np.testing.assert_array_equal(length, mask.sum(-1))
  assert max(errors) < 1e-5, errors
  np.testing.assert_array_equal(np.asarray(cache.valid).sum(-1), length)


def test_cache_rows_are_independent():
  """Writing into one row's cache leaves the other row's logits unchanged."""
  model = qwen2_5_vl.Qwen25VL(CONFIG)
  params = qwen2_5_vl.init_params(CONFIG, jax.random.key(2))
  ids = np.arange(3, 13, dtype=np.int32).reshape(2, 5)
  mask = np.ones_like(ids)
  positions, _ = get_rope_index(ids, mask, None, config=CONFIG)
  embeds = model.apply({"params": params}, ids, method=model.embed)
  cache = KVCache.init(CONFIG, batch=2, max_length=8)
  run = lambda e, pos, m, c, w: model.apply({"params": params}, e, pos, m, c, w,
                                            method=model.decode)
  logits_a, _ = run(embeds, positions, np.ones((2, 5), bool), cache, jnp.zeros(2, jnp.int32))
  only_row0 = np.array([[True] * 5, [False] * 5])
  logits_b, cache_b = run(embeds, positions, only_row0, cache, jnp.zeros(2, jnp.int32))
  np.testing.assert_allclose(logits_a[0], logits_b[0], atol=1e-6)
  assert not np.asarray(cache_b.valid)[1].any()
