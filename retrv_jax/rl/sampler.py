"""The rollout engine: G samples per prompt, decoded in one jitted `lax.while_loop`.

One prefill per prompt; its KV cache is then broadcast to the G samples of that prompt.
Each loop step samples one token per live row and runs it through the decoder. When a
row closes an inspection (`<inspection-index-start>` digits `<inspection-index-end>`)
that names a candidate it has not opened yet, within `max_inspections`, the candidate's
full tokens (`<|cand_start|>` ... `<|cand_end|>`, images included) are prefilled into
that row's cache in the same step, at its own slot and M-RoPE position, without leaving
jit (the details-inspection splice). Other rows are untouched by the splice.

Cache slots of one row (P prompt, g generated, B inserted block, . free):

    P P P P g g g g B B B B B g g g . . .
            ^ next_position    ^ after the block: start + splice_advance

Every inspection of the form start-digits-end counts toward `max_inspections`, whether
or not it inserts anything (out of range, repeat, or past the limit); this is the rule of
`retrv_jax.data.prompts.parse_response`. The insertion record (which generated step,
which candidate) is enough for the learner to rebuild the exact input
(`retrv_jax.rl.learner`). Prompts come as `RerankInputs` (the re-ranker builds them; a
plain prompt with no candidates: `RerankInputs.from_token_ids`).

Log-probs are those of the policy the learner scores: logits with vision/padding tokens
banned, divided by the temperature. top-k / top-p only restrict what is drawn.
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
from retrv_jax.models.reranker import RerankInputs
from retrv_jax.models.rope import text_positions


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How rows are decoded. Static under jit: a change recompiles."""

  max_new_tokens: int = 256  # Generated tokens per row (inserted blocks not counted).
  temperature: float = 1.0  # 0 = greedy.
  top_k: int = 0  # Draw among the k most likely tokens; 0 = all.
  top_p: float = 1.0  # Nucleus: smallest set with this much mass; 1 = all.
  stop_token_ids: tuple[int, ...] = ()  # Empty: the model's eos.
  # Details inspection; inspect_start_id < 0 turns it off.
  inspect_start_id: int = -1
  inspect_end_id: int = -1
  # Tokens that decode to digits only, with their value and digit count (the parser's
  # rule; `rewards.FormatTokens.from_tokenizer` lists them for a tokenizer).
  digit_ids: tuple[int, ...] = ()
  digit_values: tuple[int, ...] = ()
  digit_lengths: tuple[int, ...] = ()
  max_inspections: int = 3

  @property
  def inspection(self) -> bool:
    return self.inspect_start_id >= 0 and self.max_inspections > 0

  def __post_init__(self):
    if self.inspection and not (
        len(self.digit_ids) == len(self.digit_values) == len(self.digit_lengths) > 0):
      raise ValueError("inspection needs digit_ids, digit_values and digit_lengths of one "
                       f"length, got {len(self.digit_ids)}, {len(self.digit_values)}, "
                       f"{len(self.digit_lengths)}")
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"bad sampling params: temperature={self.temperature}, "
                       f"top_k={self.top_k}, top_p={self.top_p}")


@flax.struct.dataclass
class Trajectory:
  """R = B * G sampled rows (row r answers prompt r // G).

  tokens, logprobs: `[R, N]`, pad / 0 after the row stops; `lengths [R]` counts the
  stop token. insert_step, insert_candidate: `[R, M]`, the generated index of the
  `<inspection-index-end>` after which candidate insert_candidate (0-based) was
  inserted; -1 where none. num_inspections `[R]`: every start-digits-end inspection.
  """

  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  insert_step: jax.Array
  insert_candidate: jax.Array
  num_inspections: jax.Array

  @property
  def num_inserted(self) -> jax.Array:
    return jnp.sum(self.insert_candidate >= 0, axis=-1)


def never_sampled(config: ModelConfig) -> tuple[int, ...]:
  """Token ids the sampler must not emit: vision placeholders and padding."""
  return (config.image_token_id, config.video_token_id, config.vision_start_token_id,
          config.vision_end_token_id, config.pad_token_id)


def banned_mask(config: ModelConfig) -> jax.Array:
  """`[vocab]` True for `never_sampled` tokens (vocab rows past the tokenizer included)."""
  return jnp.zeros(config.vocab_size, bool).at[jnp.array(never_sampled(config))].set(True)


def policy_logits(logits: jax.Array, banned: jax.Array, temperature: float) -> jax.Array:
  """The distribution both sampler and learner score: banned tokens out, temperature in."""
  logits = jnp.where(banned, -jnp.inf, logits.astype(jnp.float32))
  return logits / temperature if temperature > 0 else logits


