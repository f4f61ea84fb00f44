"""GRPO: group-relative advantages, KL estimators and the clipped surrogate loss.

Per token t of row r (sampled from the old policy, scored by the policy and the reference):

    rho    = exp(logp - old_logp)
    loss_t = -min(rho * A_r, clip(rho, 1 - eps_low, 1 + eps_high) * A_r) + beta * KL_t

KL_t estimates KL(pi_theta || pi_ref) from the sampled token (Schulman, "Approximating KL
divergence", 2020), with d = logp - ref_logp:  k1 = d,  k2 = d^2 / 2,  k3 = e^-d + d - 1.

Exact under gradient accumulation: `grpo_loss` returns a micro-batch's *contribution*,
sum_r sum_t w_rt * loss_rt / denominator, with `denominator = loss_denominator(mask)` of the
whole batch. Split the batch by rows into micro-batches, pass each the same denominator, and
the contributions (and their gradients) add up to the full-batch loss (and gradient).

    aggregation      w_rt              denominator
    token_mean       mask              valid tokens in the batch
    sequence_mean    mask / len_r      sequences with a valid token
    sequence_sum     mask              sequences with a valid token

Metrics are sums as well: keys ending in `_min` / `_max` combine by min / max, every other
key adds over micro-batches and hosts; divide by `tokens` on the host for means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum")
KL_ESTIMATORS = ("k1", "k2", "k3")
# exp() of a log-ratio past this overflows float32 gradients; ratios are cut there.
MAX_LOG_RATIO = 20.0


def group_advantages(
    rewards: jax.Array, group_size: int, *, eps: float = 1e-4, ddof: int = 1
) -> tuple[jax.Array, jax.Array]:
  """A = (R - mean_group) / (std_group + eps), for `rewards [B * G]` in groups of G rows.

  std is the sample std (`ddof=1`, Bessel's correction) by default, as TRL's GRPOTrainer
  (`torch.std`) and its eps of 1e-4; `ddof=0` gives the population std. A group whose
  rewards are all equal carries no signal: its advantages are exactly 0.

  Returns:
    advantages `[B * G]` float32 and zero_variance `[B]` bool (the all-equal groups).
  """
  if ddof not in (0, 1):
    raise ValueError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof}")
  if group_size <= ddof or rewards.shape[0] % group_size:
    raise ValueError(f"{rewards.shape[0]} rewards cannot form groups of group_size={group_size}"
                     f" (a multiple of it, and more than {ddof} per group, is needed)")
  grouped = rewards.astype(jnp.float32).reshape(-1, group_size)
  mean = jnp.mean(grouped, axis=1, keepdims=True)
  std = jnp.std(grouped, axis=1, keepdims=True, ddof=ddof)
  zero_variance = jnp.max(grouped, axis=1) == jnp.min(grouped, axis=1)
  advantages = jnp.where(zero_variance[:, None], 0.0, (grouped - mean) / (std + eps))
  return advantages.reshape(-1), zero_variance


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = "k3") -> jax.Array:
  """Per-token estimate of KL(pi_theta || pi_ref) from log-probs of a sampled token."""
  d = logp - ref_logp
  if kind == "k1":
    return d
  if kind == "k2":
    return 0.5 * jnp.square(d)
  if kind == "k3":
    return jnp.exp(-d) + d - 1.0
  raise ValueError(f"kl_estimator {kind!r}: expected one of {KL_ESTIMATORS}")


def _check_aggregation(aggregation: str) -> None:
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation {aggregation!r}: expected one of {AGGREGATIONS}")


def loss_denominator(mask: jax.Array, aggregation: str = "token_mean") -> jax.Array:
  """The normaliser of the whole batch `mask [R, N]`: valid tokens or sequences (>= 1)."""
  _check_aggregation(aggregation)
  if aggregation == "token_mean":
    count = jnp.sum(mask, dtype=jnp.float32)
  else:
    count = jnp.sum(jnp.any(mask, axis=-1), dtype=jnp.float32)
  return jnp.maximum(count, 1.0)


def token_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) over the last axis, float32 (`[..., V] -> [...]`)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * jnp.where(jnp.isfinite(logp), logp, 0.0), axis=-1)


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    denominator: jax.Array | float,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "token_mean",
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """This micro-batch's share of the GRPO loss, and metric sums.

  Args:
    logp: `[R, N]` log-probs of the sampled tokens under the trained policy (differentiated).
    old_logp: `[R, N]` under the policy that sampled them (constants).
    ref_logp: `[R, N]` under the reference policy; may be None when beta == 0.
    advantages: `[R]` (or `[R, N]`) from `group_advantages`.
    mask: `[R, N]` bool, the scored tokens (generated, not inserted, before the length).
    denominator: `loss_denominator` of the whole batch (all micro-batches).
    epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high] of the ratio.
    beta: weight of the KL penalty; 0 skips it.
    kl_estimator: 'k1', 'k2' or 'k3'.
    aggregation: 'token_mean', 'sequence_mean' or 'sequence_sum' (module docstring).
    entropy: optional `[R, N]` policy entropy per token (`token_entropy`), for metrics.

  Returns:
    (loss, metrics): the loss contribution (a float32 scalar) and a dict of scalars: loss
    parts `pg_loss`, `kl_loss`; counts `tokens`, `sequences`, `clipped_low`,
    `clipped_high` (tokens where the clip stops the gradient); `ratio_sum`, `ratio_min`,
    `ratio_max`; `kl_sum` when ref_logp is given; `entropy_sum` when entropy is.
  """
  _check_aggregation(aggregation)
  if not 0 <= epsilon_low < 1 or epsilon_high < 0:
    raise ValueError(f"clip range needs 0 <= epsilon_low < 1 and epsilon_high >= 0, got "
                     f"epsilon_low={epsilon_low}, epsilon_high={epsilon_high}")
  if beta < 0:
    raise ValueError(f"beta must be >= 0, got {beta}")
  if beta > 0 and ref_logp is None:
    raise ValueError(f"beta={beta} needs ref_logp (the reference policy's log-probs)")
  mask = mask.astype(bool)
  valid = mask.astype(jnp.float32)
  logp = logp.astype(jnp.float32)
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  advantages = advantages.astype(jnp.float32)

  log_ratio = jnp.where(mask, logp - old_logp.astype(jnp.float32), 0.0)
  ratio = jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))
  clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  surrogate = -jnp.minimum(ratio * advantages, clipped_ratio * advantages)

  weights = valid
  if aggregation == "sequence_mean":
    weights = valid / jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1.0)
  share = lambda per_token: jnp.sum(weights * per_token) / denominator

  metrics = {
      "pg_loss": share(surrogate),
      "tokens": jnp.sum(valid),
      "sequences": jnp.sum(jnp.any(mask, axis=-1), dtype=jnp.float32),
      "clipped_low": jnp.sum(mask & (ratio < 1.0 - epsilon_low) & (advantages < 0),
                             dtype=jnp.float32),
      "clipped_high": jnp.sum(mask & (ratio > 1.0 + epsilon_high) & (advantages > 0),
                              dtype=jnp.float32),
      "ratio_sum": jnp.sum(valid * ratio),
      "ratio_min": jnp.min(jnp.where(mask, ratio, jnp.inf)),
      "ratio_max": jnp.max(jnp.where(mask, ratio, -jnp.inf)),
  }
  loss = metrics["pg_loss"]
  metrics["kl_loss"] = jnp.zeros((), jnp.float32)
  if ref_logp is not None:
    kl = kl_estimate(jnp.where(mask, logp, 0.0),
                     jnp.where(mask, ref_logp.astype(jnp.float32), 0.0), kl_estimator)
    metrics["kl_sum"] = jnp.sum(valid * kl)
    if beta > 0:
      metrics["kl_loss"] = beta * share(kl)
      loss = loss + metrics["kl_loss"]
  if entropy is not None:
    metrics["entropy_sum"] = jnp.sum(valid * entropy.astype(jnp.float32))
  return loss, metrics
