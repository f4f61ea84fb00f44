"""The re-ranker's encoder against the plain Qwen2.5-VL model on the same tokens and images.

Oracle: `Qwen25VL.apply` on token ids + pixel values (itself checked against transformers
in test_model_parity); the re-ranker must build the same embeddings and M-RoPE positions
from a `PromptBatch`, and splice blocks that continue a sequence exactly.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrv_jax import parallel
from retrv_jax.data import prompts as P
from retrv_jax.data.tokenizer import load_tokenizer
from retrv_jax.models import reranker as R
from retrv_jax.models.compression import CompressionConfig, InformationCompression
from retrv_jax.models.config import VisionConfig, tiny
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.models.rope import get_rope_index

CONFIG = tiny().replace(
    hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    mrope_section=(1, 1, 2),
    vision=VisionConfig(depth=1, hidden_size=16, intermediate_size=24, num_heads=2,
                        out_hidden_size=32, patch_size=2, window_size=8,
                        fullatt_block_indexes=(0,)),
)
K = 3
TOK = load_tokenizer()
EXAMPLES = [
    P.Example("Find the image.", P.Item("a red circle", (1, 4, 4)),
              (P.Item("a blue star", (1, 2, 4)), P.Item("a red circle on white"),
               P.Item("", (1, 4, 2)))),
    P.Example("Find the caption.", P.Item("a green square"),
              (P.Item("a green square", (1, 2, 2)), P.Item("blue"), P.Item("a star"))),
]
ICM = CompressionConfig()
NO_ICM = CompressionConfig(enabled=False)


def prompt_config(icm: CompressionConfig, **changes) -> P.PromptConfig:
  base = dict(num_candidates=K, prompt_buckets=(96, 160), max_candidate_tokens=12,
              system_prompt="Rank.", compress_candidates=icm.enabled,
              candidate_slots=icm.candidate_slots)
  return P.PromptConfig(**{**base, **changes})


def images_of(examples, seed=0):
  """Random patches per (example, slot); slot 0 = query, slot k = candidate k."""
  rng = np.random.default_rng(seed)
  out = {}
  for b, ex in enumerate(examples):
    for s, item in enumerate((ex.query, *ex.candidates)):
      if item.image_grid_thw:
        n = int(np.prod(item.image_grid_thw))
        out[b, s] = rng.normal(size=(n, CONFIG.vision.patch_dim)).astype(np.float32)
  return out


def build(icm, examples=EXAMPLES, seed=0, num_patches=None, **changes):
  batch = P.build_batch(examples, TOK, prompt_config(icm, **changes))
  images = images_of(examples, seed)
  pixels = np.concatenate([images[key] for key in sorted(images)])
  arrays = R.batch_from_prompts(batch, pixels, num_patches=num_patches, compression=icm)
  return batch, images, arrays


@pytest.fixture(scope="module")
def params():
  return jax.jit(R.init_params, static_argnums=(0, 1))(CONFIG, ICM, jax.random.key(0))


@functools.partial(jax.jit, static_argnums=0)
def encode(icm, params, arrays):
  return R.Reranker(CONFIG, icm).apply({"params": params}, arrays, method=R.Reranker.encode)


@pytest.fixture(scope="module")
def encoded(params):
  """(PromptBatch, images, arrays, RerankInputs) for both modes, right padded."""
  out = {}
  for icm in (ICM, NO_ICM):
    batch, images, arrays = build(icm)
    out[icm.enabled] = batch, images, arrays, encode(icm, params, arrays)
  return out


def backbone_apply(params, ids, mask, images, grids, method=None):
  """The plain model on token ids and the images they show (in order of appearance)."""
  pixels = np.concatenate(images) if images else None
  grids = np.asarray(grids, np.int32) if images else None
  if method is None:
    return _backbone(params["backbone"], ids, pixels, grids, mask)
  return _backbone(params["backbone"], ids, pixels, grids, method=method)


@functools.partial(jax.jit, static_argnames="method")
def _backbone(params, ids, pixels, grids, mask=None, method=None):
  model = Qwen25VL(CONFIG)
  if method is None:
    return model.apply({"params": params}, ids, pixels, grids, mask)
  return model.apply({"params": params}, ids, pixels, grids, method=method)


def shown_images(examples, images, batch, b):
  """Images (patches, grid) of row b's prompt in order of appearance."""
  slots = [s for s in range(1 + K) if batch.image_spans[b, s, 1] > 0]
  items = (examples[b].query, *examples[b].candidates)
  return [images[b, s] for s in slots], [items[s].image_grid_thw for s in slots]


