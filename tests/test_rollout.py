"""The rollout engine: inspection splices inside jit, learner == sampler log-probs, G sharing.

The model is the small config of test_kv_cache (vocab 64). Token ids used here: '0'..'9'
are 40..49, <inspection-index-start> 50, <inspection-index-end> 51, <|cand_start|> 52,
<|cand_end|> 53, stop 2; 60/61/63 are vision start/end/pad.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kv_cache import CONFIG

from retrv_jax import parallel
from retrv_jax.models import qwen2_5_vl
from retrv_jax.models.reranker import RerankInputs
from retrv_jax.models.rope import get_rope_index
from retrv_jax.rl import learner, sampler

DIGITS = tuple(range(40, 50))
START, END, CAND_START, CAND_END, STOP = 50, 51, 52, 53, 2
K, BLOCK = 3, 10
SAMPLING = sampler.SamplingParams(
    max_new_tokens=14, temperature=1.0, stop_token_ids=(STOP,), inspect_start_id=START,
    inspect_end_id=END, digit_ids=DIGITS + (39,), digit_values=tuple(range(10)) + (2,),
    digit_lengths=(1,) * 10 + (2,), max_inspections=2)  # Token 39 reads "02".
MODEL = qwen2_5_vl.Qwen25VL(CONFIG)
PARAMS = qwen2_5_vl.init_params(CONFIG, jax.random.key(7))
IMAGE = [60, 63, 63, 63, 63, 61]  # One 1x4x4 patch grid = 4 merged tokens.
GRID = (1, 4, 4)


def _pad(rows, length):
  ids = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    ids[i, : len(row)] = row
  return ids, ids != 0


def _pixels(count, seed):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(16 * count, CONFIG.vision.patch_dim)).astype(np.float32)


class Prompts:
  """Two prompts (the first with an image) and K=3 candidates each (some with images)."""

  def __init__(self):
    self.prompt_rows = [[5, 6] + IMAGE + [7, 8, 9], [10, 11, 12, 13]]
    self.block_rows = [
        [[CAND_START, 20, 21, CAND_END], [CAND_START, 22] + IMAGE + [CAND_END],
         [CAND_START, 23, 24, 25, CAND_END]],
        [[CAND_START] + IMAGE + [26, CAND_END], [CAND_START, 27, CAND_END],
         [CAND_START, 28, 29, CAND_END]],
    ]
    self.prompt_pixels = _pixels(1, 0)
    flat_blocks = [b for rows in self.block_rows for b in rows]
    self.block_images = [i for i, b in enumerate(flat_blocks) if 63 in b]
    self.block_pixels = {i: _pixels(1, 10 + i) for i in self.block_images}

  def inputs(self, params=PARAMS) -> RerankInputs:
    ids, mask = _pad(self.prompt_rows, 14)
    grid = np.array([GRID], np.int32)
    base = RerankInputs.from_token_ids(MODEL, params, ids, mask, self.prompt_pixels, grid)
    flat = [b for rows in self.block_rows for b in rows]
    block_ids, block_mask = _pad(flat, BLOCK)
    block_grid = np.array([GRID] * len(self.block_images), np.int32)
    block_pixels = np.concatenate([self.block_pixels[i] for i in self.block_images])
    embeds = MODEL.apply({"params": params}, block_ids, block_pixels, block_grid,
                         method=qwen2_5_vl.Qwen25VL.embed)
    offsets, advance = get_rope_index(block_ids, block_mask, block_grid, config=CONFIG)
    shape = (2, K, BLOCK)
    return base.replace(
        splice_ids=jnp.asarray(block_ids).reshape(shape),
        splice_embeds=embeds.reshape(shape + (-1,)),
        splice_mask=jnp.asarray(block_mask).reshape(shape),
        splice_offsets=offsets.reshape((3,) + shape),
        splice_advance=advance.reshape(2, K),
    )

  def spliced_sequence(self, prompt, tokens, length, inserts):
    """Token ids and images of prompt + response with blocks inserted, for a plain forward."""
    ids = list(self.prompt_rows[prompt])
    pixels = [self.prompt_pixels] if 63 in ids else []
    scored = []  # Index in `ids` of the slot predicting each generated token.
    for j in range(length):
      scored.append(len(ids) - 1)
      ids.append(int(tokens[j]))
      for step, cand in inserts:
        if step == j:
          ids += self.block_rows[prompt][cand]
          flat = prompt * K + cand
          if flat in self.block_pixels:
            pixels.append(self.block_pixels[flat])
    return np.array([ids], np.int32), np.concatenate(pixels), scored


FORCED = [7, START, 42, END, 8, START, 41, END]  # Inspect candidate 2, then candidate 1.


@pytest.fixture(scope="module")
def sampled():
  prompts = Prompts()
  inputs = prompts.inputs()
  forced = np.full((4, len(FORCED)), -1, np.int32)
  forced[:3] = FORCED
  forced[3, :4] = [START, 41, END, 9]  # Row 3 (prompt 1): inspect candidate 1 only.
  traj = sampler.rollout(MODEL, PARAMS, inputs, jax.random.key(0), sampling=SAMPLING,
                         group_size=2, forced_tokens=forced)
  return prompts, inputs, traj


def test_forced_inspections_equal_a_forward_over_the_spliced_sequence(sampled):
  prompts, _, traj = sampled
  tokens = np.asarray(traj.tokens)
  np.testing.assert_array_equal(tokens[:3, : len(FORCED)], np.tile(FORCED, (3, 1)))
  np.testing.assert_array_equal(np.asarray(traj.insert_candidate),
                                [[1, 0], [1, 0], [1, 0], [0, -1]])
  np.testing.assert_array_equal(np.asarray(traj.insert_step), [[3, 7], [3, 7], [3, 7], [2, -1]])
  worst = 0.0
  for r in range(4):
    length = int(traj.lengths[r])
    inserts = [(int(s), int(c)) for s, c in zip(traj.insert_step[r], traj.insert_candidate[r],
                                                 strict=True) if c >= 0]
    ids, pixels, scored = prompts.spliced_sequence(r // 2, tokens[r], length, inserts)
    grid = np.array([GRID] * (len(pixels) // 16), np.int32)
    logits = MODEL.apply({"params": PARAMS}, ids, pixels, grid)[0]
    policy = sampler.policy_logits(logits, sampler.banned_mask(CONFIG), 1.0)
    logp = np.asarray(jax.nn.log_softmax(policy))[scored, tokens[r, :length]]
    worst = max(worst, np.abs(logp - np.asarray(traj.logprobs)[r, :length]).max())
  assert worst < 1e-4, worst


def test_learner_logprobs_equal_sampler_logprobs(sampled):
  _, inputs, traj = sampled
  logp, mask = jax.jit(
      lambda p, i, t: learner.token_logprobs(MODEL, p, i, t, group_size=2, chunk_size=4)
  )(PARAMS, inputs, traj)
  np.testing.assert_array_equal(np.asarray(mask).sum(-1), np.asarray(traj.lengths))
  np.testing.assert_allclose(np.asarray(logp), np.asarray(traj.logprobs), atol=1e-5)


def test_invalid_inspections_are_recorded_not_spliced():
  inputs = Prompts().inputs()
  forced = np.array([
      [START, 45, END, START, 41, END, START, 41, END, START, 42, END],  # 5 > K, ok, repeat, 4th
      [START, 7, END, START, END, START, 41, 42, END, START, 39, END],  # non-digit, empty, 12, 02
  ], np.int32)
  traj = sampler.rollout(MODEL, PARAMS, inputs, jax.random.key(1),
                         sampling=SAMPLING, group_size=1, forced_tokens=forced)
  np.testing.assert_array_equal(np.asarray(traj.insert_candidate), [[0, -1], [1, -1]])
  np.testing.assert_array_equal(np.asarray(traj.insert_step), [[5, -1], [11, -1]])
  # Row 0: four start-digits-end inspections; row 1: '12' and '02' (the others are malformed).
  np.testing.assert_array_equal(np.asarray(traj.num_inspections), [4, 2])


def test_group_samples_share_one_prefill():
  """G greedy rows from one prefill equal G separately prefilled copies of the prompt."""
  prompts = Prompts()
  inputs = prompts.inputs()
  greedy = sampler.SamplingParams(**{**SAMPLING.__dict__, "temperature": 0.0})
  shared = sampler.rollout(MODEL, PARAMS, inputs, jax.random.key(0), sampling=greedy,
                           group_size=3)
  copies = jax.tree.map(lambda x: jnp.repeat(x, 3, axis=1 if x.shape[0] == 3 else 0), inputs)
  separate = sampler.rollout(MODEL, PARAMS, copies, jax.random.key(0), sampling=greedy,
                             group_size=1)
  np.testing.assert_array_equal(shared.tokens, separate.tokens)
  np.testing.assert_allclose(shared.logprobs, separate.logprobs, atol=1e-5)


def test_greedy_on_eight_devices_equals_one_device():
  prompts = Prompts()
  inputs = prompts.inputs()
  greedy = sampler.SamplingParams(**{**SAMPLING.__dict__, "temperature": 0.0})
  forced = np.tile(np.array(FORCED[:4], np.int32), (8, 1))
  single = sampler.rollout(MODEL, PARAMS, inputs, jax.random.key(0), sampling=greedy,
                           group_size=4, forced_tokens=forced)
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = parallel.DEFAULT_RULES
  params = jax.device_put(PARAMS, parallel.shardings_of(qwen2_5_vl.abstract_params(CONFIG),
                                                        mesh, rules))
  with jax.set_mesh(mesh), parallel.with_rules(rules):
    sharded = sampler.rollout(MODEL, params, inputs, jax.random.key(0), sampling=greedy,
                              group_size=4, forced_tokens=forced)
  np.testing.assert_array_equal(single.tokens, sharded.tokens)
  np.testing.assert_array_equal(single.insert_candidate, sharded.insert_candidate)
  np.testing.assert_allclose(single.logprobs, sharded.logprobs, atol=1e-5)
