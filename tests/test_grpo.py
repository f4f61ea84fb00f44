"""GRPO advantages, KL estimators and loss: golden numbers worked by hand, and exactness under
gradient accumulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrv_jax.rl import grpo

LOG = np.log


def _loss(aggregation="token_mean", **kwargs):
  """`grpo_loss` under jit, the batch being the whole batch (its own denominator)."""

  @jax.jit
  def run(logp, old_logp, ref_logp, advantages, mask, entropy=None):
    return grpo.grpo_loss(logp, old_logp, ref_logp, advantages, mask, entropy=entropy,
                          denominator=grpo.loss_denominator(mask, aggregation),
                          aggregation=aggregation, **kwargs)

  return run


def test_group_advantages_by_hand():
  # Group 0: mean 1.5, deviations (1.5, -0.5, -0.5, -0.5), sum of squares 3;
  #   sample std sqrt(3 / 3) = 1 -> A = deviations; population std sqrt(3 / 4) = 0.8660254.
  # Group 1: all 0.7 -> zero variance, A = 0 exactly.
  rewards = jnp.array([3.0, 1.0, 1.0, 1.0, 0.7, 0.7, 0.7, 0.7])
  run = jax.jit(grpo.group_advantages, static_argnames=("group_size", "eps", "ddof"))
  advantages, zero_variance = run(rewards, group_size=4, eps=0.0)
  np.testing.assert_allclose(advantages[:4], [1.5, -0.5, -0.5, -0.5], rtol=1e-6)
  np.testing.assert_array_equal(advantages[4:], 0.0)
  np.testing.assert_array_equal(zero_variance, [False, True])
  population, _ = run(rewards, group_size=4, eps=0.0, ddof=0)
  np.testing.assert_allclose(population[:4], [1.7320508, -0.5773503, -0.5773503, -0.5773503],
                             rtol=1e-6)
  default, _ = run(rewards, group_size=4)  # eps = 1e-4: 1.5 / 1.0001.
  np.testing.assert_allclose(default[0], 1.49985, rtol=1e-6)
  # Two groups of 2: (0, 1) -> sample std 0.7071068 -> A = -+0.5 / 0.7071068 = -+0.7071068.
  pairs, zero_variance = run(jnp.array([0.0, 1.0, 2.0, 2.0]), group_size=2, eps=0.0)
  np.testing.assert_allclose(pairs, [-0.7071068, 0.7071068, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(zero_variance, [False, True])
  with pytest.raises(ValueError, match="6 rewards cannot form groups of group_size=4"):
    grpo.group_advantages(jnp.zeros(6), 4)
  with pytest.raises(ValueError, match="group_size=1"):
    grpo.group_advantages(jnp.zeros(4), 1)


def test_kl_estimators_by_hand():
  # d = logp - ref = 0, ln 2 = 0.6931472, -ln 2.
  # k1 = d; k2 = d^2 / 2 = 0.2402265; k3 = e^-d + d - 1: 0.5 + 0.6931472 - 1 = 0.1931472,
  #   2 - 0.6931472 - 1 = 0.3068528.
  logp = jnp.array(LOG([1.0, 0.5, 0.25]))
  ref = jnp.array(LOG([1.0, 0.25, 0.5]))
  run = jax.jit(grpo.kl_estimate, static_argnames="kind")
  np.testing.assert_allclose(run(logp, ref, "k1"), [0.0, 0.6931472, -0.6931472], atol=1e-6)
  np.testing.assert_allclose(run(logp, ref, "k2"), [0.0, 0.2402265, 0.2402265], atol=1e-6)
  np.testing.assert_allclose(run(logp, ref, "k3"), [0.0, 0.1931472, 0.3068528], atol=1e-6)
  with pytest.raises(ValueError, match="kl_estimator 'k4': expected one of"):
    grpo.kl_estimate(logp, ref, "k4")


def _two_sequences():
  """Lengths 3 and 1 (N = 3); ratios (1, 1.1, 0.9) and (1.05); A = (1, -2); no clipping.

  Masked slots hold values whose ratio would overflow: they must not leak.
  """
  old = jnp.array([[0.0, 0.0, 0.0], [0.0, -50.0, -50.0]])
  logp = jnp.array([[0.0, LOG(1.1), LOG(0.9)], [LOG(1.05), 50.0, 50.0]], jnp.float32)
  mask = jnp.array([[True, True, True], [True, False, False]])
  return logp, old, jnp.array([1.0, -2.0]), mask


@pytest.mark.parametrize("aggregation,denominator,expected", [
    # Per-token loss -rho * A: row 0 (-1, -1.1, -0.9), sum -3; row 1 (2.1).
    ("token_mean", 4.0, -0.225),  # (-3 + 2.1) / 4 tokens
    ("sequence_mean", 2.0, 0.55),  # (-3 / 3 + 2.1 / 1) / 2 sequences
    ("sequence_sum", 2.0, -0.45),  # (-3 + 2.1) / 2 sequences
])
def test_aggregations_by_hand(aggregation, denominator, expected):
  logp, old, advantages, mask = _two_sequences()
  assert grpo.loss_denominator(mask, aggregation) == denominator
  loss, metrics = _loss(aggregation)(logp, old, None, advantages, mask)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["pg_loss"], expected, rtol=1e-6)
  assert metrics["kl_loss"] == 0 and "kl_sum" not in metrics and "entropy_sum" not in metrics
  assert (metrics["tokens"], metrics["sequences"]) == (4, 2)
  assert metrics["clipped_low"] == metrics["clipped_high"] == 0
  np.testing.assert_allclose(metrics["ratio_sum"], 1 + 1.1 + 0.9 + 1.05, rtol=1e-6)
  np.testing.assert_allclose([metrics["ratio_min"], metrics["ratio_max"]], [0.9, 1.1], rtol=1e-6)
  grad = jax.grad(lambda x: _loss(aggregation)(x, old, None, advantages, mask)[0])(logp)
  assert np.isfinite(grad).all() and (grad[1, 1:] == 0).all()


def test_clipping_by_hand():
  """eps_low = 0.2, eps_high = 0.28: ratio kept in [0.8, 1.28] where the clip binds."""
  # Row 0, A = +1, rho (1.5, 0.5, 1.25): min(1.5, 1.28) = 1.28 (clipped high), min(0.5, 0.8) =
  #   0.5, min(1.25, 1.25) = 1.25 -> loss (-1.28, -0.5, -1.25).
  # Row 1, A = -1, rho (0.5, 1.5, 0.78): min(-0.5, -0.8) = -0.8 (clipped low),
  #   min(-1.5, -1.28) = -1.5, min(-0.78, -0.8) = -0.8 (clipped low) -> loss (0.8, 1.5, 0.8).
  # token_mean: (-3.03 + 3.1) / 6 = 0.0116667.
  # d loss / d logp = -A * rho / 6 where unclipped, 0 where clipped.
  logp = jnp.array(LOG([[1.5, 0.5, 1.25], [0.5, 1.5, 0.78]]), jnp.float32)
  old, mask, advantages = jnp.zeros((2, 3)), jnp.ones((2, 3), bool), jnp.array([1.0, -1.0])
  run = _loss(epsilon_low=0.2, epsilon_high=0.28)
  loss, metrics = run(logp, old, None, advantages, mask)
  np.testing.assert_allclose(loss, 0.07 / 6, rtol=1e-5)
  assert (metrics["clipped_low"], metrics["clipped_high"]) == (2, 1)
  grad = jax.grad(lambda x: run(x, old, None, advantages, mask)[0])(logp)
  np.testing.assert_allclose(grad, [[0.0, -0.5 / 6, -1.25 / 6], [0.0, 1.5 / 6, 0.0]], atol=1e-6)
  # Symmetric eps = 0.2 clips rho = 1.25 too: row 0 (-1.2, -0.5, -1.2) -> (-2.9 + 3.1) / 6.
  symmetric, metrics = _loss(epsilon_low=0.2, epsilon_high=0.2)(logp, old, None, advantages, mask)
  np.testing.assert_allclose(symmetric, 0.2 / 6, rtol=1e-5)
  assert (metrics["clipped_low"], metrics["clipped_high"]) == (2, 2)


def test_kl_penalty_and_beta_zero():
  # One row, A = 0 (no policy term), rho = 1; d = logp - ref = (ln 2, -ln 2).
  # k3 = (0.1931472, 0.3068528), mean 0.25 -> beta = 0.04 gives loss 0.01.
  # d k3 / d logp = 1 - e^-d = (0.5, -1) -> grad = 0.04 * (0.5, -1) / 2 tokens.
  logp = jnp.array([LOG([0.5, 0.25])], jnp.float32)
  ref = jnp.array([LOG([0.25, 0.5])], jnp.float32)
  mask, advantages = jnp.ones((1, 2), bool), jnp.zeros(1)
  run = _loss(beta=0.04, kl_estimator="k3")
  loss, metrics = run(logp, logp, ref, advantages, mask)
  np.testing.assert_allclose(loss, 0.01, rtol=1e-5)
  np.testing.assert_allclose([metrics["kl_loss"], metrics["kl_sum"]], [0.01, 0.5], rtol=1e-5)
  assert metrics["pg_loss"] == 0
  grad = jax.grad(lambda x: run(x, logp, ref, advantages, mask)[0])(logp)
  np.testing.assert_allclose(grad, [[0.01, -0.02]], rtol=1e-5)
  # k1 mean (ln 2 - ln 2) / 2 = 0; k2 mean 0.2402265 -> 0.04 * 0.2402265 = 0.0096091.
  np.testing.assert_allclose(_loss(beta=0.04, kl_estimator="k1")(
      logp, logp, ref, advantages, mask)[0], 0.0, atol=1e-7)
  np.testing.assert_allclose(_loss(beta=0.04, kl_estimator="k2")(
      logp, logp, ref, advantages, mask)[0], 0.0096091, rtol=1e-5)
  # beta = 0: no reference needed; given one, KL is reported but not in the loss.
  loss, metrics = _loss()(logp, logp, None, advantages, mask)
  assert loss == 0 and "kl_sum" not in metrics
  loss, metrics = _loss()(logp, logp, ref, advantages, mask)
  assert loss == 0 and metrics["kl_loss"] == 0
  np.testing.assert_allclose(metrics["kl_sum"], 0.5, rtol=1e-5)
  with pytest.raises(ValueError, match="beta=0.04 needs ref_logp"):
    grpo.grpo_loss(logp, logp, None, advantages, mask, denominator=2.0, beta=0.04)


def test_entropy_metric():
  # Uniform over 4 tokens: ln 4 = 1.3862944; a -inf logit contributes 0: ln 2 = 0.6931472.
  logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -jnp.inf, -jnp.inf]]])
  entropy = jax.jit(grpo.token_entropy)(logits)
  np.testing.assert_allclose(entropy, [[1.3862944, 0.6931472]], rtol=1e-6)
  _, metrics = _loss()(jnp.zeros((1, 2)), jnp.zeros((1, 2)), None, jnp.ones(1),
                       jnp.array([[True, False]]), entropy=entropy)
  np.testing.assert_allclose(metrics["entropy_sum"], 1.3862944, rtol=1e-6)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_gradient_accumulation_is_exact(aggregation):
  """4 sequences in 2 micro-batches of 2 (same global denominator) = the full batch."""
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
  params = jnp.array([0.3, -0.2, 0.5])
  policy = lambda w, x: jax.nn.log_sigmoid(x @ w)  # Toy log-probs [R, N].
  old = policy(params, features) + jnp.asarray(rng.normal(scale=0.3, size=(4, 5)), jnp.float32)
  ref = policy(params, features) - 0.1
  mask = jnp.arange(5) < jnp.array([5, 2, 4, 1])[:, None]
  advantages = jnp.array([1.0, -0.5, 2.0, -1.0])
  options = dict(aggregation=aggregation, epsilon_low=0.2, epsilon_high=0.28, beta=0.05)

  @jax.jit
  def loss_and_grad(w, rows, denominator):
    def loss(w):
      return grpo.grpo_loss(policy(w, features[rows]), old[rows], ref[rows], advantages[rows],
                            mask[rows], denominator=denominator, **options)[0]
    return jax.value_and_grad(loss)(w)

  denominator = grpo.loss_denominator(mask, aggregation)
  full = loss_and_grad(params, jnp.arange(4), denominator)
  halves = [loss_and_grad(params, rows, denominator) for rows in (jnp.array([0, 1]),
                                                                   jnp.array([2, 3]))]
  np.testing.assert_allclose(halves[0][0] + halves[1][0], full[0], rtol=1e-6)
  np.testing.assert_allclose(halves[0][1] + halves[1][1], full[1], rtol=1e-6, atol=1e-8)
  assert np.abs(full[1]).max() > 1e-3  # The gradient is not trivially zero.
  # The example is not degenerate: each micro-batch normalising by itself gets it wrong.
  local = [loss_and_grad(params, rows, grpo.loss_denominator(mask[rows], aggregation))[0]
           for rows in (jnp.array([0, 1]), jnp.array([2, 3]))]
  assert not np.isclose(sum(local), full[0], rtol=1e-3)


def test_bad_options():
  logp, old, advantages, mask = _two_sequences()
  call = functools.partial(grpo.grpo_loss, logp, old, None, advantages, mask, denominator=4.0)
  with pytest.raises(ValueError, match="aggregation 'mean': expected one of"):
    call(aggregation="mean")
  with pytest.raises(ValueError, match="epsilon_low=1.5"):
    call(epsilon_low=1.5)
  with pytest.raises(ValueError, match="beta must be >= 0, got -1"):
    call(beta=-1.0)
  with pytest.raises(ValueError, match="aggregation 'sum': expected one of"):
    grpo.loss_denominator(mask, "sum")
