"""The list-pointing row (`retrv_jax.stages.pointing`) against plain forwards of the same
tokens, its greedy answer, and the list-choice evaluation (`retrv_jax.evaluate_lists`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_bench import make_bench

from retrv_jax import evaluate_lists
from retrv_jax.data.pipeline import PipelineConfig, make_iterator, split_host_fields
from retrv_jax.data.tokenizer import load_tokenizer
from retrv_jax.models import reranker
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.config import tiny
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.stages import pointing, sequences

K = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Eval batches of text and image queries, and a random 1-layer model."""
  root = make_bench(tmp_path_factory, k=K, num_train=1, num_val=1, num_test=3)
  tok = load_tokenizer()
  data = PipelineConfig(data_dir=root, source="mbeir", batch_size=3, num_candidates=K,
                        prompt_buckets=(256,), max_candidate_tokens=32, split="test",
                        shuffle=False, num_epochs=1)
  batches = [split_host_fields(b)[0] for b in make_iterator("eval", data, tok)]
  base = tiny()
  config = base.replace(num_layers=1, vision=dataclasses.replace(
      base.vision, depth=1, fullatt_block_indexes=(0,)))
  icm = CompressionConfig(enabled=False)
  model = reranker.Reranker(config, icm)
  params = jax.jit(lambda key: reranker.init_params(config, icm, key))(jax.random.key(0))
  return tok, batches, model, params


def _image_pixels(batch, b: int, slot: int):
  """Patches and grid `[1, 3]` of image slot `slot` (0 query, 1..K candidates) of row b."""
  grids = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
  sizes = np.prod(grids, axis=-1)
  at = b * (1 + K) + slot
  start = int(np.sum(sizes[:at]))
  return batch["pixel_values"][start:start + sizes[at]], grids[at:at + 1]


def _plain_row(rows: pointing.PointRows, batch, b: int, index, answer=(), verdicts=()):
  """The row's tokens, its images' patches and grids, as a plain sequence (with tags, the
  verdict words `verdicts` after them)."""
  query = batch["input_ids"][b][batch["query_mask"][b].astype(bool)]
  ids, images = [rows.texts[0], query, rows.texts[1]], [0] if np.any(
      query == tiny().image_token_id) else []
  for place, k in enumerate(index):
    block = batch["splice_ids"][b, k][batch["splice_mask"][b, k].astype(bool)]
    ids += [rows.labels[place], block]
    if rows.workspace is not None:
      ids.append(rows.workspace)
    if rows.tags is not None:
      ids += [rows.tags[place], np.asarray(verdicts[place: place + 1], np.int32)]
    ids.append(rows.newline)
    if np.any(block == tiny().image_token_id):
      images.append(1 + int(k))
  ids += [rows.texts[2], np.asarray(answer, np.int32)]
  pixels = [_image_pixels(batch, b, s) for s in images]
  return (np.concatenate(ids).astype(np.int32), np.concatenate([p for p, _ in pixels]),
          np.concatenate([g for _, g in pixels]))


def _plain_logits(model, params, row):
  ids, pixels, grids = row
  backbone = Qwen25VL(model.config)
  return np.asarray(backbone.apply({"params": params["backbone"]}, ids[None], pixels, grids,
                                   np.ones((1, len(ids)), np.int32))[0])


@pytest.mark.parametrize("workspace,tag", [(False, False), (True, False), (True, True)])
def test_a_pointing_row_equals_a_plain_forward_of_its_tokens(setup, workspace, tag):
  tok, batches, model, params = setup
  batch = batches[0]
  rows = pointing.PointRows(tok, 64, K, workspace=workspace, tag=tag)
  index = jnp.asarray([[2, 0, 3], [1, 3, 0], [3, 2, 1]], jnp.int32)  # Lists of 3, shuffled.
  target = jnp.asarray([1, 0, 2], jnp.int32)
  ids, mask = rows.targets(target)
  inputs = reranker.encode_batch(model, params, batch)
  verdicts = rows.true_verdicts(target, 3) if tag else None
  hidden, tag_slots = rows.hidden(model, params, inputs, batch, index, ids, mask, verdicts)
  logits = np.asarray(model.apply({"params": params}, hidden,
                                  method=lambda m, h: m.backbone.logits(h)))
  assert np.all(mask)  # Labels 1..3: one digit and the end token, no padding.
  n = ids.shape[1] + 1  # The answer's tokens and the slot that predicts the first.
  assert len(tag_slots) == (3 if tag else 0)
  for b in range(3):
    row = _plain_row(rows, batch, b, np.asarray(index[b]), np.asarray(ids[b]),
                     np.asarray(verdicts[b]) if tag else ())
    plain = _plain_logits(model, params, row)
    np.testing.assert_allclose(logits[b, -n:], plain[-n:], atol=1e-4, rtol=0)
    if tag:  # The tags' slots hold the logits of each tag's last token, then its verdict.
      ends = np.asarray(_tag_ends(rows, row[0]))
      np.testing.assert_allclose(logits[b, tag_slots], plain[ends], atol=1e-4, rtol=0)
      assert row[0][ends + 1].tolist() == np.asarray(verdicts[b]).tolist()