@pytest.mark.parametrize("side", ["right", "left"])
def test_without_icm_equals_backbone(params, side):
  batch, images, arrays = build(NO_ICM, padding_side=side)
  assert batch.attention_mask[:, 0 if side == "right" else -1].all()
  assert not batch.attention_mask[:, -1 if side == "right" else 0].all()
  assert (batch.image_spans[:, 1:, 1] > 0).any()  # Candidate images are in the prompt.
  logits = jax.jit(R.Reranker(CONFIG, NO_ICM).apply)({"params": params}, arrays)
  pixels, grids = [], []
  for b in range(len(EXAMPLES)):
    p, g = shown_images(EXAMPLES, images, batch, b)
    pixels, grids = pixels + p, grids + g
  expected = backbone_apply(params, batch.input_ids, batch.attention_mask, pixels, grids)
  mask = batch.attention_mask
  np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(expected)[mask], atol=1e-5)


def test_icm_prompt_embeddings(params, encoded):
  batch, images, _, inputs = encoded[True]
  embed = lambda *a: np.asarray(backbone_apply(params, *a, method=Qwen25VL.embed))
  b_range = range(len(EXAMPLES))
  plain = np.concatenate([embed(batch.input_ids[b : b + 1], None,
                                *shown_images(EXAMPLES, images, batch, b)) for b in b_range])
  slot = batch.slot_index >= 0
  assert slot.sum() == 2 * K * len(EXAMPLES)
  # Text embeddings exactly; image features up to the vision tower's batch-size rounding.
  np.testing.assert_allclose(np.asarray(inputs.prompt_embeds)[~slot], plain[~slot], atol=1e-6)

  # The slots hold the ICM run on the plain embeddings of each candidate block.
  keys = [(b, k + 1) for b in b_range for k in range(K) if (b, k + 1) in images]
  blocks = embed(batch.candidate_ids.reshape(len(EXAMPLES) * K, -1), None,
                 [images[key] for key in keys],
                 [EXAMPLES[b].candidates[s - 1].image_grid_thw for b, s in keys])
  blocks = blocks.reshape(batch.candidate_ids.shape + (-1,))
  compressed = InformationCompression(CONFIG, ICM).apply(
      {"params": params["icm"]}, blocks, batch.candidate_mask, plain, batch.query_mask)
  for b in b_range:
    for k in range(K):
      for s in range(2):
        got = inputs.prompt_embeds[b, batch.slot_positions[b, k, s]]
        np.testing.assert_allclose(got, compressed[b, k, s], atol=1e-6)
  np.testing.assert_allclose(inputs.splice_embeds[:, :, 1:-1][batch.candidate_mask],
                             blocks[batch.candidate_mask], atol=1e-6)

  grids = [g for b in b_range for g in shown_images(EXAMPLES, images, batch, b)[1]]
  positions, next_position = get_rope_index(batch.input_ids, batch.attention_mask,
                                            np.asarray(grids), config=CONFIG)
  np.testing.assert_array_equal(inputs.prompt_positions, positions)
  np.testing.assert_array_equal(inputs.next_position, next_position)


def _spliced_forward(params, inputs, batch, k, after_token):
  """Our side: prompt, block k at next_position, then one text token; right padded."""
  b_size, t = batch.input_ids.shape
  ls = batch.splice_ids.shape[-1]
  total = t + ls + 1
  embeds = np.zeros((b_size, total, CONFIG.hidden_size), np.float32)
  positions = np.zeros((3, b_size, total), np.int32)
  mask = np.zeros((b_size, total), bool)
  after = np.asarray(backbone_apply(params, np.full((1, 1), after_token), None, [], [],
                                    method=Qwen25VL.embed))[0, 0]
  for b in range(b_size):
    n, m = batch.lengths[b], batch.splice_mask[b, k].sum()
    start = int(inputs.next_position[b])
    embeds[b, :n] = inputs.prompt_embeds[b, :n]
    embeds[b, n : n + m] = inputs.splice_embeds[b, k, :m]
    embeds[b, n + m] = after
    positions[:, b, :n] = inputs.prompt_positions[:, b, :n]
    positions[:, b, n : n + m] = start + np.asarray(inputs.splice_offsets)[:, b, k, :m]
    positions[:, b, n + m] = start + int(inputs.splice_advance[b, k])
    mask[b, : n + m + 1] = True
  logits = jax.jit(functools.partial(Qwen25VL(CONFIG).apply, method=Qwen25VL.forward_embeds))(
      {"params": params["backbone"]}, embeds, positions, mask)
  return np.asarray(logits), positions, mask


