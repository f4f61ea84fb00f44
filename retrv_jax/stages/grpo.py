"""Stage 3, GRPO with the curriculum efficiency reward (PAPER.md §5.3), one jitted step.

    sample    encode each micro-batch, draw G responses per prompt (inspections spliced
              in the decode loop); the sampler's log-probs are the old policy's
    reward    in jit: R = r_f + r_r, r_r = 1[correct](1 - lambda N_ins / K), N_ins from
              the insertion record, lambda = curriculum_lambda(optimizer step)
    advantage per group of G; all-equal groups are counted (zero_variance) and, with
              `filter_zero_variance`, left out of the loss
    reference if beta > 0: log-probs under the same weights with LoRA off and the ICM as
              it was when GRPO started (the SFT policy: SFT's adapters are merged into
              the kernels when the stage starts, see `outputs.load_params(merge_lora)`)
    update    mu = `num_iterations` optimizer steps on this batch; each is a scan over
              the micro-batches whose summed loss is the whole batch's (the aggregation's
              denominator is computed over all of them first)

Metrics (per step, as (sum, count) pairs): reward, format, correct, n_inspected, lambda,
kl, clip_fraction, entropy (the Monte-Carlo estimate: mean -log pi of the sampled tokens),
response_tokens, zero_variance, logprob_gap (|learner - sampler| log-prob per token, first
iteration), generated_tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from retrv_jax.config import ConfigError
from retrv_jax.data.tokenizer import Tokenizer
from retrv_jax.models import lora
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.models.reranker import Reranker, encode_batch
from retrv_jax.rl import grpo as grpo_lib
from retrv_jax.rl import learner, rewards, sampler
from retrv_jax.stages import setup, trainer

TRAINABLE = lora.TRAINABLE
PIPELINE_STAGE = "grpo"
REFERENCE_ICM = "reference_icm"  # Key of the frozen ICM copy in the frozen params.


def frozen_extras(params: dict) -> dict:
  """What the step needs besides the frozen weights: the reference ICM (a copy)."""
  return {REFERENCE_ICM: jax.tree.map(jnp.copy, params["icm"])} if "icm" in params else {}


def _split(trainable, frozen) -> tuple[dict, dict | None]:
  params = lora.combine(trainable, frozen)
  reference_icm = params.pop(REFERENCE_ICM, None)
  return params, reference_icm


def make_step(model: Reranker, config: ml_collections.ConfigDict, tokenizer: Tokenizer, tx):
  section = config.grpo
  group = int(section.group_size)
  k = int(config.data.num_candidates)
  sampling = setup.sampling_params(config, tokenizer, temperature=float(section.temperature),
                                   max_new_tokens=int(section.max_new_tokens),
                                   top_k=int(section.top_k), top_p=float(section.top_p))
  format_tokens = rewards.FormatTokens.from_tokenizer(tokenizer)
  backbone = Qwen25VL(model.config)
  reference = Reranker(model.config.replace(lora_rank=0), model.compression)
  beta = float(section.beta)
  loss_options = dict(epsilon_low=float(section.epsilon_low),
                      epsilon_high=float(section.epsilon_high), beta=beta,
                      kl_estimator=section.kl_estimator, aggregation=section.aggregation)
  for field, allowed in (("aggregation", grpo_lib.AGGREGATIONS),
                         ("kl_estimator", grpo_lib.KL_ESTIMATORS),
                         ("curriculum_schedule", rewards.CURRICULUM_SCHEDULES)):
    if section[field] not in allowed:
      raise ConfigError(f"config.grpo.{field} = {section[field]!r}: expected one of {allowed}")
  chunk = int(section.logprob_chunk)

  def logprobs(m: Reranker, params, batch, traj):
    inputs = encode_batch(m, params, batch)
    return learner.token_logprobs(Qwen25VL(m.config), params["backbone"], inputs, traj,
                                  group_size=group, temperature=sampling.temperature,
                                  chunk_size=chunk)

  def sample(params, batch, key):
    traj = sampler.rollout(backbone, params["backbone"], encode_batch(model, params, batch), key,
                           sampling=sampling, group_size=group)
    return jax.tree.map(jax.lax.stop_gradient, traj)

  def step(state: trainer.TrainState, frozen, micro_batches):
    stacked = trainer.stack_micro_batches(micro_batches)
    n = len(micro_batches)
    params, reference_icm = _split(jax.lax.stop_gradient(state.trainable), frozen)
    keys = jax.random.split(state.rng, n + 1)
    trajs = jax.lax.map(lambda xs: sample(params, *xs), (stacked, keys[1:]))
    lam = rewards.curriculum_lambda(state.step, int(section.steps), section.curriculum_schedule,
                                    float(section.curriculum_value))
    parts = jax.vmap(lambda t, gt: rewards.trajectory_rewards(
        t, gt, format_tokens, curriculum_weight=lam, num_candidates=k,
        max_inspections=sampling.max_inspections))(trajs, stacked["gt_index"])
    advantages, zero_variance = jax.vmap(
        lambda r: grpo_lib.group_advantages(r, group))(parts["reward"])
    mask = jnp.arange(trajs.tokens.shape[-1]) < trajs.lengths[..., None]  # [n, R, N]
    if section.filter_zero_variance:
      mask &= ~jnp.repeat(zero_variance, group, axis=-1)[..., None]
    denominator = grpo_lib.loss_denominator(mask.reshape(-1, mask.shape[-1]), section.aggregation)
    ref_logp = None
    if beta > 0:
      ref_params = {"backbone": params["backbone"]}
      if reference_icm is not None:
        ref_params["icm"] = reference_icm
      ref_logp = jax.lax.map(lambda xs: logprobs(reference, ref_params, *xs)[0],
                             (stacked, trajs))

    def loss_fn(trainable, batch, traj, adv, row_mask, ref):
      p, _ = _split(trainable, frozen)
      logp, _ = logprobs(model, p, batch, traj)
      loss, m = grpo_lib.grpo_loss(logp, traj.logprobs, ref if beta > 0 else None, adv, row_mask,
                                   denominator=denominator, **loss_options)
      gap = jnp.sum(jnp.where(row_mask, jnp.abs(logp - traj.logprobs), 0.0))
      nll = jnp.sum(jnp.where(row_mask, -logp, 0.0))
      return loss, dict(m, logprob_gap=jax.lax.stop_gradient(gap),
                        entropy_sum=jax.lax.stop_gradient(nll))

    def iteration(st: trainer.TrainState, _):
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

      def body(grads, xs):
        (loss, m), g = grad_fn(st.trainable, *xs)
        return jax.tree.map(jnp.add, grads, g), (loss, m)

      zeros = jax.tree.map(jnp.zeros_like, st.trainable)
      refs = ref_logp if ref_logp is not None else jnp.zeros(mask.shape, jnp.float32)
      grads, (losses, m) = jax.lax.scan(body, zeros, (stacked, trajs, advantages, mask, refs))
      m = jax.tree.map(lambda x: jnp.sum(x, axis=0), m)
      new, out = trainer.apply_gradients(st, grads, jnp.sum(losses), {}, tx, st.rng)
      return new, (out, m)

    state, (outs, ms) = jax.lax.scan(iteration, state, None, length=int(section.num_iterations))
    first = jax.tree.map(lambda x: x[0], ms)
    tokens = first["tokens"]
    rows = jnp.float32(parts["reward"].size)
    lengths = trajs.lengths.astype(jnp.float32)
    pairs = {
        "reward": (jnp.sum(parts["reward"]), rows),
        "format": (jnp.sum(parts["format"]), rows),
        "correct": (jnp.sum(parts["correct"]), rows),
        "n_inspected": (jnp.sum(parts["n_inspected"]), rows),
        "response_tokens": (jnp.sum(lengths), rows),
        "generated_tokens": (jnp.sum(lengths), jnp.float32(1)),
        "zero_variance": (jnp.sum(zero_variance, dtype=jnp.float32),
                          jnp.float32(zero_variance.size)),
        "lambda": (lam, jnp.float32(1)),
        "clip_fraction": (first["clipped_low"] + first["clipped_high"], tokens),
        "entropy": (first["entropy_sum"], tokens),
        "logprob_gap": (first["logprob_gap"], tokens),
        "pg_loss": (first["pg_loss"], jnp.float32(1)),
    }
    if "kl_sum" in first:
      pairs["kl"] = (first["kl_sum"], tokens)
    last = jax.tree.map(lambda x: x[-1], outs)
    state = state.replace(rng=keys[0])
    out_pairs = dict(last["pairs"], **pairs)
    return state, dict(last, pairs=out_pairs, finite=jnp.all(outs["finite"]))

  return step