def _draw(policy: jax.Array, key: jax.Array, sampling: SamplingParams) -> jax.Array:
  """A token `[R]` from policy logits `[R, V]` restricted by top-k / top-p."""
  if sampling.temperature == 0:
    return jnp.argmax(policy, axis=-1).astype(jnp.int32)
  if sampling.top_k:
    kth = jax.lax.top_k(policy, sampling.top_k)[0][:, -1:]
    policy = jnp.where(policy < kth, -jnp.inf, policy)
  if sampling.top_p < 1:
    sorted_logits = jnp.sort(policy, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < sampling.top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    policy = jnp.where(policy < threshold, -jnp.inf, policy)
  return jax.random.categorical(key, policy, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class _InspectionState:
  """Per-row parser of `<inspection-index-start>` digits `<inspection-index-end>`."""

  open: jax.Array  # [R] bool: inside an inspection.
  value: jax.Array  # [R] int32: digits so far.
  digits: jax.Array  # [R] int32: how many digits.
  bad: jax.Array  # [R] bool: a non-digit token inside.
  count: jax.Array  # [R] int32: closed start-digits-end inspections.
  inspected: jax.Array  # [R, K] bool: candidates already inserted.

  @classmethod
  def init(cls, rows: int, num_candidates: int) -> _InspectionState:
    zeros = jnp.zeros(rows, jnp.int32)
    return cls(open=zeros.astype(bool), value=zeros, digits=zeros, bad=zeros.astype(bool),
               count=zeros, inspected=jnp.zeros((rows, num_candidates), bool))

  def step(self, token, live, digit_value, digit_length, sampling: SamplingParams):
    """Consumes one token per row; returns (state, insert now [R], candidate [R])."""
    num_candidates = self.inspected.shape[1]
    is_start = live & (token == sampling.inspect_start_id)
    is_end = live & self.open & (token == sampling.inspect_end_id)
    digit, length = digit_value[token], jnp.minimum(digit_length[token], 6)
    inside = live & self.open & ~is_end
    is_digit = inside & (digit >= 0)
    well_formed = is_end & ~self.bad & (self.digits > 0)
    count = self.count + well_formed
    candidate = self.value - 1
    in_range = (candidate >= 0) & (candidate < num_candidates)
    safe = jnp.clip(candidate, 0, num_candidates - 1)
    first_time = ~jnp.take_along_axis(self.inspected, safe[:, None], axis=1)[:, 0]
    insert = well_formed & in_range & first_time & (count <= sampling.max_inspections)
    rows = jnp.arange(token.shape[0])
    state = _InspectionState(
        open=is_start | (self.open & ~is_end),
        value=jnp.where(is_start, 0, jnp.where(
            is_digit, jnp.minimum(self.value * 10**length + digit, 10**6), self.value)),
        digits=jnp.where(is_start, 0, self.digits + jnp.where(is_digit, length, 0)),
        bad=jnp.where(is_start, False, self.bad | (inside & (digit < 0))),
        count=count,
        inspected=self.inspected.at[rows, safe].set(self.inspected[rows, safe] | insert),
    )
    return state, insert, safe


@functools.partial(jax.jit, static_argnames=("model", "sampling", "group_size"))
def rollout(
    model: Qwen25VL,
    params: Any,
    inputs: RerankInputs,
    rng: jax.Array,
    *,
    sampling: SamplingParams,
    group_size: int = 1,
    forced_tokens: jax.Array | None = None,
) -> Trajectory:
  """Samples `group_size` responses per prompt.

  Args:
    model: the backbone `Qwen25VL` (static); params: its params.
    inputs: prompts (right padded) and their candidates' splice blocks.
    rng: PRNG key (unused when greedy).
    sampling: decoding rules (static).
    group_size: G samples per prompt; they share one prefill.
    forced_tokens: `[B * G, F]` optional response prefix: where >= 0 the token is taken
      instead of drawn (scored, parsed and spliced like a drawn one), e.g. to open every
      response with `<think>`.

  Returns:
    The `Trajectory` of the B * G rows.
  """
  config = model.config
  apply = lambda method, *a, **kw: model.apply({"params": params}, *a, method=method, **kw)
  batch, prompt_len = inputs.prompt_mask.shape
  num_candidates, block_len = inputs.splice_mask.shape[1:]
  budget = sampling.max_new_tokens
  max_inserts = sampling.max_inspections if sampling.inspection else 0
  rows = batch * group_size
  prompt_of_row = jnp.arange(rows) // group_size
  banned = banned_mask(config)
  stops = jnp.array(sampling.stop_token_ids or (config.eos_token_id,), jnp.int32)
  digit_value = jnp.full(config.vocab_size, -1, jnp.int32)
  digit_length = jnp.zeros(config.vocab_size, jnp.int32)
  if sampling.inspection:
    ids = jnp.array(sampling.digit_ids)
    digit_value = digit_value.at[ids].set(jnp.array(sampling.digit_values, jnp.int32))
    digit_length = digit_length.at[ids].set(jnp.array(sampling.digit_lengths, jnp.int32))
  if forced_tokens is None:
    forced_tokens = jnp.full((rows, 1), -1, jnp.int32)

  # One prefill per prompt, then the cache is broadcast to its G rows.
  cache = KVCache.init(config, batch, prompt_len + budget + max_inserts * block_len)
  hidden, cache = apply(Qwen25VL.decode, inputs.prompt_embeds, inputs.prompt_positions,
                        inputs.prompt_mask, cache, jnp.zeros(batch, jnp.int32),
                        return_hidden=True)
  last = jnp.sum(inputs.prompt_mask, axis=-1) - 1
  logits = apply(Qwen25VL.logits, hidden[jnp.arange(batch), last][:, None])[:, 0]
  repeat = lambda x, axis=0: jnp.repeat(x, group_size, axis=axis)
  cache = KVCache(k=repeat(cache.k, 1), v=repeat(cache.v, 1), valid=repeat(cache.valid))

  def splice(operands, insert, candidate):
    """Prefills the chosen candidate block into the rows that inspect it."""
    cache, write, position, logits = operands
    pick = lambda x: x[prompt_of_row, candidate]
    mask = pick(inputs.splice_mask) & insert[:, None]
    offsets = inputs.splice_offsets[:, prompt_of_row, candidate]
    block_hidden, cache = apply(Qwen25VL.decode, pick(inputs.splice_embeds),
                                position[None, :, None] + offsets, mask, cache, write,
                                return_hidden=True)
    n = jnp.sum(mask, axis=-1)
    last_hidden = block_hidden[jnp.arange(rows), jnp.maximum(n - 1, 0)]
    block_logits = apply(Qwen25VL.logits, last_hidden[:, None])[:, 0]
    logits = jnp.where(insert[:, None], block_logits, logits)
    advance = jnp.where(insert, pick(inputs.splice_advance), 0)
    return cache, write + n, position + advance, logits

  def body(state):
    (step, out, done, logits, cache, write, position, inspection, key) = state
    key, draw_key = jax.random.split(key)
    policy = policy_logits(logits, banned, sampling.temperature)
    token = _draw(policy, draw_key, sampling)
    forced = forced_tokens[:, jnp.minimum(step, forced_tokens.shape[1] - 1)]
    token = jnp.where((step < forced_tokens.shape[1]) & (forced >= 0), forced, token)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(policy, -1), token[:, None], -1)[:, 0]
    live = ~done
    token = jnp.where(live, token, config.pad_token_id)
    out = dict(out, tokens=out["tokens"].at[:, step].set(token),
               logprobs=out["logprobs"].at[:, step].set(jnp.where(live, logprob, 0.0)))
    done = done | jnp.isin(token, stops) | (step + 1 >= budget)

    embed = apply(Qwen25VL.embed, token[:, None])
    logits, cache = apply(Qwen25VL.decode, embed, text_positions(position, 1), live[:, None],
                          cache, write)
    logits = logits[:, 0]
    write, position = write + live, position + live

    if sampling.inspection:
      inspection, insert, candidate = inspection.step(token, live, digit_value, digit_length,
                                                          sampling)
      insert = insert & ~done
      slot = jnp.sum(out["insert_candidate"] >= 0, axis=-1)
      record = lambda a, v: a.at[jnp.arange(rows), jnp.minimum(slot, max_inserts - 1)].set(
          jnp.where(insert, v, a[jnp.arange(rows), jnp.minimum(slot, max_inserts - 1)]))
      out = dict(out, insert_step=record(out["insert_step"], step),
                 insert_candidate=record(out["insert_candidate"], candidate))
      cache, write, position, logits = jax.lax.cond(
          jnp.any(insert), functools.partial(splice, insert=insert, candidate=candidate),
          lambda operands: operands, (cache, write, position, logits))
    return (step + 1, out, done, logits, cache, write, position, inspection, key)

  out = {
      "tokens": jnp.full((rows, budget), config.pad_token_id, jnp.int32),
      "logprobs": jnp.zeros((rows, budget), jnp.float32),
      "insert_step": jnp.full((rows, max_inserts), -1, jnp.int32),
      "insert_candidate": jnp.full((rows, max_inserts), -1, jnp.int32),
  }
  state = (jnp.int32(0), out, jnp.zeros(rows, bool), repeat(logits), cache,
           repeat(last + 1), repeat(inputs.next_position),
           _InspectionState.init(rows, num_candidates), rng)
  state = jax.lax.while_loop(lambda s: ~jnp.all(s[2]), body, state)
  out, inspection = state[1], state[7]
  return Trajectory(
      tokens=out["tokens"],
      logprobs=out["logprobs"],
      lengths=_lengths(out["tokens"], stops, budget),
      insert_step=out["insert_step"],
      insert_candidate=out["insert_candidate"],
      num_inspections=inspection.count,
  )


def _lengths(tokens: jax.Array, stops: jax.Array, budget: int) -> jax.Array:
  """Generated length of each row, counting its stop token."""
  is_stop = jnp.isin(tokens, stops)
  first = jnp.argmax(is_stop, axis=-1)
  return jnp.where(is_stop.any(-1), first + 1, budget).astype(jnp.int32)
