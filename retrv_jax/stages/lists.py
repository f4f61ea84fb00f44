"""The list curriculum of pretraining's `point` task: how many candidates a pointing row
shows at each step, and whether hard negatives may be among them.

A curriculum is a comma-separated string of rungs `size:negatives[:steps]`, e.g.

    "3:easy:250,5:easy:400,10:all"

  size       candidates in the list (2 .. data.num_candidates);
  negatives  'easy': the positive with negatives outside the query's `neg_cand_list`
             (hard ones only where too few easy ones are left), 'all': any of the
             stage-I negatives;
  steps      the rung's length in optimizer steps; the last rung has none and runs to the
             stage's end.

Small lists first: finding the one match among several and naming its label is a circuit a
small LM forms only after a plateau that grows with the list's length (README: the tiny
model's pretraining). Each step's lists are drawn in jit from the step's key: a positive
and `size - 1` negatives of the query's stage-I list, in a random order, so the positive's
label is uniform over the list.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEGATIVES = ("easy", "all")


@dataclasses.dataclass(frozen=True)
class Rung:
  size: int  # Candidates per list.
  hard: bool  # Whether hard negatives may be drawn ('all').
  end: int  # The first step past the rung.


def parse(text: str, *, num_candidates: int, steps: int, field: str) -> tuple[Rung, ...]:
  """The rungs of `text`; every malformed or inconsistent part is named with `field`."""

  def fail(detail: str) -> ValueError:
    return ValueError(f"{field} = {text!r}: {detail}; expected rungs 'size:easy|all[:steps]', "
                      "comma-separated, the last without steps (e.g. '3:easy:250,10:all')")

  parts = [p.strip() for p in str(text).split(",") if p.strip()]
  if not parts:
    raise fail("no rung")
  rungs, start = [], 0
  for i, part in enumerate(parts):
    last = i == len(parts) - 1
    fields = part.split(":")
    if len(fields) != (2 if last else 3):
      raise fail(f"rung {part!r} " + ("(the last) takes no steps" if last else "needs steps"))
    try:
      size, length = int(fields[0]), (int(fields[2]) if not last else steps - start)
    except ValueError:
      raise fail(f"rung {part!r} has a non-integer size or steps") from None
    if not 2 <= size <= num_candidates:
      raise fail(f"rung {part!r}: size must be in [2, data.num_candidates={num_candidates}]")
    if fields[1] not in NEGATIVES:
      raise fail(f"rung {part!r}: negatives must be one of {NEGATIVES}")
    if length < 1:
      raise fail(f"rung {part!r} leaves no step of the stage's {steps}" if last
                 else f"rung {part!r} must last at least one step")
    start += length
    rungs.append(Rung(size, fields[1] == "all", start))
  return tuple(rungs)


def rung_index(rungs: tuple[Rung, ...], step: jax.Array) -> jax.Array:
  """The rung that optimizer step `step` (0-based, traced) trains on."""
  ends = jnp.asarray([r.end for r in rungs[:-1]], jnp.int32)
  return jnp.sum(step >= ends).astype(jnp.int32)


def sample(key: jax.Array, gt_index: jax.Array, hard_negatives: jax.Array, size: int,
           hard: bool) -> tuple[jax.Array, jax.Array]:
  """Draws one list per row: `index [B, size]` (candidates of the stage-I list, in list
  order) and `target [B]` (the positive's place in it; -1 where the row has none).

  The positive is always in; negatives are drawn uniformly, hard ones (`hard_negatives
  [B, K]`) only when `hard` or when the easy ones are too few.
  """
  b, k = hard_negatives.shape
  pick_key, order_key = jax.random.split(key)
  candidates = jnp.arange(k)[None]
  positive = candidates == gt_index[:, None]
  # Priority: the positive, then allowed negatives, then the rest, each at random.
  allowed = hard_negatives if hard else jnp.zeros_like(hard_negatives)
  tier = jnp.where(positive, 2.0, jnp.where(hard_negatives & ~allowed, 0.0, 1.0))
  _, chosen = jax.lax.top_k(tier + jax.random.uniform(pick_key, (b, k)), size)
  order = jnp.argsort(jax.random.uniform(order_key, (b, size)), axis=-1)
  index = jnp.take_along_axis(chosen, order, axis=-1).astype(jnp.int32)
  target = jnp.argmax(index == gt_index[:, None], axis=-1).astype(jnp.int32)
  return index, jnp.where(gt_index >= 0, target, -1)