def _tag_ends(rows, ids, n=3):
  """The slots of a plain row where each tag's last token sits, found by its text and the
  verdict word after it."""
  ends, start = [], 0
  for tag in rows.tags[:n]:
    for at in range(start, len(ids) - len(tag) + 1):
      # The label before a block reads the same but goes on with ':'; a tag, its verdict.
      if np.array_equal(ids[at:at + len(tag)], tag) and ids[at + len(tag)] in rows.verdict_words:
        ends.append(at + len(tag) - 1)
        start = at + len(tag)
        break
  assert len(ends) == n
  return ends


def test_parallel_pieces_start_together_and_see_only_the_prefix():
  """Two rows: a prefix of 2 tokens, pieces of 3 and 1 (row 1: 1 and 2) real tokens, a
  suffix of 2; the suffix starts past the longer piece."""
  seg = lambda mask: sequences.text_segment(jnp.zeros((2, len(mask[0]), 1)),
                                            jnp.asarray(mask, bool))
  prefix = [seg([[1, 1], [1, 1]])]
  pieces = [[seg([[1, 1, 1], [1, 0, 0]])], [seg([[1], [1]]), seg([[0], [1]])]]
  _, positions, mask, ids = sequences.assemble_parallel(prefix, pieces, [seg([[1, 1]] * 2)])
  assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 2, 0, 0]] * 2
  assert positions[0].tolist() == [[0, 1, 2, 3, 4, 2, 0, 5, 6], [0, 1, 2, 0, 0, 2, 3, 4, 5]]
  assert mask[1].tolist() == [True, True, True, False, False, True, True, True, True]


def _plain_piece(rows: pointing.PointRows, batch, b: int, place: int, k: int):
  """The prefix and one candidate's piece (place `place`, candidate `k`) as a plain
  sequence: what a parallel piece must compute."""
  query = batch["input_ids"][b][batch["query_mask"][b].astype(bool)]
  block = batch["splice_ids"][b, k][batch["splice_mask"][b, k].astype(bool)]
  ids = [rows.texts[0], query, rows.texts[1], rows.labels[place], block, rows.workspace,
         rows.tags[place], rows.newline]
  images = ([0] if np.any(query == tiny().image_token_id) else []) + (
      [1 + k] if np.any(block == tiny().image_token_id) else [])
  pixels = [_image_pixels(batch, b, s) for s in images]
  return (np.concatenate(ids).astype(np.int32), np.concatenate([p for p, _ in pixels]),
          np.concatenate([g for _, g in pixels]))


def _parallel_row(setup, index, target):
  """Parallel rows of lists `index` (batch 0) with their true verdicts and answers: the
  rows, the batch's encoding, (ids, mask, verdicts) and (hidden, tag slots, logits)."""
  tok, batches, model, params = setup
  rows = pointing.PointRows(tok, 64, K, workspace=True, tag=True, parallel=True)
  ids, mask = rows.targets(target)
  inputs = reranker.encode_batch(model, params, batches[0])
  verdicts = rows.true_verdicts(target, index.shape[1])
  hidden, tag_slots = rows.hidden(model, params, inputs, batches[0], index, ids, mask,
                                  verdicts)
  logits = np.asarray(model.apply({"params": params}, hidden,
                                  method=lambda m, h: m.backbone.logits(h)))
  return rows, inputs, (ids, mask, verdicts), (hidden, tag_slots, logits)


