"""Teacher-forced sequences built from pieces of embeddings, for the describe-and-compare
tasks of `pretrain` and `align`.

A sequence is a row of `Segment`s laid end to end: constant text, the query's tokens, a
candidate (its full splice block, or one compressed token), then the target text. Each
segment is padded to a static length; its padding stays in place as holes (masked slots)
and its M-RoPE positions continue from the previous segment's advance, so holes change
nothing. Two prompts per candidate (PAPER.md §5.1):

    content : <|im_start|>user\\nCandidate: [X] \\nDescribe the candidate.<|im_end|>\\n
              <|im_start|>assistant\\n [description] <|im_end|>
    relation: <|im_start|>user\\nQuery: [query] \\nCandidate: [X] \\nHow does the candidate
              relate to the query?<|im_end|>\\n<|im_start|>assistant\\n [relation] <|im_end|>

X is the full block (pretrain; what the LM sees on inspection) or t_con / t_rel (align).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from retrv_jax.data.tokenizer import Tokenizer
from retrv_jax.models.reranker import RerankInputs, encode_batch

CONTENT_TEXTS = ("<|im_start|>user\nCandidate: ",
                 "\nDescribe the candidate.<|im_end|>\n<|im_start|>assistant\n")
RELATION_TEXTS = ("<|im_start|>user\nQuery: ", "\nCandidate: ",
                  "\nHow does the candidate relate to the query?<|im_end|>\n"
                  "<|im_start|>assistant\n")


@flax.struct.dataclass
class Segment:
  """`N` rows of one piece: embeddings, real slots and positions relative to its start."""

  embeds: jax.Array  # [N, L, D]
  mask: jax.Array  # [N, L] bool
  offsets: jax.Array  # [3, N, L] int32
  advance: jax.Array  # [N] int32: the piece's extent in positions.


def text_segment(embeds: jax.Array, mask: jax.Array) -> Segment:
  """Plain tokens: consecutive positions over the real slots."""
  mask = mask.astype(bool)
  offsets = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
  return Segment(embeds, mask, jnp.broadcast_to(offsets, (3, *offsets.shape)),
                 jnp.sum(mask, axis=-1, dtype=jnp.int32))


def assemble(segments: Sequence[Segment]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Concatenates segments: embeds `[N, S, D]`, positions `[3, N, S]`, mask `[N, S]`."""
  return assemble_parallel(segments, (), ())[:3]


