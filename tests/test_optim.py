"""The optimizer: schedule values, clipping, masked weight decay, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs.grpo as grpo_config
from retrv_jax import optim
from retrv_jax.config import ConfigError


def _section(**changes):
  section = optim.default_config()
  section.update({"total_steps": 1000, **changes})
  return section


def test_schedule_warms_up_then_decays_to_the_end_ratio():
  section = _section(learning_rate=2e-4, warmup_steps=10, total_steps=110, end_lr_ratio=0.1)
  lr = lambda step: optim.learning_rate_at(section, step)
  assert lr(0) == 0.0
  assert lr(5) == pytest.approx(1e-4)
  assert lr(10) == pytest.approx(2e-4)
  assert lr(60) == pytest.approx(2e-4 * (0.1 + 0.9 * 0.5), rel=1e-5)  # Half-way down the cosine.
  assert lr(110) == pytest.approx(2e-5)
  assert lr(10_000) == pytest.approx(2e-5)
  schedule = optim.make_schedule(section)
  assert float(schedule(37)) == lr(37)


def test_total_steps_zero_follows_the_stage_steps():
  stage = {"steps": 40, "optim": _section(total_steps=0, warmup_steps=0, end_lr_ratio=0.5)}
  assert optim.for_stage(stage)["total_steps"] == 40
  assert optim.learning_rate_at(optim.for_stage(stage), 40) == pytest.approx(0.5e-4)
  stage["optim"].total_steps = 1000  # An explicit schedule length is kept.
  assert optim.for_stage(stage)["total_steps"] == 1000
  with pytest.raises(ConfigError, match=r"total_steps = 0: expected a positive integer"):
    optim.make_optimizer(_section(total_steps=0))


def test_overriding_a_stage_s_steps_stretches_its_schedule():
  config = grpo_config.get_config("tiny")
  config.sft.steps = 600
  sft = optim.for_stage(config.sft)
  assert sft["total_steps"] == 600
  assert optim.learning_rate_at(sft, 300) > optim.learning_rate_at(sft, 600)


def test_schedule_without_warmup_starts_at_the_peak():
  assert optim.learning_rate_at(_section(warmup_steps=0, learning_rate=3e-4), 0) == (
      pytest.approx(3e-4))


def _first_update(section, grads, params):
  tx = optim.make_optimizer(section)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return updates


def test_clipping_clips_to_the_global_norm():
  # eps = 1 keeps Adam's first step scale-dependent: update = -lr * g / (|g| + 1).
  section = _section(learning_rate=1.0, warmup_steps=0, eps=1.0, weight_decay=0.0,
                     grad_clip_norm=1.0)
  params = {"a": {"kernel": jnp.zeros(1)}, "b": {"kernel": jnp.zeros(1)}}
  grads = {"a": {"kernel": jnp.array([30.0])}, "b": {"kernel": jnp.array([40.0])}}  # Norm 50.
  clipped = _first_update(section, grads, params)
  np.testing.assert_allclose(clipped["a"]["kernel"], [-0.6 / 1.6], rtol=1e-5)
  np.testing.assert_allclose(clipped["b"]["kernel"], [-0.8 / 1.8], rtol=1e-5)
  section.grad_clip_norm = 0.0
  unclipped = _first_update(section, grads, params)
  np.testing.assert_allclose(unclipped["a"]["kernel"], [-30.0 / 31.0], rtol=1e-5)
  section.grad_clip_norm = 100.0  # Above the norm: nothing changes.
  loose = _first_update(section, grads, params)
  np.testing.assert_allclose(loose["b"]["kernel"], [-40.0 / 41.0], rtol=1e-5)


def test_weight_decay_skips_norms_biases_and_embeddings():
  section = _section(learning_rate=0.5, warmup_steps=0, weight_decay=0.1)
  params = {
      "q_proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2), "lora_a": jnp.ones((2, 1)),
                 "lora_b": jnp.ones((1, 2))},
      "norm": {"scale": jnp.ones(2)},
      "embed_tokens": {"embedding": jnp.ones((3, 2))},
      "icm": {"content_query": jnp.ones(2), "output_scale": jnp.ones(2)},
  }
  mask = optim.decay_mask(params)
  assert mask["q_proj"] == {"kernel": True, "bias": False, "lora_a": True, "lora_b": True}
  assert not mask["norm"]["scale"] and not mask["embed_tokens"]["embedding"]
  zeros = jax.tree.map(jnp.zeros_like, params)  # Adam's own step is 0 for zero gradients.
  updates = _first_update(section, zeros, params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
    name = path[-1].key
    expected = -0.5 * 0.1 if name in optim.DECAYED_LEAVES else 0.0
    np.testing.assert_allclose(leaf, expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_optimizer_state_covers_only_what_it_is_given():
  tx = optim.make_optimizer(_section())
  trainable = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 4))}
  state = tx.init(trainable)
  sizes = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
  assert sizes == 2 * 16  # Two Adam moments per trainable element, nothing else.
  grads = jax.tree.map(jnp.ones_like, trainable)
  updates, _ = tx.update(grads, state, trainable)
  new = optax.apply_updates(trainable, updates)
  assert jax.tree.structure(new) == jax.tree.structure(trainable)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"learning_rate": 0.0}, r"config.optim.learning_rate = 0.0: expected a positive number"),
        ({"warmup_steps": 20, "total_steps": 10}, r"warmup_steps = 20: .*total_steps=10"),
        ({"warmup_steps": 10, "total_steps": 10}, r"warmup_steps = 10: .*the cosine needs a step"),
        ({"end_lr_ratio": 1.5}, r"end_lr_ratio = 1.5: expected a fraction"),
        ({"b2": 1.0}, r"config.optim.b2 = 1.0"),
        ({"grad_clip_norm": -1.0}, r"grad_clip_norm = -1.0"),
        ({"total_steps": "10"}, r"total_steps = '10': expected a positive integer"),
    ],
)
def test_invalid_fields_are_named(changes, message):
  section = {**_section().to_dict(), **changes}  # A plain dict takes any type.
  with pytest.raises(ConfigError, match=message):
    optim.make_optimizer(section)


def test_unknown_and_missing_fields_are_named():
  section = _section()
  section.lr = 1.0
  with pytest.raises(ConfigError, match=r"unknown field\(s\) \['lr'\]"):
    optim.validate(section)
  partial = {k: v for k, v in _section().items() if k not in ("eps", "b1")}
  with pytest.raises(ConfigError, match="config.optim.b1 is missing"):
    optim.validate(partial)
  partial["b1"] = 0.9
  optim.validate(partial)  # eps may be left out.
