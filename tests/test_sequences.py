"""Teacher-forced rows built from segments (`retrv_jax.stages.sequences`): hole-free
positions, packing, candidate order, and parity of an assembled row with a plain forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_bench import make_bench

from retrv_jax.data.pipeline import PipelineConfig, make_iterator, split_host_fields
from retrv_jax.data.tokenizer import load_tokenizer
from retrv_jax.models import reranker
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.config import tiny
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.stages import sequences

K = 4
DESCRIBED = 2  # Candidates described per example.


def _segment(embeds, mask, offsets, advance) -> sequences.Segment:
  return sequences.Segment(jnp.asarray(embeds, jnp.float32), jnp.asarray(mask, bool),
                           jnp.asarray(offsets, jnp.int32), jnp.asarray(advance, jnp.int32))


def test_assemble_continues_positions_over_holes():
  # Row 0: text "a b _", a block with a 2-D layout (advance 3), text "_ c d".
  # Row 1: text "a _ _", the block with one slot fewer (advance 2), text "c _ d".
  text1 = sequences.text_segment(jnp.zeros((2, 3, 1)), jnp.array([[1, 1, 0], [1, 0, 0]]))
  block_offsets = np.zeros((3, 2, 3), np.int32)
  block_offsets[:, 0] = [[0, 1, 1], [0, 1, 2], [0, 1, 2]]  # (t, h, w) of a tiny image.
  block_offsets[:, 1] = [[0, 1, 0], [0, 1, 0], [0, 1, 0]]
  block = _segment(np.ones((2, 3, 1)), [[1, 1, 1], [1, 1, 0]], block_offsets, [3, 2])
  text2 = sequences.text_segment(jnp.full((2, 3, 1), 2.0), jnp.array([[0, 1, 1], [1, 0, 1]]))

  embeds, positions, mask = sequences.assemble([text1, block, text2])

  np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 1, 1, 0, 1, 1], [1, 0, 0, 1, 1, 0, 1, 0, 1]])
  np.testing.assert_array_equal(embeds[..., 0], [[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 2)
  # Holes sit at 0; real slots continue from the previous segment's advance.
  np.testing.assert_array_equal(positions[:, 0], [[0, 1, 0, 2, 3, 3, 0, 5, 6],
                                                  [0, 1, 0, 2, 3, 4, 0, 5, 6],
                                                  [0, 1, 0, 2, 3, 4, 0, 5, 6]])
  np.testing.assert_array_equal(positions[:, 1], [[0, 0, 0, 1, 2, 0, 3, 0, 4]] * 3)


def test_compact_moves_real_slots_first_in_order():
  mask = jnp.array([[0, 1, 0, 1, 1], [1, 1, 0, 0, 1]], bool)
  embeds = jnp.arange(10, dtype=jnp.float32).reshape(2, 5, 1)
  positions = jnp.stack([jnp.arange(10).reshape(2, 5) + 100 * a for a in range(3)])

  out_embeds, out_positions, out_mask = sequences.compact(embeds, positions, mask)

  np.testing.assert_array_equal(out_mask, [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(out_embeds[:, :3, 0], [[1, 3, 4], [5, 6, 9]])
  real = np.array([[1, 3, 4], [5, 6, 9]])
  for a in range(3):
    np.testing.assert_array_equal(out_positions[a, :, :3], real + 100 * a)


def test_candidate_order_puts_the_positive_first():
  order = sequences.candidate_order(jnp.array([2, 0, 3, -1]), 4, 3)
  np.testing.assert_array_equal(order, [[2, 0, 1], [0, 1, 2], [3, 0, 1], [0, 1, 2]])
  assert order.dtype == jnp.int32


def test_select_candidates_flattens_in_example_order():
  x = jnp.arange(2 * 4 * 3).reshape(2, 4, 3)
  picked = sequences.select_candidates(x, jnp.array([[3, 1], [0, 2]]))
  np.testing.assert_array_equal(picked, [x[0, 3], x[0, 1], x[1, 0], x[1, 2]])


# ------------------------------------------------------------------ against the model


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
  """An align batch of one text query and one image query, encoded by a random model."""
  root = make_bench(tmp_path_factory, k=K, num_train=2, num_val=1, num_test=1)
  tok = load_tokenizer()
  data = PipelineConfig(data_dir=root, source="mbeir", batch_size=4, num_candidates=K,
                        prompt_buckets=(256,), max_candidate_tokens=32,
                        max_description_tokens=16, shuffle=False)
  batch, _ = split_host_fields(next(make_iterator("align", data, tok)))
  assert set(batch["task_id"].tolist()) == {0, 7}  # Text and image queries.
  base = tiny()
  model_config = base.replace(num_layers=1, vision=dataclasses.replace(
      base.vision, depth=1, fullatt_block_indexes=(0,)))
  model = reranker.Reranker(model_config, CompressionConfig())
  params = jax.jit(lambda key: reranker.init_params(model_config, CompressionConfig(), key))(
      jax.random.key(0))
  encode = jax.jit(lambda p, b: model.apply({"params": p}, b, method=model.encode))
  inputs = encode(params, {k: batch[k] for k in reranker.ENCODE_KEYS})
  return tok, batch, model_config, params, inputs


def _candidate_pixels(batch, b: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Patches `[n, D]` and grid `[1, 3]` of candidate k of example b (slot order b, 0..K)."""
  grids = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
  sizes = np.prod(grids, axis=-1)
  slot = b * (1 + K) + 1 + k
  start = int(np.sum(sizes[:slot]))
  return batch["pixel_values"][start:start + sizes[slot]], grids[slot:slot + 1]


