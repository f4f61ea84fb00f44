"""The vision stage's data and loss: per-cell labels, a deterministic resumable stream, and
the per-head cross-entropy and accuracy on hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from retrv_jax.data import scene_images
from retrv_jax.data.images import ImageConfig
from retrv_jax.data.scene import Scene, SceneObject, SceneSpec
from retrv_jax.stages import vision

SCENE = Scene("gray", (SceneObject("red", "circle", "large", "top left"),
                       SceneObject("blue", "square", "small", "center")))
_ = -1  # An empty cell: no label.
GOLDEN = [1,  # gray
          1, 0, 0, 0, 1, 0, 0, 0, 0,  # occupied: top left, center
          0, _, _, _, 2, _, _, _, _,  # red, blue
          0, _, _, _, 1, _, _, _, _,  # circle, square
          1, _, _, _, 0, _, _, _, _]  # large, small


def _source(seed=0):
  return scene_images.SceneImages(SceneSpec(), image_size=56,
                                  image_config=ImageConfig(min_pixels=56 * 56,
                                                           max_pixels=56 * 56), seed=seed)


def test_scene_labels_golden():
  np.testing.assert_array_equal(scene_images.scene_labels(SCENE), GOLDEN)
  assert scene_images.NUM_LABELS == len(GOLDEN)
  assert scene_images.NUM_LOGITS == 4 + 9 * (2 + 6 + 5 + 2)


def test_examples_depend_on_seed_and_index_alone():
  a, b = _source(), _source()
  first, again, other = a(3), b(3), a(4)
  assert first["pixel_values"].shape == (16, 3 * 2 * 14 * 14)
  assert first["pixel_values"].dtype == np.float32 and first["labels"].dtype == np.int32
  np.testing.assert_array_equal(first["pixel_values"], again["pixel_values"])
  np.testing.assert_array_equal(first["labels"], again["labels"])
  assert not np.array_equal(first["pixel_values"], other["pixel_values"])
  assert not np.array_equal(_source(seed=1)(3)["pixel_values"], first["pixel_values"])
  assert a.grid_thw() == (1, 4, 4)


def test_a_restored_iterator_continues_the_stream():
  ds = scene_images.dataset(_source(), batch_size=2, num_batches=5)
  it = iter(ds)
  next(it)
  state = it.get_state()
  expected = [next(it)["labels"] for _ in range(3)]
  with pytest.raises(StopIteration):
    next(it), next(it)
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["labels"], want)


def test_head_losses_golden():
  """Zero logits: cross-entropy ln(classes) per labelled cell; argmax is class 0."""
  labels = jnp.asarray([GOLDEN])
  out = vision.head_losses(jnp.zeros((1, scene_images.NUM_LOGITS)), labels)
  expected = {"background": (math.log(4), 0, 1), "occupied": (9 * math.log(2), 7, 9),
              "color": (2 * math.log(6), 1, 2), "shape": (2 * math.log(5), 1, 2),
              "size": (2 * math.log(2), 1, 2)}
  assert set(out) == set(expected)
  for name, (ce, correct, count) in expected.items():
    np.testing.assert_allclose([float(x) for x in out[name]], [ce, correct, count], rtol=1e-6,
                               err_msg=name)


def test_head_losses_read_each_head_from_its_own_logits():
  """A logit of +10 on the right class of every label: loss near 0, all correct."""
  logits = np.zeros(scene_images.NUM_LOGITS, np.float32)
  offset = column = 0
  for _name, classes, columns in scene_images.HEADS:
    for c in range(columns):
      label = GOLDEN[column + c]
      if label >= 0:
        logits[offset + c * classes + label] = 10.0
    offset, column = offset + classes * columns, column + columns
  out = vision.head_losses(jnp.asarray(logits[None]), jnp.asarray([GOLDEN]))
  for name, (ce, correct, count) in out.items():
    assert float(ce) < 1e-2 * float(count), name
    assert float(correct) == float(count), name
