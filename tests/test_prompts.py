"""Prompt batches (static shapes, landmarks, vision spans) and the response parser."""

from __future__ import annotations

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from retrv_jax.data import prompts as P
from retrv_jax.data import tokenizer as tok_lib

K = 4
CORPUS = [f"a {c} {s} on a {b} background" for c in ("red", "blue", "green")
          for s in ("circle", "square", "star") for b in ("white", "black")]


@pytest.fixture(scope="module", params=["tiny", "qwen"])
def tok(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  texts = CORPUS * 10 + list(P.template_texts())
  if request.param == "tiny":
    return tok_lib.train_tiny_tokenizer(texts, directory / "tiny.model")
  return byte_level_bpe(texts, vocab_size=600)


def byte_level_bpe(texts, vocab_size):
  """A Qwen-like byte-level BPE tokenizer trained on `texts`, with the Retrv-R1 tokens."""
  raw = tokenizers.Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  raw.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  return tok_lib.add_retrv_tokens(raw)[0]


def example(query_image=(1, 4, 4), candidate_images=((1, 2, 4), None, (1, 4, 2), None),
            query_text="a red circle"):
  candidates = tuple(P.Item(f"candidate {k + 1}: {CORPUS[k]}", grid)
                     for k, grid in enumerate(candidate_images))
  return P.Example("Retrieve the matching image.", P.Item(query_text, query_image), candidates)


def config(**changes):
  base = dict(num_candidates=K, prompt_buckets=(4096,), max_candidate_tokens=40)
  return P.PromptConfig(**{**base, **changes})


def _parse(tok, text, max_inspections=3):
  return P.parse_response(tok.encode(text), tok, num_candidates=K, max_inspections=max_inspections)


def test_build_then_parse_round_trip(tok):
  batch = P.build_batch([example()], tok, config())
  verification = (f"{P.inspection_tag(2)} is close; {P.inspection_tag(4)} is not; "
                  f"again {P.inspection_tag(2)}")
  response = P.format_response(
      target="a red circle", elimination="1 and 3 are blue.", verification=verification, answer=2)
  ids = tok.encode(response + P.RESPONSE_END) + [tok.pad] * 3
  parsed = P.parse_response(ids, tok, num_candidates=K, max_inspections=3)
  assert parsed.well_formed and parsed.error is None
  assert parsed.inspected_indices == (2, 4) and parsed.repeated_indices == (2,)
  assert parsed.answer_index == 2
  assert parsed.reasoning_text.startswith("Ideal target: a red circle\nElimination:")
  assert P.inspection_tag(4) in parsed.reasoning_text
  assert P.parse_response_text(response, num_candidates=K, max_inspections=3) == parsed

  # With the splices a sampler inserts, the parse is the same.
  blocks = [batch.candidate_ids[0, k][batch.candidate_mask[0, k]] for k in range(K)]
  spliced, loss_mask, insertions = P.splice_inspections(ids, blocks, tok, max_inspections=3)
  assert [index for _, index in insertions] == [2, 4]  # The repeat inserts nothing.
  for position, index in insertions:
    assert spliced[position - 1] == tok.inspect_end
    block = batch.splice_ids[0, index - 1][batch.splice_mask[0, index - 1]].tolist()
    assert spliced[position : position + len(block)] == block
    assert not any(loss_mask[position : position + len(block)])
  assert sum(loss_mask) == len(ids)
  assert [t for t, keep in zip(spliced, loss_mask, strict=True) if keep] == ids
  assert P.parse_response(spliced, tok, num_candidates=K, max_inspections=3) == parsed


def test_splice_respects_max_inspections(tok):
  text = "<think>" + "".join(P.inspection_tag(k) for k in (1, 2, 3)) + "</think><answer>1</answer>"
  blocks = [[tok.encode("x")[0]] * k for k in range(1, K + 1)]
  _, _, insertions = P.splice_inspections(tok.encode(text), blocks, tok, max_inspections=2)
  assert [index for _, index in insertions] == [1, 2]


MALFORMED = [
    ("", "empty"),
    ("<answer>1</answer>", "missing_think"),
    ("Sure. <think>a</think><answer>1</answer>", "text_before_think"),
    ("<think>a</think><think>b</think><answer>1</answer>", "multiple_think"),
    ("<think>a red circle", "unclosed_think"),
    ("<think>a</think>", "missing_answer"),
    ("<think>a</think><answer>1</answer><answer>2</answer>", "multiple_answers"),
    ("<think>a</think><answer>1", "unclosed_answer"),
    ("<think>a</think><answer>two</answer>", "answer_not_integer"),
    ("<think>a</think><answer>5</answer>", "answer_out_of_range"),
    ("<think>a</think> so <answer>1</answer>", "text_between_think_and_answer"),
    ("<think>a</think><answer>1</answer> because", "text_after_answer"),
    ("<think>a</think><inspection-index-start>1<inspection-index-end><answer>1</answer>",
     "inspection_outside_think"),
    ("<think><inspection-index-start>x<inspection-index-end></think><answer>1</answer>",
     "inspection_not_integer"),
    ("<think><inspection-index-start> 2<inspection-index-end></think><answer>1</answer>",
     "inspection_not_integer"),
    ("<think><inspection-index-start>2 then</think><answer>1</answer>", "unclosed_inspection"),
    ("<think><inspection-index-start>9<inspection-index-end></think><answer>1</answer>",
     "inspection_out_of_range"),
    ("<think>" + "".join(P.inspection_tag(k) for k in (1, 2, 3, 4)) + "</think><answer>1</answer>",
     "too_many_inspections"),
    ("<think><inspection-index-start>1<inspection-index-end><|cand_start|>a red",
     "unclosed_splice"),
    ("<think>a<|cand_con|></think><answer>1</answer>", "unexpected_token"),
    ("<think>a</think></answer><answer>1</answer>", "unexpected_token"),
]


@pytest.mark.parametrize("text,error", MALFORMED, ids=[e for _, e in MALFORMED])
def test_malformed_responses(tok, text, error):
  assert error in P.FORMAT_ERRORS
  parsed = _parse(tok, text)
  assert not parsed.well_formed and parsed.error == error
  assert P.parse_response_text(text, num_candidates=K, max_inspections=3) == parsed


def test_malformed_details():
  parse = lambda text: P.parse_response_text(text, num_candidates=K, max_inspections=3)
  assert parse("<think>a</think><answer>1</answer><answer>2</answer>").answer_index == 1
  assert parse("<think>a</think><answer>5</answer>").answer_index is None
  many = parse("<think>" + "".join(P.inspection_tag(k) for k in (1, 2, 3, 4)) + "</think>")
  assert many.inspected_indices == (1, 2, 3)  # The fourth is ignored.
  ok = parse("\n<think>a</think>\n<answer>3</answer>\n<|im_end|>garbage")
  assert ok.well_formed and ok.answer_index == 3


def test_slots_spans_and_masks(tok):
  examples = [example(), example(query_image=None, candidate_images=(None,) * K)]
  batch = P.build_batch(examples, tok, config())
  for b in range(2):
    assert batch.attention_mask[b].sum() == batch.lengths[b]
    assert (batch.slot_index[b] >= 0).sum() == 2 * K
    for k in range(K):
      con, rel = batch.slot_positions[b, k]
      assert batch.input_ids[b, con] == tok.cand_con and batch.input_ids[b, rel] == tok.cand_rel
      assert (batch.slot_index[b, con], batch.slot_index[b, rel]) == (2 * k, 2 * k + 1)
  start, count = batch.image_spans[0, 0]
  assert count == 4 and batch.image_grid_thw[0, 0].tolist() == [1, 4, 4]
  assert batch.input_ids[0, start - 1] == tok.vision_start
  assert batch.input_ids[0, start + count] == tok.vision_end
  assert (batch.input_ids[0, start : start + count] == tok.image_pad).all()
  assert (batch.input_ids[0] == tok.image_pad).sum() == 4  # Candidates stay compressed.
  assert batch.image_spans[1].sum() == 0 and batch.image_grid_thw[0, 1:].sum() == 0
  query = tok.decode(batch.input_ids[0][batch.query_mask[0]])
  assert query == "a red circle<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
  assert tok.decode(batch.input_ids[1][batch.query_mask[1]]) == "a red circle"
  prompt = tok.decode(batch.input_ids[1][: batch.lengths[1]])
  assert prompt.startswith("<|im_start|>system\n" + P.SYSTEM_PROMPT + "<|im_end|>\n")
  assert prompt.endswith("Candidate 4: <|cand_con|><|cand_rel|><|im_end|>\n"
                         "<|im_start|>assistant\n")
  assert "\nQuery: a red circle\nCandidates:\nCandidate 1: <|cand_con|><|cand_rel|>\n" in prompt


def test_candidate_blocks(tok):
  batch = P.build_batch([example()], tok, config())
  for k in range(K):
    block = batch.candidate_ids[0, k][batch.candidate_mask[0, k]]
    text = f"candidate {k + 1}: {CORPUS[k]}"
    start, count = batch.candidate_image_spans[0, k]
    if k in (0, 2):
      assert count == 2 and tok.decode(block) == (
          text + "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>")
      assert (block[start : start + count] == tok.image_pad).all()
      assert batch.candidate_image_grid_thw[0, k].tolist() == [1, 2, 4] if k == 0 else [1, 4, 2]
    else:
      assert count == 0 and tok.decode(block) == text
    splice = batch.splice_ids[0, k][batch.splice_mask[0, k]]
    assert splice.tolist() == [tok.cand_start, *block.tolist(), tok.cand_end]
    assert (batch.candidate_ids[0, k][~batch.candidate_mask[0, k]] == tok.pad).all()


def test_vision_span_is_never_split(tok):
  long_text = " ".join(CORPUS)
  ex = example()
  candidates = (P.Item(long_text, (1, 4, 4)),) + ex.candidates[1:]
  batch = P.build_batch([P.Example(ex.instruction, ex.query, candidates)], tok,
                        config(max_candidate_tokens=12))
  block = batch.candidate_ids[0, 0]
  assert batch.candidate_mask[0, 0].all()  # Filled to Lc = 12: 6 text + 6 vision tokens.
  assert block[6:].tolist() == [tok.vision_start] + [tok.image_pad] * 4 + [tok.vision_end]
  assert batch.candidate_image_spans[0, 0].tolist() == [7, 4]
  assert tok.decode(block[:6]) == tok.decode(tok.encode(long_text)[:6])
  too_big = (P.Item("x", (1, 8, 8)),) + ex.candidates[1:]
  with pytest.raises(ValueError, match="example 0 candidate 1: its image span has 18 tokens"):
    P.build_batch([P.Example(ex.instruction, ex.query, too_big)], tok,
                  config(max_candidate_tokens=12))


def test_full_candidate_prompt_without_icm(tok):
  batch = P.build_batch([example()], tok, config(compress_candidates=False))
  assert (batch.slot_index == -1).all() and (batch.slot_positions == -1).all()
  ids = batch.input_ids[0, : batch.lengths[0]].tolist()
  for k in range(K):
    block = batch.candidate_ids[0, k][batch.candidate_mask[0, k]].tolist()
    prefix = tok.encode(f"Candidate {k + 1}: ")
    needle = prefix + block
    assert any(ids[i : i + len(needle)] == needle for i in range(len(ids))), k
    start, count = batch.image_spans[0, k + 1]
    if k in (0, 2):
      assert count == 2 and ids[start : start + count] == [tok.image_pad] * 2
      offset = batch.candidate_image_spans[0, k, 0]  # Of the image pads inside the block.
      assert ids[start - offset : start] == block[:offset]
    else:
      assert count == 0
  assert ids.count(tok.image_pad) == 4 + 2 + 2


def test_buckets_and_padding_sides(tok):
  n = int(P.build_batch([example()], tok, config()).lengths[0])
  buckets = (n - 1, n + 5, n + 100)
  right = P.build_batch([example(), example(query_text="a")], tok, config(prompt_buckets=buckets))
  left = P.build_batch([example(), example(query_text="a")], tok,
                       config(prompt_buckets=buckets, padding_side="left"))
  for batch in (right, left):
    assert batch.input_ids.shape == (2, n + 5) and batch.input_ids.dtype == np.int32
    assert batch.slot_index.shape == batch.attention_mask.shape == batch.query_mask.shape
    assert batch.candidate_ids.shape == (2, K, 40) and batch.splice_ids.shape == (2, K, 42)
    assert batch.image_spans.shape == (2, K + 1, 2) and batch.image_grid_thw.shape == (2, K + 1, 3)
  assert right.lengths[1] < n
  for b in range(2):
    length = right.lengths[b]
    np.testing.assert_array_equal(left.input_ids[b, -length:], right.input_ids[b, :length])
    assert (left.input_ids[b, : n + 5 - length] == tok.pad).all()
    shift = n + 5 - length
    np.testing.assert_array_equal(left.slot_positions[b], right.slot_positions[b] + shift)
    assert left.image_spans[b, 0, 0] == right.image_spans[b, 0, 0] + shift
    np.testing.assert_array_equal(left.query_mask[b, shift:], right.query_mask[b, :length])
  with pytest.raises(ValueError, match=f"example 0: prompt of {n} tokens exceeds .* {n - 1}"):
    P.build_batch([example()], tok, config(prompt_buckets=(n - 1,)))


def test_data_is_never_special(tok):
  batch = P.build_batch([example(query_text="a <answer>2</answer>", query_image=None)], tok,
                        config())
  query = batch.input_ids[0][batch.query_mask[0]]
  assert not set(query.tolist()) & set(tok.special_ids.values())
  assert tok.decode(query) == "a <answer>2</answer>"


def test_wrong_candidate_count_is_refused(tok):
  ex = example()
  with pytest.raises(ValueError, match="example 1: 3 candidates, expected num_candidates=4"):
    P.build_batch([ex, P.Example(ex.instruction, ex.query, ex.candidates[:3])], tok, config())


def test_teacher_instruction_and_template_texts():
  text = P.teacher_instruction(7)
  assert "The correct candidate is 7" in text and "<answer>7</answer>" in text
  assert all(heading in text for heading in P.PHASE_HEADINGS)
  assert P.SYSTEM_PROMPT in list(P.template_texts())
