"""Jitted autoregressive sampling with a preallocated KV cache.

One prefill over the (padded) prompt, then a `lax.while_loop` that decodes one token
per row per step until every row has emitted a stop token or the budget is spent.
Slots in the cache follow `retrv_jax.models.decoder`: each row writes at its own index,
so left- and right-padded prompts both work.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from retrv_jax.models.config import ModelConfig
from retrv_jax.models.decoder import KVCache
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.models.rope import get_rope_index, text_positions


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How tokens are drawn. temperature 0 means greedy."""

  max_new_tokens: int = 64
  temperature: float = 0.0
  stop_token_ids: tuple[int, ...] = ()


@flax.struct.dataclass
class Generation:
  """tokens, logprobs: `[b, max_new_tokens]` (pad after a row stops); lengths: `[b]`."""

  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array


def never_sampled(config: ModelConfig) -> tuple[int, ...]:
  """Token ids the sampler must not emit: vision placeholders and padding."""
  return (config.image_token_id, config.video_token_id, config.vision_start_token_id,
          config.vision_end_token_id, config.pad_token_id)


def _pick(logits: jax.Array, rng: jax.Array, sampling: SamplingParams, banned: jax.Array):
  """Token `[b]` and its log-prob under the sampling distribution, from logits `[b, v]`."""
  logits = jnp.where(banned, -jnp.inf, logits.astype(jnp.float32))
  if sampling.temperature > 0:
    logits = logits / sampling.temperature
    token = jax.random.categorical(rng, logits, axis=-1)
  else:
    token = jnp.argmax(logits, axis=-1)
  logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], -1)[:, 0]
  return token.astype(jnp.int32), logprob


@functools.partial(jax.jit, static_argnames=("model", "sampling"))
def generate(
    model: Qwen25VL,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None,
    image_grid_thw: jax.Array | None,
    rng: jax.Array,
    *,
    sampling: SamplingParams,
) -> Generation:
  """Samples continuations of a padded prompt batch.

  Args:
    model: the `Qwen25VL` module (static).
    params: its params.
    input_ids, attention_mask: `[b, t]` prompts, left or right padded.
    pixel_values, image_grid_thw: the prompts' images (HF processor layout) or None.
    rng: PRNG key (unused when greedy).
    sampling: budget, temperature and stop tokens (static).
  """
  config = model.config
  apply = lambda method, *a: model.apply({"params": params}, *a, method=method)
  batch, prompt_len = input_ids.shape
  budget = sampling.max_new_tokens
  banned = jnp.zeros(config.vocab_size, bool).at[jnp.array(never_sampled(config))].set(True)
  stops = jnp.array(sampling.stop_token_ids or (config.eos_token_id,), jnp.int32)

  positions, next_position = get_rope_index(input_ids, attention_mask, image_grid_thw,
                                            config=config)
  embeds = apply(Qwen25VL.embed, input_ids, pixel_values, image_grid_thw)
  cache = KVCache.init(config, batch, prompt_len + budget)
  zeros = jnp.zeros(batch, jnp.int32)
  logits, cache = apply(Qwen25VL.decode, embeds, positions, attention_mask, cache, zeros)
  slots = jnp.arange(prompt_len)[None]
  last = jnp.max(jnp.where(attention_mask.astype(bool), slots, -1), axis=-1)
  logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]

  def cond(state):
    step, _, _, done, *_ = state
    return (step < budget) & ~jnp.all(done)

  def body(state):
    step, tokens, logprobs, done, logits, cache, write, position, rng = state
    rng, key = jax.random.split(rng)
    token, logprob = _pick(logits, key, sampling, banned)
    token = jnp.where(done, config.pad_token_id, token)
    tokens = tokens.at[:, step].set(token)
    logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
    live = ~done
    done = done | jnp.isin(token, stops)
    embed = apply(Qwen25VL.embed, token[:, None])
    logits, cache = apply(Qwen25VL.decode, embed, text_positions(position, 1), live[:, None],
                          cache, write)
    advance = live.astype(jnp.int32)
    return (step + 1, tokens, logprobs, done, logits[:, 0], cache, write + advance,
            position + advance, rng)

  state = (
      jnp.int32(0),
      jnp.full((batch, budget), config.pad_token_id, jnp.int32),
      jnp.zeros((batch, budget), jnp.float32),
      jnp.zeros(batch, bool),
      logits,
      cache,
      last + 1,
      next_position,
      rng,
  )
  _, tokens, logprobs, *_ = jax.lax.while_loop(cond, body, state)
  lengths = _lengths(tokens, stops, budget)
  return Generation(tokens=tokens, logprobs=logprobs, lengths=lengths)


def _lengths(tokens: jax.Array, stops: jax.Array, budget: int) -> jax.Array:
  """Generated length of each row, counting its stop token."""
  is_stop = jnp.isin(tokens, stops)
  first = jnp.argmax(is_stop, axis=-1)
  return jnp.where(is_stop.any(-1), first + 1, budget).astype(jnp.int32)
