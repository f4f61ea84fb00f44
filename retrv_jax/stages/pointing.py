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


class PointRows:
  """Builds pointing rows of lists of up to `max_size` candidates for one tokenizer."""

  def __init__(self, tokenizer: Tokenizer, query_tokens: int, max_size: int,
               workspace: bool = False):
    self.texts = sequences.constant_ids(tokenizer, POINT_TEXTS)
    self.labels = sequences.constant_ids(tokenizer,
                                         [f"Candidate {k}: " for k in range(1, max_size + 1)])
    self.newline = sequences.constant_ids(tokenizer, ["\n"])[0]
    self.workspace = (sequences.constant_ids(tokenizer, [sequences.RELATION_TEXTS[2]])[0]
                      if workspace else None)
    answers = [tokenizer.encode(str(k), allow_special=False) + [tokenizer.eos]
               for k in range(1, max_size + 1)]
    width = max(map(len, answers))
    self.answer_ids = np.full((max_size, width), tokenizer.pad, np.int32)
    self.answer_mask = np.zeros((max_size, width), bool)
    for k, ids in enumerate(answers):
      self.answer_ids[k, : len(ids)], self.answer_mask[k, : len(ids)] = ids, True
    self.query_tokens = query_tokens
    self.digits = np.asarray(tokenizer.digit_ids, np.int32)

  def targets(self, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[B, L]` answer ids and mask of list places `target [B]` (all False where -1)."""
    ids = jnp.asarray(self.answer_ids)[jnp.maximum(target, 0)]
    mask = jnp.asarray(self.answer_mask)[jnp.maximum(target, 0)] & (target >= 0)[:, None]
    return ids, mask

  def hidden(self, model, params, inputs: RerankInputs, batch, index: jax.Array,
             answer_ids: jax.Array, answer_mask: jax.Array) -> jax.Array:
    """Final hidden states `[B, S, D]` of the rows of lists `index [B, n]`, the answer
    (`[B, L]` ids and mask) in the last L slots."""
    apply = lambda fn, *a, **kw: model.apply({"params": params}, *a, method=fn, **kw)
    embed = lambda ids: apply(sequences._backbone("embed"), ids)
    b, n = index.shape
    segments = [sequences.constant(embed, self.texts[0], b),
                sequences.query_segment(inputs, batch["query_mask"], self.query_tokens, 1),
                sequences.constant(embed, self.texts[1], b)]
    for place in range(n):
      segments += [sequences.constant(embed, self.labels[place], b),
                   sequences.block_segment(inputs, index[:, place: place + 1])]
      if self.workspace is not None:
        segments.append(sequences.constant(embed, self.workspace, b))
      segments.append(sequences.constant(embed, self.newline, b))
    segments.append(sequences.constant(embed, self.texts[2], b))
    if answer_ids.shape[1]:
      segments.append(sequences.text_segment(embed(answer_ids), answer_mask))
    embeds, positions, seq_mask = sequences.assemble(segments)
    return apply(sequences._backbone("forward_embeds"), embeds, positions, seq_mask,
                 return_hidden=True)

  def loss(self, model, params, inputs: RerankInputs, batch, index: jax.Array,
           target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The answers' cross-entropy summed over their tokens and rows, and the number of rows
    with a positive: the loss per list, whose chance is ln n."""
    ids, mask = self.targets(target)
    hidden = self.hidden(model, params, inputs, batch, index, ids, mask)
    logits_fn = lambda h: model.apply({"params": params}, h, method=sequences._backbone("logits"))
    nll, _ = sequences.sequence_loss(logits_fn, hidden, ids, mask)
    return nll, jnp.sum(target >= 0, dtype=jnp.float32)

  def greedy_answer(self, model, params, inputs: RerankInputs, batch, index: jax.Array
                    ) -> jax.Array:
    """The label the model writes first, greedily: `[B]` 1-based, its digits up to two;
    0 when its first token is not a digit."""
    logits_of = lambda hidden: model.apply({"params": params}, hidden[:, -1:],
                                           method=sequences._backbone("logits"))[:, 0]
    empty = jnp.zeros((index.shape[0], 0), jnp.int32)
    first = jnp.argmax(logits_of(self.hidden(model, params, inputs, batch, index, empty,
                                             empty.astype(bool))), axis=-1).astype(jnp.int32)
    second = jnp.argmax(logits_of(self.hidden(model, params, inputs, batch, index,
                                              first[:, None], jnp.ones_like(first[:, None],
                                                                            bool))), axis=-1)
    digits = jnp.asarray(self.digits)
    value = lambda token: jnp.argmax(token[:, None] == digits[None], axis=-1)
    is_digit = lambda token: jnp.any(token[:, None] == digits[None], axis=-1)
    two = 10 * value(first) + value(second)
    return jnp.where(is_digit(first), jnp.where(is_digit(second), two, value(first)), 0)