def test_parallel_pieces_equal_each_piece_alone(setup):
  """Each parallel piece's tag computes what the prefix and that piece alone compute; the
  greedy verdicts are one forward's margins, " match" written at the largest."""
  _, batches, model, params = setup
  batch = batches[0]
  index = jnp.asarray([[2, 0, 3], [1, 3, 0], [3, 2, 1]], jnp.int32)
  rows, inputs, (ids, mask, verdicts), (hidden, tag_slots, logits) = _parallel_row(
      setup, index, jnp.asarray([1, 0, 2], jnp.int32))
  words, margins = (np.asarray(x) for x in rows.greedy_verdicts(model, params, inputs, batch,
                                                                index))
  for b in range(3):
    for place in range(3):
      row = _plain_piece(rows, batch, b, place, int(index[b, place]))
      plain = _plain_logits(model, params, row)[-2]  # The tag's last token.
      np.testing.assert_allclose(logits[b, tag_slots[place]], plain, atol=1e-4, rtol=0)
      match, no = plain[rows.verdict_words]
      np.testing.assert_allclose(margins[b, place], match - no, atol=1e-4)
    best = int(np.argmax(margins[b]))
    assert words[b].tolist() == [int(rows.verdict_words[0 if p == best else 1])
                                 for p in range(3)]
  # The answer sees every piece: another candidate's block changes its logits.
  other = index.at[:, 0].set(index[:, 1])
  moved, _ = rows.hidden(model, params, inputs, batch, other, ids, mask, verdicts)
  assert np.abs(np.asarray(moved[:, -1] - hidden[:, -1])).max() > 1e-3


def test_a_parallel_list_of_one_is_a_plain_row(setup):
  """With one piece nothing runs in parallel: the row is the plain sequence of its tokens,
  the verdicts written in order after the pieces, then the question and the answer."""
  _, batches, model, params = setup
  batch = batches[0]
  index = jnp.asarray([[2], [1], [3]], jnp.int32)
  rows, _, (ids, _, _), (_, _, logits) = _parallel_row(setup, index, jnp.zeros(3, jnp.int32))
  for b in range(3):
    piece, pixels, grids = _plain_piece(rows, batch, b, 0, int(index[b, 0]))
    row = (np.concatenate([piece, rows.tags[0], rows.verdict_words[:1], rows.newline,
                           rows.texts[2], np.asarray(ids[b])]), pixels, grids)
    n = ids.shape[1] + 1
    np.testing.assert_allclose(logits[b, -n:], _plain_logits(model, params, row)[-n:],
                               atol=1e-4, rtol=0)


def test_the_verdict_loss_against_hand_computed_values():
  # Two lists of 3; the second has no positive (target -1) and counts for nothing.
  logits = jnp.asarray([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[5.0, 0.0]] * 3])
  ce, top1 = pointing.verdict_loss(logits, jnp.asarray([0, -1]))
  softplus = lambda x: np.log1p(np.exp(x))
  # Positive: -log sigmoid(2); negatives: -log sigmoid(1) and -log sigmoid(0), each / 4.
  expected = 0.5 * softplus(-2.0) + 0.25 * softplus(-1.0) + 0.25 * softplus(0.0)
  assert float(ce) == pytest.approx(expected, rel=1e-6)
  assert float(top1) == 1.0  # Margins 2, -1, 0: place 0, the target.


@pytest.mark.parametrize("tag", [False, True])
def test_the_greedy_answer_is_what_plain_decoding_writes(setup, tag):
  tok, batches, model, params = setup
  rows = pointing.PointRows(tok, 64, K, workspace=True, tag=tag)
  batch = batches[0]
  index = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (3, K))
  inputs = reranker.encode_batch(model, params, batch)
  got = np.asarray(rows.greedy_answer(model, params, inputs, batch, index))
  if tag:
    words, margins = (np.asarray(x) for x in rows.greedy_verdicts(model, params, inputs, batch,
                                                                  index))
  digits = list(tok.digit_ids)
  for b in range(3):
    verdicts = []
    if tag:  # Each verdict by plain decoding of the row so far, restricted to the two words.
      for place in range(K):
        later = [int(rows.verdict_words[1])] * (K - place)  # Unseen by this tag (causal).
        row = _plain_row(rows, batch, b, range(K), verdicts=verdicts + later)
        logits = _plain_logits(model, params, row)[_tag_ends(rows, row[0], K)[place]]
        match, no = logits[rows.verdict_words]
        np.testing.assert_allclose(margins[b, place], match - no, atol=1e-4)
        verdicts.append(int(rows.verdict_words[0] if match > no else rows.verdict_words[1]))
      assert words[b].tolist() == verdicts
    first = int(np.argmax(_plain_logits(model, params,
                                        _plain_row(rows, batch, b, range(K), [], verdicts))[-1]))
    second = int(np.argmax(_plain_logits(model, params, _plain_row(
        rows, batch, b, range(K), [first], verdicts))[-1]))
    value = 0
    if first in digits:
      value = digits.index(first)
      if second in digits:
        value = 10 * value + digits.index(second)
    assert got[b] == value


