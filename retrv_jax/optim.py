"""The optimizer of every training stage: AdamW, warmup + cosine decay, global-norm clipping.

    tx = optim.make_optimizer(optim.for_stage(config))   # config: a stage's section
    trainable, frozen = lora.partition(params, lora.path_regex(*lora.TRAINABLE))
    opt_state = tx.init(trainable)                      # only the trainable subset
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)

The trainer passes the trainable subset only (LoRA factors, the ICM, or whatever its
path predicate selects): frozen weights then hold no Adam moments and get no update.
Weight decay applies to matrices only, i.e. leaves named `kernel`, `lora_a` or `lora_b`;
norm scales, biases, embeddings and learned vectors are not decayed.

Gradient accumulation is the trainer's job (sum the micro-batch gradients inside its
jitted step, e.g. with `lax.scan`, divide, then call `update` once), not
`optax.MultiSteps`: one optimizer step per trainer step keeps the schedule, the step
counter and the checkpoints in the same units.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax

from retrv_jax.config import ConfigError

DECAYED_LEAVES = ("kernel", "lora_a", "lora_b")
FIELDS = ("learning_rate", "warmup_steps", "total_steps", "end_lr_ratio", "b1", "b2", "eps",
          "weight_decay", "grad_clip_norm")
OPTIONAL = {"eps": 1e-8}  # Fields a section may leave out, with their values.


def default_config() -> ml_collections.ConfigDict:
  """The `optim` section with its defaults; stage configs override fields."""
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-4  # Peak learning rate, reached at the end of warmup.
  c.warmup_steps = 100  # Linear warmup from 0 over this many optimizer steps.
  # Steps of the whole schedule (warmup included); cosine ends here. 0: the stage's `steps`,
  # so `--config.sft.steps=600` stretches the schedule with the run.
  c.total_steps = 0
  c.end_lr_ratio = 0.1  # Final learning rate as a fraction of the peak; held after total_steps.
  c.b1 = 0.9  # Adam first-moment decay.
  c.b2 = 0.999  # Adam second-moment decay.
  c.eps = 1e-8  # Adam denominator epsilon.
  c.weight_decay = 0.0  # Decoupled weight decay (times the learning rate) on matrices.
  c.grad_clip_norm = 1.0  # Clip gradients to this global L2 norm; 0 disables clipping.
  return c


def _field(section: Mapping[str, Any], name: str) -> Any:
  if name not in section and name in OPTIONAL:
    return OPTIONAL[name]
  if name not in section:
    raise ConfigError(f"config.optim.{name} is missing; the section has {sorted(section)}")
  return section[name]


def for_stage(stage: Mapping[str, Any]) -> dict[str, Any]:
  """The `optim` section of a stage config (`steps`, `optim`), `total_steps` 0 resolved to
  the stage's `steps`."""
  section = dict(stage["optim"])
  if section.get("total_steps") == 0:
    section["total_steps"] = stage["steps"]
  return section


def validate(section: Mapping[str, Any]) -> None:
  """Stops with the field, its value and what is allowed when a value cannot work."""
  unknown = sorted(set(section) - set(FIELDS))
  if unknown:
    raise ConfigError(f"config.optim: unknown field(s) {unknown}; known fields are {FIELDS}")

  def check(name: str, ok, expected: str) -> None:
    value = _field(section, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
      raise ConfigError(f"config.optim.{name} = {value!r}: expected {expected}")

  check("learning_rate", lambda v: v > 0, "a positive number")
  check("total_steps", lambda v: isinstance(v, int) and v > 0,
        "a positive integer (for_stage resolves a stage's 0 to its steps)")
  total = _field(section, "total_steps")
  check("warmup_steps", lambda v: isinstance(v, int) and 0 <= v < total,
        f"an integer in [0, total_steps={total}) (the cosine needs a step)")
  check("end_lr_ratio", lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
  check("b1", lambda v: 0 <= v < 1, "a number in [0, 1)")
  check("b2", lambda v: 0 <= v < 1, "a number in [0, 1)")
  check("eps", lambda v: v > 0, "a positive number")
  check("weight_decay", lambda v: v >= 0, "a non-negative number")
  check("grad_clip_norm", lambda v: v >= 0, "a non-negative number (0: no clipping)")


def make_schedule(section: Mapping[str, Any]) -> optax.Schedule:
  """Learning rate per optimizer step: 0 -> peak over warmup, cosine to peak·end_lr_ratio."""
  validate(section)
  peak = float(_field(section, "learning_rate"))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=int(_field(section, "warmup_steps")),
      decay_steps=int(_field(section, "total_steps")),
      end_value=peak * float(_field(section, "end_lr_ratio")),
  )


def learning_rate_at(section: Mapping[str, Any], step: int) -> float:
  """The learning rate the update of optimizer step `step` (0-based) uses, for metrics."""
  return float(make_schedule(section)(step))


def decay_mask(params: Any) -> Any:
  """True on the leaves weight decay applies to (named `kernel`, `lora_a`, `lora_b`)."""

  def decayed(path, _) -> bool:
    last = path[-1] if path else None
    return getattr(last, "key", getattr(last, "name", None)) in DECAYED_LEAVES

  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(section: Mapping[str, Any]) -> optax.GradientTransformation:
  """Clip by global norm (if > 0), then AdamW with the schedule and masked weight decay.

  Args:
    section: the config's `optim` section (see `default_config` for the fields).

  Returns:
    An optax transformation for the trainable subset of the params (see module doc).
  """
  schedule = make_schedule(section)
  adamw = optax.adamw(
      learning_rate=schedule,
      b1=float(_field(section, "b1")),
      b2=float(_field(section, "b2")),
      eps=float(_field(section, "eps")),
      weight_decay=float(_field(section, "weight_decay")),
      mask=decay_mask,
  )
  clip = float(_field(section, "grad_clip_norm"))
  return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