@pytest.mark.parametrize("icm", [NO_ICM, ICM], ids=["no_icm", "icm"])
def test_splice_continues_the_sequence(params, encoded, icm):
  """prompt + splice block (+ a text token) == the plain model on the concatenated ids."""
  batch, images, _, inputs = encoded[icm.enabled]
  k = 0  # Candidate 1 has an image in both examples.
  after_token = TOK.encode("a", allow_special=False)[0]
  ours, positions, mask = _spliced_forward(params, inputs, batch, k, after_token)

  ids = np.full(mask.shape, TOK.pad, np.int32)
  pixels, grids = [], []
  for b in range(len(EXAMPLES)):
    block = batch.splice_ids[b, k][batch.splice_mask[b, k]]
    row = [*batch.input_ids[b, : batch.lengths[b]], *block, after_token]
    ids[b, : len(row)] = row
    p, g = shown_images(EXAMPLES, images, batch, b)
    pixels += p + [images[b, k + 1]]
    grids += g + [EXAMPLES[b].candidates[k].image_grid_thw]
  expected_positions, _ = get_rope_index(ids, mask, np.asarray(grids), config=CONFIG)
  np.testing.assert_array_equal(positions, expected_positions)
  if not icm.enabled:  # With the ICM the prompt holds t_con/t_rel, which no id gives.
    expected = backbone_apply(params, ids, mask, pixels, grids)
    np.testing.assert_allclose(ours[mask], np.asarray(expected)[mask], atol=1e-5)
  # The splice blocks' own embeddings are the plain model's, in both modes.
  blocks = backbone_apply(params, batch.splice_ids[:, k], None,
                          [images[b, k + 1] for b in range(len(EXAMPLES))],
                          [ex.candidates[k].image_grid_thw for ex in EXAMPLES],
                          method=Qwen25VL.embed)
  real = batch.splice_mask[:, k]
  np.testing.assert_allclose(inputs.splice_embeds[:, k][real], np.asarray(blocks)[real],
                             atol=1e-6)


def test_advance_of_text_only_and_image_blocks(encoded):
  batch, _, _, inputs = encoded[True]
  for b in range(len(EXAMPLES)):
    for k in range(K):
      n = int(batch.splice_mask[b, k].sum())
      grid = EXAMPLES[b].candidates[k].image_grid_thw
      # An image of h x w merged tokens spends max(h, w) positions on h * w tokens.
      expected = n
      if grid:
        h, w = grid[1] // 2, grid[2] // 2
        expected = n - h * w + max(h, w)
      assert inputs.splice_advance[b, k] == expected, (b, k)
      offsets = np.asarray(inputs.splice_offsets)[:, b, k]
      assert (offsets[:, 0] == 0).all() and (offsets[:, n:] == 0).all()


def test_one_slot_layouts(params, encoded):
  """'Without t_con' / 'without t_rel': one slot per candidate, filled with the right token."""
  full_batch, _, _, full = encoded[True]
  for icm in (CompressionConfig(use_content=False), CompressionConfig(use_relation=False)):
    batch, _, arrays = build(icm)
    s = 1 if icm.use_relation else 0
    assert (batch.slot_positions[..., 1 - s] == -1).all()
    assert (batch.slot_positions[..., s] >= 0).all()
    assert (batch.slot_index >= 0).sum() == K * len(EXAMPLES)
    icm_params = dict(params)
    if not icm.use_relation:
      icm_params["icm"] = {n: v for n, v in params["icm"].items() if n != "relate"}
    inputs = encode(icm, icm_params, arrays)
    for b in range(len(EXAMPLES)):
      got = inputs.prompt_embeds[b, batch.slot_positions[b, :, s]]
      want = full.prompt_embeds[b, full_batch.slot_positions[b, :, s]]
      np.testing.assert_allclose(got, want, atol=1e-6)  # Same params, same token.
    with pytest.raises(ValueError, match="candidate_slots"):
      R.batch_from_prompts(batch, arrays["pixel_values"], compression=ICM)


def test_jit_compiles_once_per_bucket(params):
  traces = []
  model = R.Reranker(CONFIG, ICM)

  @jax.jit
  def run(p, arrays):
    traces.append(1)
    inputs = model.apply({"params": p}, arrays, method=R.Reranker.encode)
    return inputs, model.apply({"params": p}, inputs, method=R.Reranker.prompt_logits)

  other = [P.Example("Find it.", P.Item("a blue star", (1, 2, 2)),
                     (P.Item("blue", (1, 4, 4)), P.Item("a star", (1, 2, 2)), P.Item("x"))),
           EXAMPLES[1]]
  _, _, first = build(ICM, num_patches=64)
  _, _, second = build(ICM, other, seed=1, num_patches=64)
  assert first["input_ids"].shape == second["input_ids"].shape
  assert not np.array_equal(first["image_grid_thw"], second["image_grid_thw"])
  inputs_a, logits_a = run(params, first)
  inputs_b, logits_b = run(params, second)
  assert len(traces) == 1
  eager = encode(ICM, params, second)
  np.testing.assert_allclose(inputs_b.prompt_embeds, eager.prompt_embeds, atol=1e-6)
  np.testing.assert_array_equal(inputs_b.splice_offsets, eager.splice_offsets)
  assert bool(jnp.isfinite(logits_a).all()) and not np.allclose(logits_a, logits_b)


