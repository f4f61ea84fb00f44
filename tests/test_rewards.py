"""In-jit format checker against `prompts.parse_response`; rewards and curriculum by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_prompts import CORPUS, MALFORMED, byte_level_bpe

from retrv_jax.data import prompts as P
from retrv_jax.data import tokenizer as tok_lib
from retrv_jax.rl import rewards
from retrv_jax.rl.sampler import Trajectory

K = 4  # As test_prompts.MALFORMED assumes.
MAX_INSPECTIONS = 3


@pytest.fixture(scope="module", params=["tiny", "bpe"])
def tok(request):
  """The shipped tiny tokenizer, and a byte-level BPE one (Qwen's kind, multi-digit tokens)."""
  if request.param == "tiny":
    return tok_lib.load_tokenizer()
  texts = CORPUS * 10 + list(P.template_texts()) + [f"{n} {n}" for n in range(100)] * 5
  return byte_level_bpe(texts, vocab_size=700)


@pytest.fixture(scope="module")
def format_tokens(tok):
  return rewards.FormatTokens.from_tokenizer(tok)


def _checker(format_tokens, **kwargs):
  return jax.jit(functools.partial(rewards.check_format, format_tokens=format_tokens,
                                   num_candidates=K, max_inspections=MAX_INSPECTIONS, **kwargs))


def _pack(seqs, tail, rng):
  """`[S, N]` ids with each row's sequence first and `tail` material (not pad) after it."""
  width = max(map(len, seqs)) + 3
  ids = rng.choice(tail, size=(len(seqs), width)).astype(np.int32)
  for i, seq in enumerate(seqs):
    ids[i, : len(seq)] = seq
  return ids, np.array([len(s) for s in seqs], np.int32)


def test_format_tokens(tok, format_tokens):
  assert format_tokens.think_start == tok.think_start
  assert format_tokens.inspect_end == tok.inspect_end
  assert format_tokens.stop_ids == (tok.im_end, tok.pad)
  assert tok.cand_con in format_tokens.other_special_ids
  assert tok.im_start in format_tokens.other_special_ids
  assert tok.think_start not in format_tokens.other_special_ids
  newline = tok.encode("\n", allow_special=False)
  assert len(newline) == 1 and newline[0] in format_tokens.blank_ids
  values = dict(zip(format_tokens.digit_ids, format_tokens.digit_values, strict=True))
  assert [values[i] for i in tok.digit_ids] == list(range(10))
  letter = tok.encode("a", allow_special=False)[0]
  assert letter not in format_tokens.blank_ids and letter not in values
  hash(format_tokens)  # A static jit argument.


def test_agrees_with_parse_response(tok, format_tokens):
  rng = np.random.default_rng(0)
  cases = [text for text, _ in MALFORMED] + [
      "<think>a</think><answer>1</answer><|im_end|>",
      "\n<think>a</think>\n<answer>3</answer>\n<|im_end|>garbage",
      "<think>a</think><answer>1</answer><answer>2</answer>",
      "<think><answer>2</answer></think><answer>3</answer>",
      "<answer>2</answer>",
      "<think>" + "".join(P.inspection_tag(k) for k in (1, 2, 3, 4)) + "</think>",
      "<think>" + P.inspection_tag(2) * 4 + "</think><answer>04</answer>",
      "<think><inspection-index-start><inspection-index-start>2<inspection-index-end></think>"
      "<answer>12</answer>",
      "<think><inspection-index-start>1<|cand_start|>x<|cand_end|></think><answer>1</answer>",
      "<think><inspection-index-start>1<inspection-index-end> <|cand_start|>x<|cand_end|>"
      "</think><answer>1</answer>",
      "<think>" + P.inspection_tag(3) + "<|cand_start|>a<answer>1</answer><|cand_end|></think>"
      "<answer>2</answer>",
  ]
  fragments = [tok.encode(s) for s in (
      "<think>", "</think>", "<answer>", "</answer>", "<inspection-index-start>",
      "<inspection-index-end>", "<|cand_start|>", "<|cand_end|>", "<|im_end|>", "<|cand_con|>",
      "<|im_start|>", "0", "1", "2", "3", "4", "5", "12", "007", " 3", "a red", " ", "\n", "x")]
  fragments.append([tok.pad])
  template = tok.encode(P.format_response(
      target="a", elimination="b", answer=2,
      verification=f"{P.inspection_tag(2)} x {P.inspection_tag(2)}{P.inspection_tag(3)}"))

  def fragment_soup():
    return [t for _ in range(rng.integers(0, 14))
            for t in fragments[rng.integers(len(fragments))]]

  def mutant():
    ids = list(template)
    for _ in range(rng.integers(1, 3)):
      where, fragment = rng.integers(len(ids)), fragments[rng.integers(len(fragments))]
      operation = rng.integers(3)
      if operation == 0:
        ids[where:where] = fragment
      elif operation == 1:
        del ids[where]
      else:
        ids[where] = fragment[0]
    return ids

  seqs = [tok.encode(text) for text in cases] + [template, template + [tok.im_end]]
  seqs += [rng.integers(0, tok.vocab_size, rng.integers(0, 12)).tolist() for _ in range(600)]
  seqs += [fragment_soup() for _ in range(1200)] + [mutant() for _ in range(1200)]
  ids, lengths = _pack(seqs, np.array(tok.encode("a 1<think>")), rng)
  result = jax.device_get(_checker(format_tokens)(ids, lengths))

  errors, num_well_formed = set(), 0
  for i, seq in enumerate(seqs):
    parsed = P.parse_response(seq, tok, num_candidates=K, max_inspections=MAX_INSPECTIONS)
    expected = (parsed.well_formed, -1 if parsed.answer_index is None else parsed.answer_index - 1,
                len(parsed.inspected_indices))
    got = (bool(result.well_formed[i]), int(result.answer[i]), int(result.num_inspected[i]))
    assert got == expected, (i, tok.decode(seq), parsed)
    errors.add(parsed.error)
    num_well_formed += parsed.well_formed
  assert errors == set(P.FORMAT_ERRORS) | {None}  # Every kind of malformation was checked.
  assert 100 < num_well_formed < len(seqs) - 100
  assert len(set(result.answer.tolist())) == K + 1 and result.num_inspected.max() == 3


def test_require_stop(tok, format_tokens):
  texts = ["<think>a</think><answer>1</answer><|im_end|>", "<think>a</think><answer>1</answer>",
           "<think>a</think><answer>1</answer>\n"]
  ids, lengths = _pack([tok.encode(t) for t in texts], np.array([tok.pad]),
                       np.random.default_rng(0))
  lenient = _checker(format_tokens)(ids, lengths)
  strict = _checker(format_tokens, require_stop=True)(ids, lengths)
  np.testing.assert_array_equal(lenient.well_formed, [True, True, True])
  np.testing.assert_array_equal(strict.well_formed, [True, False, False])
  np.testing.assert_array_equal(strict.stopped, [True, False, False])
  np.testing.assert_array_equal(strict.answer, [0, 0, 0])


def test_retrieval_reward_by_hand():
  """K = 10, lambda = 0.5: r_r = 1 - 0.5 * N_ins / 10 when well formed and right, else 0."""
  tok = tok_lib.load_tokenizer()
  k = 10
  tags = P.inspection_tag(2) + P.inspection_tag(5)
  texts = [
      "<think>a</think><answer>3</answer><|im_end|>",  # correct, 0 inspections
      f"<think>{tags}</think><answer>3</answer><|im_end|>",  # correct, 2 inspections
      "<think>a</think><answer>4</answer><|im_end|>",  # wrong, 0
      f"<think>{tags}</think><answer>4</answer><|im_end|>",  # wrong, 2
      "<think>a</think>so <answer>3</answer><|im_end|>",  # malformed, right answer
      f"<think>{tags}</think><answer>3</answer> ok<|im_end|>",  # malformed, right, 2
      "<think>a</think><answer>4</answer>!<|im_end|>",  # malformed, wrong
  ]
  ids, lengths = _pack([tok.encode(t) for t in texts], np.array([tok.pad]),
                       np.random.default_rng(0))
  format_tokens = rewards.FormatTokens.from_tokenizer(tok)

  @jax.jit
  def reward(ids, lengths, gt, inspected, lam):
    result = rewards.check_format(ids, lengths, format_tokens, num_candidates=k, max_inspections=3)
    return rewards.retrieval_reward(result, gt, inspected, curriculum_weight=lam,
                                    num_candidates=k), result.num_inspected

  gt = jnp.full(len(texts), 2)  # 0-based: candidate "3".
  inspected = jnp.array([0, 2, 0, 2, 0, 2, 0])  # As the sampler's insertion record says.
  out, num_inspected = reward(ids, lengths, gt, inspected, 0.5)
  np.testing.assert_array_equal(num_inspected, inspected)
  # 1 + 1 = 2; 1 + (1 - 0.5 * 2 / 10) = 1.9; wrong: 1 + 0; malformed: 0 + 0 (r_r is gated).
  np.testing.assert_allclose(out["reward"], [2.0, 1.9, 1.0, 1.0, 0.0, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(out["format"], [1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(out["correct"], [1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(out["answer_match"], [1, 1, 0, 0, 1, 1, 0])
  np.testing.assert_allclose(out["retrieval"], [1.0, 0.9, 0, 0, 0, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(out["n_inspected"], inspected)
  # lambda = 0 (first step): inspections are free; lambda = 1: 1 - 2 / 10 = 0.8.
  np.testing.assert_allclose(reward(ids, lengths, gt, inspected, 0.0)[0]["reward"][:2], [2, 2])
  np.testing.assert_allclose(reward(ids, lengths, gt, inspected, 1.0)[0]["reward"][:2],
                             [2.0, 1.8], rtol=1e-6)
  # No positive (gt = -1): never correct, even for an answer of "0".
  none = reward(ids, lengths, jnp.full(len(texts), -1), inspected, 0.5)[0]
  np.testing.assert_array_equal(none["correct"], 0)


def test_trajectory_rewards():
  """B = 2 prompts x G = 2 rows; N_ins comes from the insertion record."""
  tok = tok_lib.load_tokenizer()
  texts = [f"<think>{P.inspection_tag(1)}</think><answer>2</answer><|im_end|>",
           "<think>a</think><answer>2</answer><|im_end|>",
           "<think>a</think><answer>2</answer><|im_end|>",
           "<think>a</think><answer>1</answer>"]
  ids, lengths = _pack([tok.encode(t) for t in texts], np.array([tok.pad]),
                       np.random.default_rng(0))
  trajectory = Trajectory(
      tokens=jnp.asarray(ids), logprobs=jnp.zeros(ids.shape), lengths=jnp.asarray(lengths),
      insert_step=jnp.array([[1, -1], [-1, -1], [-1, -1], [-1, -1]]),
      insert_candidate=jnp.array([[0, -1], [-1, -1], [-1, -1], [-1, -1]]),
      num_inspections=jnp.array([1, 0, 0, 0]))
  run = jax.jit(functools.partial(
      rewards.trajectory_rewards, format_tokens=rewards.FormatTokens.from_tokenizer(tok),
      num_candidates=K, max_inspections=3, curriculum_weight=0.5))
  out = run(trajectory, jnp.array([1, 0]))
  # Rows 0, 1 answer prompt 0 (gt "2"): 1 + (1 - 0.5 * 1 / 4) = 1.875 and 2; rows 2, 3
  # answer prompt 1 (gt "1"): wrong, 1; right, 2.
  np.testing.assert_allclose(out["reward"], [1.875, 2.0, 1.0, 2.0])
  strict = jax.jit(functools.partial(
      rewards.trajectory_rewards, format_tokens=rewards.FormatTokens.from_tokenizer(tok),
      num_candidates=K, max_inspections=3, curriculum_weight=0.5, require_stop=True))
  np.testing.assert_allclose(strict(trajectory, jnp.array([1, 0]))["reward"][3], 0.0)
  with pytest.raises(ValueError, match="4 trajectory rows is not a multiple of 3 prompts"):
    run(trajectory, jnp.array([1, 0, 0]))


def test_curriculum_lambda():
  linear = jax.jit(functools.partial(rewards.curriculum_lambda, total_steps=100))
  # i / N: 0 / 100, 50 / 100, 100 / 100, and held at 1 past the end.
  np.testing.assert_allclose([linear(s) for s in (0, 50, 100, 150)], [0.0, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(linear(25), 0.25)
  fixed = jax.jit(functools.partial(rewards.curriculum_lambda, total_steps=100,
                                    schedule="fixed", value=0.5))
  np.testing.assert_allclose([fixed(s) for s in (0, 50, 100)], [0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match="'cosine': expected one of \\('linear', 'fixed'\\)"):
    rewards.curriculum_lambda(0, 100, "cosine")
  with pytest.raises(ValueError, match="total_steps must be positive, got 0"):
    rewards.curriculum_lambda(0, 0)
  with pytest.raises(ValueError, match="value must be in \\[0, 1\\], got 2"):
    rewards.curriculum_lambda(0, 10, "fixed", 2)