def assemble_parallel(prefix: Sequence[Segment], pieces: Sequence[Sequence[Segment]],
                      suffix: Sequence[Segment]
                      ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`assemble` for a prefix, parallel pieces and a suffix, plus segment ids `[N, S]`
  (`qwen2_5_vl.causal_mask`): every piece starts at the position where the prefix ends and
  sees only the prefix and itself (piece n has id n + 1), as if it stood alone after the
  prefix; the suffix continues past the longest piece and sees everything."""
  start = jnp.zeros(prefix[0].mask.shape[0], jnp.int32)
  positions, ids = [], []

  def place(seg: Segment, at: jax.Array, segment_id: int) -> None:
    positions.append(jnp.where(seg.mask, at[:, None] + seg.offsets, 0))
    ids.append(jnp.full(seg.mask.shape, segment_id, jnp.int32))

  for seg in prefix:
    place(seg, start, 0)
    start = start + seg.advance
  end = start
  for n, piece in enumerate(pieces):
    at = start
    for seg in piece:
      place(seg, at, n + 1)
      at = at + seg.advance
    end = jnp.maximum(end, at)
  for seg in suffix:
    place(seg, end, 0)
    end = end + seg.advance
  segments = [*prefix, *(seg for piece in pieces for seg in piece), *suffix]
  return (jnp.concatenate([s.embeds for s in segments], axis=1),
          jnp.concatenate(positions, axis=2),
          jnp.concatenate([s.mask for s in segments], axis=1),
          jnp.concatenate(ids, axis=1))


def compact(embeds: jax.Array, positions: jax.Array, mask: jax.Array
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Moves the real slots of each row to the front (order kept): right-padded rows."""
  order = jnp.argsort(~mask, axis=-1, stable=True)
  return (jnp.take_along_axis(embeds, order[..., None], axis=1),
          jnp.take_along_axis(positions, order[None], axis=2),
          jnp.take_along_axis(mask, order, axis=1))


def constant_ids(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
  return [np.asarray(tokenizer.encode(t, allow_special=True), np.int32) for t in texts]


def constant(embed_fn, ids: np.ndarray, rows: int) -> Segment:
  """A constant text piece repeated on `rows` rows."""
  embeds = embed_fn(jnp.asarray(ids)[None])
  return text_segment(jnp.broadcast_to(embeds, (rows, *embeds.shape[1:])),
                      jnp.ones((rows, len(ids)), bool))


def select_candidates(x: jax.Array, index: jax.Array) -> jax.Array:
  """`x [B, K, ...]` at candidates `index [B, n]` -> `[B * n, ...]`."""
  picked = jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)
  return picked.reshape((-1,) + x.shape[2:])


def block_segment(inputs: RerankInputs, index: jax.Array) -> Segment:
  """The full splice blocks of candidates `index [B, n]`, one row each."""
  offsets = jnp.stack([select_candidates(inputs.splice_offsets[a], index) for a in range(3)])
  return Segment(select_candidates(inputs.splice_embeds, index),
                 select_candidates(inputs.splice_mask, index), offsets,
                 select_candidates(inputs.splice_advance, index))


def token_segment(tokens: jax.Array) -> Segment:
  """One embedding per row `[N, D]` (a compressed token)."""
  n = tokens.shape[0]
  return Segment(tokens[:, None], jnp.ones((n, 1), bool), jnp.zeros((3, n, 1), jnp.int32),
                 jnp.ones(n, jnp.int32))


def query_segment(inputs: RerankInputs, query_mask: jax.Array, size: int, repeats: int
                  ) -> Segment:
  """The prompt's query tokens packed into `size` slots (0: the prompt's length), each row
  repeated `repeats` times; `Reranker.encode` checks that every query fits.

  Positions keep the query's own layout (image tokens included): offsets from its first
  token; advance: one past its largest position.
  """
  query_mask = query_mask.astype(bool)
  size = size or query_mask.shape[1]  # 0: the whole prompt's width.
  order = jnp.argsort(~query_mask, axis=-1, stable=True)[:, :size]
  mask = jnp.take_along_axis(query_mask, order, axis=1)
  embeds = jnp.take_along_axis(inputs.prompt_embeds, order[..., None], axis=1)
  pos = jnp.take_along_axis(inputs.prompt_positions, order[None], axis=2)  # [3, B, size]
  first = jnp.min(jnp.where(mask[None], pos, jnp.iinfo(jnp.int32).max), axis=(0, 2))
  offsets = jnp.where(mask[None], pos - first[None, :, None], 0)
  advance = jnp.max(jnp.where(mask[None], offsets + 1, 0), axis=(0, 2))
  rep = lambda x, axis=0: jnp.repeat(x, repeats, axis=axis)
  return Segment(rep(embeds), rep(mask), rep(offsets, 1), rep(advance))


def sequence_loss(logits_fn, hidden: jax.Array, target_ids: jax.Array, target_mask: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy of the target segment (the last `L` slots) and its token count.

  hidden: `[N, S, D]` of the assembled rows; target_ids, target_mask: `[N, L]`. The slot
  before the target segment (the end of the constant suffix) predicts its first token.
  """
  length = target_ids.shape[1]
  predictors = hidden[:, -length - 1: -1]
  logits = logits_fn(predictors).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits)
  token_logp = jnp.take_along_axis(logp, target_ids[..., None], axis=-1)[..., 0]
  mask = target_mask.astype(jnp.float32)
  return -jnp.sum(token_logp * mask), jnp.sum(mask)


def candidate_order(gt_index: jax.Array, num_candidates: int, count: int) -> jax.Array:
  """`[B, count]` candidates to describe: the positive first, then the others in stage-I
  order (deterministic, so a step's token count is known before its micro-batches run)."""
  k = jnp.arange(num_candidates)
  rank = jnp.where(k[None] == gt_index[:, None], -1, k[None])
  return jnp.argsort(rank, axis=-1)[:, :count].astype(jnp.int32)


@flax.struct.dataclass
class DescribeTargets:
  """Target ids and masks `[B * n, Ld]` of the content and relation rows."""

  content_ids: jax.Array
  content_mask: jax.Array
  relation_ids: jax.Array
  relation_mask: jax.Array

  @classmethod
  def from_batch(cls, batch, index: jax.Array) -> DescribeTargets:
    pick = lambda name: select_candidates(batch[name], index)
    return cls(pick("description_ids"), pick("description_mask").astype(bool),
               pick("relation_ids"), pick("relation_mask").astype(bool))

  def num_tokens(self, content: bool = True, relation: bool = True) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    if content:
      total += jnp.sum(self.content_mask, dtype=jnp.float32)
    if relation:
      total += jnp.sum(self.relation_mask, dtype=jnp.float32)
    return total


def described_tokens(stacked, per_example: int, *, content: bool = True,
                     relation: bool = True) -> jax.Array:
  """Target tokens the describe rows of stacked micro-batches `[n, B, ...]` score (the
  candidates of `candidate_order`), known before the micro-batches run."""
  k = stacked["candidate_mask"].shape[2]
  index = jax.vmap(lambda g: candidate_order(g, k, per_example))(stacked["gt_index"])
  targets = jax.vmap(DescribeTargets.from_batch)(stacked, index)
  return targets.num_tokens(content, relation)


class DescribeRows:
  """Builds the content and relation rows of a batch (module docstring) for one model."""

  def __init__(self, tokenizer: Tokenizer, query_tokens: int):
    self.content_ids = constant_ids(tokenizer, CONTENT_TEXTS)
    self.relation_ids = constant_ids(tokenizer, RELATION_TEXTS)
    self.query_tokens = query_tokens

  def content(self, embed_fn, x: Segment, target_embeds, target_mask):
    n = x.mask.shape[0]
    c0, c1 = (constant(embed_fn, ids, n) for ids in self.content_ids)
    return assemble([c0, x, c1, text_segment(target_embeds, target_mask)])

  def relation(self, embed_fn, inputs: RerankInputs, query_mask, x: Segment, target_embeds,
               target_mask):
    n = x.mask.shape[0]
    r0, r1, r2 = (constant(embed_fn, ids, n) for ids in self.relation_ids)
    query = query_segment(inputs, query_mask, self.query_tokens, n // query_mask.shape[0])
    return assemble([r0, query, r1, x, r2, text_segment(target_embeds, target_mask)])


def _backbone(method: str):
  return lambda module, *args, **kwargs: getattr(module.backbone, method)(*args, **kwargs)


def describe_loss(model, rows: DescribeRows, params, batch, denominator, *, per_example: int,
                  compressed: bool, content: bool = True, relation: bool = True,
                  inputs: RerankInputs | None = None):
  """Cross-entropy of the content and relation descriptions of `per_example` candidates
  per example (summed, divided by `denominator`), and their metric pairs.

  compressed: the candidate enters as t_con / t_rel (the prompt's slots, `align`) rather
  than as its full block (`pretrain`). `model` is a `Reranker`; `inputs`, its encoding of
  the batch, if already computed.
  """
  apply = lambda method, *a, **kw: model.apply({"params": params}, *a, method=method, **kw)
  if inputs is None:
    inputs = encode_batch(model, params, batch)
  k = batch["candidate_mask"].shape[1]
  index = candidate_order(batch["gt_index"], k, per_example)
  targets = DescribeTargets.from_batch(batch, index)
  embed = lambda ids: apply(_backbone("embed"), ids)
  logits_fn = lambda h: apply(_backbone("logits"), h)
  if compressed:
    slots = select_candidates(batch["slot_positions"], index)  # [N, 2]
    rows_of = jnp.repeat(jnp.arange(index.shape[0]), per_example)
    compressed_token = lambda s: token_segment(
        inputs.prompt_embeds[rows_of, jnp.maximum(slots[:, s], 0)])
    x_con, x_rel = compressed_token(0), compressed_token(1)
  else:
    x_con = x_rel = block_segment(inputs, index)
  pairs, total = {}, jnp.zeros((), jnp.float32)
  for name, on, build, ids, mask in (
      ("content_loss", content, lambda e, m: rows.content(embed, x_con, e, m),
       targets.content_ids, targets.content_mask),
      ("relation_loss", relation,
       lambda e, m: rows.relation(embed, inputs, batch["query_mask"], x_rel, e, m),
       targets.relation_ids, targets.relation_mask)):
    if not on:
      continue
    embeds, positions, seq_mask = build(embed(ids), mask)
    hidden = apply(_backbone("forward_embeds"), embeds, positions, seq_mask, return_hidden=True)
    loss, count = sequence_loss(logits_fn, hidden, ids, mask)
    pairs[name] = (loss, count)
    total += loss
  return total / denominator, pairs