def test_batch_from_prompts_checks_and_pads(params):
  batch, images, arrays = build(ICM, num_patches=64)
  assert set(arrays) == set(R.ENCODE_KEYS) and arrays["pixel_values"].shape[0] == 64
  pixels = np.concatenate([images[key] for key in sorted(images)])
  with pytest.raises(ValueError, match=r"pixel_values: expected \[36, patch_dim\]"):
    R.batch_from_prompts(batch, pixels[:-4])
  with pytest.raises(ValueError, match="num_patches=38"):
    R.batch_from_prompts(batch, pixels, num_patches=38)
  with pytest.raises(ValueError, match="num_patches=32"):
    R.batch_from_prompts(batch, pixels, num_patches=32)
  with pytest.raises(ValueError, match="compress_candidates=False"):
    R.batch_from_prompts(batch, pixels, compression=NO_ICM)
  text_only = [P.Example("Find.", P.Item("a"), (P.Item("b"), P.Item("c"), P.Item("d")))]
  empty = P.build_batch(text_only, TOK, prompt_config(ICM))
  arrays = R.batch_from_prompts(empty, np.zeros((0, CONFIG.vision.patch_dim)))
  assert arrays["pixel_values"].shape == (4, CONFIG.vision.patch_dim)
  with pytest.raises(ValueError, match="batch lacks"):
    encode(ICM, params, {k: v for k, v in arrays.items() if k != "splice_ids"})


def test_params_tree(params):
  abstract = R.abstract_params(CONFIG, ICM)
  assert set(abstract) == {"backbone", "icm"}
  assert set(R.abstract_params(CONFIG, NO_ICM)) == {"backbone"}
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(params) == shapes(jax.tree.map(lambda x: x.value, abstract,
                                               is_leaf=lambda x: hasattr(x, "value")))
  table = params["backbone"]["language_model"]["embed_tokens"]["embedding"]
  np.testing.assert_allclose(params["icm"]["output_scale"], jnp.sqrt(jnp.mean(table**2, 0)),
                             rtol=1e-5)


def test_sharded_encode_equals_single_device(params):
  """Batch over (data, fsdp), heads and mlp over tensor: the same inputs and logits."""
  examples = EXAMPLES * 2
  _, _, arrays = build(ICM, examples, num_patches=80)
  model = R.Reranker(CONFIG, ICM)

  def run(p, a):
    inputs = model.apply({"params": p}, a, method=R.Reranker.encode)
    return inputs, model.apply({"params": p}, inputs, method=R.Reranker.prompt_logits)

  expected_inputs, expected = jax.jit(run)(params, arrays)
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = parallel.DEFAULT_RULES
  sharded_params = jax.device_put(
      params, parallel.shardings_of(R.abstract_params(CONFIG, ICM), mesh, rules))
  pixels = arrays.pop("pixel_values")
  sharded = {**parallel.shard_batch(arrays, mesh), "pixel_values": pixels}
  with jax.set_mesh(mesh), parallel.with_rules(rules):
    inputs, logits = jax.jit(run)(sharded_params, sharded)
  assert logits.sharding.shard_shape(logits.shape)[0] == 1
  q_kernel = sharded_params["icm"]["summarize"]["attention_0"]["q_proj"]["kernel"]
  assert q_kernel.sharding.shard_shape(q_kernel.shape) == (16, 2, 8)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(inputs.prompt_embeds, expected_inputs.prompt_embeds, atol=1e-6)


def test_packed_query_equals_whole_prompt(params, encoded):
  """ATT2 over the query packed into a few slots = ATT2 over the masked prompt."""
  _, _, arrays, inputs = encoded[True]
  longest = int(np.asarray(arrays["query_mask"]).sum(-1).max())
  packed = encode(dataclasses.replace(ICM, max_query_tokens=longest), params, arrays)
  np.testing.assert_allclose(np.asarray(packed.prompt_embeds), np.asarray(inputs.prompt_embeds),
                             atol=1e-6)
  too_small = dataclasses.replace(ICM, max_query_tokens=longest - 1)
  with pytest.raises(ValueError, match="max_query_tokens"):
    R.Reranker(CONFIG, too_small).apply({"params": params}, arrays, method=R.Reranker.encode)
