"""The list-pointing row of pretraining's `point` task: name the candidate of a numbered
list, in full tokens, that fits the query.

    <|im_start|>user\\nQuery: [query]\\nCandidates:\\nCandidate 1: [block 1]{workspace}\\n
    ... Candidate n: [block n]{workspace}\\nWhich candidate matches the query best?
    <|im_end|>\\n<|im_start|>assistant\\nCandidate [k]<|im_end|>

The list is any `index [B, n]` of the batch's candidates (the curriculum of
`retrv_jax.stages.lists` draws it; evaluation takes the stage-I list as it is). With the
workspace, each block is followed by the relation question of the `relate` rows ("How
does the candidate relate to the query?" and the assistant turn's start), so the
per-candidate judgement pretraining taught has a place in the list to be computed, and
pointing has to find it rather than compare raw blocks across the list.

With tags (`pretrain.point_tag`), each candidate's piece ends on its label again and a
verdict word, `\\nCandidate k match` or `\\nCandidate k no`: the model judges each
candidate where its block is, in order, and writes the judgement down, and the answer
then copies the label before the word " match" (a token it can attend to from the first
layer) instead of searching the list for a judgement no layer has yet made. In training
the true verdicts are written (teacher forcing) and the verdict loss
(`pretrain.point_verdict_weight`) trains the tag's prediction of its word: K labels per
list instead of one answer. At evaluation the model writes them itself
(`greedy_verdicts`), then its answer. Measured (README, list choice): the answer is learned
at once, but a tag that sees the true verdicts before it can say "no" once " match" has
been written, so the verdicts learn a count more than a judgement and do not hold on new
lists.

With parallel pieces (`pretrain.point_parallel`) each candidate's piece (label, block,
workspace, tag) starts where the query's part ends and sees only that part and itself
(`sequences.assemble_parallel`), so its verdict is judged as if the candidate stood alone
and no tag sees another's verdict. The words are then written in order after the pieces,
where the answer reads them:

    ... Candidates:\n  Candidate k: [block k]{workspace}\nCandidate k\n   (k = 1..n, parallel)
    \nCandidate 1no\nCandidate 2 match ...\n Which candidate ...?<|im_end|>\n
    <|im_start|>assistant\nCandidate [k]<|im_end|>

At evaluation one forward decides every verdict, " match" is written for the candidate the
tags are surest of and "no" for the others (each training list holds one positive), and
the answer follows. Measured (README, list choice): the verdicts hold on new lists and the
answer learns to name the one marked " match" (Recall@1 0.635 at K = 10 after 301 steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from retrv_jax.data.tokenizer import Tokenizer
from retrv_jax.models.reranker import RerankInputs
from retrv_jax.stages import sequences

POINT_TEXTS = ("<|im_start|>user\nQuery: ", "\nCandidates:\n",
               "\nWhich candidate matches the query best?<|im_end|>\n<|im_start|>assistant\n"
               "Candidate ")
VERDICT_WORDS = (" match", "no")  # The tag's verdict: the positive, any negative.


class PointRows:
  """Builds pointing rows of lists of up to `max_size` candidates for one tokenizer."""

  def __init__(self, tokenizer: Tokenizer, query_tokens: int, max_size: int,
               workspace: bool = False, tag: bool = False, parallel: bool = False):
    if parallel and not tag:
      raise ValueError("pointing.PointRows: parallel pieces need tags")
    self.parallel = parallel
    self.texts = sequences.constant_ids(tokenizer, POINT_TEXTS)
    self.labels = sequences.constant_ids(tokenizer,
                                         [f"Candidate {k}: " for k in range(1, max_size + 1)])
    self.newline = sequences.constant_ids(tokenizer, ["\n"])[0]
    self.workspace = (sequences.constant_ids(tokenizer, [sequences.RELATION_TEXTS[2]])[0]
                      if workspace else None)
    self.tags = (sequences.constant_ids(tokenizer,
                                        [f"\nCandidate {k}" for k in range(1, max_size + 1)])
                 if tag else None)
    verdict = [tokenizer.encode(w, allow_special=False) for w in VERDICT_WORDS]
    if any(len(ids) != 1 for ids in verdict):
      raise ValueError(f"pointing.VERDICT_WORDS {VERDICT_WORDS}: each must be one token of "
                       f"this tokenizer, got {verdict}")
    self.verdict_words = np.asarray([ids[0] for ids in verdict], np.int32)
    answers = [tokenizer.encode(str(k), allow_special=False) + [tokenizer.eos]
               for k in range(1, max_size + 1)]
    width = max(map(len, answers))
    self.answer_ids = np.full((max_size, width), tokenizer.pad, np.int32)
    self.answer_mask = np.zeros((max_size, width), bool)
    for k, ids in enumerate(answers):
      self.answer_ids[k, : len(ids)], self.answer_mask[k, : len(ids)] = ids, True
    self.query_tokens = query_tokens
    self.digits = np.asarray(tokenizer.digit_ids, np.int32)

  @classmethod
  def from_config(cls, config, tokenizer: Tokenizer, max_size: int) -> PointRows:
    """The rows `config.pretrain` describes, its pointing fields checked by name."""
    section = config.pretrain
    weight = float(section.point_verdict_weight)
    if weight < 0 or (weight and not section.point_tag):
      raise ValueError(f"config.pretrain.point_verdict_weight = {weight}: expected >= 0, "
                       "and 0 unless config.pretrain.point_tag (the verdict is read at the tags)")
    if section.point_parallel and not section.point_tag:
      raise ValueError("config.pretrain.point_parallel = True needs config.pretrain.point_tag "
                       "(the answer reads the pieces' written verdicts)")
    return cls(tokenizer, config.compression.max_query_tokens, max_size,
               workspace=bool(section.point_workspace), tag=bool(section.point_tag),
               parallel=bool(section.point_parallel))

  def targets(self, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[B, L]` answer ids and mask of list places `target [B]` (all False where -1)."""
    ids = jnp.asarray(self.answer_ids)[jnp.maximum(target, 0)]
    mask = jnp.asarray(self.answer_mask)[jnp.maximum(target, 0)] & (target >= 0)[:, None]
    return ids, mask

  def true_verdicts(self, target: jax.Array, n: int) -> jax.Array:
    """`[B, n]` the verdict words of lists whose positive is at `target [B]`."""
    match, no = (int(i) for i in self.verdict_words)
    return jnp.where(jnp.arange(n)[None] == target[:, None], match, no).astype(jnp.int32)

  def hidden(self, model, params, inputs: RerankInputs, batch, index: jax.Array,
             answer_ids: jax.Array, answer_mask: jax.Array, verdicts: jax.Array | None = None
             ) -> tuple[jax.Array, np.ndarray]:
    """Final hidden states `[B, S, D]` of the rows of lists `index [B, n]`, the answer
    (`[B, L]` ids and mask) in the last L slots, and the slots of the tags' last tokens
    `[n]` (static; empty without tags). With tags, `verdicts [B, n]` are the words written
    after them (with parallel pieces: after all pieces, each after its tag again)."""
    apply = lambda fn, *a, **kw: model.apply({"params": params}, *a, method=fn, **kw)
    embed = lambda ids: apply(sequences._backbone("embed"), ids)
    b, n = index.shape
    verdict = lambda place: sequences.text_segment(embed(verdicts[:, place: place + 1]),
                                                   jnp.ones((b, 1), bool))
    prefix = [sequences.constant(embed, self.texts[0], b),
              sequences.query_segment(inputs, batch["query_mask"], self.query_tokens, 1),
              sequences.constant(embed, self.texts[1], b)]
    width = sum(s.mask.shape[1] for s in prefix)
    pieces, tag_slots = [], []
    for place in range(n):
      piece = [sequences.constant(embed, self.labels[place], b),
               sequences.block_segment(inputs, index[:, place: place + 1])]
      if self.workspace is not None:
        piece.append(sequences.constant(embed, self.workspace, b))
      if self.tags is not None:
        piece.append(sequences.constant(embed, self.tags[place], b))
        tag_slots.append(width + sum(s.mask.shape[1] for s in piece) - 1)
        if not self.parallel:
          piece.append(verdict(place))
      piece.append(sequences.constant(embed, self.newline, b))
      width += sum(s.mask.shape[1] for s in piece)
      pieces.append(piece)
    suffix = []
    if self.parallel:  # The verdicts, in order, where the answer reads them.
      for place in range(n):
        suffix += [sequences.constant(embed, self.tags[place], b), verdict(place)]
      suffix.append(sequences.constant(embed, self.newline, b))
    suffix.append(sequences.constant(embed, self.texts[2], b))
    if answer_ids.shape[1]:
      suffix.append(sequences.text_segment(embed(answer_ids), answer_mask))
    if self.parallel:
      embeds, positions, seq_mask, segment_ids = sequences.assemble_parallel(prefix, pieces,
                                                                             suffix)
    else:
      segment_ids = None
      embeds, positions, seq_mask = sequences.assemble(
          [*prefix, *(seg for piece in pieces for seg in piece), *suffix])
    hidden = apply(sequences._backbone("forward_embeds"), embeds, positions, seq_mask,
                   return_hidden=True, segment_ids=segment_ids)
    return hidden, np.asarray(tag_slots, np.int32)

  def loss(self, model, params, inputs: RerankInputs, batch, index: jax.Array,
           target: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Metric pairs (sum over rows, rows with a positive): `point_loss`, the answers'
    cross-entropy per list (chance ln n); with tags (the true verdicts written after them),
    `point_verdict_loss`, the balanced verdict cross-entropy per list (chance ln 2), and
    `point_verdict_top1`, whether the tag most sure of " match" is the positive's."""
    ids, mask = self.targets(target)
    verdicts = self.true_verdicts(target, index.shape[1]) if self.tags is not None else None
    hidden, tag_slots = self.hidden(model, params, inputs, batch, index, ids, mask, verdicts)
    logits_fn = lambda h: model.apply({"params": params}, h, method=sequences._backbone("logits"))
    nll, _ = sequences.sequence_loss(logits_fn, hidden, ids, mask)
    lists = jnp.sum(target >= 0, dtype=jnp.float32)
    pairs = {"point_loss": (nll, lists)}
    if self.tags is not None:
      verdict_logits = logits_fn(hidden[:, tag_slots]).astype(jnp.float32)
      ce, top1 = verdict_loss(verdict_logits[..., self.verdict_words], target)
      pairs["point_verdict_loss"] = (ce, lists)
      pairs["point_verdict_top1"] = (top1, lists)
    return pairs

  def greedy_verdicts(self, model, params, inputs: RerankInputs, batch, index: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """The verdicts the model writes after the tags, in order, each seeing the ones
    before it: `[B, n]` words (the likelier of `VERDICT_WORDS`) and `[B, n]` margins
    (" match" minus "no" logit)."""
    b, n = index.shape
    empty = jnp.zeros((b, 0), jnp.int32)
    words = jnp.asarray(self.verdict_words)
    if self.parallel:  # No tag sees another piece's word: one forward decides them all.
      hidden, tag_slots = self.hidden(model, params, inputs, batch, index, empty,
                                      empty.astype(bool), jnp.full((b, n), words[1], jnp.int32))
      logits = model.apply({"params": params}, hidden[:, tag_slots],
                           method=sequences._backbone("logits"))
      pair = logits[..., words].astype(jnp.float32)
      margins = pair[..., 0] - pair[..., 1]
      best = jnp.arange(n)[None] == jnp.argmax(margins, axis=-1)[:, None]
      return jnp.where(best, words[0], words[1]).astype(jnp.int32), margins

    def decide(place, carry):
      verdicts, margins = carry
      hidden, tag_slots = self.hidden(model, params, inputs, batch, index, empty,
                                      empty.astype(bool), verdicts)
      at = jax.lax.dynamic_index_in_dim(hidden, jnp.asarray(tag_slots)[place], axis=1)
      logits = model.apply({"params": params}, at, method=sequences._backbone("logits"))
      pair = logits[:, 0, words].astype(jnp.float32)
      margin = pair[:, 0] - pair[:, 1]
      word = jnp.where(margin > 0, words[0], words[1]).astype(jnp.int32)
      return verdicts.at[:, place].set(word), margins.at[:, place].set(margin)

    start = (jnp.full((b, n), words[1], jnp.int32), jnp.zeros((b, n), jnp.float32))
    return jax.lax.fori_loop(0, n, decide, start)

  def greedy_answer(self, model, params, inputs: RerankInputs, batch, index: jax.Array,
                    verdicts: jax.Array | None = None) -> jax.Array:
    """The label the model writes first, greedily: `[B]` 1-based, its digits up to two;
    0 when its first token is not a digit. With tags, after `verdicts` (default: its own,
    `greedy_verdicts`)."""
    if self.tags is not None and verdicts is None:
      verdicts = self.greedy_verdicts(model, params, inputs, batch, index)[0]
    logits_of = lambda hidden: model.apply({"params": params}, hidden[:, -1:],
                                           method=sequences._backbone("logits"))[:, 0]
    empty = jnp.zeros((index.shape[0], 0), jnp.int32)
    first = jnp.argmax(logits_of(self.hidden(model, params, inputs, batch, index, empty,
                                             empty.astype(bool), verdicts)[0]),
                       axis=-1).astype(jnp.int32)
    second = jnp.argmax(logits_of(self.hidden(model, params, inputs, batch, index,
                                              first[:, None], jnp.ones_like(first[:, None],
                                                                            bool), verdicts)[0]),
                        axis=-1)
    digits = jnp.asarray(self.digits)
    value = lambda token: jnp.argmax(token[:, None] == digits[None], axis=-1)
    is_digit = lambda token: jnp.any(token[:, None] == digits[None], axis=-1)
    two = 10 * value(first) + value(second)
    return jnp.where(is_digit(first), jnp.where(is_digit(second), two, value(first)), 0)


def verdict_loss(logits: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed over lists with a positive: the 2-way verdict cross-entropy of `logits
  [B, n, 2]` (" match", "no") against `target [B]`, the positive weighted 1/2 and each
  negative 1/(2(n-1)) (chance ln 2 per list), and whether the place of the largest
  " match" - "no" margin is the target."""
  n = logits.shape[1]
  is_target = jnp.arange(n)[None] == target[:, None]
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.where(is_target, logp[..., 0], logp[..., 1])
  weight = jnp.where(is_target, 0.5, 0.5 / max(n - 1, 1))
  valid = target >= 0
  per_list = jnp.sum(ce * weight, axis=-1)
  top1 = jnp.argmax(logits[..., 0] - logits[..., 1], axis=-1) == target
  return (jnp.sum(jnp.where(valid, per_list, 0.0)),
          jnp.sum(valid & top1, dtype=jnp.float32))
