"""The cached greedy sampler agrees with full forwards, for left and right padding."""

import jax
import numpy as np
from test_kv_cache import CONFIG

from retrv_jax.models import qwen2_5_vl
from retrv_jax.rl import sampler


def _prompts(side):
  rows = [[5, 6, 60] + [63] * 4 + [61, 7, 8], [9, 10, 11, 12]]
  length = 10
  ids = np.zeros((2, length), np.int32)
  mask = np.zeros_like(ids)
  for i, row in enumerate(rows):
    span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
    ids[i, span], mask[i, span] = row, 1
  return ids, mask


def test_greedy_tokens_are_the_argmax_of_a_full_forward():
  model = qwen2_5_vl.Qwen25VL(CONFIG)
  params = qwen2_5_vl.init_params(CONFIG, jax.random.key(3))
  grid = np.array([[1, 4, 4]], np.int32)
  pixels = np.random.default_rng(0).normal(size=(16, CONFIG.vision.patch_dim)).astype(np.float32)
  sampling = sampler.SamplingParams(max_new_tokens=6, stop_token_ids=(2,))
  outs = {}
  for side in ("right", "left"):
    ids, mask = _prompts(side)
    outs[side] = sampler.generate(model, params, ids, mask, pixels, grid, jax.random.key(0),
                                  sampling=sampling)
  np.testing.assert_array_equal(outs["right"].tokens, outs["left"].tokens)
  np.testing.assert_allclose(outs["right"].logprobs, outs["left"].logprobs, atol=1e-5)

  # Re-run the whole sequence (right padded: prompt, then generated) in one forward.
  ids, mask = _prompts("right")
  gen = np.asarray(outs["right"].tokens)
  lengths = mask.sum(-1)
  full_ids = np.zeros((2, ids.shape[1] + gen.shape[1]), np.int32)
  full_mask = np.zeros_like(full_ids)
  for i in range(2):
    seq = list(ids[i, : lengths[i]]) + list(gen[i, : outs["right"].lengths[i]])
    full_ids[i, : len(seq)], full_mask[i, : len(seq)] = seq, 1
  logits = np.array(model.apply({"params": params}, full_ids, pixels, grid, full_mask))
  banned = list(sampler.never_sampled(CONFIG))
  logits[..., banned] = -np.inf
  for i in range(2):
    n = int(outs["right"].lengths[i])
    predicted = logits[i, lengths[i] - 1 : lengths[i] - 1 + n].argmax(-1)
    np.testing.assert_array_equal(predicted, gen[i, :n])
    logp = np.asarray(jax.nn.log_softmax(logits[i, lengths[i] - 1 : lengths[i] - 1 + n]))
    np.testing.assert_allclose(logp[np.arange(n), gen[i, :n]],
                               np.asarray(outs["right"].logprobs)[i, :n], atol=1e-4)
