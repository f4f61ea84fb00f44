"""Learner-side log-probs: rebuild each sampled row's exact input and score its tokens.

The rollout engine wrote row r's tokens and inserted blocks into cache slots in sequence
order; `rebuild` lays out the same sequence from the prompt inputs and the trajectory's
insertion record, so one cache-free forward sees exactly what the sampler saw:

    slots : [ prompt (T, right padded) | g0 g1 g2 B B B B g3 g4 ... | free ]
                                            ^ block inserted after g2 (insert_step = 2)

Token j is predicted by the hidden state of the slot before it in sequence order: the
last real prompt slot for j = 0, else `slot(j) - 1` (a block's last token when a block
precedes it). Prompt tokens and inserted tokens are observations: never scored.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.models.reranker import RerankInputs
from retrv_jax.rl.sampler import Trajectory, banned_mask, policy_logits


@flax.struct.dataclass
class SplicedSequence:
  """One flat sequence per row, `S = T + N + M * Ls` slots."""

  embeds: jax.Array  # [R, S, D]
  positions: jax.Array  # [3, R, S]
  mask: jax.Array  # [R, S] bool: real slots.
  predictor_slot: jax.Array  # [R, N]: slot whose hidden state predicts token j.
  token_mask: jax.Array  # [R, N] bool: j < length (the scored tokens).


def rebuild(inputs: RerankInputs, trajectory: Trajectory, token_embeds: jax.Array,
            group_size: int) -> SplicedSequence:
  """Lays out prompt, generated tokens (`token_embeds [R, N, D]`) and inserted blocks."""
  rows, budget = trajectory.tokens.shape
  batch, prompt_len = inputs.prompt_mask.shape
  max_inserts = trajectory.insert_step.shape[1]
  block_len = inputs.splice_mask.shape[2]
  total = prompt_len + budget + max_inserts * block_len
  row = jnp.arange(rows)
  prompt = row // group_size

  has = trajectory.insert_candidate >= 0  # [R, M]
  cand = jnp.maximum(trajectory.insert_candidate, 0)
  n_real = jnp.where(has, jnp.sum(inputs.splice_mask[prompt[:, None], cand], -1), 0)
  advance = jnp.where(has, inputs.splice_advance[prompt[:, None], cand], 0)
  step = trajectory.insert_step

  j = jnp.arange(budget)
  before = has[:, None, :] & (step[:, None, :] < j[None, :, None])  # [R, N, M]
  first_position = inputs.next_position[prompt]
  gen_slot = prompt_len + j[None] + jnp.sum(before * n_real[:, None], -1)
  gen_position = first_position[:, None] + j[None] + jnp.sum(before * advance[:, None], -1)
  token_mask = j[None] < trajectory.lengths[:, None]

  block_slot = prompt_len + step + 1 + jnp.cumsum(n_real, -1) - n_real  # [R, M]
  block_position = first_position[:, None] + step + 1 + jnp.cumsum(advance, -1) - advance
  i = jnp.arange(block_len)
  block_real = i[None, None] < n_real[..., None]  # [R, M, Ls]
  block_slots = block_slot[..., None] + i
  offsets = inputs.splice_offsets[:, prompt[:, None], cand]  # [3, R, M, Ls]

  def place(prompt_part, gen_part, block_part, fill):
    """Scatters the three parts into `[R, S, ...]` (invalid entries dropped)."""
    out = jnp.full((rows, total) + prompt_part.shape[2:], fill, prompt_part.dtype)
    out = out.at[:, :prompt_len].set(prompt_part)
    out = out.at[row[:, None], jnp.where(token_mask, gen_slot, total)].set(gen_part, mode="drop")
    return out.at[row[:, None, None], jnp.where(block_real, block_slots, total)].set(
        block_part, mode="drop")

  embeds = place(inputs.prompt_embeds[prompt], token_embeds.astype(inputs.prompt_embeds.dtype),
                 inputs.splice_embeds[prompt[:, None], cand], 0)
  positions = jnp.stack([
      place(inputs.prompt_positions[a][prompt], gen_position,
            block_position[..., None] + offsets[a], 0)
      for a in range(3)
  ])
  mask = place(inputs.prompt_mask[prompt], token_mask, block_real, False)
  last_prompt_slot = jnp.sum(inputs.prompt_mask[prompt], -1) - 1
  predictor = jnp.where(j[None] == 0, last_prompt_slot[:, None], gen_slot - 1)
  return SplicedSequence(embeds=embeds, positions=positions, mask=mask, predictor_slot=predictor,
                  token_mask=token_mask)


def token_logprobs(
    model: Qwen25VL,
    params: Any,
    inputs: RerankInputs,
    trajectory: Trajectory,
    *,
    group_size: int,
    temperature: float = 1.0,
    chunk_size: int = 128,
) -> tuple[jax.Array, jax.Array]:
  """Log-probs `[R, N]` of the sampled tokens under `params`, and their mask `[R, N]`.

  The vocabulary projection runs over chunks of `chunk_size` generated positions, so
  `[R, N, vocab]` logits never exist at once. Differentiable in `params` (and in
  `inputs`, which the caller computes from params, e.g. through the compression module).
  """
  apply = lambda method, *a, **kw: model.apply({"params": params}, *a, method=method, **kw)
  token_embeds = apply(Qwen25VL.embed, trajectory.tokens)
  seq = rebuild(inputs, trajectory, token_embeds, group_size)
  hidden = apply(Qwen25VL.forward_embeds, seq.embeds, seq.positions, seq.mask,
                 return_hidden=True)
  rows, budget = trajectory.tokens.shape
  predictor_hidden = hidden[jnp.arange(rows)[:, None], seq.predictor_slot]  # [R, N, D]
  banned = banned_mask(model.config)

  chunk = min(chunk_size, budget)
  pad = -budget % chunk
  hidden_chunks = jnp.pad(predictor_hidden, ((0, 0), (0, pad), (0, 0)))
  token_chunks = jnp.pad(trajectory.tokens, ((0, 0), (0, pad)))
  num_chunks = (budget + pad) // chunk
  hidden_chunks = hidden_chunks.reshape(rows, num_chunks, chunk, -1).swapaxes(0, 1)
  token_chunks = token_chunks.reshape(rows, num_chunks, chunk).swapaxes(0, 1)

  def score(args):
    h, tokens = args
    logp = jax.nn.log_softmax(policy_logits(apply(Qwen25VL.logits, h), banned, temperature))
    return jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]

  logprobs = jax.lax.map(score, (hidden_chunks, token_chunks))
  logprobs = logprobs.swapaxes(0, 1).reshape(rows, -1)[:, :budget]
  return jnp.where(seq.token_mask, logprobs, 0.0), seq.token_mask
