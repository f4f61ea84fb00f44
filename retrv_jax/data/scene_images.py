"""Rendered scenes with per-cell attribute labels: the supervised data of the `vision` stage.

Example `i` is a function of (seed, i) alone: a scene drawn from a `SceneSpec`, rendered at
`image_size` with the benchmark's renderer and preprocessed as the pipeline does, so the
stream is endless, needs no files, and a grain iterator's state resumes it exactly.

Labels, one int32 row per image (-1 where a cell is empty, so no loss there):

    [background, occupied x 9 cells, colour x 9, shape x 9, size x 9]

in `scene.CELLS` order; `HEADS` names each group and its number of classes.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from retrv_jax.data import scene as scene_lib
from retrv_jax.data.images import ImageConfig, image_grid_thw, preprocess_image

# (name, classes, number of label columns) in label order.
HEADS = (
    ("background", len(scene_lib.BACKGROUNDS), 1),
    ("occupied", 2, len(scene_lib.CELLS)),
    ("color", len(scene_lib.COLORS), len(scene_lib.CELLS)),
    ("shape", len(scene_lib.SHAPES), len(scene_lib.CELLS)),
    ("size", len(scene_lib.SIZES), len(scene_lib.CELLS)),
)
NUM_LABELS = sum(columns for _, _, columns in HEADS)
NUM_LOGITS = sum(classes * columns for _, classes, columns in HEADS)
IGNORE = -1


def scene_labels(scene: scene_lib.Scene) -> np.ndarray:
  """`[NUM_LABELS]` int32: the background, then occupancy and attributes per cell."""
  cells = len(scene_lib.CELLS)
  labels = np.full(NUM_LABELS, IGNORE, np.int32)
  labels[0] = scene_lib.BACKGROUNDS.index(scene.background)
  labels[1:1 + cells] = 0
  for obj in scene.objects:
    cell = scene_lib.CELLS.index(obj.position)
    labels[1 + cell] = 1
    labels[1 + cells + cell] = scene_lib.COLORS.index(obj.color)
    labels[1 + 2 * cells + cell] = scene_lib.SHAPES.index(obj.shape)
    labels[1 + 3 * cells + cell] = scene_lib.SIZES.index(obj.size)
  return labels


@dataclasses.dataclass(frozen=True)
class SceneImages:
  """Index -> {'pixel_values' [patches, patch_dim] float32, 'labels' [NUM_LABELS] int32}."""

  spec: scene_lib.SceneSpec
  image_size: int  # Rendering side in pixels (the benchmark's image_size).
  image_config: ImageConfig  # What the model sees (resize, normalise, patchify).
  seed: int

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, int(index)])
    scene = scene_lib.sample_scene(rng, self.spec)
    image = np.asarray(scene_lib.render(scene, self.image_size, rng))
    pixel_values, _ = preprocess_image(image, self.image_config, name=f"scene {index}")
    return {"pixel_values": pixel_values, "labels": scene_labels(scene)}

  def grid_thw(self) -> tuple[int, int, int]:
    """The (t, h, w) patch grid every image of the stream has."""
    return image_grid_thw(self.image_size, self.image_size, self.image_config)


def dataset(source: SceneImages, batch_size: int, num_batches: int) -> grain.MapDataset:
  """`num_batches` batches of `batch_size` consecutive examples."""
  return grain.MapDataset.range(num_batches * batch_size).map(source).batch(
      batch_size, drop_remainder=True)
