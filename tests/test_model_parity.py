"""Full-model logits equal transformers' (float32, max |dlogit| <= 1e-4) over many configs.

Each config is saved as a Hugging Face checkpoint, loaded with `retrv_jax.hf`, and both
implementations run on: text only; one image of 10x12 patches (several windows, partial
at the edges); two images of different sizes in one prompt; a padded batch of 2 (left
and right padding). Besides hand-picked configs, random valid configs are drawn, since
parity must hold for any valid config, not only these.
"""

import numpy as np
import pytest
import torch
from hf_models import save_hf_model, tiny_config

from retrv_jax import config as config_lib
from retrv_jax.hf import load_pretrained
from retrv_jax.models.qwen2_5_vl import Qwen25VL

ATOL = 1e-4

CONFIGS = {
    "untied_gqa2_window2": tiny_config(),
    "tied_mha_window1_no_full": tiny_config(
        tie_word_embeddings=True, num_kv_heads=4, mrope_section=(4, 2, 2),
        vision={"window_size": 28, "fullatt_block_indexes": ()},
    ),
    "gqa4_window4_all_full": tiny_config(
        num_kv_heads=1, mrope_section=(1, 3, 4),
        vision={"window_size": 112, "fullatt_block_indexes": (0, 1, 2), "depth": 3},
    ),
}


def _random_config(seed):
  """A random valid tiny config: head counts, GQA ratio, sections, windows, depth."""
  rng = np.random.default_rng(seed)
  heads = int(rng.choice([2, 4, 8]))
  head_dim = int(rng.choice([8, 16]))
  kv = int(rng.choice([d for d in (1, 2, 4, 8) if heads % d == 0]))
  half = head_dim // 2
  cut = np.sort(rng.choice(np.arange(1, half), size=2, replace=False))
  sections = (int(cut[0]), int(cut[1] - cut[0]), int(half - cut[1]))
  depth = int(rng.integers(1, 4))
  full = tuple(int(i) for i in range(depth) if rng.random() < 0.4)
  config = tiny_config(
      hidden_size=heads * head_dim, num_heads=heads, num_kv_heads=kv, mrope_section=sections,
      num_layers=int(rng.integers(1, 4)), tie_word_embeddings=bool(rng.random() < 0.5),
      vision={"depth": depth, "fullatt_block_indexes": full,
              "window_size": 28 * int(rng.integers(1, 5)), "num_heads": int(rng.choice([1, 2]))},
  )
  return config_lib.validate_model(config)


for _seed in range(3):
  CONFIGS[f"random_{_seed}"] = _random_config(_seed)


def _image_span(config, grid):
  n = int(np.prod(grid)) // config.vision.spatial_merge_size**2
  return [config.vision_start_token_id] + [config.image_token_id] * n + [
      config.vision_end_token_id]


def _cases(config):
  """(name, rows of token ids, grids in order of appearance, padding side)."""
  rng = np.random.default_rng(0)
  text = lambda n: [int(t) for t in rng.integers(3, 240, size=n)]
  big, small = (1, 10, 12), (1, 6, 4)
  return [
      ("text", [text(17)], [], "right"),
      ("one_image", [text(3) + _image_span(config, big) + text(5)], [big], "right"),
      ("two_images",
       [text(2) + _image_span(config, big) + text(3) + _image_span(config, small) + text(4)],
       [big, small], "right"),
      ("padded_right", [text(2) + _image_span(config, small) + text(6), text(5)], [small],
       "right"),
      ("padded_left", [text(7), text(2) + _image_span(config, small) + text(3)], [small], "left"),
  ]


def _pad(rows, side):
  length = max(map(len, rows))
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros_like(ids)
  for i, row in enumerate(rows):
    span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
    ids[i, span], mask[i, span] = row, 1
  return ids, mask


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, tmp_path_factory):
  config = CONFIGS[request.param]
  path = tmp_path_factory.mktemp(request.param)
  hf = save_hf_model(path, config, seed=1)
  loaded_config, params = load_pretrained(path)
  return hf, Qwen25VL(loaded_config), params


@pytest.mark.parametrize("case", ["text", "one_image", "two_images", "padded_right",
                                  "padded_left"])
def test_logits_match_transformers(models, case):
  hf, model, params = models
  config = model.config
  _, rows, grids, side = next(c for c in _cases(config) if c[0] == case)
  ids, mask = _pad(rows, side)
  rng = np.random.default_rng(1)
  kwargs = {}
  pixels = grid = None
  if grids:
    grid = np.array(grids, np.int64)
    num_patches = int(np.prod(grid, axis=-1).sum())
    pixels = rng.normal(size=(num_patches, config.vision.patch_dim)).astype(np.float32)
    kwargs = {"pixel_values": torch.tensor(pixels), "image_grid_thw": torch.tensor(grid)}
  with torch.no_grad():
    expected = hf(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
        mm_token_type_ids=torch.tensor((ids == config.image_token_id).astype(np.int64)), **kwargs
    ).logits.numpy()
  ours = np.asarray(model.apply({"params": params}, ids.astype(np.int32), pixels, grid, mask))
  real = mask.astype(bool)
  diff = np.abs(ours[real] - expected[real]).max()
  assert diff <= ATOL, f"max |dlogit| = {diff:.2e}"
  assert np.abs(expected[real]).max() > 0.1  # The comparison is not between near-zeros.