def test_content_row_equals_plain_forward_of_the_same_tokens(encoded):
  tok, batch, model_config, params, inputs = encoded
  backbone = Qwen25VL(model_config)
  apply = lambda method, *a, **kw: backbone.apply({"params": params["backbone"]}, *a,
                                                  method=method, **kw)
  index = sequences.candidate_order(jnp.asarray(batch["gt_index"]), K, DESCRIBED)
  targets = sequences.DescribeTargets.from_batch(batch, index)
  rows = sequences.DescribeRows(tok, query_tokens=64)
  embed = lambda ids: apply(Qwen25VL.embed, ids)
  x = sequences.block_segment(inputs, index)
  embeds, positions, mask = rows.content(embed, x, embed(targets.content_ids),
                                         targets.content_mask)
  assert not np.all(np.asarray(mask)), "the rows should hold holes"
  logits = np.asarray(jax.jit(lambda e, p, m: apply(Qwen25VL.forward_embeds, e, p, m))(
      embeds, positions, mask))

  # The same tokens as plain right-padded sequences, each with its candidate's image.
  prefix, suffix = rows.content_ids
  sequences_ids, pixels, grids = [], [], []
  for n in range(index.shape[0]):
    b, k = n // DESCRIBED, int(index[n // DESCRIBED, n % DESCRIBED])
    block = batch["splice_ids"][b, k][batch["splice_mask"][b, k].astype(bool)]
    target = np.asarray(targets.content_ids[n])[np.asarray(targets.content_mask[n])]
    sequences_ids.append(np.concatenate([prefix, block, suffix, target]).astype(np.int32))
    if np.any(block == model_config.image_token_id):
      patches, grid = _candidate_pixels(batch, b, k)
      pixels.append(patches)
      grids.append(grid)
  assert grids, "some described candidate should have an image"
  length = max(len(s) for s in sequences_ids)
  ids = np.stack([np.pad(s, (0, length - len(s))) for s in sequences_ids])
  plain_mask = np.stack([np.arange(length) < len(s) for s in sequences_ids]).astype(np.int32)
  expected = np.asarray(jax.jit(lambda i, p, g, m: apply(Qwen25VL.__call__, i, p, g, m))(
      ids, np.concatenate(pixels), np.concatenate(grids), plain_mask))

  for n, plain in enumerate(sequences_ids):
    real = np.asarray(mask[n])
    assert real.sum() == len(plain)
    np.testing.assert_allclose(logits[n][real], expected[n, :len(plain)], atol=1e-4, rtol=0)


def test_query_segment_keeps_the_prompt_layout_of_an_image_query(encoded):
  _, batch, model_config, _, inputs = encoded
  query_mask = np.asarray(batch["query_mask"], bool)
  size, repeats = 48, 3
  seg = sequences.query_segment(inputs, jnp.asarray(query_mask), size, repeats)
  b = query_mask.shape[0]
  assert seg.embeds.shape[:2] == (b * repeats, size) and seg.offsets.shape == (3, b * repeats, size)

  image_rows = 0
  for row in range(b):
    slots = np.flatnonzero(query_mask[row])
    pos = np.asarray(inputs.prompt_positions)[:, row]
    n = len(slots)
    for r in range(repeats):  # Each example's row, repeated in place.
      i = row * repeats + r
      np.testing.assert_array_equal(seg.mask[i], np.arange(size) < n)
      np.testing.assert_array_equal(seg.offsets[:, i, :n], pos[:, slots] - pos[:, slots[0], None])
      np.testing.assert_array_equal(seg.offsets[:, i, n:], 0)
      np.testing.assert_array_equal(seg.embeds[i, :n], np.asarray(inputs.prompt_embeds)[row, slots])
    # The prompt's token after the query sits exactly `advance` past the query's start.
    after = slots[-1] + 1
    np.testing.assert_array_equal(pos[:, after], pos[:, slots[0]] + int(seg.advance[row * repeats]))
    is_image = batch["input_ids"][row, slots] == model_config.image_token_id
    if is_image.any():
      image_rows += 1
      image = seg.offsets[:, row * repeats, :n][:, is_image]
      # One 2x2 merged image: temporal offsets equal, height and width span two values each.
      assert len(set(image[0].tolist())) == 1
      assert len(set(image[1].tolist())) == 2 and len(set(image[2].tolist())) == 2
      # Its extent is shorter than its token count: positions are not consecutive.
      assert int(seg.advance[row * repeats]) < n
  assert image_rows > 0


def test_query_segment_of_size_zero_keeps_the_whole_query(encoded):
  """compression.max_query_tokens = 0 means "the whole prompt" (CompressionConfig), and
  DescribeRows passes it as the size: the relation rows must still hold the query."""
  _, batch, _, _, inputs = encoded
  query_mask = jnp.asarray(batch["query_mask"], bool)
  seg = sequences.query_segment(inputs, query_mask, 0, 1)
  np.testing.assert_array_equal(np.sum(seg.mask, axis=-1), np.sum(query_mask, axis=-1))
