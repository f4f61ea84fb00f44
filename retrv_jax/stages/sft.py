"""Stage 2, activation (PAPER.md §5.2): next-token cross-entropy on the teacher's response.

The response is laid out exactly as the sampler would have produced it: the pipeline's
`response_ids` with their insertion record (`insert_steps`, `insert_candidates`) are a
`Trajectory`, and the learner rebuilds prompt + response + inspected blocks from it. So
the loss covers the response tokens only; the prompt and the inserted blocks are context,
never targets. Trainable: the ICM and LoRA on the LM; the vision tower and the LM's own
weights are frozen. The loss is the mean over the step's response tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from retrv_jax.data.tokenizer import Tokenizer
from retrv_jax.models import lora
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.models.reranker import Reranker, encode_batch
from retrv_jax.rl import learner
from retrv_jax.rl.sampler import Trajectory
from retrv_jax.stages import trainer

TRAINABLE = lora.TRAINABLE
PIPELINE_STAGE = "sft"


def response_trajectory(batch) -> Trajectory:
  """The teacher's response `[B, R]` as a one-sample-per-prompt trajectory."""
  tokens = batch["response_ids"]
  return Trajectory(tokens=tokens, logprobs=jnp.zeros(tokens.shape, jnp.float32),
                    lengths=batch["response_lengths"], insert_step=batch["insert_steps"],
                    insert_candidate=batch["insert_candidates"],
                    num_inspections=jnp.sum(batch["insert_candidates"] >= 0, axis=-1))


def response_logprobs(model: Reranker, params, batch, chunk_size: int = 128):
  """Log-probs `[B, R]` of the response tokens given everything before them, and the mask."""
  inputs = encode_batch(model, params, batch)
  return learner.token_logprobs(Qwen25VL(model.config), params["backbone"], inputs,
                                response_trajectory(batch), group_size=1, chunk_size=chunk_size)


def make_step(model: Reranker, config: ml_collections.ConfigDict, tokenizer: Tokenizer, tx):
  del tokenizer

  def denominator(stacked):
    return jnp.sum(stacked["response_lengths"]).astype(jnp.float32)

  def loss_fn(trainable, frozen, batch, denom, rng):
    del rng
    logp, mask = response_logprobs(model, lora.combine(trainable, frozen), batch)
    nll = -jnp.sum(jnp.where(mask, logp, 0.0))
    answer = jnp.sum(mask, dtype=jnp.float32)
    return nll / denom, {"nll": (nll, answer)}

  return trainer.supervised_step(loss_fn, denominator, tx)
