"""bfloat16 compute (float32 params) stays close to float32 on the tiny preset."""

import jax
import numpy as np

from retrv_jax.models import qwen2_5_vl
from retrv_jax.models.config import tiny


def test_bfloat16_compute_is_close_to_float32():
  config = tiny()
  params = qwen2_5_vl.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  merge = config.vision.spatial_merge_size
  grid = np.array([[1, 4 * merge, 4 * merge]], np.int32)
  pixels = rng.normal(size=(16 * merge**2, config.vision.patch_dim)).astype(np.float32)
  text = rng.integers(3, 4000, size=48)
  ids = np.concatenate([text[:8], [config.vision_start_token_id], [config.image_token_id] * 16,
                        [config.vision_end_token_id], text[8:]])[None].astype(np.int32)

  def logits(dtype):
    model = qwen2_5_vl.Qwen25VL(config.replace(dtype=dtype))
    return np.asarray(model.apply({"params": params}, ids, pixels, grid))

  f32, bf16 = logits("float32"), logits("bfloat16")
  gap = np.abs(f32 - bf16).max() / np.abs(f32).max()
  print(f"bf16 vs f32: max |dlogit| / max |logit| = {gap:.4f}")
  assert gap < 0.05
  p32, p16 = jax.nn.softmax(f32), jax.nn.softmax(bf16)
  kl = np.asarray(np.sum(p32 * (np.log(p32) - np.log(p16)), -1)).mean()
  assert kl < 1e-2, kl
