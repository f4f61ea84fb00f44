"""M-RoPE positions equal transformers' get_rope_index; rotary angles follow mrope_section."""

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from retrv_jax.models.config import ModelConfig
from retrv_jax.models.rope import get_rope_index, mrope_cos_sin, text_positions

IMAGE, VSTART, VEND = 99, 97, 98


def _config(merge=2):
  return ModelConfig(
      vocab_size=100, hidden_size=64, intermediate_size=32, num_layers=1, num_heads=4,
      num_kv_heads=2, mrope_section=(2, 3, 3), image_token_id=IMAGE, video_token_id=96,
      vision_start_token_id=VSTART, vision_end_token_id=VEND, bos_token_id=1, eos_token_id=2,
      pad_token_id=0,
  ).replace(vision=ModelConfig().vision.__class__(spatial_merge_size=merge, out_hidden_size=64))


def _hf_rope_index(ids, mask, grids, merge):
  """transformers' implementation, called on a stand-in `self` that carries the config."""
  hf_config = Qwen2_5_VLConfig(vision_config={"spatial_merge_size": merge})

  class Stub:
    config = hf_config
    get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids

  ids_t = torch.tensor(ids)
  mm_types = (ids_t == IMAGE).int()
  pos, deltas = Qwen2_5_VLModel.get_rope_index(
      Stub(), ids_t, mm_types, image_grid_thw=torch.tensor(grids) if grids else None,
      attention_mask=torch.tensor(mask),
  )
  return pos.numpy(), deltas.numpy()[:, 0]


def _row(rng, grids, merge):
  """Random text with one vision span per grid."""
  row = list(rng.integers(3, 90, size=rng.integers(1, 5)))
  for t, h, w in grids:
    row += [VSTART] + [IMAGE] * (t * h * w // merge**2) + [VEND]
    row += list(rng.integers(3, 90, size=rng.integers(0, 4)))
  return row


@pytest.mark.parametrize("merge", [1, 2])
@pytest.mark.parametrize("side", ["right", "left"])
def test_rope_index_matches_transformers(merge, side):
  rng = np.random.default_rng(merge)
  per_row = [
      [(1, 4, 6), (1, 2, 2)],
      [],
      [(1, 6, 4)],
      [(2, 2, 4), (1, 4, 4), (1, 2, 2)],
  ]
  rows = [_row(rng, grids, merge) for grids in per_row]
  length = max(map(len, rows)) + 3
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros_like(ids)
  for i, row in enumerate(rows):
    span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
    ids[i, span], mask[i, span] = row, 1
  grids = [g for gs in per_row for g in gs]
  ref_pos, ref_delta = _hf_rope_index(ids, mask, grids, merge)
  pos, next_pos = get_rope_index(ids, mask, np.array(grids), config=_config(merge))
  np.testing.assert_array_equal(np.asarray(pos), ref_pos)
  np.testing.assert_array_equal(np.asarray(next_pos) - mask.sum(-1), ref_delta)


def test_text_only_positions_count_real_tokens():
  ids = np.array([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  pos, next_pos = get_rope_index(ids, mask, None, config=_config())
  np.testing.assert_array_equal(np.asarray(pos)[0], [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(next_pos, [3, 5])
  np.testing.assert_array_equal(text_positions(next_pos, 2)[2], [[3, 4], [5, 6]])


def test_mrope_sections_pick_their_position_row():
  config = _config()  # head_dim 16, sections (2, 3, 3)
  positions = np.stack([np.full((1, 1), 1), np.full((1, 1), 2), np.full((1, 1), 3)])
  cos, _ = mrope_cos_sin(positions, config)
  inv_freq = 1.0 / config.rope_theta ** (np.arange(0, 16, 2) / 16)
  section = np.array([0, 0, 1, 1, 1, 2, 2, 2])
  expected = np.cos((section + 1) * inv_freq)
  np.testing.assert_allclose(np.asarray(cos)[0, 0], np.concatenate([expected, expected]),
                             rtol=1e-6)
