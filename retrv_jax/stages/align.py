"""Stage 1, ICM self-alignment (PAPER.md §5.1): the LM is frozen and only the ICM learns,
so that the LM, given t_con (t_rel), says what it says about the candidate's full tokens:
its content description (its relation to the query).

Targets (`config.align.targets`): 'data', the dataset's descriptions and relations (the
embedded benchmark's, which the tiny model was pretrained to produce); 'self', what the
frozen LM itself generates greedily from the full tokens (`pretrain`'s rows), for
checkpoints pretrained elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from retrv_jax.data.tokenizer import Tokenizer
from retrv_jax.models import lora
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.models.reranker import Reranker, RerankInputs, encode_batch
from retrv_jax.rl import sampler
from retrv_jax.stages import sequences, trainer

TRAINABLE = (r"^icm/",)
PIPELINE_STAGE = "align"
TARGETS = ("data", "self")


def self_targets(model: Reranker, rows: sequences.DescribeRows, params, batch, *,
                 per_example: int, length: int, eos: int, pad: int) -> dict:
  """The batch with the description / relation ids of the `per_example` candidates the loss
  reads (`sequences.candidate_order`) replaced by the frozen LM's own greedy outputs from
  their full tokens (at most `length` tokens, ending in eos)."""
  apply = lambda method, *a, **kw: model.apply({"params": params}, *a, method=method, **kw)
  inputs = encode_batch(model, params, batch)
  b, k = batch["candidate_mask"].shape[:2]
  index = sequences.candidate_order(batch["gt_index"], k, per_example)
  rows_total = b * per_example
  x = sequences.block_segment(inputs, index)
  embed = lambda ids: apply(lambda m, i: m.backbone.embed(i), ids)
  empty = jnp.zeros((rows_total, 0), jnp.int32)
  prompts = {
      "description": rows.content(embed, x, embed(empty), empty.astype(bool)),
      "relation": rows.relation(embed, inputs, batch["query_mask"], x, embed(empty),
                                empty.astype(bool)),
  }
  out = dict(batch)
  backbone = Qwen25VL(model.config)
  sampling = sampler.SamplingParams(max_new_tokens=length - 1, temperature=0.0,
                                    stop_token_ids=(eos,))
  for name, (embeds, positions, mask) in prompts.items():
    embeds, positions, mask = sequences.compact(embeds, positions, mask)
    next_position = jnp.max(positions, axis=(0, 2)) + 1
    prompt = RerankInputs.from_embeds(embeds, mask, positions, next_position)
    traj = sampler.rollout(backbone, params["backbone"], prompt, jax.random.key(0),
                           sampling=sampling)
    n = traj.lengths  # The stop token included, when there is one.
    real = jnp.arange(length - 1)[None] < n[:, None]
    ids = jnp.pad(jnp.where(real, traj.tokens, pad), ((0, 0), (0, 1)), constant_values=pad)
    stopped = jnp.any(real & (traj.tokens == eos), axis=-1)
    ids = ids.at[jnp.arange(rows_total), n].set(jnp.where(stopped, pad, eos))  # Close it.
    mask = jnp.arange(length)[None] < (n + ~stopped)[:, None]
    example = jnp.arange(b)[:, None]
    out[f"{name}_ids"] = batch[f"{name}_ids"].at[example, index].set(
        ids.reshape(b, per_example, length))
    out[f"{name}_mask"] = batch[f"{name}_mask"].astype(bool).at[example, index].set(
        mask.reshape(b, per_example, length))
  return out


def make_step(model: Reranker, config: ml_collections.ConfigDict, tokenizer: Tokenizer, tx):
  section = config.align
  if section.targets not in TARGETS:
    raise ValueError(f"config.align.targets = {section.targets!r}: expected one of {TARGETS}")
  rows = sequences.DescribeRows(tokenizer, config.compression.max_query_tokens)
  per_example = min(int(section.candidates_per_example), config.data.num_candidates)
  content, relation = model.compression.use_content, model.compression.use_relation
  length = int(config.data.max_description_tokens)

  def prepare(batch, params):
    if section.targets == "data":
      return batch
    return self_targets(model, rows, params, batch, per_example=per_example, length=length,
                        eos=tokenizer.eos, pad=tokenizer.pad)

  def denominator(stacked):
    return sequences.described_tokens(stacked, per_example, content=content, relation=relation)

  def loss_fn(trainable, frozen, batch, denom, rng):
    del rng
    params = lora.combine(trainable, frozen)
    return sequences.describe_loss(model, rows, params, batch, denom, per_example=per_example,
                                   compressed=True, content=content, relation=relation)

  return trainer.supervised_step(loss_fn, denominator, tx,
                                 prepare=None if section.targets == "data" else prepare)
