"""The list curriculum of pretraining's `point` task (`retrv_jax.stages.lists`): rungs
parsed and checked, the per-step schedule, and the lists drawn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrv_jax.stages import lists

FIELD = "config.pretrain.point_curriculum"


def _parse(text: str, steps: int = 1000, k: int = 10):
  return lists.parse(text, num_candidates=k, steps=steps, field=FIELD)


def test_rungs_end_where_their_steps_add_up():
  assert _parse("3:easy:250,5:easy:400,10:all") == (
      lists.Rung(3, False, 250), lists.Rung(5, False, 650), lists.Rung(10, True, 1000))
  assert _parse("10:all") == (lists.Rung(10, True, 1000),)


def test_schedule_gives_each_step_its_rung():
  rungs = _parse("2:easy:2,3:all:3,4:easy", steps=7, k=4)
  schedule = [(rungs[i].size, rungs[i].hard)
              for i in (int(lists.rung_index(rungs, jnp.int32(s))) for s in range(7))]
  assert schedule == [(2, False), (2, False), (3, True), (3, True), (3, True), (4, False),
                      (4, False)]
  # Past the stage's steps (a resumed run with more steps) the last rung goes on.
  assert int(lists.rung_index(rungs, jnp.int32(50))) == 2


@pytest.mark.parametrize("text, detail", [
    ("", "no rung"),
    ("3:easy,10:all", "needs steps"),
    ("3:easy:100,10:all:100", "takes no steps"),
    ("1:easy:100,10:all", r"size must be in \[2, data.num_candidates=10\]"),
    ("3:easy:100,11:all", "size must be in"),
    ("3:hard:100,10:all", r"negatives must be one of \('easy', 'all'\)"),
    ("three:easy:100,10:all", "non-integer"),
    ("3:easy:0,10:all", "at least one step"),
    ("3:easy:600,5:easy:400,10:all", "leaves no step of the stage's 1000"),
])
def test_a_bad_curriculum_is_named(text, detail):
  with pytest.raises(ValueError, match=rf"{FIELD} = .*{detail}"):
    _parse(text)


def _draw(seed: int, gt, hard, size: int, allow_hard: bool):
  index, target = lists.sample(jax.random.key(seed), jnp.asarray(gt, jnp.int32),
                               jnp.asarray(hard, bool), size, allow_hard)
  return np.asarray(index), np.asarray(target)


def test_lists_hold_the_positive_at_its_target_and_no_candidate_twice():
  k, rows = 10, 64
  rng = np.random.default_rng(0)
  gt = rng.integers(0, k, rows)
  hard = rng.random((rows, k)) < 0.2
  hard[np.arange(rows), gt] = False
  for size in (2, 5, 10):
    for allow_hard in (False, True):
      index, target = _draw(size, gt, hard, size, allow_hard)
      assert index.shape == (rows, size) and index.dtype == np.int32
      np.testing.assert_array_equal(index[np.arange(rows), target], gt)
      assert all(len(set(row)) == size for row in index.tolist())
      assert index.min() >= 0 and index.max() < k


def test_easy_lists_leave_hard_negatives_out_while_easy_ones_remain():
  # Row 0: hard negatives 1 and 2 and seven easy ones; row 1: nine hard ones.
  gt = [0, 0]
  hard = np.zeros((2, 10), bool)
  hard[0, [1, 2]] = True
  hard[1, 1:] = True
  for seed in range(20):
    index, _ = _draw(seed, gt, hard, 8, False)
    assert not hard[0, index[0]].any()  # Seven easy negatives: enough for a list of eight.
    assert set(index[1]) - {0} <= set(range(1, 10))  # Only hard ones left: they fill in.
    index, _ = _draw(seed, gt, hard, 10, False)
    assert sorted(index[0]) == list(range(10))  # The whole list: hard ones included.
  # 'all' draws hard negatives like easy ones: 3 of the 9 negatives miss both hard ones
  # with probability C(7, 3) / C(9, 3) = 35 / 84.
  draws = [_draw(seed, gt[:1], hard[:1], 4, True)[0][0] for seed in range(300)]
  with_hard = np.mean([hard[0, d].any() for d in draws])
  assert abs(with_hard - (1 - 35 / 84)) < 0.08


def test_the_positive_lands_in_every_place_alike_and_a_row_without_one_gets_minus_one():
  rows = 4000
  index, target = _draw(1, np.full(rows, 3), np.zeros((rows, 10), bool), 5, True)
  counts = np.bincount(target, minlength=5)
  np.testing.assert_allclose(counts / rows, 0.2, atol=0.03)
  _, target = _draw(2, [-1, 4], np.zeros((2, 10), bool), 3, True)
  assert target[0] == -1 and target[1] >= 0