def test_list_choice_metrics_from_hand_counted_answers():
  hard = np.zeros((6, 4), bool)
  hard[:3, 1] = True  # Rows 0-2 hold a hard negative (candidate 2).
  table = {"answer": np.array([1, 2, 0, 1, 3, 3]), "gt_index": np.array([0, 0, 0, 0, 2, 1]),
           "task_id": np.array([0, 0, 7, 7, 7, 0]), "hard_negative_mask": hard}
  metrics = evaluate_lists.summarize(table)
  assert metrics["recall@1"] == pytest.approx(3 / 6)
  assert metrics["wrong_hard"] == pytest.approx(1 / 6)  # Row 1 names candidate 2.
  assert metrics["wrong_easy"] == pytest.approx(1 / 6)  # Row 5.
  assert metrics["no_label"] == pytest.approx(1 / 6)  # Row 2's 0.
  assert metrics["recall@1/with_hard"] == pytest.approx(1 / 3)
  assert metrics["recall@1/without_hard"] == pytest.approx(2 / 3)
  assert metrics["recall@1/task0"] == pytest.approx(1 / 3)
  assert metrics["recall@1/task7"] == pytest.approx(2 / 3)
  assert metrics["top_answer_share"] == pytest.approx(2 / 6)


def test_the_verdicts_choice_is_broken_down_like_the_answer():
  hard = np.zeros((4, 3), bool)
  hard[:2, 2] = True  # Rows 0-1 hold a hard negative (candidate 3).
  table = {"answer": np.array([1, 1, 1, 1]), "gt_index": np.array([0, 1, 2, 0]),
           "task_id": np.array([0, 0, 3, 3]), "hard_negative_mask": hard,
           "verdict_choice": np.array([1, 3, 3, 2]), "verdict_matches": np.array([1, 1, 2, 0])}
  metrics = evaluate_lists.summarize(table)
  assert metrics["recall@1"] == pytest.approx(2 / 4)
  assert metrics["verdict_recall@1"] == pytest.approx(2 / 4)  # Rows 0 and 2.
  assert metrics["verdict_wrong_hard"] == pytest.approx(1 / 4)  # Row 1 chose candidate 3.
  assert metrics["verdict_wrong_easy"] == pytest.approx(1 / 4)  # Row 3.
  assert metrics["verdict_recall@1/with_hard"] == pytest.approx(1 / 2)
  assert metrics["verdict_recall@1/task3"] == pytest.approx(1 / 2)
  assert metrics["verdict_one_match"] == pytest.approx(2 / 4)
  assert metrics["verdict_matches_per_list"] == pytest.approx(1.0)


def test_list_choice_scores_the_greedy_answers_of_every_test_query(setup):
  tok, batches, model, params = setup
  rows = pointing.PointRows(tok, 64, K, workspace=False)
  metrics = evaluate_lists.evaluate_lists(model, params, batches, rows)
  answers, gts, tasks = [], [], []
  for batch in batches:
    inputs = reranker.encode_batch(model, params, batch)
    index = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (len(batch["gt_index"]), K))
    answer = np.asarray(rows.greedy_answer(model, params, inputs, batch, index))
    keep = batch["valid"] & (batch["gt_index"] >= 0)
    answers += answer[keep].tolist()
    gts += batch["gt_index"][keep].tolist()
    tasks += batch["task_id"][keep].tolist()
  assert metrics["num_examples"] == len(gts) == 6  # Three test queries of each task.
  assert metrics["recall@1"] == pytest.approx(np.mean(np.array(answers) == np.array(gts) + 1))
  assert set(metrics) >= {"recall@1/task0", "recall@1/task7", "wrong_hard", "no_label"}
